"""Datasets beyond CamVid: descriptions, the four layouts, label encodings, any ignore index,
through the command line; video prediction; loading the shipped model by name."""
import importlib.util
import itertools
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segnet import load_pretrained, pretrained_names
from segnet.checkpoint import DEFAULT_PRETRAINED, load_checkpoint
from segnet.cli import main
from segnet.data import Augment, SegmentationDataset, class_weights, list_pairs, median_frequency_weights, read_label
from segnet.description import DatasetDescription, load_description, preset_names
from segnet.metrics import confusion_matrix, scores

RNG = np.random.default_rng()
H, W = 24, 40


def blobs(num_classes, ignore, rng):
    """A label map of a few rectangles of random classes, and an ignored band."""
    label = np.full((H, W), rng.integers(num_classes), np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, H - 6), rng.integers(0, W - 8)
        label[top:top + rng.integers(4, 12), left:left + rng.integers(6, 20)] = rng.integers(num_classes)
    label[0, :num_classes] = np.arange(num_classes)  # every class present, whatever the draws
    label[:, -3:] = ignore
    return label


def photo_of(label, description, rng):
    """An image that shows its label (class colour plus noise), so a model can learn it."""
    colours = description.palette().astype(np.int16)
    noisy = colours[label] + rng.integers(-20, 21, (H, W, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_cityscapes(root, rng):
    d = load_description("cityscapes")
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            label = blobs(d.num_classes, 255, rng)
            stem = f"{root}/%s/{split}/city{i % 2}/city{i % 2}_{i:06d}_000019"
            os.makedirs(os.path.dirname(stem % "leftImg8bit"), exist_ok=True)
            os.makedirs(os.path.dirname(stem % "gtFine"), exist_ok=True)
            Image.fromarray(photo_of(label, d, rng)).save(f"{stem % 'leftImg8bit'}_leftImg8bit.png")
            Image.fromarray(label).save(f"{stem % 'gtFine'}_gtFine_labelTrainIds.png")
            Image.fromarray(label * 0 + 7).save(f"{stem % 'gtFine'}_gtFine_labelIds.png")  # ignored file
    return d


def make_voc(root, rng, colour_coded=True):
    d = load_description("voc")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 3), ("val", 2)):
        stems = [f"2007_{split}_{i}" for i in range(count)]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            label = blobs(d.num_classes, 255, rng)
            Image.fromarray(photo_of(label, d, rng)).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
            if colour_coded:
                Image.fromarray(d.palette()[label]).save(root / "SegmentationClass" / f"{stem}.png")
            else:  # VOC's own: palette PNGs whose indices are the class ids
                im = Image.fromarray(label, "P")
                im.putpalette(d.palette().ravel().tolist())
                im.save(root / "SegmentationClass" / f"{stem}.png")
    return d


def make_generic(root, rng):
    """Three classes, 0 = 'unlabelled' is the ignore index; images .jpg, labels .png, nested."""
    spec = {"name": "fields", "layout": "generic", "ignore_index": 0,
            "classes": [{"name": "unlabelled", "color": [0, 0, 0]}, {"name": "crop", "color": [20, 200, 20]},
                        {"name": "soil", "color": [150, 90, 40]}]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "fields.json").write_text(json.dumps(spec))
    d = load_description(root / "fields.json")
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            sub = f"farm{i % 2}"
            (root / "images" / split / sub).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / sub).mkdir(parents=True, exist_ok=True)
            label = blobs(3, 0, rng)
            Image.fromarray(photo_of(label, d, rng)).save(root / "images" / split / sub / f"p{i}.jpg", quality=95)
            Image.fromarray(label).save(root / "labels" / split / sub / f"p{i}.png")
    return d


