"""segnet: the SegNet application (model, CamVid data, training, evaluation, prediction),
built on segnet_ext's layers. The command line is ``segnet`` (``python -m segnet``)."""
from .data import CLASSES, NUM_CLASSES, PALETTE, VOID, CamVid, median_frequency_weights
from .metrics import confusion_matrix, scores
from .model import SegNet, SegNetBasic, build_model, load_encoder_weights
from .train import TrainConfig, Trainer, train

__all__ = [
    "CLASSES", "NUM_CLASSES", "PALETTE", "VOID", "CamVid", "median_frequency_weights",
    "confusion_matrix", "scores",
    "SegNet", "SegNetBasic", "build_model", "load_encoder_weights",
    "TrainConfig", "Trainer", "train",
]
