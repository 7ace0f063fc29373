"""segnet_ext: memory-efficient SegNet kernels for PyTorch.

Ops (registered with the PyTorch dispatcher as ``torch.ops.segnet_ext.*``):
``max_pool2x2`` (2x2 arg-max pooling with 2-bit packed indices), ``max_unpool2x2``
(sparse unpooling from them), ``pack_indices`` / ``unpack_indices`` (conversion to
and from torch's int64 indices). Layers live in :mod:`segnet_ext.nn`.
"""
from ._loader import load_native_library

_C = load_native_library()

from .ops import (  # noqa: E402
    cuda_kernels_available,
    max_pool2x2,
    max_unpool2x2,
    pack_indices,
    unpack_indices,
)
from . import nn, reference  # noqa: E402
from .nn import ConvBNReLU2d, fuse, unfuse  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "cuda_kernels_available",
    "max_pool2x2",
    "max_unpool2x2",
    "pack_indices",
    "unpack_indices",
    "ConvBNReLU2d",
    "fuse",
    "unfuse",
    "nn",
    "reference",
]
