"""Training: SGD (the paper's) or Adam, step/poly schedules, class-weighted cross-entropy
(optionally plus the Lovász-softmax surrogate of 1 - IoU), mixed precision, channels_last,
gradient accumulation, torchrun data parallelism, a moving average of the weights, and
checkpoints from which a resumed run ends bit-identical to an uninterrupted one.

Output folder: ``last.pt`` (after every epoch and on interruption), ``best.pt`` (best val
mIoU), ``metrics.csv`` / ``metrics.jsonl`` (one row per epoch), ``curves.png``, ``config.json``,
and TensorBoard events in ``tensorboard/`` when tensorboard is installed.
"""
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed
from .checkpoint import ensure_writable, init_from_checkpoint, load_checkpoint, remove_partial_writes, save_checkpoint
from .data import Augment, CopyPaste, EpochSampler, SegmentationDataset, class_weights, collate, derived_seed, rare_classes
from .description import load_description
from .evaluate import autocast, confusion_over, resolve_device
from .losses import lovasz_softmax, ohem_labels
from .metrics import scores
from .model import BACKENDS, INPUT_NORMS, MODELS, build_model, load_encoder_weights


@dataclass
class TrainConfig:
    """Every setting of a run; saved in each checkpoint and in ``config.json``."""

    data: str = "sample"                      # the dataset's root, or "sample" (bundled CamVid images)
    dataset: str = "camvid"                   # description: a preset's name or a JSON file (description.py)
    output: str = "runs/segnet"
    model: str = "segnet"                     # segnet | segnet_basic
    backend: str = "segnet_ext"               # segnet_ext | torch
    num_classes: Optional[int] = None         # the description's class count
    encoder_weights: Optional[str] = None     # torchvision vgg16_bn / vgg16 state dict
    init_from: Optional[str] = None           # fine-tune: start from this checkpoint's weights (file or bundled name)
    dropout: float = 0.0                      # Bayesian SegNet's dropout in the central stages (model.py)
    input_norm: str = "none"                  # none | lcn | rgb+lcn: local contrast normalisation of the input (model.py)
    epochs: int = 100
    max_steps: Optional[int] = None           # stop (resumably) after this many optimiser steps
    batch_size: int = 4                       # per process
    accumulate: int = 1                       # micro-batches per optimiser step
    optimizer: str = "sgd"                    # sgd | adam
    lr: Optional[float] = None                # default 0.01 (sgd), 0.001 (adam)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"                    # poly | step | constant
    poly_power: float = 0.9
    step_epochs: int = 30                     # step schedule: multiply by gamma every step_epochs
    gamma: float = 0.1
    class_weights: str = "median"             # median | enet | paper | none
    class_weight_power: float = 1.0           # each class weight raised to this: 0.5 softens them, 0 = all 1
    lovasz: float = 0.0                       # weight of the Lovász-softmax term added to the cross-entropy; 0 = off
    ohem: float = 0.0                         # cross-entropy on the pixels less sure of their label than this; 0 = off
    ohem_min_kept: float = 0.2                # ... and on at least this share of each micro-batch's pixels (losses.py)
    flip: bool = True
    scale: Tuple[float, float] = (1.0, 1.0)   # random rescale range
    crop: Optional[Tuple[int, int]] = None    # random crop H, W
    color_jitter: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    blur: float = 0.0                         # probability of a random Gaussian blur
    copy_paste: float = 0.0                   # probability of pasting another image's rare classes (data.CopyPaste)
    channels_last: bool = False
    amp: str = "none"                         # none | bf16 | fp16 (CUDA)
    seed: int = 0
    deterministic: bool = True                # CUDA: deterministic cuDNN/ATen kernels (see deterministic_cuda)
    workers: int = 0
    train_split: str = "train"                # a split, or several joined: "train+val" (data.list_pairs)
    val_split: str = "val"
    holdout_sequence: Optional[str] = None    # train without this sequence and validate on it (unseen streets)
    val_every: int = 1                        # epochs; 0 = never
    device: str = "auto"
    sync_bn: bool = False
    ema: float = 0.0                          # decay of a moving average of the weights, validated and saved; 0 = off
    progress: bool = True

    def __post_init__(self):
        self.scale = tuple(float(s) for s in self.scale)
        self.color_jitter = tuple(float(c) for c in self.color_jitter)
        self.crop = None if self.crop is None else tuple(int(c) for c in self.crop)
        for name, low in (("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("workers", 0), ("val_every", 0), ("step_epochs", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        choices = {"model": MODELS, "backend": BACKENDS, "input_norm": INPUT_NORMS, "optimizer": ("sgd", "adam"),
                   "schedule": ("poly", "step", "constant"), "class_weights": ("median", "enet", "paper", "none"),
                   "amp": ("none", "bf16", "fp16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.lr is None:
            self.lr = 0.01 if self.optimizer == "sgd" else 0.001
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1) (0 = off, 0.999 typical), got {self.ema}")
        if not (math.isfinite(self.class_weight_power) and self.class_weight_power >= 0.0):
            raise ValueError("class_weight_power must be a finite number >= 0 (1 = the weights as they are, 0.5 softer), "
                             f"got {self.class_weight_power}")
        if not (math.isfinite(self.lovasz) and self.lovasz >= 0.0):
            raise ValueError(f"lovasz must be a finite weight >= 0 (0 = off, 1 typical), got {self.lovasz}")
        if not (self.ohem == 0.0 or 0.0 < self.ohem <= 1.0):
            raise ValueError(f"ohem must be a probability threshold in (0, 1] (0 = off, 0.7 typical), got {self.ohem}")
        if not 0.0 <= self.ohem_min_kept <= 1.0:
            raise ValueError(f"ohem_min_kept must be a share of the pixels in [0, 1] (0.2 typical), got {self.ohem_min_kept}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, inert, why in (("class_weight_power", self.class_weights == "none", "class_weights 'none'"),
                                 ("ohem_min_kept", not self.ohem, "ohem 0 (off)"),
                                 ("momentum", self.optimizer != "sgd", f"optimizer {self.optimizer!r}"),
                                 ("poly_power", self.schedule != "poly", f"schedule {self.schedule!r}"),
                                 ("step_epochs", self.schedule != "step", f"schedule {self.schedule!r}"),
                                 ("gamma", self.schedule != "step", f"schedule {self.schedule!r}")):
            if inert and getattr(self, name) != defaults[name]:
                warnings.warn(f"{name} {getattr(self, name)} has no effect with {why}", stacklevel=3)
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ValueError(f"copy_paste must be a probability in [0, 1] (0 = off, 0.5 typical), got {self.copy_paste}")
        if self.init_from and self.encoder_weights:
            raise ValueError(f"init_from {self.init_from!r} and encoder_weights {self.encoder_weights!r} both give the "
                             "starting weights; give one")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        classes = load_description(self.dataset).num_classes
        if self.num_classes is None:
            self.num_classes = classes
        elif self.num_classes != classes:
            raise ValueError(f"num_classes {self.num_classes} differs from the {classes} classes of dataset {self.dataset!r}")

    @classmethod
    def from_dict(cls, values: Dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)


class TrainingInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint is written."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint written to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class _StopSignals:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks between steps (a second
    one interrupts at once)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.default_int_handler(signum, frame)
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint (again to abort)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _ignore_sigint(_worker_id: int) -> None:
    # DataLoader workers leave SIGINT to the main process, which stops cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights and BN statistics (Polyak
    averaging, as timm's ModelEma and mmengine's EMAHook keep), updated after each optimiser
    step. Its decay warms up as TensorFlow's ExponentialMovingAverage with num_updates,
    min(decay, (1 + n) / (10 + n)) after n updates, so that the first weights, random ones,
    fade from it within the first few hundred steps whatever the decay."""

    @torch.no_grad()
    def update(averaged: List[Tensor], current: List[Tensor], n: Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # BN's batch counters: the model's own
            torch._foreach_copy_(averaged, current)
            return
        updates = float(n)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + updates) / (10 + updates)))

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def lr_factor(config: TrainConfig, steps_per_epoch: int):
    """The schedule as a function of the optimiser step (for LambdaLR)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "poly":
        return lambda step: (1 - min(step, total - 1) / total) ** config.poly_power
    if config.schedule == "step":
        return lambda step: config.gamma ** ((step // steps_per_epoch) // config.step_epochs)
    return lambda step: 1.0


def deterministic_cuda() -> None:
    """What makes a CUDA run repeat bit for bit, so that a resumed run ends as an uninterrupted
    one: cuDNN's deterministic algorithms, not the fastest by timing (benchmark mode can pick
    differently in each process), ATen's deterministic kernels where they exist (a warning
    names any op that has none), and cuBLAS with a fixed workspace. segnet_ext's own CUDA
    kernels use no atomics. CPU runs are deterministic without it (same thread count)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


class Trainer:
    """One training run. ``Trainer(config).fit()``; ``resume=True`` continues from the
    output folder's ``last.pt``."""

    def __init__(self, config: TrainConfig, resume: bool = False, trust_checkpoint: bool = False):
        self.config = config
        self.device = resolve_device(config.device)
        self.context = distributed.init(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.context.local_rank)
            torch.cuda.set_device(self.device)
            if config.deterministic:
                deterministic_cuda()
        self.output = Path(config.output)
        resume_state = self._resume_state(trust_checkpoint) if resume else None

        torch.manual_seed(config.seed)
        self.description = load_description(config.dataset)
        self.model = build_model(config.model, config.num_classes, config.backend, config.dropout, config.input_norm)
        if config.init_from and resume_state is None:
            fresh = init_from_checkpoint(self.model, config.init_from, config.model, config.input_norm,
                                         self.description.classes, trust_checkpoint)
            if self.context.is_main:
                print(f"fine-tuning from {config.init_from}" + (f": it learned other classes, so {', '.join(fresh)} start "
                                                                 "fresh" if fresh else ""), flush=True)
        if config.encoder_weights and resume_state is None:
            load_encoder_weights(self.model, config.encoder_weights)
        if config.sync_bn:
            distributed.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ddp = distributed.data_parallel(self.model, self.context, self.device)
        self.average = weight_average(self.model, config.ema) if config.ema else None
        self.shipped = self.model if self.average is None else self.average.module  # validated and saved as "model"

        augment = Augment(flip=config.flip, scale=config.scale, crop=config.crop, ignore_index=self.description.ignore_index,
                          color=config.color_jitter, blur=config.blur)
        holdout = [config.holdout_sequence] if config.holdout_sequence else []
        paste = None
        if config.copy_paste:
            rare = rare_classes(config.data, config.train_split, description=self.description, exclude_sequences=holdout)
            paste = CopyPaste(config.copy_paste, rare) if rare else None
            if self.context.is_main:
                names = ", ".join(self.description.classes[c] for c in rare) or "none, so it is off"
                print(f"copy-paste (p={config.copy_paste}) of the classes rarer than the median one in the training labels: {names}",
                      flush=True)
        self.train_set = SegmentationDataset(config.data, config.train_split, augment, self.description, holdout, paste)
        val_split = f"{config.train_split}@{config.holdout_sequence}" if holdout else config.val_split
        self.val_set = SegmentationDataset(config.data, val_split, None, self.description) if config.val_every else None
        weights = class_weights(config.class_weights, config.data, self.description, config.train_split, holdout,
                                config.class_weight_power)
        self.class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=self.device)

        per_process = math.ceil(len(self.train_set) / self.context.world_size)
        self.steps_per_epoch = math.ceil(per_process / (config.batch_size * config.accumulate))
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")

        self.epoch, self.samples_done, self.step = 0, 0, 0   # samples_done: this process, this epoch
        self.best_miou: Optional[float] = None
        self.history: List[Dict] = []
        self._epoch_loss = [0.0, 0]                          # sum of step losses, steps
        if resume_state is not None:
            self._load_state(resume_state)

    # ---- checkpoints -------------------------------------------------------------------

    def _resume_state(self, trust: bool) -> Dict:
        path = self.output / "last.pt"
        state = load_checkpoint(path, trust=trust)
        saved = dict(state["config"])
        # Settings that change what is computed must match; where to write, how many
        # epochs or steps, workers and progress may change on resume.
        free = {"output", "epochs", "max_steps", "workers", "progress", "val_every", "device"}
        mine = dataclasses.asdict(self.config)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # settings older checkpoints lack
        changed = {k: (saved.get(k, defaults[k]), mine[k]) for k in mine
                   if k not in free and _normal(saved.get(k, defaults[k])) != _normal(mine[k])}
        if "dataset" in state and state["dataset"] != load_description(self.config.dataset).to_dict():
            changed["dataset description"] = ("as saved", f"{self.config.dataset} now")
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"--resume: the settings differ from those of {path} ({details}); resume with the same settings")
        if saved.get("epochs") != self.config.epochs and self.config.schedule != "constant":
            print(f"note: epochs changed {saved.get('epochs')} -> {self.config.epochs}; the {self.config.schedule} schedule follows the new total")
        return state

    def _state(self) -> Dict:
        state = {
            "model": self.shipped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch": self.epoch,
            "samples_done": self.samples_done,
            "step": self.step,
            "best_miou": self.best_miou,
            "history": self.history,
            "epoch_loss": list(self._epoch_loss),
            "world_size": self.context.world_size,
            "config": dataclasses.asdict(self.config),
            "dataset": self.description.to_dict(),
        }
        if self.average is not None:  # the optimiser's own weights, which a resumed run continues from
            state.update(trained_model=self.model.state_dict(), averages=int(self.average.n_averaged))
        return state

    def _load_state(self, state: Dict) -> None:
        if state.get("world_size", 1) != self.context.world_size and state.get("samples_done", 0):
            raise ValueError(
                f"--resume: last.pt stopped mid-epoch with {state['world_size']} processes; resume it with the same number "
                f"(now {self.context.world_size})"
            )
        self.model.load_state_dict(state.get("trained_model", state["model"]))
        if self.average is not None:
            self.average.module.load_state_dict(state["model"])
            self.average.n_averaged.fill_(state["averages"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch, self.samples_done, self.step = state["epoch"], state["samples_done"], state["step"]
        self.best_miou, self.history = state["best_miou"], list(state["history"])
        self._epoch_loss = list(state.get("epoch_loss", [0.0, 0]))

    def save(self, name: str = "last.pt") -> Path:
        path = self.output / name
        if self.context.is_main:
            save_checkpoint(self._state(), path)
        if self.context.enabled:
            torch.distributed.barrier()
        return path

    # ---- the loop ----------------------------------------------------------------------

    def fit(self) -> Dict:
        """Train to ``config.epochs`` (or ``max_steps``); returns the last history row."""
        if self.context.is_main:
            ensure_writable(self.output, 2 * self._checkpoint_bytes())  # a new last.pt beside the old, and best.pt
            remove_partial_writes(self.output)
            (self.output / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
            if self.history or self.step:
                self._rewrite_logs()
        with _StopSignals() as stop, self._tensorboard() as board:
            while self.epoch < self.config.epochs:
                finished = self._train_epoch(stop)
                if not finished:
                    path = self.save()
                    if stop.received is not None or not self._max_steps_reached():
                        raise TrainingInterrupted(stop.received or signal.SIGTERM, path)
                    return {"stopped_at_step": self.step, "checkpoint": str(path)}
                self._end_epoch(board)
        return self.history[-1] if self.history else {}

    def _loader(self):
        sampler = EpochSampler(
            len(self.train_set), self.config.seed, self.epoch, rank=self.context.rank,
            world_size=self.context.world_size, skip=self.samples_done,
        )
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.config.batch_size, sampler=sampler, collate_fn=collate,
            num_workers=self.config.workers, worker_init_fn=_ignore_sigint if self.config.workers else None,
            persistent_workers=False, pin_memory=self.device.type == "cuda",
        )

    def _train_epoch(self, stop: _StopSignals) -> bool:
        """Run the rest of the current epoch; False when stopped early (signal or max_steps)."""
        self.ddp.train()
        if self.samples_done == 0:
            self._epoch_loss = [0.0, 0]
        self._epoch_start, self._epoch_images = time.perf_counter(), 0
        loader = iter(self._loader())
        remaining = self.steps_per_epoch - self.step_in_epoch()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch(), desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   unit="step", disable=not (self.config.progress and self.context.is_main), dynamic_ncols=True)
        with bar:
            for _ in range(remaining):
                batches = [b for b in (next(loader, None) for _ in range(self.config.accumulate)) if b is not None]
                if not batches:
                    break
                loss = self._step(batches)
                n = sum(len(labels) for _, labels in batches)
                self.samples_done += n
                self.step += 1
                self._epoch_images += n * self.context.world_size
                self._epoch_loss[0] += loss
                self._epoch_loss[1] += 1
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self._epoch_images / (time.perf_counter() - self._epoch_start):.2f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                bar.update()
                if self._should_stop(stop):
                    return False
        return True

    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _should_stop(self, stop: _StopSignals) -> bool:
        """A signal or max_steps; under torchrun every process stops after the same step
        (a signal may reach them at different moments)."""
        local = stop.received is not None or self._max_steps_reached()
        if not self.context.enabled:
            return local
        flag = distributed.all_reduce(torch.tensor([float(local)]), self.context, torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def step_in_epoch(self) -> int:
        return math.ceil(self.samples_done / (self.config.batch_size * self.config.accumulate))

    def _step(self, batches: List[Tuple[Tensor, Tensor]]) -> float:
        """One optimiser step over ``batches`` (the accumulated micro-batches). The
        cross-entropy is normalised by the class weight of every valid pixel of the whole
        global step, so accumulation and data parallelism give the gradient of one big batch;
        the Lovász term (not a sum over pixels) is the mean of its micro-batches' values. OHEM
        drops the easy pixels from the sum but not from that normaliser (mmsegmentation's
        convention); its ``ohem_min_kept`` share is of each micro-batch."""
        batches = [(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)) for images, labels in batches]
        denominator = torch.zeros((), dtype=torch.float64)
        for _, labels in batches:
            denominator += _pixel_weight(labels, self.class_weights, self.description.ignore_index).double().cpu()
        distributed.all_reduce(denominator, self.context)
        denominator = max(float(denominator), 1e-12)
        if self.config.dropout:
            # Dropout draws from the global generator, which the DataLoader also draws from:
            # seeded per step (as augmentation is per sample), a resumed run draws the same masks.
            # Only with dropout: runs without it keep the generator's stream they always had.
            torch.manual_seed(derived_seed("dropout", self.config.seed, self.step, self.context.rank))
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, (images, labels) in enumerate(batches):
            if self.config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = i == len(batches) - 1 or not self.context.enabled
            with (self.ddp.no_sync() if not sync else contextlib.nullcontext()):
                with autocast(self.device, self.config.amp):
                    logits = self.ddp(images)
                hard = labels if not self.config.ohem else ohem_labels(
                    logits, labels, self.description.ignore_index, self.config.ohem, self.config.ohem_min_kept)
                loss_sum = F.cross_entropy(logits.float(), hard, weight=self.class_weights,
                                           ignore_index=self.description.ignore_index, reduction="sum")
                loss = loss_sum * (self.context.world_size / denominator)
                if self.config.lovasz:
                    # DDP averages the processes' gradients: no world_size factor here
                    lovasz = lovasz_softmax(logits, labels, self.description.ignore_index) * (self.config.lovasz / len(batches))
                    loss = loss + lovasz
                    total += lovasz.item() / self.context.world_size
                self.scaler.scale(loss).backward()
            total += loss_sum.item() / denominator
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.model)
        reduced = distributed.all_reduce(torch.tensor([total], dtype=torch.float64), self.context)
        return float(reduced)

    def _end_epoch(self, board) -> None:
        seconds = time.perf_counter() - self._epoch_start
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": self._epoch_loss[0] / max(1, self._epoch_loss[1]),
            "images_per_s": self._epoch_images / seconds if seconds > 0 else None,
            "epoch_s": seconds,
        }
        validate = self.val_set is not None and ((self.epoch + 1) % self.config.val_every == 0 or self.epoch + 1 == self.config.epochs)
        result = None
        if validate:
            result = self._validate(self.shipped)
            row.update(val_global_accuracy=result["global_accuracy"], val_class_accuracy=result["class_accuracy"], val_mean_iou=result["mean_iou"])
            if self.average is not None:  # the trained weights too, to show what averaging adds
                trained = self._validate(self.model)
                row.update(val_trained_global_accuracy=trained["global_accuracy"], val_trained_mean_iou=trained["mean_iou"])
        self.history.append(row)
        self.epoch, self.samples_done = self.epoch + 1, 0
        improved = result is not None and result["mean_iou"] is not None and (self.best_miou is None or result["mean_iou"] > self.best_miou)
        if improved:
            self.best_miou = result["mean_iou"]
        if improved:  # best.pt first: a crash between the two repeats the epoch, which writes both again
            self.save("best.pt")
        self.save("last.pt")
        if self.context.is_main:
            self._log(row, board)
            summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"epoch {row['epoch']}: {summary}" + (" (best)" if improved else ""), flush=True)

    def _validate(self, model: nn.Module) -> Dict:
        confusion = confusion_over(
            model, self.val_set, self.device, self.config.batch_size, self.config.amp,
            self.config.channels_last, self.config.workers, self.context, self.config.progress,
        )
        return scores(confusion, self.description.classes, self.description.ignore_index)

    def _checkpoint_bytes(self) -> int:
        """About the size of a checkpoint: the model (twice with an average), and the
        optimiser's state per parameter."""
        copies = 1 if self.average is None else 2
        slots = {"adam": 2, "sgd": 1}[self.config.optimizer]
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        return (params + buffers) * copies + params * slots + 2**20

    # ---- logs --------------------------------------------------------------------------

    def _rewrite_logs(self) -> None:
        """On resume, the logs say what the checkpoint says: rows written after it (a run
        killed between its log and its checkpoint) are dropped, missing ones restored. Each
        file is written beside itself, then renamed over: a reader never finds it missing."""
        for name, text in (("metrics.jsonl", _jsonl(self.history)), ("metrics.csv", _csv(self.history, header=True))):
            tmp = self.output / f".{name}.tmp"
            with open(tmp, "w", newline="") as f:
                f.write(text)
            os.replace(tmp, self.output / name)

    def _log(self, row: Dict, board) -> None:
        self._write_row(row)
        if board is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and v is not None:
                    board.add_scalar(k, v, row["epoch"])
        plot_curves(self.history, self.output / "curves.png")

    def _write_row(self, row: Dict) -> None:
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(_jsonl([row]))
        csv_path = self.output / "metrics.csv"
        header = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            f.write(_csv([row], header))

    def _tensorboard(self):
        if not self.context.is_main:
            return contextlib.nullcontext()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return contextlib.nullcontext()
        return SummaryWriter(str(self.output / "tensorboard"))


