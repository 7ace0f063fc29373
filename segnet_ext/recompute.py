"""Recomputed activations: outputs that carry a recipe instead of being stored.

A layer whose output can be recomputed exactly and cheaply from tensors that autograd
keeps anyway attaches a recipe to that output. A segnet_ext layer that would save the
output for its backward (a convolution saves its input) saves the recipe's tensors
instead and rebuilds the output in its backward, with the same op that produced it, so
bit for bit. Recipes:

- ``ScaleShiftReLU``: a ConvBNReLU2d output, from its pre-BN convolution output z and its
  per-channel scale and shift (which the block saves for its own backward);
- ``Unpool``: a MaxUnpool2x2 output (a sparse map, 3 of 4 zeros), from the pooled values
  (themselves possibly a recipe) and the 2-bit indices (which the unpooling saves).

Any other consumer simply saves the tensor as usual (correct, without the saving); a
tensor modified in place after it was made (its version changed) is never recomputed.
Explicit recipes were chosen over ``saved_tensors_hooks`` because they need no context
manager around the user's training step and never touch tensors of unrelated code.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_ops = torch.ops.segnet_ext
RECIPE = "_segnet_recompute"


class Recipe:
    """How to rebuild a tensor: ``tensors()`` to save, ``rebuild(saved)`` to recompute."""

    version: int

    def tensors(self) -> List[Tensor]:
        raise NotImplementedError

    def rebuild(self, saved: Sequence[Tensor]) -> Tuple[Tensor, Sequence[Tensor]]:
        """The tensor, and what is left of ``saved`` after this recipe's share."""
        raise NotImplementedError

    def recompute(self) -> Tensor:
        return self.rebuild(self.tensors())[0]


class ScaleShiftReLU(Recipe):
    def __init__(self, z: Tensor, scale: Tensor, shift: Tensor, relu: bool):
        self.z, self.scale, self.shift, self.relu = z, scale, shift, relu

    def tensors(self):
        return [self.z, self.scale, self.shift]

    def rebuild(self, saved):
        z, scale, shift = saved[:3]
        return _ops.scale_shift_relu(z, scale, shift, self.relu), saved[3:]


class Unpool(Recipe):
    def __init__(self, values: Tensor, packed: Tensor, output_size: Sequence[int]):
        self.source = recipe_of(values)
        self.values = None if self.source is not None else values
        self.packed, self.output_size = packed, list(output_size)

    def tensors(self):
        return (self.source.tensors() if self.source is not None else [self.values]) + [self.packed]

    def rebuild(self, saved):
        if self.source is not None:
            values, saved = self.source.rebuild(saved)
        else:
            values, saved = saved[0], saved[1:]
        return _ops.max_unpool2x2(values, saved[0], self.output_size), saved[1:]


def attach(t: Tensor, recipe: Recipe) -> Tensor:
    if not torch.compiler.is_compiling():
        recipe.version = t._version
        setattr(t, RECIPE, recipe)
    return t


def recipe_of(t: Tensor) -> Optional[Recipe]:
    """The recipe of ``t`` if it still describes it (not modified in place since)."""
    recipe = getattr(t, RECIPE, None)
    return recipe if recipe is not None and recipe.version == t._version else None


class SavedInput:
    """Saves a layer input through ``ctx``: its recipe's tensors when it has one, else itself."""

    @staticmethod
    def save(ctx, x: Tensor, *others: Tensor) -> None:
        recipe = recipe_of(x)
        saved = recipe.tensors() if recipe is not None else [x]
        ctx.input_recipe, ctx.input_count = recipe, len(saved)
        ctx.save_for_backward(*saved, *others)

    @staticmethod
    def load(ctx) -> Tuple[Tensor, Sequence[Tensor]]:
        """(the input, rebuilt if need be; the other saved tensors)."""
        saved = ctx.saved_tensors
        inputs, others = saved[: ctx.input_count], saved[ctx.input_count:]
        x = ctx.input_recipe.rebuild(inputs)[0] if ctx.input_recipe is not None else inputs[0]
        return x, others


def autocast_operands(device: str, *tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """A convolution's operands as autocast would hand them to it: where autocast is on for
    ``device``, float tensors other than float64 cast to its dtype (None stays None).

    An autograd.Function that runs a convolution must cast explicitly and save what it
    cast: its backward runs outside autocast, and ATen's ``convolution_backward`` needs one
    dtype across gradient, input and weight. oneDNN happens to accept a mix on CPUs with
    AVX-512; ATen's own kernels (CPUs with AVX2 only, oneDNN off, cuDNN) do not."""
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def grads_as(grads: Sequence[Optional[Tensor]], like: Sequence[Optional[torch.dtype]]) -> Tuple[Optional[Tensor], ...]:
    """Each gradient in the dtype of the input it belongs to (autocast's casts undone)."""
    return tuple(None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, like))


def dtypes(*tensors: Optional[Tensor]) -> Tuple[Optional[torch.dtype], ...]:
    return tuple(None if t is None else t.dtype for t in tensors)


class Conv2dFunction(torch.autograd.Function):
    """F.conv2d that saves a recomputable input as its recipe."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (list(stride), list(padding), list(dilation), groups, bias is not None)
        ctx.dtypes = dtypes(x, weight, bias)
        device = x.device.type
        x, weight, bias = autocast_operands(device, x, weight, bias)
        SavedInput.save(ctx, x, weight)
        with torch.autocast(device, enabled=False):
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, (weight,) = SavedInput.load(ctx)
        stride, padding, dilation, groups, has_bias = ctx.conv
        needs = ctx.needs_input_grad
        grads = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
            [0, 0], groups, [needs[0], needs[1], needs[2] and has_bias])
        return (*grads_as(grads, ctx.dtypes), None, None, None, None)
