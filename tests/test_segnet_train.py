"""Training: learning, checkpoints, exact resume, interruption, logs, settings."""
import copy
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segnet.checkpoint import load_checkpoint, save_checkpoint
from segnet.data import Augment, CamVid, sample_root
from segnet.evaluate import confusion_over
from segnet.losses import ohem_labels
from segnet.metrics import scores
from segnet.train import TrainConfig, Trainer, plot_curves, train


def tiny_config(root, output, **overrides):
    values = dict(data=str(root), output=str(output), model="segnet_basic", epochs=2, batch_size=1, optimizer="sgd",
                  lr=0.01, class_weights="median", val_every=1, progress=False, seed=5)
    values.update(overrides)
    return TrainConfig(**values)


def test_overfits_one_image(tmp_path):
    """SegNet-Basic learns one CamVid image (at quarter size) to > 90% pixel accuracy."""
    root = tmp_path / "one"
    image = "train/0016E5_01470.png"
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    for folder in ("train", "trainannot"):
        src = sample_root() / folder / "0016E5_01470.png"
        (root / folder / src.name).write_bytes(src.read_bytes())
    # one epoch of 100 steps on the same image (one checkpoint, not a hundred)
    (root / "train.txt").write_text(f"{image} {image.replace('train/', 'trainannot/')}\n" * 100)
    config = tiny_config(root, tmp_path / "run", epochs=1, optimizer="adam", lr=0.003, scale=(0.25, 0.25), flip=False,
                         class_weights="none", schedule="constant", val_every=0)
    trainer = Trainer(config)
    trainer.fit()
    seen = CamVid(root, "train", Augment(flip=False, scale=(0.25, 0.25)))
    seen.pairs = seen.pairs[:1]
    accuracy = scores(confusion_over(trainer.model, seen, torch.device("cpu"), progress=False))["global_accuracy"]
    assert accuracy > 90


@pytest.mark.parametrize("options", [dict(), dict(accumulate=2, schedule="step", step_epochs=1, optimizer="adam", dropout=0.5, ema=0.9,
                                                       lovasz=1.0, copy_paste=0.5, ohem=0.7)])
def test_resume_is_bit_identical(camvid_root, tmp_path, options):
    whole = Trainer(tiny_config(camvid_root, tmp_path / "whole", **options))
    whole.fit()
    # stopped mid-epoch 2 (as an interruption would), then resumed in a fresh Trainer
    Trainer(tiny_config(camvid_root, tmp_path / "parts", max_steps=whole.steps_per_epoch + 1, **options)).fit()
    resumed = Trainer(tiny_config(camvid_root, tmp_path / "parts", **options), resume=True)
    assert resumed.step == whole.steps_per_epoch + 1 and resumed.samples_done > 0
    resumed.fit()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    if options.get("ema"):
        assert torch.equal(whole.average.n_averaged, resumed.average.n_averaged)
        for key, value in whole.average.module.state_dict().items():
            assert torch.equal(value, resumed.average.module.state_dict()[key]), key
    a, b = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))
    drop_timing = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in rows]
    assert drop_timing(whole.history) == drop_timing(resumed.history)


def test_ohem_step_counts_the_hard_pixels_over_every_valid_pixel(camvid_root, tmp_path):
    """With OHEM a step's loss is the class-weighted cross-entropy summed over the pixels
    ohem_labels keeps, over the class weight of every valid pixel; without, over all of them."""
    images = torch.randn(2, 3, 24, 32)
    labels = torch.randint(0, 11, (2, 24, 32))
    for ohem in (0.0, 0.7):
        trainer = Trainer(tiny_config(camvid_root, tmp_path / str(ohem), ohem=ohem, val_every=0,
                                       **(dict(ohem_min_kept=0.3) if ohem else {})))
        ignore = trainer.description.ignore_index
        labels[:, :3] = ignore
        model = copy.deepcopy(trainer.model)
        logits = model(images)
        weights = trainer.class_weights
        hard = ohem_labels(logits, labels, ignore, 0.7, 0.3) if ohem else labels
        if ohem:
            assert 0.3 * (labels != ignore).sum() <= (hard != ignore).sum() < (labels != ignore).sum()
        expected = (F.cross_entropy(logits, hard, weight=weights, ignore_index=ignore, reduction="sum")
                    / weights[labels[labels != ignore]].sum())
        assert trainer._step([(images, labels)]) == pytest.approx(expected.item(), rel=1e-5)


