"""segnet: the SegNet application (model, datasets, training, evaluation, prediction),
built on segnet_ext's layers. The command line is ``segnet`` (``python -m segnet``).

    model = segnet.load_pretrained()   # segnet_basic_camvid_v7, eval mode; model.dataset: its classes
"""
from .checkpoint import load_pretrained, pretrained_names
from .data import CLASSES, NUM_CLASSES, PALETTE, VOID, CamVid, SegmentationDataset, median_frequency_weights
from .description import DatasetDescription, load_description
from .metrics import confusion_matrix, scores
from .model import SegNet, SegNetBasic, build_model, load_encoder_weights
from .train import TrainConfig, Trainer, train

__all__ = [
    "load_pretrained", "pretrained_names",
    "CLASSES", "NUM_CLASSES", "PALETTE", "VOID", "CamVid", "SegmentationDataset", "median_frequency_weights",
    "DatasetDescription", "load_description",
    "confusion_matrix", "scores",
    "SegNet", "SegNetBasic", "build_model", "load_encoder_weights",
    "TrainConfig", "Trainer", "train",
]
