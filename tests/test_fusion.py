"""fuse / unfuse on whole models: Sequential runs, torch.fx dataflow (attribute-style
blocks, functional ReLUs), what is left and why, state_dict keys, copies, unfuse."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segnet_ext
from segnet_ext import ConvBNReLU2d, FusedConv2d, fuse, unfuse
from bench.common import saved_bytes
from tests.test_conv_bn_relu import pair


def randomise_bn(model: nn.Module) -> nn.Module:
    """BN parameters and running statistics away from their defaults (so that a BN skipped
    or applied twice shows)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def fused_count(model: nn.Module) -> int:
    return sum(isinstance(m, (FusedConv2d, ConvBNReLU2d)) for m in model.modules())


def run(model, x, mode):
    """(output, input gradient, parameter gradients) of one step in ``mode``."""
    model.train(mode == "train")
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y, xi.grad, grads


def assert_same_model(fused_model, model, x, modes=("train", "eval"), tol=1e-9):
    """Outputs, gradients and running statistics of ``fused_model`` match ``model``'s, float64
    (gradients within ``tol`` of their largest magnitude: a deep network's backward sums
    terms much larger than some of its results, so rounding shows there first)."""
    for mode in modes:
        (y0, gx0, g0), (y1, gx1, g1) = run(model, x, mode), run(fused_model, x, mode)
        torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9 * max(1.0, y0.abs().max().item()))
        torch.testing.assert_close(gx1, gx0, rtol=1e-7, atol=tol * gx0.abs().max().item())
        assert g1.keys() == g0.keys()
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=tol * max(1.0, g0[k].abs().max().item()), msg=k)
    for (k, v0), (k1, v1) in zip(model.state_dict().items(), fused_model.state_dict().items()):
        assert k1 == k
        torch.testing.assert_close(v1, v0, rtol=1e-9, atol=1e-12, msg=k)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out (attribute-style, shared ReLU module)."""

    def __init__(self, c, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if downsample else None

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Functional(nn.Module):
    """Each ReLU spelling: F.relu, F.relu(inplace), torch.relu, .relu_(), F.relu_."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(5))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(5))

    def forward(self, x):
        c, b = self.convs, self.bns
        x = F.relu(b[0](c[0](x)))
        x = F.relu(b[1](c[1](x)), inplace=True)
        x = torch.relu(b[2](c[2](x)))
        x = b[3](c[3](x)).relu_()
        return F.relu_(b[4](c[4](x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8, downsample=True))
        self.head = Functional()
        self.fc = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.head(x[:, :4])
        return self.fc(torch.cat([x, x], 1))


def test_attribute_style_blocks_and_functional_relus_are_fused_exactly():
    model = randomise_bn(TinyResNet()).double()
    keys = list(model.state_dict())
    fused_model, report = fuse(model, inplace=False, report=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fused_count(fused_model) == n_bn == len(report.fused) == 11
    assert list(fused_model.state_dict()) == keys
    assert type(fused_model) is TinyResNet and type(fused_model.layer1[0]) is BasicBlock  # classes kept
    assert "(model): conv1 -> bn1 -> relu" in report.fused and "head: convs.3 -> bns.3 -> relu_" in report.fused
    assert "layer1.1: conv2 -> bn2 -> add -> relu" in report.fused and not report.left
    assert fused_model.layer1[0].conv1.relu and fused_model.layer1[0].conv2.relu
    assert_same_model(fused_model, model, torch.randn(2, 3, 9, 10, dtype=torch.float64))
    back = unfuse(fused_model)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert "forward" not in back.__dict__ and list(back.state_dict()) == keys
    assert_same_model(back, model, torch.randn(2, 3, 6, 5, dtype=torch.float64))


def test_a_fused_block_saves_less_and_its_output_is_recomputed():
    torch.manual_seed(0)
    blocks = nn.Sequential(*(BasicBlock(16) for _ in range(3)))
    fused_blocks = fuse(copy.deepcopy(blocks))
    x = torch.randn(2, 16, 24, 32)
    plain_bytes, _ = saved_bytes(lambda: blocks(x.clone().requires_grad_()))
    fused_bytes, _ = saved_bytes(lambda: fused_blocks(x.clone().requires_grad_()))
    # distinct activations saved per block, plain: the block input (conv1), bn1's input,
    # the ReLU output (also conv2's input), bn2's input, the block output (ReLU); fused: z1
    # and z2 (conv2 rebuilds its input from z1, the next block its input from z2 and the
    # identity): 2 per block, with the model input 7 activations against 13.6
    activation = x.numel() * x.element_size()
    assert plain_bytes >= 4.4 * len(blocks) * activation
    assert fused_bytes <= (2 * len(blocks) + 1.7) * activation, (fused_bytes / activation, plain_bytes / activation)


def test_what_cannot_be_fused_is_left_and_said_why():
    class Shared(nn.Module):  # the BN output has two users: the ReLU stays out
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            z = self.conv2(y)  # conv2's output feeds bn2 and the sum: not fused
            return F.relu(y) + y + self.bn2(z) + z

    class Twice(nn.Module):  # one BN called at two places
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn(x)

    class ByMode(nn.Module):  # the traced graph would freeze the mode
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y * 2 if self.training else y

    class DataDependent(nn.Module):  # not traceable; its Sequential is still fused
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
            self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1))

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.seq(y) if y.sum() > 0 else y

    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    for cls, fused_n, reason in [(Shared, 1, "convolution's output has other users"),
                                 (Twice, 0, "called at more than one place"),
                                 (ByMode, 0, "depends on its training flag"),
                                 (DataDependent, 1, "not traceable by torch.fx")]:
        model = randomise_bn(cls()).double()
        fused_model, report = fuse(model, inplace=False, report=True)
        assert fused_count(fused_model) == fused_n == len(report.fused), (cls, report)
        assert any(reason in line for line in report.left), (cls, report)
        assert list(fused_model.state_dict()) == list(model.state_dict())
        assert_same_model(fused_model, model, x)
    shared = fuse(randomise_bn(Shared()).double(), inplace=False)
    assert not shared.conv.relu  # fused as conv -> BN, the ReLU applied after


