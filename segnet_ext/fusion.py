"""``fuse(model)`` / ``unfuse(model)``: any model rewritten with segnet_ext's layers.

Where the patterns are found:

- in a module's own dataflow, by torch.fx: the module's ``forward`` is traced with every
  submodule call as one node (so the module tree is untouched), and each
  ``Conv2d -> BatchNorm2d (-> ReLU)`` whose intermediate values have no other user is
  rewritten: the convolution becomes a :class:`~segnet_ext.nn.FusedConv2d` (the same
  object, its class changed), the BN and ReLU calls leave the graph (the modules stay,
  with their state_dict keys), and the module runs the rewritten graph as its
  ``forward`` (an instance attribute: the module keeps its class and methods). ReLU as
  ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``, in place or not. ResNet's
  ``BatchNorm2d -> add(identity) (-> ReLU)`` becomes ``conv(x, identity)``.
- in an ``nn.Sequential``, and in any module torch.fx cannot trace, by walking the
  module tree: runs of consecutive ``Conv2d, BatchNorm2d (, ReLU)`` children.

Every other ``nn.Conv2d`` becomes a :class:`~segnet_ext.nn.Conv2d` (its class changed),
which saves a recomputable input as its recipe. ``MaxPool2d(2, 2)`` becomes
:class:`~segnet_ext.nn.MaxPool2x2`, and, when the model
also has ``MaxUnpool2d(2, 2)`` layers, pools with ``return_indices=True`` and those
unpools become the 2-bit pair (their indices are only meaningful to each other).
"""
import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn import Conv2d, ConvBNReLU2d, FusedConv2d, MaxPool2x2, MaxUnpool2x2, _check_fusable
from .recompute import MAX_DEPTH


@dataclass
class FuseReport:
    """What :func:`fuse` did: ``fused`` patterns and ``left`` ones with the reason, each
    named by the module path where it was found."""

    fused: List[str] = field(default_factory=list)
    left: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)}:"] + [f"  {f}" for f in self.fused]
        lines += [f"left {len(self.left)}:"] + [f"  {f}" for f in self.left]
        return "\n".join(lines)


