"""CamVid reading, augmentation, sampling, class weights and metrics."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from segnet import data
from segnet.data import (VOID, Augment, CamVid, CopyPaste, EpochSampler, class_weights, enet_weights, list_pairs,
                         median_frequency_weights, rare_classes)
from segnet.metrics import confusion_matrix, format_scores, scores
from tests.conftest import write_camvid


def test_bundled_sample():
    train, val = CamVid("sample", "train"), CamVid("sample", "val")
    assert (len(train), len(val)) == (4, 2)
    image, label = train[0]
    assert image.shape == (3, 360, 480) and image.dtype == torch.float32
    assert label.shape == (360, 480) and label.dtype == torch.int64
    assert 0 <= label.min() and label.max() <= VOID
    assert "Attribution-NonCommercial" in (data.sample_root() / "README.md").read_text()  # its licence, credited


def test_pairs_by_folder_and_by_list(camvid_root):
    by_folder = list_pairs(camvid_root, "train")
    (camvid_root / "train.txt").write_text("".join(f"train/{p.name} trainannot/{p.name}\n" for p, _ in by_folder[::-1]))
    by_list = list_pairs(camvid_root, "train")
    assert [p.name for p, _ in by_list] == [p.name for p, _ in by_folder[::-1]]


def test_image_and_label_decoding(camvid_root):
    image_path, label_path = list_pairs(camvid_root, "train")[0]
    image, label = CamVid(camvid_root, "train")[0]
    raw = torch.from_numpy(np.array(Image.open(image_path))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (raw - mean) / std)
    assert torch.equal(label, torch.from_numpy(np.array(Image.open(label_path)).astype(np.int64)))


def test_bad_files_are_named(camvid_root):
    pairs = list_pairs(camvid_root, "train")
    dataset = CamVid(camvid_root, "train")
    pairs[0][0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=f"cannot read image .*{pairs[0][0].name}"):
        dataset[0]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(pairs[1][0])
    with pytest.raises(ValueError, match=r"is \(5, 5\) \(HxW\) but its label .* is \(24, 32\)"):
        dataset[1]
    Image.fromarray(np.full((24, 32), 200, np.uint8)).save(pairs[2][1])
    with pytest.raises(ValueError, match=r"label .*img2.png' has values \[200\]: camvid has class ids 0..10 and ignore_index 11"):
        dataset[2]
    Image.fromarray(np.full((24, 32, 3), (1, 2, 3), np.uint8)).save(pairs[3][1])
    with pytest.raises(ValueError, match=r"label .*img3.png' has colours \[\[1, 2, 3\]\] that are no class of camvid"):
        dataset[3]
    Image.fromarray(np.zeros((24, 32, 2), np.uint8), "LA").save(pairs[3][1])
    with pytest.raises(ValueError, match="class ids .grey or palette. or of class colours .RGB., got mode LA"):
        dataset[3]


def png_header(path, width, height):
    """A PNG whose header promises width x height RGB pixels and whose data holds none."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_untrusted_image_files(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    png_header(bomb, 9000, 8000)  # 72 M pixels promised in 67 bytes: refused before decoding
    with pytest.raises(ValueError, match=r"bomb.png' is 9000x8000 = 72000000 pixels, more than the limit of 67108864"):
        data.read_image(bomb)
    with pytest.raises(ValueError, match="label .*bomb.png' is 9000x8000 = 72000000 pixels, more than the limit"):
        data.read_label(bomb)
    png_header(bomb, 50_000, 50_000)  # beyond Pillow's own guard too
    with pytest.raises(ValueError, match="image .*bomb.png' is refused: .*decompression bomb"):
        data.read_image(bomb)
    png_header(bomb, 9000, 8000)
    monkeypatch.setenv("SEGNET_MAX_IMAGE_PIXELS", str(9000 * 8000))  # allowed, it is then just broken
    with pytest.raises(ValueError, match="cannot read image .*bomb.png"):
        data.read_image(bomb)
    monkeypatch.delenv("SEGNET_MAX_IMAGE_PIXELS")
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("truncated.png", "text.png", "empty.jpg"):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            data.read_image(tmp_path / name)
    Image.fromarray(np.zeros((4, 4), np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="floating-point images are not supported"):
        data.read_image(tmp_path / "float.tif")


def test_image_modes_and_orientation(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    as_read = lambda name: data.read_image(tmp_path / name).permute(1, 2, 0).numpy()  # noqa: E731
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(as_read("rgb.png"), rgb)
    Image.fromarray(np.dstack([rgb, np.full((6, 9), 7, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(as_read("rgba.png"), rgb)  # alpha dropped
    Image.fromarray(rgb).quantize(256).save(tmp_path / "palette.png")
    palette = Image.open(tmp_path / "palette.png")
    assert palette.mode == "P" and np.array_equal(as_read("palette.png"), np.asarray(palette.convert("RGB")))
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert np.array_equal(as_read("grey.png"), np.repeat(grey[..., None], 3, axis=2))
    grey16 = grey.astype(np.uint16) * 256 + 100  # 16-bit: the top 8 bits are the 8-bit grey
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.array_equal(as_read("grey16.png"), np.repeat(grey[..., None], 3, axis=2))
    flat = np.broadcast_to(np.array([200, 100, 50], np.uint8), (6, 9, 3))
    Image.fromarray(np.ascontiguousarray(flat)).save(tmp_path / "photo.jpg", quality=95)
    assert np.abs(as_read("photo.jpg").astype(int) - flat).max() <= 3
    # a camera's portrait photo: stored landscape, EXIF orientation 6 (rotate 90 degrees clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "portrait.png", exif=exif)
    assert np.array_equal(as_read("portrait.png"), np.rot90(rgb, k=-1))


def test_bad_layouts(camvid_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        CamVid(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="neither .*test.txt nor the folder"):
        CamVid(camvid_root, "test")
    (camvid_root / "val.txt").write_text("val/img0.png ../../etc/passwd\n")
    with pytest.raises(ValueError, match="leaves the data root"):
        CamVid(camvid_root, "val")
    (camvid_root / "val.txt").write_text("val/img0.png\n")
    with pytest.raises(ValueError, match="val.txt:1: expected 'image label'"):
        CamVid(camvid_root, "val")
    (camvid_root / "trainannot" / "img3.png").unlink()
    with pytest.raises(FileNotFoundError, match="no label .*img3.png"):
        CamVid(camvid_root, "train")


def test_augment_moves_image_and_label_together():
    image = torch.arange(2 * 3 * 4 * 6, dtype=torch.uint8).view(2, 3, 4, 6)[0]
    label = torch.arange(24).view(4, 6) % 12
    flipped = Augment(flip=True)
    outcomes = set()
    for seed in range(16):
        im, lab = flipped(image, label, torch.Generator().manual_seed(seed))
        is_flipped = torch.equal(lab, label.flip(-1))
        assert is_flipped or torch.equal(lab, label)
        assert torch.equal(im, image.flip(-1) if is_flipped else image)
        outcomes.add(is_flipped)
    assert outcomes == {True, False}
    im, lab = Augment(flip=False, crop=(6, 8))(image, label, torch.Generator().manual_seed(0))
    assert im.shape == (3, 6, 8) and lab.shape == (6, 8)
    assert (lab == VOID).sum() >= 6 * 8 - 24  # the padding is void
    im, lab = Augment(flip=False, scale=(0.5, 0.5))(image, label, torch.Generator())
    assert im.shape == (3, 2, 3) and lab.shape == (2, 3) and im.dtype == torch.uint8
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())
    with pytest.raises(ValueError, match="scale must be a range"):
        Augment(scale=(1.0, 0.5))


def test_samples_are_reproducible_whatever_the_workers(camvid_root):
    dataset = CamVid(camvid_root, "train", Augment(scale=(0.5, 1.5), crop=(16, 16)))
    sampler = EpochSampler(len(dataset), seed=3, epoch=1)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=data.collate)
        batches = [b for b in loader]
        if workers == 0:
            first = batches
        else:
            for (a, la), (b, lb) in zip(first, batches):
                assert torch.equal(a, b) and torch.equal(la, lb)


def test_epoch_sampler_shards_and_skips():
    full = list(EpochSampler(10, seed=1, epoch=2))
    assert sorted(i for i, _ in full) == list(range(10))
    assert [i for i, _ in full] != list(range(10))
    assert full != list(EpochSampler(10, seed=1, epoch=3))
    shards = [list(EpochSampler(10, seed=1, epoch=2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # 12 = 10 wrapped around
    interleaved = [shards[p % 3][p // 3] for p in range(10)]
    assert interleaved == full  # same images, same augmentation seeds as one process
    assert list(EpochSampler(10, seed=1, epoch=2, skip=7)) == full[7:]
    assert len(EpochSampler(10, 1, 2, skip=7)) == 3


def test_median_frequency_and_enet_weights(tmp_path, monkeypatch):
    root = tmp_path / "mf"
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    labels = [np.array([[0, 0, 0, 1]], np.uint8), np.array([[0, 2, 2, 11]], np.uint8)]
    for i, lab in enumerate(labels):
        Image.fromarray(np.zeros((1, 4, 3), np.uint8)).save(root / "train" / f"{i}.png")
        Image.fromarray(lab).save(root / "trainannot" / f"{i}.png")
    # f_c = pixels of c / labelled (non-void) pixels of the images with c: 0: 4 in 4+3; 1: 1 in 4; 2: 2 in 3
    freq = np.array([4 / 7, 1 / 4, 2 / 3])
    median = np.median(freq)
    expected = [median / f for f in freq] + [0.0] * 8
    cache = tmp_path / "cache"
    got = median_frequency_weights(root, cache_dir=cache)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    files = list(cache.iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["weights"] == got
    files[0].write_text(json.dumps({"weights": [7.0] * 11}))  # the cache is what is read
    assert median_frequency_weights(root, cache_dir=cache) == [7.0] * 11
    assert class_weights("paper", root)[2] == 4.5640 and class_weights("none", root) is None
    with pytest.raises(ValueError, match="'median', 'enet', 'paper' or 'none', got 'inverse'"):
        class_weights("inverse", root)
    # ENet's: 1 / ln(1.02 + share of the 7 labelled pixels); absent classes 0; cached apart
    shares = np.array([4 / 7, 1 / 7, 2 / 7])
    got = enet_weights(root, cache_dir=cache)
    np.testing.assert_allclose(got, list(1 / np.log(1.02 + shares)) + [0.0] * 8, rtol=1e-12)
    assert got[0] < got[2] < got[1] and len(list(cache.iterdir())) == 2
    monkeypatch.setenv("SEGNET_CACHE", str(cache))
    assert class_weights("enet", root) == got
    # a power softens (0.5: the square root) or flattens (0: all 1) them; an absent class stays 0
    np.testing.assert_allclose(class_weights("enet", root, power=0.5), np.sqrt(got), rtol=1e-12)
    assert class_weights("enet", root, power=0.0) == [1.0] * 3 + [0.0] * 8
    assert class_weights("paper", root, power=2.0)[2] == pytest.approx(4.5640 ** 2)
    for power in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"class weight power must be a finite number >= 0 .* got {power}"):
            class_weights("enet", root, power=power)


def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 11, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, num_classes=3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]  # the void pixel is not counted
    s = scores(cm, ["a", "b", "c"])
    assert s["global_accuracy"] == pytest.approx(100 * 5 / 7, abs=1e-3)
    assert s["class_accuracy"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3, abs=1e-3)
    ious = [2 / 4, 2 / 3, 1 / 2]  # tp / (row + col - tp)
    assert [s["per_class"][n]["iou"] for n in "abc"] == pytest.approx([100 * i for i in ious], abs=1e-3)
    assert s["mean_iou"] == pytest.approx(100 * sum(ious) / 3, abs=1e-3)
    assert "mIoU" in format_scores(s)


def test_scores_leave_out_absent_classes():
    cm = torch.tensor([[3, 0, 0], [0, 0, 0], [1, 0, 1]])  # class 1 neither true nor predicted
    s = scores(cm, ["a", "b", "c"])
    assert s["per_class"]["b"]["iou"] is None and s["per_class"]["b"]["accuracy"] is None
    assert s["mean_iou"] == pytest.approx(100 * (3 / 4 + 1 / 2) / 2, abs=1e-3)
    with pytest.raises(ValueError, match="prediction shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2))


def sequences_root(tmp_path):
    """CamVid layout whose frames belong to sequences A (3 train frames), B (2 train, 2 val)."""
    root = write_camvid(tmp_path / "seq", splits=(("train", 5), ("val", 2)))
    for split, names in (("train", ["A_f1", "A_f2", "A_f3", "B_f1", "B_f2"]), ("val", ["B_f3", "B_f4"])):
        for i, name in enumerate(names):
            for folder in (split, f"{split}annot"):
                (root / folder / f"img{i}.png").rename(root / folder / f"{name}.png")
    return root


def test_splits_join_and_select_sequences(tmp_path):
    from segnet.data import sequence_of

    root = sequences_root(tmp_path)
    stems = lambda pairs: [image.stem for image, _ in pairs]
    assert sequence_of("x/0006R0_f02340.png") == "0006R0" and sequence_of("aachen_000000_000019_leftImg8bit") == "aachen"
    assert stems(list_pairs(root, "train@A")) == ["A_f1", "A_f2", "A_f3"]
    assert stems(list_pairs(root, "train", exclude_sequences=["A"])) == ["B_f1", "B_f2"]
    assert stems(list_pairs(root, "train+val@B")) == ["B_f1", "B_f2", "B_f3", "B_f4"]
    assert len(list_pairs(root, "train+val")) == 7
    with pytest.raises(ValueError, match=r"sequence 'C' is not in split 'train' .* \(its sequences: A, B\)"):
        list_pairs(root, "train@C")
    with pytest.raises(ValueError, match="has no images once sequences .'A', 'B'. are left out"):
        list_pairs(root, "train", exclude_sequences=["A", "B"])


def test_holdout_sequence_trains_without_it_and_validates_on_it(tmp_path):
    from segnet.train import TrainConfig, Trainer

    root = sequences_root(tmp_path)
    config = TrainConfig(data=str(root), output=str(tmp_path / "run"), model="segnet_basic", epochs=1, batch_size=2,
                         holdout_sequence="A", progress=False)
    trainer = Trainer(config)
    assert [p.stem for p, _ in trainer.train_set.pairs] == ["B_f1", "B_f2"]
    assert [p.stem for p, _ in trainer.val_set.pairs] == ["A_f1", "A_f2", "A_f3"]
    joined = Trainer(TrainConfig(**{**config.__dict__, "train_split": "train+val", "holdout_sequence": None}))
    assert len(joined.train_set) == 7 and joined.val_set.split == "val"


def test_photometric_augmentation():
    from segnet.data import list_pairs as pairs, read_image

    image = read_image(pairs("sample", "val")[0][0])[:, :64, :96]
    label = torch.zeros(64, 96, dtype=torch.long)
    jitter = Augment(flip=False, color=(0.4, 0.4, 0.4, 0.05), blur=0.5)
    outs = [jitter(image, label, torch.Generator().manual_seed(seed))[0] for seed in range(8)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outs)
    assert len({o.float().mean().round().item() for o in outs}) > 3  # brightness and contrast vary
    torch.testing.assert_close(jitter(image, label, torch.Generator().manual_seed(3))[0], outs[3], rtol=0, atol=0)
    # each change alone does what it says
    same = lambda **kw: Augment(flip=False, **kw)(image, label, torch.Generator().manual_seed(1))[0].float()
    grey = lambda x: (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * x).sum(0)
    assert (same(color=(0.0, 0.0, 0.0, 0.0)) == image.float()).all()
    assert (same(color=(0.0, 0.0, 0.999, 0.0)) - grey(image.float())).abs().max() > 0  # saturation moves colours
    hue_only = same(color=(0.0, 0.0, 0.0, 0.2))
    assert (grey(hue_only) - grey(image.float())).abs().mean() < 2.5  # a hue rotation keeps brightness
    blurred = same(blur=1.0)
    assert blurred.diff(dim=-1).abs().mean() < image.float().diff(dim=-1).abs().mean()  # blur smooths edges
    for bad, message in (({"color": (1.5, 0, 0, 0)}, "color must be"), ({"blur": 2.0}, "blur must be a probability")):
        with pytest.raises(ValueError, match=message):
            Augment(**bad)


def test_copy_paste_pastes_the_rare_classes_of_a_donor():
    image, label = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8), torch.randint(0, 4, (5, 6))
    donor_image, donor_label = torch.randint(0, 256, (3, 4, 7), dtype=torch.uint8), torch.randint(0, 4, (4, 7))
    donor_label[0, 0], donor_label[1, 1] = 1, VOID                       # a rare pixel and a void one, at least
    inputs = [t.clone() for t in (image, label, donor_image, donor_label)]
    out_image, out_label = CopyPaste(1.0, [1, 3])(image, label, donor_image, donor_label)
    for y in range(5):
        for x in range(6):
            pasted = y < 4 and donor_label[y, x] in (1, 3)               # the donor covers the top-left 4 x 6
            source_image, source_label = (donor_image, donor_label) if pasted else (image, label)
            assert out_label[y, x] == source_label[y, x] and torch.equal(out_image[:, y, x], source_image[:, y, x]), (y, x)
    assert out_label[0, 0] == 1
    assert all(torch.equal(a, b) for a, b in zip(inputs, (image, label, donor_image, donor_label)))  # inputs left alone
    with pytest.raises(ValueError, match=r"copy-paste probability must be in \[0, 1\], got 1.5"):
        CopyPaste(1.5, [1])


def test_copy_paste_in_the_dataset(camvid_root):
    plain = CamVid(camvid_root, "train")
    pasting = CamVid(camvid_root, "train", copy_paste=CopyPaste(1.0, [2, 5]))
    raw = [data.read_image(i) for i, _ in plain.pairs], [data.read_label(l) for _, l in plain.pairs]
    donors = set()
    for seed in range(12):
        image, label = pasting[(1, seed)]
        candidates = [CopyPaste(1.0, [2, 5])(raw[0][1], raw[1][1], raw[0][d], raw[1][d]) for d in range(len(plain))]
        matches = [d for d, (im, lab) in enumerate(candidates) if torch.equal(label, lab) and torch.equal(image, data.normalize(im))]
        assert matches, seed                                             # image 1 with some donor's classes 2 and 5
        donors.update(matches)
        assert torch.equal(pasting[(1, seed)][1], label)                 # reproducible
    assert len(donors) > 1
    # probability 0: the samples, augmentation included, of a dataset without copy-paste
    augment = Augment(scale=(0.5, 1.5), crop=(16, 16))
    never = CamVid(camvid_root, "train", augment, copy_paste=CopyPaste(0.0, [2, 5]))
    for seed in range(4):
        assert all(torch.equal(a, b) for a, b in zip(never[(2, seed)], CamVid(camvid_root, "train", augment)[(2, seed)]))
    # with augmentation: the sample's own draws come first, so what is not pasted over is the plain sample
    sometimes = CamVid(camvid_root, "train", augment, copy_paste=CopyPaste(0.5, [2, 5]))
    changed = 0
    for seed in range(16):
        (image, label), (plain_image, plain_label) = sometimes[(0, seed)], CamVid(camvid_root, "train", augment)[(0, seed)]
        pasted = (label != plain_label) | (image != plain_image).any(0)
        changed += int(pasted.any())
        assert set(label[pasted].tolist()) <= {2, 5}
    assert 0 < changed < 16


def test_rare_classes(tmp_path):
    root = tmp_path / "rare"
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    # labelled pixels (11, void, not counted): class 0: 5, 1: 1, 2: 3, 3: 2, 4: 3; median 3; rarer: 1 and 3
    for i, lab in enumerate([np.array([[0, 0, 0, 1, 11, 11]], np.uint8), np.array([[0, 0, 2, 2, 2, 3]], np.uint8),
                             np.array([[3, 11, 11, 4, 4, 4]], np.uint8)]):
        Image.fromarray(np.zeros((1, 6, 3), np.uint8)).save(root / "train" / f"{i}.png")
        Image.fromarray(lab).save(root / "trainannot" / f"{i}.png")
    assert rare_classes(root, cache_dir=tmp_path / "cache") == [1, 3]
    assert rare_classes("sample", "train+val", cache_dir=tmp_path / "cache")  # some class is rare in the bundled sample
