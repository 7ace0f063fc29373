"""SegNet and SegNet-Basic (Badrinarayanan, Kendall, Cipolla, TPAMI 2017).

Both networks come in two backends with identical ``state_dict`` keys, so a checkpoint
moves freely between them:

- ``backend="segnet_ext"``: fused conv-BN-ReLU blocks (the output of each block is
  recomputed in backward, not stored), 2-bit arg-max pooling and sparse unpooling
  (1/32 of the index memory of torch's pooling);
- ``backend="torch"``: ``nn.Sequential(Conv2d, BatchNorm2d, ReLU)`` blocks,
  ``nn.MaxPool2d(return_indices=True)`` / ``nn.MaxUnpool2d``, what
  plain-PyTorch SegNet implementations run, and the path for ONNX / TorchScript export.

Pooling uses ceil mode, so every input size >= 1x1 works and the logits always have the
input's size (360x480 pools to 180x240, 90x120, 45x60, 23x30, 12x15).

``dropout=p`` adds Bayesian SegNet's dropout (Kendall, Badrinarayanan, Cipolla, BMVC 2017) at
its best placement, the central encoder and decoder stages: after the pools of the deepest
encoder stages and after the deepest decoder stages (two each in SegNet-Basic, three in
SegNet, as the authors' Bayesian SegNet releases). It trains with dropout and evaluates
without (weight averaging); it adds no weights, so ``state_dict`` keys do not change.

``input_norm="lcn"`` runs the input through :class:`LocalContrastNorm` first, as the first
SegNet (arXiv 1505.07293) did to its RGB input against uneven lighting: each pixel is seen
relative to its neighbourhood's mean and contrast. ``input_norm="rgb+lcn"`` gives the
network both, the input and its LCN stacked as channels (:class:`WithLocalContrast`): what LCN
removes (the colour's level, the lighting) stays visible to it. That doubles the first
convolution's input channels; neither adds other weights. Checkpoints record the choice in
their config, which ``segnet`` reads.
"""
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import segnet_ext

BACKENDS = ("segnet_ext", "torch")
MODELS = ("segnet", "segnet_basic")
INPUT_NORMS = ("none", "lcn", "rgb+lcn")