MAKERS = {"cityscapes": make_cityscapes, "voc": make_voc, "generic": make_generic}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_a_tiny_dataset_trains_evaluates_and_predicts_through_the_cli(kind, tmp_path, capsys):
    root = tmp_path / kind
    description = MAKERS[kind](root, RNG)
    dataset_flag = str(root / "fields.json") if kind == "generic" else kind
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--dataset", dataset_flag, "--model", "segnet_basic", "--epochs", "2",
                 "--batch-size", "3", "--optimizer", "adam", "--lr", "0.01", "--crop", "24x48", "--output", str(run),
                 "--no-progress"]) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["dataset"] == description.to_dict() and state["config"]["num_classes"] == description.num_classes
    assert state["model"]["classifier.weight"].shape[0] == description.num_classes
    capsys.readouterr()
    # eval and predict need no --dataset: the checkpoint carries its description
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--data", str(root), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    named = [c for i, c in enumerate(description.classes) if i != description.ignore_index]
    assert list(metrics["per_class"]) == named and metrics["dataset"] == description.name
    counted = sum(int((read_label(label, description) != description.ignore_index).sum())
                  for _, label in list_pairs(root, "val", description.layout))
    assert metrics["pixels"] == counted < 2 * H * W  # the ignored band is not counted
    assert Image.open(tmp_path / "m_confusion.png").size[0] > 200
    pred = tmp_path / "pred"
    images = [p for p, _ in list_pairs(root, "val", description.layout)]
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--input", str(images[0]), "--output", str(pred)]) == 0
    ids = np.asarray(Image.open(pred / f"{images[0].stem}_labels.png"))
    colour = np.asarray(Image.open(pred / f"{images[0].stem}_color.png"))
    assert ids.shape == (H, W) and ids.max() < description.num_classes
    np.testing.assert_array_equal(colour[:H, :W], description.palette()[ids])
    assert colour.shape[0] > H  # the legend below


def test_fine_tuning_the_shipped_model_on_other_classes(tmp_path, capsys):
    """--init-from the bundled CamVid model on a 3-class dataset: every weight but the classifier's
    is the shipped model's (float16 there, float32 here), the classifier is the run's own, and
    the command line trains on from there."""
    from segnet.train import TrainConfig, Trainer

    root = tmp_path / "fields"
    make_generic(root, RNG)
    shipped = load_checkpoint(DEFAULT_PRETRAINED)
    norm = shipped["config"]["input_norm"]
    config = TrainConfig(data=str(root), dataset=str(root / "fields.json"), model="segnet_basic", input_norm=norm,
                         init_from=DEFAULT_PRETRAINED, output=str(tmp_path / "t"), progress=False)
    state = Trainer(config).model.state_dict()
    assert capsys.readouterr().out == (f"fine-tuning from {DEFAULT_PRETRAINED}: it learned other classes, so "
                                       "classifier.weight, classifier.bias start fresh\n")
    assert state.keys() == shipped["model"].keys()
    for k, v in shipped["model"].items():
        if k.startswith("classifier."):
            assert state[k].shape[0] == 3 and v.shape[0] == 11, k
        else:
            assert torch.equal(state[k], v.to(state[k].dtype)), k
    run = ["train", "--data", str(root), "--dataset", str(root / "fields.json"), "--model", "segnet_basic",
           "--init-from", DEFAULT_PRETRAINED, "--epochs", "1", "--batch-size", "3", "--no-progress", "--output"]
    assert main(run + [str(tmp_path / "run"), "--input-norm", norm]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["model"]["classifier.weight"].shape[0] == 3
    other = "none" if norm != "none" else "lcn"
    capsys.readouterr()
    assert main(run + [str(tmp_path / "bad"), "--input-norm", other]) == 2
    assert f"has input_norm {norm!r}, but this run has {other!r}; fine-tune it with --input-norm {norm}" in capsys.readouterr().err


def test_colour_coded_and_palette_labels_decode_to_the_same_ids(tmp_path):
    coded, indexed = tmp_path / "rgb", tmp_path / "pal"
    make_voc(coded, np.random.default_rng(5), colour_coded=True)
    d = make_voc(indexed, np.random.default_rng(5), colour_coded=False)
    for (_, a), (_, b) in zip(list_pairs(coded, "train", "voc"), list_pairs(indexed, "train", "voc")):
        ids = read_label(b, d)
        assert (ids == 255).any() and ids[ids != 255].max() < 21
        torch.testing.assert_close(read_label(a, d), ids, rtol=0, atol=0)


def test_a_colour_not_in_the_palette_is_named(tmp_path):
    d = load_description("voc")
    label = d.palette()[blobs(21, 255, RNG)]
    label[3, 5] = (1, 2, 3)
    Image.fromarray(label).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"x.png' has colours \[\[1, 2, 3\]\] that are no class of voc"):
        read_label(tmp_path / "x.png", d)


