"""torch.hub entry points: ``torch.hub.load(path_to_checkout, "segnet_basic_camvid_v7", source="local")``.

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


def _segnet_basic(name: str, pretrained: bool, device: str, backend):
    segnet = _segnet()
    if not pretrained:  # the network the bundled file's settings describe (input norm included), fresh weights
        from segnet.checkpoint import PRETRAINED, build_from_config, checkpoint_description, load_checkpoint

        state = load_checkpoint(PRETRAINED / f"{name}.pt")
        model = build_from_config(state["config"], segnet.NUM_CLASSES, backend)
        model.dataset = checkpoint_description(state)
        return model.to(device)
    return segnet.load_pretrained(name, device, backend)


def segnet_basic_camvid_v7(pretrained: bool = True, device: str = "cpu", backend=None):
    """SegNet-Basic trained on CamVid train+val (11 classes, 360x480 road scenes) with the recipe
    chosen on a held-out street (local contrast normalisation of the input, whole-image 360x480
    crops, 80 epochs, a moving average of the weights), in eval mode; ``model.dataset`` names its
    classes and colours. ``pretrained=False``: random weights."""
    return _segnet_basic("segnet_basic_camvid_v7", pretrained, device, backend)


def segnet_basic_camvid_v6(pretrained: bool = True, device: str = "cpu", backend=None):
    """v7's recipe without local contrast normalisation of the input, which trails it by 2.0 mIoU
    and 1.7 G at 40 epochs on a held-out street (README, Choosing settings that hold on unseen
    streets)."""
    return _segnet_basic("segnet_basic_camvid_v6", pretrained, device, backend)


def segnet_basic_camvid_v5(pretrained: bool = True, device: str = "cpu", backend=None):
    """v6's recipe without the moving average of the weights: its trained weights, 0.6 mIoU and
    0.8 G below their average at 80 epochs on a held-out street (README, Choosing settings that
    hold on unseen streets)."""
    return _segnet_basic("segnet_basic_camvid_v5", pretrained, device, backend)


def segnet_basic_camvid_v4(pretrained: bool = True, device: str = "cpu", backend=None):
    """v5's recipe with 288x384 crops, which score 1.0 mIoU and 1.6 G below v5's whole images at
    80 epochs on a held-out street (within one run's spread: README, Choosing settings that hold
    on unseen streets)."""
    return _segnet_basic("segnet_basic_camvid_v4", pretrained, device, backend)


def segnet_basic_camvid_v3(pretrained: bool = True, device: str = "cpu", backend=None):
    """v2's settings trained on CamVid train+val: v4's recipe with 192x256 crops, which score 1.1
    mIoU below v4's 288x384 at 80 epochs on a held-out street (README, Choosing settings that
    hold on unseen streets)."""
    return _segnet_basic("segnet_basic_camvid_v3", pretrained, device, backend)


def segnet_basic_camvid_v2(pretrained: bool = True, device: str = "cpu", backend=None):
    """v3's recipe trained on CamVid train only, so CamVid val measures it (mIoU 55.4);
    ``segnet_basic_camvid_v3`` adds val's images (+1.4 mIoU on a held-out street for its recipe,
    about one run's spread: README, Choosing settings that hold on unseen streets)."""
    return _segnet_basic("segnet_basic_camvid_v2", pretrained, device, backend)


def segnet_basic_camvid(pretrained: bool = True, device: str = "cpu", backend=None):
    """The first SegNet-Basic trained on CamVid (median-frequency class weights, 60 epochs);
    v2 to v7 (the default) use recipes chosen on a held-out street, and score higher."""
    return _segnet_basic("segnet_basic_camvid", pretrained, device, backend)
