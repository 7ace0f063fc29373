"""The main job (``make demo``, or ``python -m segnet.demo``): the shipped model segmenting
and evaluated on the bundled CamVid images, then a short training run as the check that the
whole pipeline works on this machine, then a one-screen summary.

    python -m segnet.demo [--output runs/demo] [--epochs 30]
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import malloc
from .checkpoint import DEFAULT_PRETRAINED as SHIPPED, DEFAULT_RECIPE
from .cli import main as segnet
from .evaluate import cpu_runs_bf16_fast, resolve_device


def run(output: Path, epochs: int = 30) -> None:
    shipped, check = output / "shipped", output / "training_check"
    steps = [
        ("the shipped model segments the bundled images",
         ["predict", "--checkpoint", SHIPPED, "--input", "sample", "--output", str(shipped / "predictions")]),
        ("the shipped model on the bundled val images",
         ["eval", "--checkpoint", SHIPPED, "--data", "sample", "--output", str(shipped / "eval_val.json")]),
        (f"a short training run ({epochs} epochs on the 4 bundled training images): the pipeline check",
         ["train", "--data", "sample", "--model", "segnet_basic", "--optimizer", "adam", "--lr", "0.003", "--scale", "0.5",
          "--epochs", str(epochs), "--val-every", "10", "--batch-size", "2", "--output", str(check)]),
        ("the short run's model on the bundled val images",
         ["eval", "--checkpoint", str(check / "best.pt"), "--data", "sample", "--output", str(check / "eval_val.json")]),
    ]
    seconds = []
    for i, (what, argv) in enumerate(steps, 1):
        print(f"\n== demo {i}/{len(steps)}: {what}\n   segnet {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        code = segnet(argv)
        if code:
            raise SystemExit(f"demo step {i} failed (exit {code}): segnet {' '.join(argv)}")
        seconds.append(time.perf_counter() - start)
    print(summary(output, seconds))


def _scores(path: Path) -> str:
    m = json.loads(path.read_text())
    return (f"G {m['global_accuracy']:.1f}  C {m['class_accuracy']:.1f}  mIoU {m['mean_iou']:.1f}  "
            f"({m['images']} images)")


def camvid_training_command() -> str:
    """The recipe's command for this machine. The recipe trains in bf16 and channels_last; a CPU
    without fast bf16 convolutions (AVX2 only) runs it in float32 NCHW instead (0.50 images/s
    against 0.36 in float32 channels_last and far less in bf16, on an AMD EPYC with AVX2)."""
    command = f"segnet train --config {DEFAULT_RECIPE} --data PATH/TO/camvid --output runs/camvid"
    if resolve_device("auto").type != "cpu" or cpu_runs_bf16_fast():  # the device `segnet train` picks
        return command
    return command + " --amp none --no-channels-last  (this CPU has no fast bf16)"


def summary(output: Path, seconds: List[float]) -> str:
    shipped, check = output / "shipped", output / "training_check"
    overlays = sorted((shipped / "predictions").glob("*_overlay.png"))
    lines = [
        "",
        "=" * 78,
        "segnet demo: done",
        "",
        f"1. Look first: the shipped {SHIPPED} model's predictions, photo | overlay, with a legend:",
        *(f"     {p}" for p in overlays),
        f"   colour maps and class-id PNGs beside them in {shipped / 'predictions'}",
        f"2. The shipped model on the bundled val images: {_scores(shipped / 'eval_val.json')}",
        f"     confusion matrix {shipped / 'eval_val_confusion.png'}",
        "     (it learned from these images, in CamVid train+val: a check, not a score; its",
        "     recipe on a street it never saw: README.md, Choosing settings that hold on unseen streets)",
        f"3. Pipeline check, a model trained here in {seconds[2]:.0f} s on 4 images: {_scores(check / 'eval_val.json')}",
        f"     expected to be poor (4 images); its curves {check / 'curves.png'}, log {check / 'metrics.csv'}",
        "",
        f"Next: your own images: segnet predict --checkpoint {SHIPPED} --input FOLDER_OR_VIDEO --output OUT",
        f"      CamVid training:  {camvid_training_command()}",
        "      your dataset:     segnet train --dataset my_dataset.json --data ROOT ... (README: Your own dataset)",
        "=" * 78,
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segnet.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="folder for everything it writes (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the short training run (default: 30)")
    args = parser.parse_args(argv)
    if argv is None:
        malloc.use_tuned_malloc()
    run(args.output, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
