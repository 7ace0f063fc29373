"""segnet_ext: memory-efficient SegNet kernels for PyTorch.

Ops (registered with the PyTorch dispatcher as ``torch.ops.segnet_ext.*``):
``max_pool2x2`` (2x2 arg-max pooling with 2-bit packed indices), ``max_unpool2x2``
(sparse unpooling from them), ``pack_indices`` / ``unpack_indices`` (conversion to
and from torch's int64 indices), and the BN+ReLU ops of the fused conv-BN-ReLU
(``bn_stats``, ``scale_shift_relu``, ``bn_relu_backward_reduce``, ``bn_relu_backward_apply``,
``conv2d_scale_shift_relu``). Layers live in :mod:`segnet_ext.nn`: ``MaxPool2x2``,
``MaxUnpool2x2``, ``ConvBNReLU2d``, ``FusedConv2d``, ``Conv2d``; :mod:`segnet_ext.fusion` has
``fuse`` / ``unfuse`` for whole models.
"""
from ._loader import load_native_library

_C = load_native_library()

from .ops import (  # noqa: E402
    cpu_capability,
    cuda_kernels_available,
    kernel_choices,
    max_pool2x2,
    max_unpool2x2,
    pack_indices,
    unpack_indices,
)
from . import nn, reference  # noqa: E402
from .nn import ConvBNReLU2d, FusedConv2d  # noqa: E402
from .fusion import FuseReport, fuse, unfuse  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "cpu_capability",
    "cuda_kernels_available",
    "kernel_choices",
    "max_pool2x2",
    "max_unpool2x2",
    "pack_indices",
    "unpack_indices",
    "ConvBNReLU2d",
    "FusedConv2d",
    "FuseReport",
    "fuse",
    "unfuse",
    "nn",
    "reference",
]
