"""Recomputed activations: outputs that carry a recipe instead of being stored.

A layer whose output can be recomputed exactly and cheaply from tensors that autograd
keeps anyway attaches a recipe to that output. A segnet_ext layer that would save the
output for its backward (a convolution saves its input) saves the recipe's tensors
instead and rebuilds the output in its backward, with the same op that produced it, so
bit for bit. Recipes:

- ``ScaleShiftReLU``: a ConvBNReLU2d / FusedConv2d output, from its pre-BN convolution
  output z and its per-channel scale and shift (which the block saves for its own
  backward), and for a residual block the identity added before the ReLU (itself possibly
  a recipe);
- ``Unpool``: a MaxUnpool2x2 output (a sparse map, 3 of 4 zeros), from the pooled values
  (themselves possibly a recipe) and the 2-bit indices (which the unpooling saves).

A recipe nests at most ``MAX_DEPTH`` recipes (the identity of a residual block is often
the previous block's output, itself a recipe): deeper, it keeps the tensor, so that a
rebuild costs at most ``MAX_DEPTH`` element-wise passes however long the chain.

Any other consumer simply saves the tensor as usual (correct, without the saving); a
tensor modified in place after it was made (its version changed) is never recomputed.

A recipe refers to its tensors weakly: the consumers save them (``SavedInput``), so each
lives as long as some node of the graph still needs it and is freed, as a plainly saved
tensor is, when the last such node's backward has run, not at the end of the backward
pass. A recipe whose tensors are gone (its graph's backward has run) no longer describes
its output, which is then saved as itself.

Explicit recipes were chosen over ``saved_tensors_hooks`` because they need no context
manager around the user's training step and never touch tensors of unrelated code.

Under ``torch.compile`` no recipe is attached (a traced tensor takes no attributes): the
compiler's own mechanism does the same job. The layers run their computation inside
:func:`compiled_region`, a selective activation checkpoint whose policy marks the outputs
of element-wise ops (ATen's pointwise ops) and of ``max_unpool2x2``
MUST_RECOMPUTE and leaves every other op to the partitioner's usual choice; AOTAutograd
then saves z, the per-channel vectors and the pooled values, and reruns the element-wise
ops in the compiled backward, where Inductor fuses them into the kernels that use them
(the block is traced as ATen ops, so the BN backward is Inductor's too). The partitioner
keeps a recomputed tensor that feeds a recomputed op of a later region (as it keeps every
boundary of two checkpoint regions: ``cleanup_recompute_tags`` in
torch/_functorch/partitioners.py). A region that reports itself as the graph's first
escapes that rule: the unpooling's, so that its input, a decoder block's output, is
recomputed from that block's z, as the eager ``Unpool`` recipe nests its
``ScaleShiftReLU``; and that of two of every ``MAX_DEPTH`` residual blocks (marked by
``fuse``), so that a chain of blocks keeps one output in ``MAX_DEPTH``, as the eager
recipes do.
"""
import functools
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import aten_conv

_ops = torch.ops.segnet_ext
RECIPE = "_segnet_recompute"
MAX_DEPTH = 3