def test_ids_outside_the_classes_and_the_ignore_index_are_refused(tmp_path):
    d = load_description("cityscapes")
    label = blobs(19, 255, RNG)
    label[0, 0] = 19
    Image.fromarray(label).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"values \[19\]: cityscapes has class ids 0..18 and ignore_index 255"):
        read_label(tmp_path / "x.png", d)


def test_crop_padding_uses_the_ignore_index():
    image, label = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8), torch.randint(0, 19, (5, 7))
    _, padded = Augment(flip=False, crop=(9, 11), ignore_index=255)(image, label, torch.Generator().manual_seed(0))
    assert padded.shape == (9, 11) and (padded == 255).sum() == 9 * 11 - 5 * 7
    assert set(padded[padded != 255].tolist()) <= set(label.unique().tolist())


def test_class_weights_and_metrics_leave_an_in_range_ignore_index_out(tmp_path):
    d = make_generic(tmp_path, RNG)
    weights = median_frequency_weights(tmp_path, description=d, cache_dir=tmp_path / "cache")
    assert weights[0] == 0 and all(w > 0 for w in weights[1:])
    target = torch.tensor([0, 1, 1, 2, 2, 2])
    prediction = torch.tensor([1, 1, 0, 2, 2, 1])  # predicting the ignored class is an error of class 1
    cm = confusion_matrix(prediction, target, 3, ignore_index=0)
    result = scores(cm, d.classes, d.ignore_index)
    assert list(result["per_class"]) == ["crop", "soil"] and result["pixels"] == 5
    assert result["per_class"]["crop"]["accuracy"] == 50 and result["global_accuracy"] == 60


