"""The ``segnet`` command: train, eval, predict, export."""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import malloc
from .checkpoint import pretrained_names
from .description import preset_names
from .evaluate import tta_scales
from .model import BACKENDS, INPUT_NORMS, MODELS
from .train import TrainConfig, TrainingInterrupted

DEFAULTS = TrainConfig()
SUPPRESS = argparse.SUPPRESS
RECIPES = Path(__file__).parent / "recipes"  # training recipes, usable by name with --config


def _hw(text: str):
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 360x480), got {text!r}")
    return tuple(int(p) for p in parts)


def _floats(count: int, what: str):
    def parse(text: str):
        try:
            values = tuple(float(p) for p in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers ({what}), got {text!r}")
        return values
    return parse


def _scale(text: str):
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a scale S or a range LOW,HIGH (e.g. 0.5,1.0), got {text!r}")
    return (values[0], values[-1])


def _scales(text: str):
    try:
        return tta_scales(text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scale factors > 0 (e.g. 0.75,1,1.25), got {text!r}") from None


# (flag, TrainConfig field, argparse keywords, help). Each default is TrainConfig's.
TRAIN_OPTIONS = [
    ("--data", "data", {}, "the dataset's root folder (its layout: see --dataset), or 'sample' for the 6 bundled CamVid images"),
    ("--dataset", "dataset", {}, f"dataset description: a JSON file, or a preset ({', '.join(preset_names())}); classes, colours, "
                                 "ignore index and layout (README: Your own dataset)"),
    ("--output", "output", {}, "run folder: checkpoints, logs, curves"),
    ("--model", "model", {"choices": MODELS}, "network"),
    ("--backend", "backend", {"choices": BACKENDS}, "pooling layers: segnet_ext's 2-bit ones, or plain PyTorch"),
    ("--encoder-weights", "encoder_weights", {}, "torchvision vgg16_bn/vgg16 state dict file for the SegNet encoder"),
    ("--init-from", "init_from", {"metavar": "CHECKPOINT"}, "fine-tune: start from the weights of this checkpoint "
     "(a file, or a bundled model's name such as segnet_basic_camvid_v7), not from its optimiser or schedule; its "
     "classifier only where it learned the same classes (README: Fine-tuning)"),
    ("--dropout", "dropout", {"type": float}, "dropout probability in the central encoder and decoder stages "
     "(Bayesian SegNet's placement; 0.5 in its paper); evaluation runs without"),
    ("--input-norm", "input_norm", {"choices": INPUT_NORMS}, "lcn: local contrast normalisation of the input "
     "inside the network (the first SegNet's, against uneven lighting); rgb+lcn: the input and its LCN side by side; "
     "checkpoints remember it"),
    ("--epochs", "epochs", {"type": int}, "epochs to train"),
    ("--max-steps", "max_steps", {"type": int}, "stop after this many optimiser steps in all (resumable, like an interruption)"),
    ("--batch-size", "batch_size", {"type": int}, "images per process per micro-batch"),
    ("--accumulate", "accumulate", {"type": int}, "micro-batches per optimiser step (gradient accumulation)"),
    ("--optimizer", "optimizer", {"choices": ["sgd", "adam"]}, "sgd: momentum and weight decay as the paper"),
    ("--lr", "lr", {"type": float}, "learning rate (default 0.01 for sgd, 0.001 for adam)"),
    ("--momentum", "momentum", {"type": float}, "SGD momentum"),
    ("--weight-decay", "weight_decay", {"type": float}, "weight decay"),
    ("--schedule", "schedule", {"choices": ["poly", "step", "constant"]}, "learning-rate schedule, per step"),
    ("--poly-power", "poly_power", {"type": float}, "poly schedule: lr * (1 - step/total)^power"),
    ("--step-epochs", "step_epochs", {"type": int}, "step schedule: multiply the lr by --gamma every this many epochs"),
    ("--gamma", "gamma", {"type": float}, "step schedule factor"),
    ("--class-weights", "class_weights", {"choices": ["median", "enet", "paper", "none"]}, "loss weights: median frequency balancing of the training labels, ENet's 1 / ln(1.02 + share) (milder on the large classes), the paper's, or none"),
    ("--class-weight-power", "class_weight_power", {"type": float, "metavar": "P"}, "raise each class weight to the "
     "power P: 0.5 (the square root) softens them towards the large classes, 0 makes them all 1 (default 1)"),
    ("--lovasz", "lovasz", {"type": float, "metavar": "WEIGHT"}, "add the Lovász-softmax loss (a surrogate of 1 - IoU, "
     "averaged over the classes present in each batch) times WEIGHT to the cross-entropy (e.g. 1; 0 = off)"),
    ("--ohem", "ohem", {"type": float, "metavar": "THRESHOLD"}, "online hard example mining: the cross-entropy counts "
     "only the pixels whose predicted probability of their label is below THRESHOLD (e.g. 0.7; 0 = off)"),
    ("--ohem-min-kept", "ohem_min_kept", {"type": float, "metavar": "SHARE"}, "with --ohem, count at least this share "
     "of each batch's pixels, the least confident (default 0.2)"),
    ("--flip", "flip", {"action": argparse.BooleanOptionalAction}, "random left-right flips"),
    ("--scale", "scale", {"type": _scale}, "random rescale S or LOW,HIGH (0.5 trains at half resolution)"),
    ("--crop", "crop", {"type": _hw}, "random crop HxW after scaling"),
    ("--color-jitter", "color_jitter", {"type": _floats(4, "B,C,S,H")},
     "random brightness, contrast, saturation (factors 1 +- each) and hue (+- turns of the colour wheel), e.g. 0.3,0.3,0.3,0.03"),
    ("--blur", "blur", {"type": float}, "probability of a random Gaussian blur (sigma 0.3-1.5 px)"),
    ("--copy-paste", "copy_paste", {"type": float, "metavar": "P"}, "with probability P, paste over a training image the "
     "pixels of the rare classes (rarer than the median class) of another, augmented on its own (Simple Copy-Paste)"),
    ("--channels-last", "channels_last", {"action": argparse.BooleanOptionalAction}, "channels_last memory format"),
    ("--amp", "amp", {"choices": ["none", "bf16", "fp16"]}, "autocast: bf16 (CPU or CUDA) or fp16 (CUDA)"),
    ("--seed", "seed", {"type": int}, "seed of initialisation, shuffling and augmentation"),
    ("--deterministic", "deterministic", {"action": argparse.BooleanOptionalAction},
     "CUDA: deterministic cuDNN and ATen kernels, so that runs and resumed runs repeat bit for bit (CPU runs always do)"),
    ("--workers", "workers", {"type": int}, "DataLoader worker processes"),
    ("--train-split", "train_split", {}, "split to train on; '+' joins splits (train+val)"),
    ("--val-split", "val_split", {}, "split to validate on; '+' joins splits, '@SEQ' keeps one sequence (train@0006R0)"),
    ("--holdout-sequence", "holdout_sequence", {},
     "train without this sequence (file name prefix, e.g. 0006R0) and validate on its frames instead of --val-split: "
     "a proxy for streets never seen"),
    ("--val-every", "val_every", {"type": int}, "validate every N epochs (and after the last); 0 = never"),
    ("--device", "device", {}, "auto, cpu, cuda or cuda:N"),
    ("--ema", "ema", {"type": float}, "keep an exponential moving average of the weights with this decay (e.g. 0.999; "
     "0 = off): validation, best.pt and last.pt's weights are the average's (README: Training)"),
    ("--sync-bn", "sync_bn", {"action": argparse.BooleanOptionalAction}, "synchronise BN statistics across torchrun processes"),
    ("--progress", "progress", {"action": argparse.BooleanOptionalAction}, "progress bars"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segnet",
        description="Train, evaluate and run SegNet on CamVid road scenes or your own dataset, with segnet_ext's memory-efficient layers.",
        epilog="Quick start: segnet train --data sample --model segnet_basic --epochs 2; segnet eval --checkpoint runs/segnet/best.pt; "
        "segnet predict --checkpoint runs/segnet/best.pt --input sample --output predictions. "
        "train, eval and predict raise glibc's malloc thresholds for activation-sized blocks "
        "(see README: Install); SEGNET_MALLOC=default keeps glibc's defaults.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model", description="Train SegNet or SegNet-Basic. Settings come from "
                                "the defaults, then --config, then the flags given; all are saved with each checkpoint. "
                                "Run under torchrun for data parallelism.")
    train.add_argument("--config", type=Path, default=None,
                       help="JSON file of settings (keys as the flags, with underscores; \"base\": a recipe it "
                            "changes), or a bundled recipe's name: "
                            f"{', '.join(sorted(p.stem for p in RECIPES.glob('*.json')))}")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt exactly where it stopped")
    train.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint (only for files you trust)")
    for flag, name, kwargs, text in TRAIN_OPTIONS:
        default = getattr(DEFAULTS, name)
        shown = "x".join(map(str, default)) if name == "crop" and default else default
        train.add_argument(flag, dest=name, default=SUPPRESS, help=f"{text} (default: {shown})", **kwargs)

    checkpoint_help = f"a .pt file written by segnet train, or a bundled model's name: {', '.join(pretrained_names())}"
    ev = commands.add_parser("eval", help="evaluate a checkpoint (G, C, per-class IoU, mIoU)",
                             description="Evaluate a checkpoint on a split with one confusion matrix (the dataset's ignore "
                                         "index is left out); writes the metrics JSON and NAME_confusion.png beside it.")
    ev.add_argument("--checkpoint", required=True, help=checkpoint_help)
    ev.add_argument("--data", default="sample", help="the dataset's root folder, or 'sample' (default: sample)")
    ev.add_argument("--split", default="val", help="split to evaluate; '+' joins splits, '@SEQ' keeps one sequence "
                                                   "(train@0006R0: the held-out sequence of --holdout-sequence) (default: val)")
    ev.add_argument("--output", default=None, help="metrics JSON file, or a folder for metrics.json (default: next to the checkpoint)")
    _common_inference(ev)
    ev.add_argument("--batch-size", type=int, default=1, help="images per batch (they must share one size) (default: 1)")
    ev.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")

    pr = commands.add_parser("predict", help="segment images and videos: class ids, colour maps, overlays",
                             description="For each image (any size): NAME_labels.png (class ids), NAME_color.png (colour "
                             "map) and NAME_overlay.png (photo | blend), both with a legend of the classes present. For each "
                             "video: NAME_overlay.mp4 and NAME_side_by_side.mp4 (photo | colour map, legend below); needs the "
                             "video extra (pip install 'segnet-ext[video]').")
    pr.add_argument("--checkpoint", required=True, help=checkpoint_help)
    pr.add_argument("--input", required=True, help="an image, a video, a folder of them, or 'sample' (the bundled val images)")
    pr.add_argument("--output", required=True, help="folder for the PNGs and MP4s")
    pr.add_argument("--batch-size", type=int, default=4, help="video frames per batch (default: 4)")
    _common_inference(pr)

    ex = commands.add_parser("export", help="export to TorchScript or ONNX (plain-PyTorch layers), or float16 weights",
                             description="Export a checkpoint with the plain-PyTorch backend, for use without segnet_ext "
                                         "(torchscript, onnx), or as a small float16 weights file for eval and predict (fp16).")
    ex.add_argument("--checkpoint", required=True, help=checkpoint_help)
    ex.add_argument("--format", choices=["torchscript", "onnx", "fp16"], default="torchscript", help="(default: torchscript)")
    ex.add_argument("--output", required=True, help="file to write (.pt for TorchScript and fp16, .onnx)")
    ex.add_argument("--size", type=_hw, default=(360, 480), help="example input HxW (default: 360x480)")
    ex.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint")
    return parser


def _common_inference(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    sub.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast (default: none)")
    sub.add_argument("--backend", choices=BACKENDS, default=None, help="override the checkpoint's backend")
    sub.add_argument("--flip-tta", action="store_true", help="flip test-time augmentation: average the softmax of each "
                                                              "image and of its mirror (twice the compute)")
    sub.add_argument("--scale-tta", type=_scales, default=(1.0,), metavar="S,S,...",
                     help="multi-scale test-time augmentation: average the softmax of the image rescaled by each factor "
                          "(e.g. 0.75,1,1.25: three times the compute; with --flip-tta, six) (default: 1)")
    sub.add_argument("--dataset", default=None, help="dataset description (JSON file or preset) to use instead of the one "
                                                     "the checkpoint was trained with; same number of classes")
    sub.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint (only for files you trust)")


def read_recipe(config: Path, _within: Tuple[Path, ...] = ()) -> Dict:
    """The settings of a JSON recipe file or a bundled recipe's name. A recipe's ``"base"`` is the
    recipe (a bundled name, or a file relative to the recipe's folder) whose settings it changes."""
    recipe = RECIPES / f"{config}.json"
    path = recipe if not config.exists() and str(config) == config.name and recipe.is_file() else config
    where = " > ".join(map(str, (*_within, path)))
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(values).__name__}")
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {where}: {e}") from None
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or path.resolve() in {p.resolve() for p in _within}:
        raise ValueError(f"--config {where}: \"base\" must name another recipe, got {base!r}")
    base_path = path.parent / base if (path.parent / base).is_file() else Path(base)
    return {**read_recipe(base_path, (*_within, path)), **values}


def train_config(args: argparse.Namespace) -> TrainConfig:
    values: Dict = read_recipe(args.config) if args.config is not None else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields})
    return TrainConfig.from_dict(values)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("train", "eval", "predict"):
        malloc.use_tuned_malloc()  # the process re-executes itself once (SEGNET_MALLOC=default: it does not)
    try:
        return _run(args)
    except TrainingInterrupted as e:
        print(f"{e}\nresume with: segnet train --resume --output {e.checkpoint.parent} (and the same settings)", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, OSError, RuntimeError) as e:
        print(f"segnet {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .train import train

        config = train_config(args)
        result = train(config, resume=args.resume, trust_checkpoint=args.trust_checkpoint)
        if os.environ.get("RANK", "0") != "0":
            return 0
        out = Path(config.output)
        print(f"run folder {out}: last.pt" + (", best.pt" if (out / "best.pt").exists() else "") + ", metrics.csv, metrics.jsonl, curves.png")
        if "stopped_at_step" in result:
            print(f"stopped after step {result['stopped_at_step']} (--max-steps); resume with --resume --output {out}")
        return 0
    if args.command == "eval":
        from .evaluate import evaluate_checkpoint

        output = args.output if args.output is not None else Path(args.checkpoint).parent / f"eval_{args.split}.json"
        evaluate_checkpoint(args.checkpoint, args.data, args.split, output, args.device, args.batch_size, args.amp,
                            args.backend, args.workers, args.trust_checkpoint, args.dataset, args.flip_tta, args.scale_tta)
        return 0
    if args.command == "predict":
        from .predict import predict

        written = predict(args.checkpoint, args.input, args.output, args.device, args.amp, args.backend, args.trust_checkpoint,
                          args.batch_size, args.dataset, args.flip_tta, args.scale_tta)
        videos = sum("frames" in w for w in written)
        print(f"{len(written) - videos} image(s) and {videos} video(s) segmented into {args.output}: "
              "*_overlay.png / *_overlay.mp4 (photo and blend, legend), *_color.png, *_side_by_side.mp4, *_labels.png (class ids)")
        return 0
    from .export import export

    path = export(args.checkpoint, args.output, args.format, args.size, args.trust_checkpoint)
    print(f"exported {args.format} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
