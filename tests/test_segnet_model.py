"""SegNet / SegNet-Basic: shapes, the two backends, encoder initialisation, learning."""
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segnet import SegNet, SegNetBasic, build_model, load_encoder_weights
from segnet.model import DECODER_STAGES, VGG16_STAGES, LocalContrastNorm

MODELS = [SegNet, SegNetBasic]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("size", [(1, 1), (7, 9), (360, 480), (361, 479)])
def test_logits_have_the_input_size(cls, size):
    model = cls(num_classes=5).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, *size))
    assert y.shape == (1, 5, *size)
    assert torch.isfinite(y).all()


def test_segnet_is_the_papers_network():
    model = SegNet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 26 and len(list(model.encoder.parameters())) == 13 * 4
    assert len([m for m in model.decoder.modules() if isinstance(m, nn.BatchNorm2d)]) == 12  # the classifier has none
    assert sum(len(s) for s in VGG16_STAGES) == 13 and sum(len(s) for s in DECODER_STAGES) + 1 == 13
    assert 29_000_000 < sum(p.numel() for p in model.parameters()) < 30_000_000  # paper: 29.5M
    # ceil-mode pooling: 360x480 -> 180x240, 90x120, 45x60, 23x30, 12x15
    sizes, x = [], torch.randn(1, 3, 360, 480)
    with torch.no_grad():
        for stage, pool in zip(model.eval().encoder, model.pools):
            x, _ = pool(stage(x))
            sizes.append(tuple(x.shape[-2:]))
    assert sizes == [(180, 240), (90, 120), (45, 60), (23, 30), (12, 15)]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dropout, input_norm", [(0.0, "none"), (0.5, "none"), (0.0, "lcn"), (0.0, "rgb+lcn")])
def test_backends_agree_forward_and_backward(cls, channels_last, dropout, input_norm):
    ours = cls(num_classes=4, backend="segnet_ext", dropout=dropout, input_norm=input_norm).double()
    theirs = cls(num_classes=4, backend="torch", dropout=dropout, input_norm=input_norm).double()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (2, 37, 45))
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(1)  # the same dropout masks
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_checkpoint_moves_between_backends():
    # float64: in float32 the backends' rounding differs by ~1e-6 (BN folded or not), enough
    # to flip a near-tie inside a pooling window now and then, and the unpooled maps then
    # differ by a whole value (seen once in ~100 random draws)
    a = SegNetBasic(backend="segnet_ext").double().eval()
    b = SegNetBasic(backend="torch").double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 45, 61, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls, central", [(SegNetBasic, 2), (SegNet, 3)])
def test_dropout_in_the_central_stages(cls, central):
    """Bayesian SegNet's placement: after the deepest encoder pools and the deepest decoder
    stages; no weights added; evaluation is the dropout-free network (weight averaging)."""
    torch.manual_seed(0)
    plain, dropped = cls(num_classes=3), cls(num_classes=3, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    stages = len(plain.pools)
    kinds = lambda modules: [type(m).__name__ for m in modules]
    assert kinds(dropped.encoder_dropout) == ["Identity"] * (stages - central) + ["Dropout"] * central
    assert kinds(dropped.decoder_dropout) == ["Dropout"] * central + ["Identity"] * (stages - central)
    assert kinds(plain.encoder_dropout) == kinds(plain.decoder_dropout) == ["Identity"] * stages
    # the encoder's dropout sees the pooled values (not the map before pooling)
    seen = {}
    dropped.pools[-1].register_forward_hook(lambda m, i, o: seen.update(pooled=o[0]))
    dropped.encoder_dropout[-1].register_forward_hook(lambda m, i, o: seen.update(dropout_in=i[0]))
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x), rtol=0, atol=0)
        seen.clear()
        a, b, c = dropped.train()(x), dropped(x), plain.train()(x)
    assert seen["dropout_in"] is seen["pooled"]
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_bad_arguments():
    for p in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=f"dropout must be a probability in \\[0, 1\\), got {p!r}"):
            SegNetBasic(dropout=p)
    with pytest.raises(ValueError, match="backend must be one of"):
        SegNet(backend="caffe")
    with pytest.raises(ValueError, match=r"input_norm must be one of \('none', 'lcn', 'rgb\+lcn'\), got 'LCN'"):
        build_model("segnet_basic", input_norm="LCN")
    for window in (0, 4, 2.0):
        with pytest.raises(ValueError, match=f"window must be an odd number of pixels >= 1, got {window!r}"):
            LocalContrastNorm(window)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("unet")
    with pytest.raises(ValueError, match="3 input channels, got 4"):
        SegNetBasic()(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"expects images \[N, 3, H, W\]"):
        SegNetBasic()(torch.randn(3, 8, 8))


