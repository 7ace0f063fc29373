"""Drop-in layers built on the segnet_ext ops."""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2, return_indices=...)`` with 2-bit packed indices
    (1/32 of torch's int64 indices). With return_indices, returns (values, packed_indices)
    for :class:`MaxUnpool2x2`."""

    def __init__(self, ceil_mode: bool = False, return_indices: bool = False):
        super().__init__()
        self.ceil_mode = ceil_mode
        self.return_indices = return_indices

    def forward(self, x: Tensor):
        values, packed = ops.max_pool2x2(x, self.ceil_mode)
        return (values, packed) if self.return_indices else values

    def extra_repr(self) -> str:
        return f"ceil_mode={self.ceil_mode}, return_indices={self.return_indices}"


class MaxUnpool2x2(nn.Module):
    """``nn.MaxUnpool2d(2, 2)`` for the packed indices of :class:`MaxPool2x2`.
    output_size (the pooled input's size) defaults to twice the input's, as torch's."""

    def forward(self, values: Tensor, packed_indices: Tensor, output_size: Optional[Sequence[int]] = None) -> Tensor:
        if output_size is None:
            output_size = (2 * values.shape[-2], 2 * values.shape[-1])
        return ops.max_unpool2x2(values, packed_indices, output_size)
