"""torch.hub entry points: ``torch.hub.load(path_to_checkout, "segnet_basic_camvid", source="local")``.

Uses the installed ``segnet`` package, else the checkout's ``python/`` folder (then with
``backend="torch"`` where segnet_ext's compiled kernels are not built)."""
import os
import sys

dependencies = ["torch", "numpy", "PIL"]


def _segnet():
    try:
        import segnet
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "python"))
        import segnet
    return segnet


def segnet_basic_camvid(pretrained: bool = True, device: str = "cpu", backend=None):
    """SegNet-Basic trained on CamVid (11 classes, 360x480 road scenes), in eval mode;
    ``model.dataset`` names its classes and colours. ``pretrained=False``: random weights."""
    segnet = _segnet()
    if not pretrained:
        model = segnet.build_model("segnet_basic", segnet.NUM_CLASSES, backend or "segnet_ext")
        model.dataset = segnet.load_description("camvid")
        return model.to(device)
    return segnet.load_pretrained("segnet_basic_camvid", device, backend)