def reference_lcn(x: Tensor, window: int, eps: float = 1e-4) -> Tensor:
    """LocalContrastNorm pixel by pixel: each box mean is the plain mean of the window's pixels
    inside the image."""
    def box_mean(t: Tensor) -> Tensor:
        H, W, r = t.shape[-2], t.shape[-1], window // 2
        out = torch.empty_like(t)
        for i in range(H):
            for j in range(W):
                out[..., i, j] = t[..., max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1].mean((-2, -1))
        return out

    v = x - box_mean(box_mean(x))
    s = box_mean(box_mean(v * v)).sum(1, keepdim=True).sqrt()
    floor = s.mean((2, 3), keepdim=True).clamp_min(eps)
    return v / torch.maximum(s, floor)


@pytest.mark.parametrize("window, size", [(3, (6, 7)), (5, (9, 4)), (9, (3, 11)), (1, (4, 5)), (9, (1, 1))])
def test_local_contrast_norm_against_its_definition(window, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64) * 3 + 1
    got = LocalContrastNorm(window)(x)
    torch.testing.assert_close(got, reference_lcn(x, window), rtol=1e-9, atol=1e-12)
    # channels_last in, the same values out
    torch.testing.assert_close(LocalContrastNorm(window)(x.contiguous(memory_format=torch.channels_last)), got,
                               rtol=1e-9, atol=1e-12)


def test_local_contrast_norm_invariances_and_edge_cases():
    lcn = LocalContrastNorm()
    x = torch.rand(2, 3, 30, 41, dtype=torch.float64)
    y = lcn(x)
    assert y.abs().max() > 0.5  # not a map of zeros
    # an offset per channel and a gain common to the channels cancel
    offset, gain = torch.randn(1, 3, 1, 1, dtype=torch.float64), 0.1 + 5 * torch.rand(()).item()
    torch.testing.assert_close(lcn(gain * x + offset), y, rtol=1e-9, atol=1e-9)
    # a constant image is all zeros, not NaN; a 1x1 image too
    assert torch.equal(lcn(torch.full((1, 3, 5, 6), 0.7)), torch.zeros(1, 3, 5, 6))
    assert torch.equal(lcn(torch.randn(1, 3, 1, 1)), torch.zeros(1, 3, 1, 1))
    # a NaN spoils its own image only
    bad = x.clone()
    bad[0, 1, 4, 5] = float("nan")
    out = lcn(bad)
    assert out[0].isnan().any() and torch.equal(out[1], y[1])
    # half-precision inputs and autocast: computed and returned in float32
    half = x.to(torch.bfloat16)
    assert lcn(half).dtype == torch.float32
    torch.testing.assert_close(lcn(half), lcn(half.float()))
    with torch.autocast("cpu", torch.bfloat16):
        assert lcn(x.float()).dtype == torch.float32


def test_local_contrast_norm_gradcheck():
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LocalContrastNorm(3), (x,))


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("input_norm", ["lcn", "rgb+lcn"])
def test_input_norm_runs_first_and_adds_no_weights(cls, input_norm):
    """lcn: the plain network on the LCN of the input; rgb+lcn: the plain network with 6 input
    channels on the input and its LCN stacked. The same weights (shapes included) either way."""
    both = input_norm == "rgb+lcn"
    plain = cls(num_classes=3, in_channels=6 if both else 3).double().eval()
    normed = cls(num_classes=3, input_norm=input_norm).double().eval()
    assert normed.in_channels == 3 and normed.stem_channels == (6 if both else 3)
    normed.load_state_dict(plain.state_dict())  # strict: the same keys and shapes
    x = torch.rand(2, 3, 16, 21, dtype=torch.float64) * 255 - 100
    lcn = LocalContrastNorm()(x)
    expected_input = torch.cat([x, lcn], 1) if both else lcn
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain(expected_input))
        torch.testing.assert_close(normed(x.contiguous(memory_format=torch.channels_last)), plain(expected_input))
        if both:
            assert not torch.allclose(normed(x), plain(torch.cat([lcn, lcn], 1)))  # the input itself counts
            with pytest.raises(ValueError, match=r"expects 3 input channels, got 6"):
                normed(expected_input)