def test_fused_models_copy_pickle_convert_and_fuse_again():
    model = randomise_bn(TinyResNet())
    fused_model = fuse(model, inplace=False)
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(fused_model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twice = fuse(copy.deepcopy(fused_model))
    for other in (copy.deepcopy(fused_model), loaded, twice):
        assert list(other.state_dict()) == list(model.state_dict())
        assert fused_count(other) == fused_count(fused_model)
        # the copy's fused convolutions refer to the copy's own BNs
        for name, m in other.named_modules():
            if isinstance(m, FusedConv2d):
                assert any(m.bn is b for b in other.modules())
        other.double()  # .to() reaches the BNs the convolutions took over
        assert_same_model(other, copy.deepcopy(model).double(), x)


def test_frozen_bn_and_load_state_dict_act_as_in_the_plain_model():
    model = randomise_bn(TinyResNet()).double()
    fused_model = fuse(copy.deepcopy(model))
    for m in (model, fused_model):
        m.layer1[0].bn1.eval()  # a frozen BN inside a training model
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    (y0, _, g0), (y1, _, g1) = run(model, x, "train"), run(fused_model, x, "train")
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
    other = randomise_bn(TinyResNet()).double()
    fused_model.load_state_dict(other.state_dict())
    assert_same_model(fused_model, other, x, modes=("eval",))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "fcn_resnet50",
                                  "deeplabv3_resnet50"])
def test_every_conv_bn_pair_of_torchvision_models_is_fused(name):
    torchvision = pytest.importorskip("torchvision")
    make = getattr(torchvision.models, name, None) or getattr(torchvision.models.segmentation, name)
    kwargs = {"weights_backbone": None} if "_resnet50" in name and name != "resnet50" else {}
    model = make(weights=None, **kwargs)
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused_model, report = fuse(model, inplace=False, report=True)
    assert fused_count(fused_model) == pairs == len(report.fused)
    assert list(fused_model.state_dict()) == list(model.state_dict())
    if name == "resnet18":
        randomise_bn(model)
        fused_model = fuse(copy.deepcopy(model))
        for m in list(model.modules()) + list(fused_model.modules()):
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        # 20 layers deep: rounding of 1e-9 of the largest input gradient seen (it is 1e-16 per op)
        assert_same_model(fused_model.double(), model.double(), torch.randn(2, 3, 32, 32, dtype=torch.float64), tol=1e-7)
# ---- fuse / unfuse ----