class _FusedAway(nn.Identity):
    """A Sequential slot whose module the FusedConv2d before it has taken over (kept so
    that unfuse() restores it)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["_original"] = module  # not a child: no parameters, no state_dict keys


class _BatchNorm2dInConv(nn.BatchNorm2d):
    """A BatchNorm2d of a Sequential whose computation the FusedConv2d before it has taken
    over (the same object, its class changed): it keeps its parameters, buffers and
    state_dict keys, and passes its input on."""

    def forward(self, input):
        return input


def fuse(model: nn.Module, inplace: bool = True, report: bool = False
         ) -> Union[nn.Module, Tuple[nn.Module, FuseReport]]:
    """Rewrite ``model`` with segnet_ext's layers (see the module's doc for what is found
    where); outputs, gradients, running statistics and ``state_dict`` keys are unchanged.
    With ``report=True`` returns ``(model, FuseReport)``. :func:`unfuse` gives back the
    standard modules.

    Left unfused: a convolution whose output has another user than the BN, a BN or
    convolution module called at more than one place, a module whose traced forward
    depends on its ``training`` flag or that torch.fx cannot trace (its Sequentials are
    still fused). A BN whose output has other users keeps the ReLU or add after it apart."""
    if not inplace:
        model = copy.deepcopy(model)
    ctx = _Context(model)
    if isinstance(model, nn.Sequential):
        whole = _whole_sequential(model)
        if whole is not None:
            ctx.report.fused.append(_describe("", list(model._modules)))
            model = whole
    if not isinstance(model, ConvBNReLU2d):
        _fuse_module(model, "", ctx)
    for m in model.modules():  # the other convolutions save a recomputable input as its recipe
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d
    return (model, ctx.report) if report else model


class _Context:
    def __init__(self, model: nn.Module):
        self.report = FuseReport()
        self.swap_indices = any(_is_unpool2x2(m) for m in model.modules())
        # modules registered under more than one parent (or twice): never class-swapped
        self.registrations = Counter(id(c) for m in model.modules() for c in m._modules.values() if c is not None)
        self.residual_blocks = 0  # fused conv-BN-add(-ReLU)s so far, in module order

    def shared(self, *modules: nn.Module) -> bool:
        return any(self.registrations[id(m)] > 1 for m in modules)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(path: str, names: List[str]) -> str:
    return f"{path or '(model)'}: {' -> '.join(names)}"


def _fuse_module(module: nn.Module, path: str, ctx: _Context) -> None:
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        replacement = _replacement(child, ctx)
        if replacement is not None:
            if isinstance(replacement, ConvBNReLU2d):
                ctx.report.fused.append(_describe(_join(path, name), list(child._modules)))
            module._modules[name] = replacement
            continue
        _fuse_module(child, _join(path, name), ctx)
    if isinstance(module, nn.Sequential):
        _fuse_runs(module, path, ctx)
    elif _has_candidates(module):
        _fuse_graph(module, path, ctx)


def _replacement(child: nn.Module, ctx: _Context) -> Optional[nn.Module]:
    if isinstance(child, nn.Sequential) and not ctx.shared(*child.children()):
        whole = _whole_sequential(child)
        if whole is not None:
            return whole
    if _is_pool2x2(child) and (ctx.swap_indices or not child.return_indices):
        return MaxPool2x2(ceil_mode=child.ceil_mode, return_indices=child.return_indices)
    if _is_unpool2x2(child):
        return MaxUnpool2x2()
    return None


def _fusable_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, FusedConv2d) and m.padding_mode == "zeros" \
        and not isinstance(m.padding, str)


def _has_candidates(module: nn.Module) -> bool:
    """Whether module has a forward of its own and holds a convolution and a BN not fused yet
    (its forward may call ones held in a ModuleList or a child's attributes, so all count)."""
    if type(module).forward is nn.Module.forward:  # ModuleList, ModuleDict: containers only
        return False
    inner = list(module.modules())[1:]
    taken = set()
    for m in inner:
        if isinstance(m, FusedConv2d):
            taken.add(id(m.bn))
        elif isinstance(m, ConvBNReLU2d):
            taken.update((id(m.conv), id(m.bn)))
    return any(_fusable_conv(m) and id(m) not in taken for m in inner) and \
        any(type(m) is nn.BatchNorm2d and id(m) not in taken for m in inner)


def _whole_sequential(seq: nn.Sequential) -> Optional[ConvBNReLU2d]:
    mods = list(seq)
    if len(mods) in (2, 3) and _fusable_conv(mods[0]) and type(mods[1]) is nn.BatchNorm2d \
            and (len(mods) == 2 or isinstance(mods[2], nn.ReLU)):
        try:
            return ConvBNReLU2d.from_modules(mods[0], mods[1], relu=len(mods) == 3)
        except ValueError:
            return None
    return None


def _fuse_runs(seq: nn.Sequential, path: str, ctx: _Context) -> None:
    keys = list(seq._modules.keys())
    i = 0
    while i + 1 < len(keys):
        conv, bn = seq._modules[keys[i]], seq._modules[keys[i + 1]]
        if not (_fusable_conv(conv) and type(bn) is nn.BatchNorm2d):
            i += 1
            continue
        relu = i + 2 < len(keys) and isinstance(seq._modules[keys[i + 2]], nn.ReLU)
        names = keys[i:i + (3 if relu else 2)]
        try:
            _check_fusable(conv, bn)
        except ValueError as e:
            ctx.report.left.append(f"{_describe(path, names)}: {e}")
            i += 1
            continue
        if ctx.shared(conv, bn):
            ctx.report.left.append(f"{_describe(path, names)}: a module is also used elsewhere in the model")
            i += 1
            continue
        FusedConv2d.take_over(conv, bn, relu)
        bn.__class__ = _BatchNorm2dInConv
        if relu:
            seq._modules[keys[i + 2]] = _FusedAway(seq._modules[keys[i + 2]])
        ctx.report.fused.append(_describe(path, names))
        i += len(names)


# ---- graph-level fusion ----

class _OwnForwardTracer(fx.Tracer):
    """Traces a module's own forward: every submodule call is one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _module_of(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS and not node.kwargs) or \
        (node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs)


def _residual_of(node: Optional[fx.Node], bn_node: fx.Node) -> Optional[fx.Node]:
    """The other operand where ``node`` is ``bn_node + other`` (either order), a tensor node."""
    if node is None or not _is_add(node) or len(node.args) != 2 or bn_node not in node.args:
        return None
    if (node.target is operator.iadd or node.target == "add_") and node.args[0] is not bn_node:
        return None  # adds into the identity in place: the identity's other users see the sum
    other = node.args[1] if node.args[0] is bn_node else node.args[0]
    return other if isinstance(other, fx.Node) and other is not bn_node else None


def _trace(owner: nn.Module) -> fx.Graph:
    """owner's forward as a graph, the same whichever its training flag (else ValueError)."""
    was = owner.training
    try:
        graphs = []
        for mode in (True, False):
            owner.training = mode
            graphs.append(_OwnForwardTracer().trace(owner))
    finally:
        owner.training = was
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise ValueError("its forward depends on its training flag")
    return graphs[0]


def _fuse_graph(module: nn.Module, path: str, ctx: _Context) -> None:
    # a module fused before runs its rewritten graph: trace that one
    owner = _installed_graph(module) or module
    try:
        graph = _trace(owner)
    except Exception as e:  # noqa: BLE001  (any tracing failure: the module stays as it is)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ctx.report.left.append(f"{path or '(model)'} ({type(module).__name__}): not traceable by torch.fx "
                               f"({reason[:200]}); its convolutions and BNs stay unfused")
        return
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    changed = False
    for node in list(graph.nodes):
        conv = _module_of(node, owner)
        if conv is None or not _fusable_conv(conv):
            continue
        bn_nodes = [u for u in node.users if type(_module_of(u, owner)) is nn.BatchNorm2d]
        if not bn_nodes:
            continue
        bn_node = bn_nodes[0]
        bn = _module_of(bn_node, owner)
        names = [node.target, bn_node.target]
        if len(node.users) > 1 or bn_node.args != (node,) or bn_node.kwargs:
            ctx.report.left.append(f"{_describe(path, names)}: the convolution's output has other users")
            continue
        if calls[node.target] > 1 or calls[bn_node.target] > 1 or ctx.shared(conv, bn):
            ctx.report.left.append(f"{_describe(path, names)}: a module is called at more than one place")
            continue
        try:
            _check_fusable(conv, bn)
        except ValueError as e:
            ctx.report.left.append(f"{_describe(path, names)}: {e}")
            continue
        follower = next(iter(bn_node.users)) if len(bn_node.users) == 1 else None
        residual_node = _residual_of(follower, bn_node) if len(node.args) == 1 and not node.kwargs else None
        add_node = follower if residual_node is not None else None
        after = follower if add_node is None else (next(iter(add_node.users)) if len(add_node.users) == 1 else None)
        relu_node = after if after is not None and _is_relu(after, owner) else None
        FusedConv2d.take_over(conv, bn, relu=relu_node is not None)
        if residual_node is not None:  # conv(x, identity), where the add was: the identity exists by then
            add_node.prepend(node)
            node.args = (node.args[0], residual_node)
            # under torch.compile, chains of residual blocks recompute MAX_DEPTH deep as the
            # eager recipes do: the first block of every MAX_DEPTH keeps its identity
            conv.recompute_residual = ctx.residual_blocks % MAX_DEPTH != 0
            ctx.residual_blocks += 1
        last = relu_node or add_node or bn_node
        last.replace_all_uses_with(node)
        for gone in (relu_node, add_node, bn_node):
            if gone is not None:
                graph.erase_node(gone)
        parts = names + (["add"] if add_node is not None else []) + ([_node_name(relu_node)] if relu_node else [])
        ctx.report.fused.append(_describe(path, parts))
        changed = True
    if changed:
        graph.lint()
        # the module keeps its class; its forward is the rewritten graph's (a bound method, as
        # torch.export wants), over the module's own submodules
        module.__dict__["forward"] = fx.GraphModule(owner, graph, class_name=f"{type(module).__name__}Fused").forward