def fake_vgg16_state_dict(batch_norm: bool):
    """A state dict laid out as torchvision's vgg16_bn / vgg16 (features.N, classifier.N)."""
    layers, width = [], 3
    for widths in VGG16_STAGES:
        for w in widths:
            layers += [nn.Conv2d(width, w, 3, padding=1)] + ([nn.BatchNorm2d(w)] if batch_norm else []) + [nn.ReLU()]
            width = w
        layers.append(nn.MaxPool2d(2))
    vgg = nn.Module()
    vgg.features = nn.Sequential(*layers)
    vgg.classifier = nn.Sequential(nn.Linear(8, 4))
    for m in vgg.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                t.data.uniform_(0.5, 1.5)
    return vgg.state_dict()


@pytest.mark.parametrize("batch_norm", [True, False])
def test_encoder_weights_from_torchvision_layout(tmp_path, batch_norm):
    state = fake_vgg16_state_dict(batch_norm)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    model = SegNet()
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    loaded = load_encoder_weights(model, path)
    assert len(loaded) == 13 * (7 if batch_norm else 2)  # conv w, b (+ BN w, b, mean, var, count)
    convs = [k for k in state if k.endswith(".weight") and state[k].dim() == 4]
    blocks = [block for stage in model.encoder for block in stage]
    for key, block in zip(convs, blocks):
        assert torch.equal(block[0].weight, state[key])
        if batch_norm:
            bn = key.replace(".weight", "").split(".")
            bn = f"features.{int(bn[1]) + 1}"
            assert torch.equal(block[1].running_var, state[f"{bn}.running_var"])
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k])


def test_encoder_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_encoder_weights(SegNet(), tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a loadable torch state dict"):
        load_encoder_weights(SegNet(), junk)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, resnet)
    with pytest.raises(ValueError, match="13 convolutions.*found 0"):
        load_encoder_weights(SegNet(), resnet)
    with pytest.raises(ValueError, match="fit only SegNet"):
        load_encoder_weights(SegNetBasic(), resnet)
    wide = fake_vgg16_state_dict(True)
    wide["features.0.weight"] = torch.zeros(64, 4, 3, 3)
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"features.0 weight has shape \(64, 4, 3, 3\)"):
        load_encoder_weights(SegNet(), tmp_path / "wide.pth")


def test_one_sgd_step_lowers_the_loss():
    model = SegNetBasic(num_classes=4)
    x, target = torch.randn(2, 3, 32, 48), torch.randint(0, 4, (2, 32, 48))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = F.cross_entropy(model(x), target)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), target)
    assert after < before


def test_encoder_weights_from_a_real_torchvision_vgg16_bn(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    vgg = torchvision.models.vgg16_bn(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16_bn.pth")
    model = SegNet()
    load_encoder_weights(model, tmp_path / "vgg16_bn.pth")
    blocks = [block for stage in model.encoder for block in stage]
    convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    bns = [m for m in vgg.features if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(b[0].weight, c.weight) and torch.equal(b[1].running_var, n.running_var)
               for b, c, n in zip(blocks, convs, bns))
    # and the encoder computes what vgg16_bn's features compute, up to the last pool
    x = torch.randn(1, 3, 32, 32)
    model.eval(), vgg.eval()
    with torch.no_grad():
        h = x
        for stage, pool in zip(model.encoder, model.pools):
            h, _ = pool(stage(h))
        torch.testing.assert_close(h, vgg.features(x), rtol=1e-4, atol=1e-4)