@pytest.mark.parametrize("change, message", [
    ({"classes": []}, "'classes' must be a list of 1 to 255"),
    ({"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "a", "color": [3, 2, 1]}]}, "class names must differ"),
    ({"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [1, 2, 3]}]}, "class colors must differ"),
    ({"classes": [{"name": "a", "color": [1, 2, 300]}]}, r"classes\[0\].color must be \[r, g, b\] with integers 0..255"),
    ({"ignore_index": 256}, "'ignore_index' must be an integer in 0..255, got 256"),
    ({"layout": "coco"}, "'layout' must be one of"),
    ({"class_weights": [1.0]}, "'class_weights' must be 2 numbers"),
    ({"colour": 1}, r"unknown fields \['colour'\]"),
    ({"ignore_color": [9, 9, 9]}, "ignore_color .9, 9, 9. is also the colour of class 'b'"),
])
def test_bad_descriptions_are_refused_with_the_field_named(change, message, tmp_path):
    spec = {"name": "x", "ignore_index": 255, "classes": [{"name": "a", "color": [1, 1, 1]}, {"name": "b", "color": [9, 9, 9]}]}
    spec.update(change)
    (tmp_path / "d.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=message):
        load_description(tmp_path / "d.json")
    assert main(["train", "--dataset", str(tmp_path / "d.json"), "--output", str(tmp_path / "r")]) == 2


def test_presets_and_the_camvid_default():
    assert preset_names() == ["camvid", "cityscapes", "voc"]
    cs, voc, camvid = (load_description(n) for n in ("cityscapes", "voc", "camvid"))
    assert (cs.num_classes, cs.ignore_index, voc.num_classes, voc.ignore_index) == (19, 255, 21, 255)
    assert voc.colors[15] == (192, 128, 128) and voc.ignore_color == (224, 224, 192)  # person; the border
    assert camvid.num_classes == 11 and camvid.ignore_index == 11 and SegmentationDataset("sample", "val").description == camvid
    assert DatasetDescription.from_dict(camvid.to_dict()) == camvid
    with pytest.raises(FileNotFoundError, match="neither a JSON file nor a preset .camvid, cityscapes, voc."):
        load_description("ade20k")
    assert class_weights("paper", "sample", camvid)[2] == 4.564
    with pytest.raises(ValueError, match="class weights 'paper': the dataset 'voc' publishes none"):
        class_weights("paper", "sample", voc)


def test_a_checkpoint_evaluates_on_another_layout_with_as_many_classes_only(tmp_path, capsys):
    spec = load_description("camvid").to_dict()
    (tmp_path / "same.json").write_text(json.dumps({**spec, "layout": "generic"}))
    for split in ("val",):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for src, lab in list_pairs("sample", split):
            Image.open(src).save(tmp_path / "images" / split / (src.stem + ".jpg"))
            Image.open(lab).save(tmp_path / "labels" / split / lab.name)
    assert main(["eval", "--checkpoint", "segnet_basic_camvid", "--data", str(tmp_path), "--dataset",
                 str(tmp_path / "same.json"), "--output", str(tmp_path / "m.json")]) == 0
    assert main(["eval", "--checkpoint", "segnet_basic_camvid", "--data", str(tmp_path), "--dataset", "voc"]) == 2
    assert "dataset 'voc' has 21 classes but checkpoint" in capsys.readouterr().err


def test_load_pretrained_and_torch_hub():
    x = torch.randn(1, 3, 32, 48)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = {}
    names = pretrained_names()
    shipped_before = {"segnet_basic_camvid", "segnet_basic_camvid_v2", "segnet_basic_camvid_v3",
                     "segnet_basic_camvid_v4", "segnet_basic_camvid_v5", "segnet_basic_camvid_v6"}
    assert shipped_before < set(names) and DEFAULT_PRETRAINED in names  # names users may hold keep loading
    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(repo, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)  # the checkout's torch.hub entry points: one per bundled model
    spec.loader.exec_module(hubconf)
    assert sorted(n for n, f in vars(hubconf).items() if callable(f) and n.startswith("segnet_")) == sorted(names)
    for name in names:
        model = load_pretrained(name)
        assert not model.training and model.dataset.name == "camvid" and model.dataset.classes[3] == "Road"
        hub = torch.hub.load(repo, name, source="local")
        untrained = torch.hub.load(repo, name, source="local", pretrained=False)  # the same network, fresh weights
        assert type(untrained.input_norm) is type(model.input_norm), name
        assert untrained.state_dict().keys() == model.state_dict().keys(), name
        with torch.no_grad():
            outputs[name] = model(x)
            torch.testing.assert_close(hub(x), outputs[name])
    for a, b in itertools.combinations(names, 2):
        assert not torch.allclose(outputs[a], outputs[b]), (a, b)  # different models
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained()(x), outputs[DEFAULT_PRETRAINED])
    with pytest.raises(ValueError, match="no bundled model 'segnet_vgg'; bundled: segnet_basic_camvid"):
        load_pretrained("segnet_vgg")


def write_clip(path, frames):
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=10, codec="libx264",
                                         macro_block_size=2, quality=10, ffmpeg_log_level="error")
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def test_a_video_round_trip(tmp_path, capsys):
    from segnet.predict import read_video

    sample = np.asarray(Image.open(list_pairs("sample", "val")[0][0]).convert("RGB").resize((50, 38)))
    frames = np.stack([np.roll(sample, 2 * i, axis=1) for i in range(7)])
    write_clip(tmp_path / "clip.mp4", frames)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", "segnet_basic_camvid", "--input", str(tmp_path / "clip.mp4"),
                 "--output", str(out), "--batch-size", "3"]) == 0
    assert "7 frames in" in capsys.readouterr().out
    blended, fps, _ = read_video(out / "clip_overlay.mp4")
    blended = list(blended)
    assert len(blended) == 7 and blended[0].shape == (38, 50, 3) and fps == 10
    side, _, _ = read_video(out / "clip_side_by_side.mp4")
    side = list(side)
    assert len(side) == 7 and side[0].shape[0] > 38 and side[0].shape[1] >= 100
    # the side-by-side frame holds the photo (lossy video: close, not equal)
    assert np.abs(side[3][:38, :50].astype(int) - frames[3].astype(int)).mean() < 12


def test_video_without_imageio_ffmpeg_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    assert main(["predict", "--checkpoint", "segnet_basic_camvid", "--input", str(tmp_path / "clip.mp4"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "pip install 'segnet-ext[video]'" in capsys.readouterr().err


def test_an_unreadable_video_is_named(tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all")
    assert main(["predict", "--checkpoint", "segnet_basic_camvid", "--input", str(tmp_path / "clip.mp4"),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read video" in err and "clip.mp4" in err