class Recipe:
    """How to rebuild a tensor: ``tensors()`` to save, ``rebuild(saved)`` to recompute;
    ``depth``: the element-wise passes a rebuild takes.

    Several layers may rebuild one tensor in the same backward pass (a residual block's
    input is its first convolution's input, its identity, and the identity inside its own
    output's recipe; a residual block rebuilds its own output for the ReLU's mask). Each
    such consumer announces itself at save time (``expect``) and takes the tensor with
    ``use``: the first rebuild is kept for the consumers still expected, and dropped when
    the last has taken it or the backward pass ends, so the tensor is rebuilt once per
    backward, not once per consumer (each rebuild is also an allocation: under glibc's
    default malloc, page faults for every block above 32 MB)."""

    version: int
    depth: int = 1
    expected: int = 0  # consumers that have not yet taken the tensor
    kept: Optional[Tensor] = None  # the tensor rebuilt for them, within one backward pass

    def refs(self) -> List[weakref.ref]:
        """Weak references to the tensors to save."""
        raise NotImplementedError

    def tensors(self) -> List[Tensor]:
        """The tensors to save; an error where one is gone (see ``alive``)."""
        tensors = [r() for r in self.refs()]
        if any(t is None for t in tensors):
            raise RuntimeError("segnet_ext: a recipe's tensors were freed (its graph's backward has run); "
                               "recipe_of() returns None for such a tensor")
        return tensors

    def alive(self) -> bool:
        """Whether every tensor of ``tensors()`` still exists."""
        return all(r() is not None for r in self.refs())

    def build(self, saved: Sequence[Tensor]) -> Tuple[Tensor, Sequence[Tensor]]:
        """The tensor, and what is left of ``saved`` after this recipe's share."""
        raise NotImplementedError

    def rebuild(self, saved: Sequence[Tensor]) -> Tuple[Tensor, Sequence[Tensor]]:
        """``build``, or the tensor kept from an earlier rebuild of this backward pass."""
        if self.kept is not None:
            return self.kept, saved[len(self.refs()):]
        t, rest = self.build(saved)
        if self.expected > 0:
            self._keep(t)
        return t, rest

    def expect(self) -> None:
        """One more consumer will ``use`` the tensor in a backward pass."""
        self.expected += 1

    def use(self, saved: Sequence[Tensor]) -> Tensor:
        """The tensor, for one of the consumers ``expect`` counted."""
        self.expected -= 1
        t = self.rebuild(saved)[0]
        if self.expected <= 0:
            self.kept = None
        return t

    def recompute(self) -> Tensor:
        return self.rebuild(self.tensors())[0]

    def _keep(self, t: Tensor) -> None:
        try:  # dropped at the end of this backward pass whatever happens
            torch.autograd.Variable._execution_engine.queue_callback(self._drop)
        except RuntimeError:  # not in a backward pass: nobody to keep it for
            return
        self.kept = t

    def _drop(self) -> None:
        self.kept = None


class _Operand:
    """A recipe's tensor operand: saved as its own recipe where it has one no deeper than
    MAX_DEPTH - 1, else as itself."""

    def __init__(self, t: Tensor):
        source = recipe_of(t)
        self.source = source if source is not None and source.depth < MAX_DEPTH else None
        self.ref = None if self.source is not None else weakref.ref(t)
        self.depth = self.source.depth if self.source is not None else 0

    def refs(self) -> List[weakref.ref]:
        return self.source.refs() if self.source is not None else [self.ref]

    def rebuild(self, saved):
        return self.source.rebuild(saved) if self.source is not None else (saved[0], saved[1:])


class ScaleShiftReLU(Recipe):
    def __init__(self, z: Tensor, scale: Tensor, shift: Tensor, relu: bool, residual: Optional[Tensor] = None):
        self.own, self.relu = [weakref.ref(t) for t in (z, scale, shift)], relu
        self.residual = _Operand(residual) if residual is not None else None
        self.depth = 1 + (self.residual.depth if self.residual is not None else 0)

    def refs(self):
        return self.own + (self.residual.refs() if self.residual is not None else [])

    def build(self, saved):
        (z, scale, shift), saved = saved[:3], saved[3:]
        residual = None
        if self.residual is not None:
            residual, saved = self.residual.rebuild(saved)
        return _ops.scale_shift_relu(z, scale, shift, self.relu, residual), saved


class Unpool(Recipe):
    def __init__(self, values: Tensor, packed: Tensor, output_size: Sequence[int]):
        self.values = _Operand(values)
        self.packed, self.output_size = weakref.ref(packed), list(output_size)
        self.depth = 1 + self.values.depth

    def refs(self):
        return self.values.refs() + [self.packed]

    def build(self, saved):
        values, saved = self.values.rebuild(saved)
        return _ops.max_unpool2x2(values, saved[0], self.output_size), saved[1:]