def test_class_weight_power_reaches_the_loss(camvid_root, tmp_path):
    """The trainer's loss weights are the split's weights raised to class_weight_power."""
    full = Trainer(tiny_config(camvid_root, tmp_path / "full", class_weights="paper", val_every=0)).class_weights
    soft = Trainer(tiny_config(camvid_root, tmp_path / "soft", class_weights="paper", class_weight_power=0.5,
                               val_every=0)).class_weights
    assert full.max() / full.min() > 10
    torch.testing.assert_close(soft, full.sqrt())


def test_run_folder(camvid_root, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(camvid_root, out, epochs=3, val_every=2))
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.jsonl", "curves.png", "config.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r.get("val_mean_iou") is not None for r in rows] == [False, True, True]  # every 2nd, and the last
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    state = load_checkpoint(out / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config"):
        assert key in state
    assert state["epoch"] == 3 and state["config"]["model"] == "segnet_basic"
    best = load_checkpoint(out / "best.pt")
    assert best["best_miou"] == max(r["val_mean_iou"] for r in rows if r.get("val_mean_iou") is not None)
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


def test_init_from_starts_a_fresh_run_from_a_checkpoints_weights(camvid_root, tmp_path, capsys):
    """--init-from (same classes): every weight and BN statistic of the checkpoint, in the model and
    its average, at step 0 with a fresh optimiser; a resumed run continues from its own last.pt."""
    source = tmp_path / "source"
    train(tiny_config(camvid_root, source, epochs=1, val_every=0, optimizer="adam", lr=0.003))
    saved = load_checkpoint(source / "last.pt")["model"]
    options = dict(init_from=str(source / "last.pt"), ema=0.9, seed=6, val_every=0)
    capsys.readouterr()
    tuned = Trainer(tiny_config(camvid_root, tmp_path / "tuned", max_steps=2, **options))
    assert capsys.readouterr().out == f"fine-tuning from {source / 'last.pt'}\n"
    for model in (tuned.model, tuned.average.module):
        state = model.state_dict()
        assert state.keys() == saved.keys()
        for k, v in saved.items():
            assert torch.equal(state[k], v), k
    assert tuned.step == tuned.epoch == 0 and not tuned.optimizer.state
    scratch = Trainer(tiny_config(camvid_root, tmp_path / "scratch", seed=6, val_every=0)).model.state_dict()
    assert not torch.equal(scratch["classifier.weight"], saved["classifier.weight"])  # it is the checkpoint's doing
    tuned.fit()
    resumed = Trainer(tiny_config(camvid_root, tmp_path / "tuned", **options), resume=True)
    for k, v in tuned.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert not torch.equal(resumed.model.state_dict()["classifier.weight"], saved["classifier.weight"])
    with pytest.raises(ValueError, match="init_from .* and encoder_weights 'vgg.pth' both give the starting weights; give one"):
        tiny_config(camvid_root, tmp_path, init_from=str(source / "last.pt"), encoder_weights="vgg.pth")
    for change, message in ((dict(input_norm="lcn"), "has input_norm 'none', but this run has 'lcn'; fine-tune it with "
                                                     "--input-norm none"),
                            (dict(model="segnet"), "has model 'segnet_basic', but this run has 'segnet'; fine-tune it with "
                                                   "--model segnet_basic"),
                            (dict(init_from=str(tmp_path / "nothing.pt")), "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            Trainer(tiny_config(camvid_root, tmp_path / "bad", **{**options, **change}))


def test_weight_average_follows_its_formula():
    """The average after each update, against the formula written out: decay warmed up as
    min(decay, (1 + n) / (10 + n)), BN statistics averaged too, batch counters copied."""
    from segnet.train import weight_average

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    average = weight_average(model, decay=0.95)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 6, 6))  # moves BN's running statistics and counter
        average.update_parameters(model)
        d = min(0.95, (1 + n) / (10 + n)) if n else 0.0  # n updates before this one; the first copies
        for k, v in model.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else d * expected[k] + (1 - d) * v
    got = average.module.state_dict()
    assert int(average.n_averaged) == 40
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(got["0.weight"], model[0].weight)  # an average, not a copy
    assert int(got["1.num_batches_tracked"]) == 40


def test_ema_run_validates_and_ships_the_average(camvid_root, tmp_path):
    from segnet.checkpoint import load_model

    out = tmp_path / "run"
    trainer = Trainer(tiny_config(camvid_root, out, epochs=1, ema=0.9))
    trainer.fit()
    state = load_checkpoint(out / "last.pt")
    for key, value in trainer.average.module.state_dict().items():
        assert torch.equal(state["model"][key], value), key                 # what eval, predict and export read
        assert torch.equal(state["trained_model"][key], trainer.model.state_dict()[key]), key
    assert state["averages"] == trainer.step
    assert not torch.equal(state["model"]["encoder.0.0.0.weight"], state["trained_model"]["encoder.0.0.0.weight"])
    model, _ = load_model(out / "last.pt", torch.device("cpu"))
    assert torch.equal(model.state_dict()["encoder.0.0.0.weight"], trainer.average.module.state_dict()["encoder.0.0.0.weight"])
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    val = CamVid(camvid_root, "val")
    for weights, prefix in ((trainer.average.module, "val_"), (trainer.model, "val_trained_")):
        assert row[prefix + "mean_iou"] == scores(confusion_over(weights, val, torch.device("cpu"), progress=False))["mean_iou"]
    assert row["val_mean_iou"] != row["val_trained_mean_iou"]
    assert "val_trained_mean_iou" in (out / "metrics.csv").read_text().splitlines()[0]


def test_resume_rewrites_the_logs_to_what_the_checkpoint_says(camvid_root, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    Trainer(tiny_config(camvid_root, whole, epochs=2)).fit()
    Trainer(tiny_config(camvid_root, out, epochs=2, max_steps=1)).fit()  # checkpoint mid-epoch 1: no rows
    Trainer(tiny_config(camvid_root, out, epochs=2), resume=True).fit()
    # as a run killed after logging epoch 3 but before its checkpoint, and one killed mid-rewrite
    for name, row in (("metrics.jsonl", '{"epoch": 3}\n'), ("metrics.csv", "3,,,,,,,,\n")):
        with open(out / name, "a") as f:
            f.write(row)
        (out / f".{name}.tmp").write_text("half a log")
    Trainer(tiny_config(camvid_root, out, epochs=3), resume=True).fit()
    Trainer(tiny_config(camvid_root, whole, epochs=3), resume=True).fit()
    untimed = lambda text: [re.sub(r'"(images_per_s|epoch_s)": [0-9.e+-]+', "", line) for line in text.splitlines()]  # noqa: E731
    assert untimed((out / "metrics.jsonl").read_text()) == untimed((whole / "metrics.jsonl").read_text())
    assert [line.split(",")[:4] for line in (out / "metrics.csv").read_text().splitlines()] == \
        [line.split(",")[:4] for line in (whole / "metrics.csv").read_text().splitlines()]  # one header, epochs 1-3
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_curves_show_validation_only_when_there_is_some(tmp_path):
    from PIL import Image

    pytest.importorskip("matplotlib")
    rows = [{"epoch": e, "train_loss": 2.0 / e} for e in (1, 2, 3)]
    validated = [dict(r, val_global_accuracy=60.0 + e, val_class_accuracy=40.0, val_mean_iou=30.0 + e)
                 for e, r in enumerate(rows)]
    widths = {name: Image.open(plot_curves(history, tmp_path / f"{name}.png")).size[0]
              for name, history in (("loss_only", rows), ("with_val", validated))}
    assert widths["loss_only"] * 2 == widths["with_val"]  # one panel, not an empty validation one


def test_resume_refuses_other_settings(camvid_root, tmp_path):
    Trainer(tiny_config(camvid_root, tmp_path / "run", max_steps=1)).fit()
    with pytest.raises(ValueError, match=r"settings differ .*lr: 0.01 -> 0.02"):
        Trainer(tiny_config(camvid_root, tmp_path / "run", lr=0.02), resume=True)
    with pytest.raises(FileNotFoundError, match="last.pt' does not exist"):
        Trainer(tiny_config(camvid_root, tmp_path / "elsewhere"), resume=True)


def test_sigint_writes_a_checkpoint_and_resumes(camvid_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "segnet", "train", "--data", str(camvid_root), "--output", str(out), "--model", "segnet_basic",
           "--epochs", "1000", "--batch-size", "1", "--val-every", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "checkpoint written to" in err and "--resume" in err
    state = load_checkpoint(out / "last.pt")
    assert state["step"] >= 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = Trainer(tiny_config(camvid_root, out, epochs=state["epoch"] + 1, val_every=0, batch_size=1, seed=0,
                                  class_weights="median", optimizer="sgd", lr=0.01), resume=True)
    assert resumed.step == state["step"]


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_or_read_only_output_is_refused_before_training(camvid_root, tmp_path, monkeypatch, capsys):
    import errno
    from collections import namedtuple

    import segnet.checkpoint
    from segnet.cli import main

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(segnet.checkpoint.shutil, "disk_usage", lambda _: Usage(2**30, 2**30, 2**10))
    with pytest.raises(OSError, match=r"output folder .*run' has 0 MiB free, but its checkpoints need about \d+ MiB"):
        Trainer(tiny_config(camvid_root, tmp_path / "run")).fit()
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(segnet.checkpoint.tempfile, "TemporaryFile", read_only)
    args = ["train", "--data", str(camvid_root), "--output", str(tmp_path / "ro"), "--model", "segnet_basic", "--no-progress"]
    assert main(args) == 2
    assert re.search(r"segnet train: error: .*output folder .*ro' is not writable: the file system is read-only", capsys.readouterr().err)
    assert not (tmp_path / "ro" / "last.pt").exists()


def test_disk_full_at_save_keeps_the_previous_checkpoint(camvid_root, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    Trainer(tiny_config(camvid_root, out, epochs=1, val_every=0)).fit()
    before = load_checkpoint(out / "last.pt")

    def disk_full(obj, f):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*last.pt': the disk is full .*; the previous last.pt is unchanged"):
        Trainer(tiny_config(camvid_root, out, epochs=2, val_every=0), resume=True).fit()
    monkeypatch.undo()
    after = load_checkpoint(out / "last.pt")
    assert after["step"] == before["step"]
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_at_random_moments_loses_nothing(camvid_root, tmp_path):
    """Killed with SIGKILL (no chance to save) at random moments, mid-epoch or mid-save, and
    resumed each time, a run ends with the weights and logs of one never interrupted."""
    import random

    epochs = 8
    common = [sys.executable, "-m", "segnet", "train", "--data", str(camvid_root), "--model", "segnet_basic", "--epochs",
              str(epochs), "--batch-size", "1", "--val-every", "2", "--no-progress", "--seed", "3"]
    whole = tmp_path / "whole"
    subprocess.run(common + ["--output", str(whole)], check=True, capture_output=True, timeout=300)
    out, kills, rng = tmp_path / "killed", 0, random.Random()
    for attempt in range(20):
        resume = ["--resume"] if (out / "last.pt").exists() else []
        proc = subprocess.Popen(common + ["--output", str(out)] + resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rows = lambda: len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0  # noqa: E731
        start, deadline = rows(), time.time() + 120
        while proc.poll() is None and rows() == start and time.time() < deadline:
            time.sleep(0.02)  # until this process has finished an epoch of its own ...
        time.sleep(rng.uniform(0, 0.4))  # ... then at a random moment of the next
        if proc.poll() is None:
            proc.kill()
            kills += 1
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert proc.returncode == 0 and kills >= 2, (proc.returncode, kills)
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(out / "last.pt")
    assert b["epoch"] == epochs
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert [r.get("val_mean_iou") for r in rows] == [r.get("val_mean_iou") for r in a["history"]]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_crafted_checkpoint_does_not_run_code(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Exploit()}, path)
    with pytest.raises(ValueError, match="not loaded from untrusted files.*--trust-checkpoint"):
        load_checkpoint(path)
    assert not _Exploit.marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a segnet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with open(tmp_path / "pickle.pt", "wb") as f:
        pickle.dump({"model": {}}, f)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "pickle.pt")


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "aten-native"])
def test_bf16_autocast_and_channels_last(camvid_root, tmp_path, onednn):
    # oneDNN off: ATen's own convolutions, as on a CPU without AVX-512
    losses = {}
    with torch.backends.mkldnn.flags(enabled=onednn):
        for name, options in {"fp32": {}, "bf16": {"amp": "bf16"}, "channels_last": {"channels_last": True}}.items():
            trainer = Trainer(tiny_config(camvid_root, tmp_path / name, epochs=1, max_steps=1, val_every=0, **options))
            batch = trainer.train_set[(0, 1)]
            losses[name] = trainer._step([(batch[0][None], batch[1][None])])
    assert losses["channels_last"] == pytest.approx(losses["fp32"], rel=1e-4)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_copy_paste_takes_the_rare_classes_of_the_training_labels(camvid_root, tmp_path, capsys):
    from segnet.data import CLASSES, rare_classes

    rare = rare_classes(camvid_root, "train")
    assert 0 < len(rare) < len(CLASSES)
    trainer = Trainer(tiny_config(camvid_root, tmp_path / "run", copy_paste=0.5))
    assert trainer.train_set.copy_paste.classes.tolist() == rare and trainer.train_set.copy_paste.probability == 0.5
    assert ", ".join(CLASSES[c] for c in rare) in capsys.readouterr().out
    for folder in ("trainannot", "valannot"):                             # one class everywhere: none is rarer
        for label in (camvid_root / folder).iterdir():
            Image.fromarray(np.full((24, 32), 3, np.uint8)).save(label)
    assert Trainer(tiny_config(camvid_root, tmp_path / "one", copy_paste=0.5, class_weights="none")).train_set.copy_paste is None
    assert "rarer than the median one in the training labels: none, so it is off" in capsys.readouterr().out


def test_bad_settings(camvid_root, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        tiny_config(camvid_root, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="optimizer must be one of .* got 'lbfgs'"):
        tiny_config(camvid_root, tmp_path, optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"input_norm must be one of \('none', 'lcn', 'rgb\+lcn'\), got 'gcn'"):
        tiny_config(camvid_root, tmp_path, input_norm="gcn")
    with pytest.raises(ValueError, match=r"ema must be a decay in \[0, 1\) .* got 1.0"):
        tiny_config(camvid_root, tmp_path, ema=1.0)
    for power in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"class_weight_power must be a finite number >= 0 .* got {power}"):
            tiny_config(camvid_root, tmp_path, class_weight_power=power)
    for weight in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=rf"lovasz must be a finite weight >= 0 .* got {weight}"):
            tiny_config(camvid_root, tmp_path, lovasz=weight)
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"ohem must be a probability threshold in \(0, 1\] \(0 = off, 0.7 typical\), got {threshold}"):
            tiny_config(camvid_root, tmp_path, ohem=threshold)
    with pytest.raises(ValueError, match=r"ohem_min_kept must be a share of the pixels in \[0, 1\] .* got 1.2"):
        tiny_config(camvid_root, tmp_path, ohem=0.7, ohem_min_kept=1.2)
    for options, message in ((dict(class_weights="none", class_weight_power=0.5),
                              "class_weight_power 0.5 has no effect with class_weights 'none'"),
                             (dict(ohem_min_kept=0.1), "ohem_min_kept 0.1 has no effect with ohem 0 (off)"),
                             (dict(optimizer="adam", momentum=0.5), "momentum 0.5 has no effect with optimizer 'adam'"),
                             (dict(schedule="step", poly_power=2.0), "poly_power 2.0 has no effect with schedule 'step'"),
                             (dict(schedule="constant", step_epochs=5), "step_epochs 5 has no effect with schedule 'constant'"),
                             (dict(schedule="poly", gamma=0.5), "gamma 0.5 has no effect with schedule 'poly'")):
        with pytest.warns(UserWarning, match=rf"^{re.escape(message)}$"):
            tiny_config(camvid_root, tmp_path, **options)
    with warnings.catch_warnings():                                         # the same settings where they act: silent
        warnings.simplefilter("error")
        tiny_config(camvid_root, tmp_path, class_weights="enet", class_weight_power=0.5, ohem=0.7, ohem_min_kept=0.1)
        tiny_config(camvid_root, tmp_path, optimizer="sgd", momentum=0.5, schedule="poly", poly_power=2.0)
        tiny_config(camvid_root, tmp_path, schedule="step", step_epochs=5, gamma=0.5)
        tiny_config(camvid_root, tmp_path, class_weights="none")
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"copy_paste must be a probability in \[0, 1\] .* got {p}"):
            tiny_config(camvid_root, tmp_path, copy_paste=p)
    with pytest.raises(ValueError, match=r"unknown training settings \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        Trainer(tiny_config(camvid_root, tmp_path / "fp16", amp="fp16", max_steps=1)).fit()


def test_deterministic_cuda_settings(monkeypatch):
    from segnet.train import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        deterministic_cuda()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


def test_bf16_on_a_cpu_without_bf16_kernels_warns(monkeypatch):
    from segnet import evaluate

    monkeypatch.setattr(evaluate, "cpu_runs_bf16_fast", lambda: False)
    with pytest.warns(UserWarning, match="use --amp none"):
        evaluate.autocast(torch.device("cpu"), "bf16")
    monkeypatch.setattr(evaluate, "cpu_runs_bf16_fast", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate.autocast(torch.device("cpu"), "bf16")
