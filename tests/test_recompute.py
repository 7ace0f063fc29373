"""Recomputed activations: a SegNet-like stage stores less and computes the same gradients."""
import copy

import pytest
import torch
from torch import nn

import segnet_ext
from segnet_ext import ConvBNReLU2d, recompute
from bench.common import saved_bytes


class Stage(nn.Module):
    """conv-BN-ReLU, pool, unpool, conv-BN-ReLU, classifier: SegNet's pattern in small."""

    def __init__(self, fused: bool):
        super().__init__()
        block = (lambda i, o: ConvBNReLU2d(i, o)) if fused else (
            lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)))
        self.enc, self.dec = block(3, 8), block(8, 8)
        self.pool = segnet_ext.nn.MaxPool2x2(ceil_mode=True, return_indices=True) if fused else \
            nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True)
        self.unpool = segnet_ext.nn.MaxUnpool2x2() if fused else nn.MaxUnpool2d(2, 2)
        self.classifier = (segnet_ext.nn.Conv2d if fused else nn.Conv2d)(8, 4, 3, padding=1)

    def forward(self, x, in_place_after_unpool=False):
        y = self.enc(x)
        v, i = self.pool(y)
        u = self.unpool(v, i, output_size=y.shape[-2:])
        if in_place_after_unpool:
            u.mul_(2)
        return self.classifier(self.dec(u))


class DecoderStage(Stage):
    """SegNet's decoder pattern: a conv-BN-ReLU output unpooled."""

    def forward(self, x):
        y = self.enc(x)
        v, i = self.pool(y)
        return self.classifier(self.unpool(self.dec(v), i, output_size=y.shape[-2:]))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_stage_gradients_equal_the_plain_layers(in_place, fmt):
    ours, plain = Stage(True).double(), Stage(False).double()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64).contiguous(memory_format=fmt)
    grads = []
    for model in (ours, plain):
        xi = x.clone().requires_grad_()
        out = model(xi, in_place)
        out.backward(torch.ones_like(out))
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_stage_stores_the_recipes_not_the_activations():
    ours, plain = Stage(True), Stage(False)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 96)
    activation = 2 * 8 * 64 * 96 * 4
    ours_bytes, _ = saved_bytes(lambda: ours(x))
    plain_bytes, _ = saved_bytes(lambda: plain(x))
    weights = sum(p.numel() * 4 for p in ours.parameters())
    # ours: the image, two pre-BN conv outputs, the pooled values and 2-bit indices;
    # plain also keeps both ReLU outputs, the dense unpooled map and int64 indices
    assert ours_bytes - weights <= 2.7 * activation  # 3/8 + 1 + 1 + 1/4 (+ indices, statistics)
    assert plain_bytes - weights >= 5.5 * activation  # 3/8 + 5 + 1/2


def test_a_block_frees_its_tensors_once_their_last_backward_has_run():
    """A recipe refers to its tensors weakly: a block's z lives while the block or the
    consumer that saved its recipe may still need it, and is freed when both backwards have
    run, as a plainly saved tensor is; not at the end of the backward pass, though the
    outputs that carry the recipes are still held."""
    import weakref

    blocks = nn.Sequential(*(ConvBNReLU2d(4, 4) for _ in range(4)))
    ys, zs, y = [], [], torch.randn(2, 4, 8, 8, requires_grad=True)
    for block in blocks:
        y = block(y)
        ys.append(y)
        zs.append(weakref.ref(recompute.recipe_of(y).tensors()[0]))
    alive = {}
    for i in range(1, len(blocks)):  # block i - 1's backward starts after those of block i and its consumer
        ys[i - 1].grad_fn.register_prehook(lambda grads, i=i: alive.update({i: zs[i]() is not None}))
    ys[-1].sum().backward()
    assert alive == {1: False, 2: False, 3: False}
    assert zs[0]() is None and recompute.recipe_of(ys[0]) is None  # no longer describes its output: saved as itself
    out = blocks[1](ys[0])  # a new graph on the old output: no recipe to rebuild, the tensor itself is saved
    torch.autograd.grad(out.sum(), list(blocks[1].parameters()))


def test_recipes_rebuild_bit_identically_and_expire():
    block, pool, unpool = ConvBNReLU2d(3, 4), segnet_ext.nn.MaxPool2x2(True, True), segnet_ext.nn.MaxUnpool2x2()
    y = block(torch.randn(2, 3, 7, 9))
    v, i = pool(y)
    u = unpool(v, i, y.shape[-2:])
    assert torch.equal(recompute.recipe_of(u).recompute(), u)
    assert torch.equal(recompute.recipe_of(y).recompute(), y)
    u.add_(1)
    assert recompute.recipe_of(u) is None