class VGG16BNLike(nn.Module):
    """torchvision's vgg16_bn layout (features.N, classifier.N), narrower and shorter."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v // 8, 3, padding=1), nn.BatchNorm2d(v // 8), nn.ReLU(inplace=True)]
                c = v // 8
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * 4 * 4, 10))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def vgg16_bn():
    try:
        import torchvision
    except ImportError:
        return VGG16BNLike()
    return torchvision.models.vgg16_bn(weights=None)


class EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True, ceil_mode=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.dec = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        y = self.enc(x)
        p, i = self.pool(y)
        return self.dec(self.unpool(p, i, output_size=y.shape[-2:]))


@pytest.mark.parametrize("make,size", [(vgg16_bn, (2, 3, 64, 64)), (EncoderDecoder, (2, 3, 9, 11))])
def test_fuse_keeps_outputs_and_gradients_and_unfuse_restores(make, size):
    # float64: in float32, rounding differences between the fused and the unfused BN can
    # flip a near-tie in a max-pool window deep in the network, which moves a gradient
    model = make().train().double()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # torchvision's classifier: same outputs on both sides
    original_keys = list(model.state_dict().keys())
    fused_model = fuse(model, inplace=False)
    assert any(isinstance(m, (ConvBNReLU2d, FusedConv2d)) for m in fused_model.modules())
    assert list(fused_model.state_dict().keys()) == original_keys
    assert not any(type(m) is nn.MaxPool2d for m in fused_model.modules())
    x = torch.randn(size, dtype=torch.float64)
    outputs = []
    for m in (model, fused_model):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        outputs.append((y, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-7, atol=1e-9 * outputs[0][1].abs().max().item())
    back = unfuse(fused_model, inplace=False)
    assert list(back.state_dict().keys()) == original_keys
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert not any(isinstance(m, (ConvBNReLU2d, segnet_ext.nn.MaxPool2x2)) for m in back.modules())
    for k, v in model.state_dict().items():  # running statistics updated identically on both sides
        torch.testing.assert_close(back.state_dict()[k], v, rtol=1e-9, atol=1e-12)


def test_fuse_a_bare_sequential_keeps_its_keys():
    seq, _ = pair(3, 4, torch.float32)
    block = fuse(seq, inplace=False)
    assert isinstance(block, ConvBNReLU2d) and block.state_dict().keys() == seq.state_dict().keys()
    assert isinstance(unfuse(block), nn.Sequential)




@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_residual_blocks_in_each_layout_and_dtype(fmt, dtype):
    """Against the float64 model: the fused blocks' error is that of the unfused blocks in
    the same dtype (in bf16/fp16 a ReLU near 0 may flip either way, so element-wise
    equality is no criterion)."""
    blocks = randomise_bn(nn.Sequential(BasicBlock(8, downsample=True), BasicBlock(8), BasicBlock(8)))
    x = torch.randn(4, 8, 16, 15)  # large enough that ReLUs flipped by rounding average out
    want = run(copy.deepcopy(blocks).double(), x.double(), "train")
    fused_blocks = fuse(copy.deepcopy(blocks)).to(dtype)
    xd = x.to(dtype).contiguous(memory_format=fmt)
    plain, got = run(copy.deepcopy(blocks).to(dtype), xd, "train"), run(fused_blocks, xd, "train")
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
    error = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    flat = lambda grads: torch.cat([grads[k].flatten().double() for k in want[2]])
    eps = torch.finfo(dtype).eps
    for what, g, p, w in [("output", got[0], plain[0], want[0]), ("input gradient", got[1], plain[1], want[1]),
                          ("parameter gradients", flat(got[2]), flat(plain[2]), flat(want[2]))]:
        assert error(g, w) <= 3 * error(p, w) + 50 * eps, (what, error(g, w), error(p, w))


def test_a_chain_of_residual_outputs_rebuilds_bit_identically_within_the_depth_bound():
    from segnet_ext import recompute

    blocks = fuse(randomise_bn(nn.Sequential(*(BasicBlock(4) for _ in range(6)))))
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    y, depths = x, []
    for block in blocks:
        y = block(y)
        recipe = recompute.recipe_of(y)
        assert torch.equal(recipe.recompute(), y)
        depths.append(recipe.depth)
    # nested (each output rebuilt from the previous one's recipe), then capped: the chain
    # stores one block output in every MAX_DEPTH
    assert depths == [1, 2, 3, 1, 2, 3] and recompute.MAX_DEPTH == 3
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_residual_chain_rebuilds_each_output_once_per_backward_and_keeps_nothing_after():
    """A block output is the next block's convolution input, its identity, the identity in
    the next output's recipe and (for the ReLU's mask) its own block's: one rebuild serves
    them all within a backward pass, and none outlives it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from segnet_ext import recompute

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is torch.ops.segnet_ext.scale_shift_relu.default
            return func(*args, **(kwargs or {}))

    blocks = fuse(randomise_bn(nn.Sequential(*(BasicBlock(4) for _ in range(6))))).double()
    reference = copy.deepcopy(blocks)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    outputs, y = [], x
    for block in blocks:
        y = block(y)
        outputs.append(y)
    recipes = [recompute.recipe_of(o) for o in outputs]
    with Count():
        grad, = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert Count.calls == 12  # 6 blocks x (the first convolution's output, the block output): once each
    assert all(r.kept is None for r in recipes)
    again, = torch.autograd.grad(y.sum(), x)  # the retained graph rebuilds anew: same gradient
    assert torch.equal(again, grad)
    want, = torch.autograd.grad(reference(x).sum(), x)  # a fresh forward: the same bits
    assert torch.equal(grad, want)


def test_a_residual_the_fused_op_cannot_take_is_added_as_before():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x, bias):
            return F.relu(self.bn(self.conv(x)) + bias)

    model = randomise_bn(Broadcast()).double()
    fused_model = fuse(copy.deepcopy(model))
    assert fused_model.conv.relu
    x, bias = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(3, 1, 1, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode), fused_model.train(mode)
        torch.testing.assert_close(fused_model(x, bias), model(x, bias), rtol=1e-9, atol=1e-9)


def test_a_fused_model_compiles_whole_and_exports():
    model = randomise_bn(TinyResNet())
    fused_model = fuse(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    for mode in (True, False):
        model.train(mode), fused_model.train(mode)
        compiled = torch.compile(fused_model, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    exported = torch.export.export(fused_model.eval(), (x,))
    torch.testing.assert_close(exported.module()(x), model.eval()(x), rtol=1e-4, atol=1e-4)
