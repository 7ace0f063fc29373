"""segnet: the SegNet application (model, CamVid data, training, evaluation, prediction),
built on segnet_ext's layers."""