def _pixel_weight(labels: Tensor, weights: Optional[Tensor], ignore_index: int) -> Tensor:
    valid = labels != ignore_index
    if weights is None:
        return valid.sum()
    return weights[labels[valid]].sum()


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


_LOG_COLUMNS = ["epoch", "step", "lr", "train_loss", "images_per_s", "epoch_s", "val_global_accuracy",
                "val_class_accuracy", "val_mean_iou", "val_trained_global_accuracy", "val_trained_mean_iou"]


def _jsonl(rows: List[Dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _csv(rows: List[Dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_LOG_COLUMNS)
    if header:
        writer.writeheader()
    writer.writerows({k: row.get(k) for k in _LOG_COLUMNS} for row in rows)
    return out.getvalue()


def plot_curves(history: List[Dict], path: Path) -> Optional[Path]:
    """Training loss and validation G / C / mIoU per epoch, as a PNG (the loss alone for a run
    without validation)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    val = [r for r in history if r.get("val_mean_iou") is not None]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 5, 3.6), squeeze=False)
    ax_loss = axes[0, 0]
    ax_loss.plot([r["epoch"] for r in history], [r["train_loss"] for r in history], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss" if val else "loss (no validation)")
    if val:
        ax_val = axes[0, 1]
        for key, label in (("val_global_accuracy", "global accuracy"), ("val_class_accuracy", "class accuracy"),
                           ("val_mean_iou", "mIoU")):
            ax_val.plot([r["epoch"] for r in val], [r[key] for r in val], marker=".", label=label)
        averaged = val[-1].get("val_trained_mean_iou") is not None  # --ema: the curves above are the average's
        if averaged:
            ax_val.plot([r["epoch"] for r in val], [r.get("val_trained_mean_iou") for r in val], ls="--", color="grey",
                        label="mIoU, trained weights")
        ax_val.set(xlabel="epoch", ylabel="%", title="validation, weight average" if averaged else "validation")
        ax_val.legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(config: TrainConfig, resume: bool = False, trust_checkpoint: bool = False) -> Dict:
    """Run training; always leaves the process group."""
    trainer = Trainer(config, resume=resume, trust_checkpoint=trust_checkpoint)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown(trainer.context)