def _installed_graph(module: nn.Module) -> Optional[fx.GraphModule]:
    """The rewritten graph a fused module runs as its forward, if any."""
    owner = getattr(module.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, fx.GraphModule) else None


def _node_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is_pool2x2(m: nn.Module) -> bool:
    return isinstance(m, nn.MaxPool2d) and _pairs(m, kernel_size=2, stride=2, padding=0, dilation=1)


def _is_unpool2x2(m: nn.Module) -> bool:
    return isinstance(m, nn.MaxUnpool2d) and _pairs(m, kernel_size=2, stride=2, padding=0)


def _pairs(m: nn.Module, **expected: int) -> bool:
    as_pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return all(as_pair(getattr(m, k)) == (v, v) for k, v in expected.items())


# ---- unfuse ----

def unfuse(model: nn.Module, inplace: bool = True) -> nn.Module:
    """The inverse of :func:`fuse`: standard PyTorch modules only (for ONNX, torch.export,
    or sharing with people who do not have segnet_ext); the same state_dict keys as
    before :func:`fuse`."""
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, ConvBNReLU2d):
        return _as_sequential(model)
    for m in list(model.modules()):
        if _installed_graph(m) is not None:
            del m.__dict__["forward"]
        if isinstance(m, FusedConv2d):
            m.release()
        if type(m) is Conv2d:
            m.__class__ = nn.Conv2d
        elif type(m) is _BatchNorm2dInConv:
            m.__class__ = nn.BatchNorm2d
    _unfuse_children(model)
    return model


def _as_sequential(block: ConvBNReLU2d) -> nn.Sequential:
    layers = [block.conv, block.bn] + ([nn.ReLU(inplace=True)] if block.relu else [])
    return nn.Sequential(*layers)


_STANDARD: Dict[type, callable] = {
    ConvBNReLU2d: _as_sequential,
    _FusedAway: lambda m: m._original,
    MaxPool2x2: lambda m: nn.MaxPool2d(2, 2, ceil_mode=m.ceil_mode, return_indices=m.return_indices),
    MaxUnpool2x2: lambda m: nn.MaxUnpool2d(2, 2),
}


def _unfuse_children(module: nn.Module) -> None:
    for name, child in list(module._modules.items()):
        if type(child) in _STANDARD:
            module._modules[name] = _STANDARD[type(child)](child)
        elif child is not None:
            _unfuse_children(child)