def test_conv2d_is_nn_conv2d_without_a_recipe():
    conv = segnet_ext.nn.Conv2d(3, 5, 3, padding=1)
    ref = copy.deepcopy(conv)
    ref.__class__ = nn.Conv2d
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    torch.testing.assert_close(conv(x), ref(x))
    assert conv.state_dict().keys() == nn.Conv2d(3, 5, 3).state_dict().keys()


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "aten-native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_stage_under_autocast_matches_the_plain_layers(dtype, onednn, fmt):
    """CPU autocast through oneDNN's convolutions and through ATen's own, which CPUs without
    AVX-512 run and which reject mixed dtypes: every gradient arrives in its tensor's dtype
    and close to what the plain layers give under the same autocast."""
    ours, plain = Stage(True), Stage(False)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 12, 14).contiguous(memory_format=fmt)
    grads = []
    with torch.backends.mkldnn.flags(enabled=onednn):
        for model in (ours, plain):
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype):
                out = model(xi)
            assert out.dtype == dtype
            out.float().square().mean().backward()
            grads.append([xi.grad] + [p.grad for p in model.parameters()])
    scale = max(g.norm() for g in grads[1])  # a conv bias before BN has a gradient of ~0: compare to this
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-3 * scale


# ---- under torch.compile: the partitioner recomputes what the recipes would ----

@pytest.mark.parametrize("stage", [Stage, DecoderStage])
def test_compiled_stage_computes_the_eager_gradients_and_stores_as_little(stage):
    """In float64: in float32, compiled and eager rounding differ by ~1e-7, enough to flip a
    2x2 arg-max between two near-equal values or a ReLU at ~0 in about one run in a hundred
    (a CI run saw one element's gradient move 4.6e-4 of the largest); in float64 such a flip
    needs values within ~1e-16 of each other."""
    torch._dynamo.reset()
    ours, plain = stage(True).double(), stage(False).double()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    activation = 2 * 8 * 64 * 96 * 8
    weights = sum(p.numel() * 8 for p in ours.parameters())
    results = {}
    for name, model in (("eager", copy.deepcopy(ours)),
                        ("compiled", torch.compile(copy.deepcopy(ours), fullgraph=True)),
                        ("compiled plain", torch.compile(copy.deepcopy(plain)))):
        xi = x.clone().requires_grad_()
        saved, out = saved_bytes(lambda: model(xi))
        out.square().mean().backward()
        grads = [xi.grad] + [p.grad for p in model.parameters()]
        results[name] = (saved, out.detach(), grads, list(model.buffers()))
    (_, y_e, g_e, b_e), (compiled, y_c, g_c, b_c) = results["eager"], results["compiled"]
    torch.testing.assert_close(y_c, y_e, rtol=1e-9, atol=1e-9)
    largest = max(g.abs().max() for g in g_e)
    for a, b in zip(g_c, g_e):
        assert (a - b).abs().max() <= 1e-9 * largest
    for a, b in zip(b_c, b_e):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # no more than eager mode (recomputed: y, the unpooled map, a decoder block's output
    # unpooled); the compiler may keep a second layout of each weight (channels_last)
    eager = results["eager"][0]
    print(f"saved / activation: eager {eager / activation:.3f}, compiled {compiled / activation:.3f}, "
          f"compiled plain {results['compiled plain'][0] / activation:.3f}")
    assert compiled <= eager + weights
    assert results["compiled plain"][0] >= 1.5 * eager


def test_a_compiled_residual_chain_stores_no_more_than_eager_mode():
    """Six ResNet blocks: fuse marks two of every three to recompute their identity (the
    previous block's output) under compile, so the compiled chain keeps one block output in
    MAX_DEPTH, as the eager recipes do; without the marks it keeps every one."""
    from tests.test_fusion import BasicBlock, randomise_bn

    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = segnet_ext.fuse(randomise_bn(nn.Sequential(*(BasicBlock(8) for _ in range(6))))).double()
    marks = [block.conv2.recompute_residual for block in ours]
    assert marks == [False, True, True, False, True, True] and recompute.MAX_DEPTH == 3
    unmarked = copy.deepcopy(ours)
    for block in unmarked:
        block.conv2.recompute_residual = False
    x = torch.randn(2, 8, 32, 48, dtype=torch.float64)
    activation = x.numel() * 8
    results = {}
    for name, model in (("eager", copy.deepcopy(ours)),
                        ("compiled", torch.compile(copy.deepcopy(ours), fullgraph=True)),
                        ("compiled unmarked", torch.compile(unmarked, fullgraph=True))):
        xi = x.clone().requires_grad_()
        saved, out = saved_bytes(lambda: model(xi))
        out.square().mean().backward()
        results[name] = (saved, [xi.grad] + [p.grad for p in model.parameters()])
    (eager, g_e), (compiled, g_c) = results["eager"], results["compiled"]
    largest = max(g.abs().max() for g in g_e)
    for a, b in zip(g_c, g_e):
        assert (a - b).abs().max() <= 1e-10 * largest
    print({name: round(r[0] / activation, 3) for name, r in results.items()})
    assert compiled <= eager
    assert results["compiled unmarked"][0] >= eager + 3 * activation  # 4 block outputs kept that eager rebuilds