def attach(t: Tensor, recipe: Recipe) -> Tensor:
    if not torch.compiler.is_compiling():
        recipe.version = t._version
        setattr(t, RECIPE, recipe)
    return t


def recipe_of(t: Tensor) -> Optional[Recipe]:
    """The recipe of ``t`` if it still describes it (not modified in place since, its tensors
    not freed)."""
    recipe = getattr(t, RECIPE, None)
    return recipe if recipe is not None and recipe.version == t._version and recipe.alive() else None


def _recompute_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is _ops.max_unpool2x2.default or torch.Tag.pointwise in op.tags:
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_SAVE  # the partitioner's usual choice


_SACMode = getattr(torch.utils.checkpoint, "_CachingTorchDispatchMode", None)


class _FirstRegionMode(_SACMode or object):
    """The forward mode of a selective checkpoint that reports itself as the first region
    of the graph (``ac_graph_id`` -1, whatever number Dynamo assigns it): the partitioner
    keeps a recomputed tensor at the boundary of two regions only where the consumer's
    region comes later (``cleanup_recompute_tags``)."""

    @property
    def ac_graph_id(self):
        return -1

    @ac_graph_id.setter
    def ac_graph_id(self, value):
        pass


def _recompute_contexts(first: bool):
    fwd, recompute = create_selective_checkpoint_contexts(_recompute_policy)
    if first and _SACMode is not None and type(fwd) is _SACMode:  # else: an ordinary region
        fwd.__class__ = _FirstRegionMode
    return fwd, recompute


def compiled_region(fn, *tensors: Optional[Tensor], constants: tuple = (), first: bool = False):
    """``fn(*tensors, *constants)``; while torch.compile traces a training forward, inside
    a selective checkpoint that recomputes segnet_ext's element-wise outputs in the
    backward instead of saving them (see the module doc). Otherwise a plain call.
    ``first``: the region reports itself as the graph's first, so that a recomputed input
    (a decoder block's output into an unpooling) is recomputed, not kept."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return fn(*tensors, *constants)
    return checkpoint(lambda *t: fn(*t, *constants), *tensors, use_reentrant=False,
                      context_fn=functools.partial(_recompute_contexts, first))


class SavedInput:
    """Saves layer inputs through ``ctx``: each one's recipe's tensors when it has one, else
    itself (None stays None)."""

    @staticmethod
    def save(ctx, inputs: Sequence[Optional[Tensor]], *others: Tensor) -> None:
        recipes, counts, saved = [], [], []
        for x in inputs:
            recipe = recipe_of(x) if x is not None else None
            if recipe is not None:
                recipe.expect()
            part = recipe.tensors() if recipe is not None else ([x] if x is not None else [])
            recipes.append(recipe)
            counts.append(len(part))
            saved += part
        ctx.input_recipes, ctx.input_counts = recipes, counts
        ctx.save_for_backward(*saved, *others)

    @staticmethod
    def others(ctx) -> Sequence[Tensor]:
        """The other saved tensors, without rebuilding the inputs."""
        return ctx.saved_tensors[sum(ctx.input_counts):]

    @staticmethod
    def load(ctx) -> Tuple[List[Optional[Tensor]], Sequence[Tensor]]:
        """(the inputs, rebuilt where need be; the other saved tensors)."""
        saved, inputs, at = ctx.saved_tensors, [], 0
        for recipe, n in zip(ctx.input_recipes, ctx.input_counts):
            part, at = saved[at:at + n], at + n
            inputs.append(recipe.use(part) if recipe is not None else (part[0] if n else None))
        return inputs, saved[at:]


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
        SavedInput.save(ctx, [x], weight)
        with torch.autocast(device, enabled=False):
            return aten_conv.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (x,), (weight,) = SavedInput.load(ctx)
        stride, padding, dilation, groups, has_bias = ctx.conv
        needs = ctx.needs_input_grad
        grads = aten_conv.convolution_backward(
            grad.to(x.dtype), x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, groups,
            [needs[0], needs[1], needs[2] and has_bias])
        return (*grads_as(grads, ctx.dtypes), None, None, None, None)