# VGG16's 13 convolutions as 5 stages of output widths.
VGG16_STAGES: Tuple[Tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Its mirror: each decoder stage ends at the width its encoder stage received; the 13th
# convolution is the classifier (64 -> num_classes).
DECODER_STAGES: Tuple[Tuple[int, ...], ...] = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True,
                 backend: str = "segnet_ext") -> nn.Module:
    """Conv2d -> BatchNorm2d (-> ReLU), keys ``0.*`` (conv) and ``1.*`` (BN): segnet_ext's fused
    :class:`~segnet_ext.ConvBNReLU2d`, or the plain ``nn.Sequential`` for the torch backend."""
    if backend == "segnet_ext":
        return segnet_ext.ConvBNReLU2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, relu=relu)
    layers: List[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Pool(nn.Module):
    """2x2/stride-2 arg-max pooling in ceil mode, returning (values, indices)."""

    def __init__(self, backend: str):
        super().__init__()
        if backend == "segnet_ext":
            self.pool = segnet_ext.nn.MaxPool2x2(ceil_mode=True, return_indices=True)
        else:
            self.pool = nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.pool(x)


class _Unpool(nn.Module):
    """The inverse of :class:`_Pool`: values back at their arg-max, zeros elsewhere."""

    def __init__(self, backend: str):
        super().__init__()
        self.unpool = segnet_ext.nn.MaxUnpool2x2() if backend == "segnet_ext" else nn.MaxUnpool2d(2, 2)

    def forward(self, x: Tensor, indices: Tensor, size: Sequence[int]) -> Tensor:
        # int(): under tracing (TorchScript / ONNX export) sizes are tensors, which
        # torch's unpool rejects; exports are therefore fixed to their example size.
        output_size = [int(s) for s in size[-2:]]
        if torch.onnx.is_in_onnx_export() and isinstance(self.unpool, nn.MaxUnpool2d):
            # ONNX has no exporter for aten::max_unpool2d; the same scatter exports.
            N, C = x.shape[:2]
            flat = x.new_zeros(N, C, output_size[0] * output_size[1])
            return flat.scatter(2, indices.flatten(2), x.flatten(2)).view(N, C, *output_size)
        return self.unpool(x, indices, output_size=output_size)


class LocalContrastNorm(nn.Module):
    """Local contrast normalisation (Jarrett et al., ICCV 2009), the divisive step across
    channels: ``v = x - mean_w(x)`` per channel, ``y = v / max(s, mean(s), eps)`` with
    ``s = sqrt(sum_c mean_w(v_c^2))``, where ``mean_w`` averages over a ``window``-pixel
    box applied twice (a triangle kernel ``2 * window - 1`` wide, pixels outside the
    image left out) and ``mean(s)`` is the image's mean ``s``, so that flat regions are
    not amplified to noise. An offset per channel and a positive gain common to all
    channels cancel (but for the ``eps`` floor). Runs in float32 under autocast; any
    size >= 1x1."""

    def __init__(self, window: int = 9, eps: float = 1e-4):
        super().__init__()
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd number of pixels >= 1, got {window!r}")
        self.window, self.eps = window, eps

    def _mean(self, x: Tensor) -> Tensor:
        k, p = self.window, self.window // 2
        for _ in range(2):  # the box is separable: rows, then columns
            for size, pad in (((k, 1), (p, 0)), ((1, k), (0, p))):
                x = nn.functional.avg_pool2d(x, size, 1, pad, count_include_pad=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        v = x - self._mean(x)
        s = self._mean(v.square().sum(1, keepdim=True)).sqrt()  # the mean is linear: sum the channels first
        floor = s.mean((2, 3), keepdim=True).clamp_min(self.eps)
        return v / torch.maximum(s, floor)

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}"


class WithLocalContrast(nn.Module):
    """The input and its :class:`LocalContrastNorm` stacked as channels: ``[N, C, H, W]`` in,
    ``[N, 2C, H, W]`` out (float32 under autocast, as LCN)."""

    def __init__(self, window: int = 9, eps: float = 1e-4):
        super().__init__()
        self.lcn = LocalContrastNorm(window, eps)

    def forward(self, x: Tensor) -> Tensor:
        y = self.lcn(x)
        return torch.cat([x.to(y.dtype), y], 1)


def _input_norm(name: str, in_channels: int) -> Tuple[nn.Module, int]:
    """The module of ``input_norm`` ``name`` (one of :data:`INPUT_NORMS`) and the channels it
    gives the first convolution from ``in_channels``."""
    if name not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {name!r}")
    module, factor = {"none": (nn.Identity, 1), "lcn": (LocalContrastNorm, 1), "rgb+lcn": (WithLocalContrast, 2)}[name]
    return module(), factor * in_channels


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class _EncoderDecoder(nn.Module):
    """Encoder stages each followed by a pool; decoder stages each preceded by an unpool
    to the exact size the matching encoder stage had."""

    encoder: nn.ModuleList
    decoder: nn.ModuleList

    def __init__(self, backend: str, input_norm: str, num_classes: int, in_channels: int):
        super().__init__()
        _check_backend(backend)
        self.backend, self.num_classes, self.in_channels = backend, num_classes, in_channels
        self.input_norm, self.stem_channels = _input_norm(input_norm, in_channels)  # stem: the first convolution's input

    def _build_pools(self, stages: int, dropout: float, central: int) -> None:
        """Pools and unpools for ``stages`` stages; dropout ``p`` after the deepest ``central``
        encoder pools and decoder stages (nn.Identity elsewhere, and everywhere when p is 0)."""
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.pools = nn.ModuleList(_Pool(self.backend) for _ in range(stages))
        self.unpools = nn.ModuleList(_Unpool(self.backend) for _ in range(stages))

        def drop(i: int) -> nn.Module:
            return nn.Dropout(dropout) if dropout > 0 and i < central else nn.Identity()

        self.encoder_dropout = nn.ModuleList(drop(stages - 1 - i) for i in range(stages))  # deepest last
        self.decoder_dropout = nn.ModuleList(drop(i) for i in range(stages))  # deepest first

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images [N, 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        x = self.input_norm(x)
        skips = []
        for stage, pool, drop in zip(self.encoder, self.pools, self.encoder_dropout):
            x = stage(x)
            size = x.shape
            x, indices = pool(x)
            x = drop(x)
            skips.append((indices, size))
        for stage, unpool, drop in zip(self.decoder, self.unpools, self.decoder_dropout):
            indices, size = skips.pop()
            x = drop(stage(unpool(x, indices, size)))
        return self.classifier(x)


class SegNet(_EncoderDecoder):
    """The paper's SegNet: a VGG16-BN encoder (13 conv-BN-ReLU in 5 stages) and a mirrored
    decoder (13 convolutions); the last one gives ``num_classes`` logits, without BN/ReLU.
    ``dropout``, ``input_norm``: see the module's doc (three central stages)."""

    def __init__(self, num_classes: int = 11, in_channels: int = 3, backend: str = "segnet_ext", dropout: float = 0.0,
                 input_norm: str = "none"):
        super().__init__(backend, input_norm, num_classes, in_channels)
        self.encoder = _stages(VGG16_STAGES, self.stem_channels, backend)
        self.decoder = _stages(DECODER_STAGES, VGG16_STAGES[-1][-1], backend)
        self.classifier = _classifier(64, num_classes, 3, backend)
        self._build_pools(len(VGG16_STAGES), dropout, central=3)
        _init_weights(self)


class SegNetBasic(_EncoderDecoder):
    """The paper's SegNet-Basic: 4 encoder stages of one 7x7 conv-BN-ReLU (64 channels),
    4 decoder stages of unpool + 7x7 conv-BN (no ReLU, as the reference release), and a
    1x1 classifier. ``dropout``, ``input_norm``: see the module's doc (two central stages)."""

    def __init__(self, num_classes: int = 11, in_channels: int = 3, backend: str = "segnet_ext", width: int = 64,
                 dropout: float = 0.0, input_norm: str = "none"):
        super().__init__(backend, input_norm, num_classes, in_channels)
        self.encoder = nn.ModuleList(
            nn.Sequential(conv_bn_relu(self.stem_channels if i == 0 else width, width, 7, backend=backend)) for i in range(4)
        )
        self.decoder = nn.ModuleList(nn.Sequential(conv_bn_relu(width, width, 7, relu=False, backend=backend)) for _ in range(4))
        self.classifier = _classifier(width, num_classes, 1, backend)
        self._build_pools(4, dropout, central=2)
        _init_weights(self)


def _stages(stages: Tuple[Tuple[int, ...], ...], width: int, backend: str) -> nn.ModuleList:
    """One nn.Sequential of 3x3 conv-BN-ReLU blocks per stage, with the given output widths."""
    out = []
    for widths in stages:
        blocks = []
        for w in widths:
            blocks.append(conv_bn_relu(width, w, backend=backend))
            width = w
        out.append(nn.Sequential(*blocks))
    return nn.ModuleList(out)


def _classifier(in_channels: int, num_classes: int, kernel_size: int, backend: str) -> nn.Conv2d:
    # segnet_ext's Conv2d recomputes its input (the last block's output) in backward
    conv = segnet_ext.nn.Conv2d if backend == "segnet_ext" else nn.Conv2d
    return conv(in_channels, num_classes, kernel_size, padding=kernel_size // 2)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def build_model(name: str, num_classes: int = 11, backend: str = "segnet_ext", dropout: float = 0.0,
                input_norm: str = "none") -> _EncoderDecoder:
    """``segnet`` or ``segnet_basic``."""
    if name == "segnet":
        return SegNet(num_classes, backend=backend, dropout=dropout, input_norm=input_norm)
    if name == "segnet_basic":
        return SegNetBasic(num_classes, backend=backend, dropout=dropout, input_norm=input_norm)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def load_encoder_weights(model: SegNet, path: Union[str, Path]) -> List[str]:
    """Initialise the encoder from a torchvision ``vgg16_bn`` or ``vgg16`` state dict saved
    at ``path`` (``torch.save(torchvision.models.vgg16_bn(weights=...).state_dict(), path)``).
    Nothing is downloaded. Returns the names of the loaded encoder tensors."""
    if not isinstance(model, SegNet):
        raise ValueError(f"encoder weights are VGG16 weights and fit only SegNet, not {type(model).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights: no such file {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"encoder weights: {str(path)!r} is not a loadable torch state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return _copy_vgg_features(model, state, str(path))


def _copy_vgg_features(model: SegNet, state: Dict[str, Tensor], source: str) -> List[str]:
    features = _vgg_feature_layers(state)
    convs = [i for i in sorted(features) if features[i].get("weight") is not None and features[i]["weight"].dim() == 4]
    if len(convs) != 13:
        raise ValueError(
            f"encoder weights: expected a torchvision vgg16/vgg16_bn state dict with 13 convolutions under "
            f"'features.N.weight', found {len(convs)} in {source!r}"
        )
    has_bn = any("running_mean" in features[i] for i in features)
    blocks = [block for stage in model.encoder for block in stage]
    loaded = []
    with torch.no_grad():
        for block_index, (block, conv_at) in enumerate(zip(blocks, convs)):
            targets = [(block[0], features[conv_at])]
            if has_bn:
                bn = features.get(conv_at + 1)
                if bn is None or "running_mean" not in bn:
                    raise ValueError(f"encoder weights: convolution features.{conv_at} has no BatchNorm after it in {source!r}")
                targets.append((block[1], bn))
            for module, tensors in targets:
                for name, param in module.state_dict().items():
                    if name not in tensors:
                        continue
                    if tensors[name].shape != param.shape:
                        raise ValueError(
                            f"encoder weights: features.{conv_at} {name} has shape {tuple(tensors[name].shape)}, "
                            f"encoder block {block_index} expects {tuple(param.shape)} ({source!r})"
                        )
                    param.copy_(tensors[name])
                    loaded.append(f"features.{conv_at if module is block[0] else conv_at + 1}.{name}")
    return loaded


def _vgg_feature_layers(state: Dict[str, Tensor]) -> Dict[int, Dict[str, Tensor]]:
    layers: Dict[int, Dict[str, Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and isinstance(value, Tensor):
            layers.setdefault(int(parts[1]), {})[parts[2]] = value
    return layers
