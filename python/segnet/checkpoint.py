"""Checkpoints: written atomically, loaded without unpickling arbitrary objects."""
import errno
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .description import DatasetDescription, load_description
from .model import build_model

# Trained models shipped with the package, loadable by name (see pretrained/README.md).
PRETRAINED = Path(__file__).parent / "pretrained"
# The default: trained with the recipe chosen on a held-out street (README: Choosing settings).
DEFAULT_PRETRAINED = "segnet_basic_camvid_v7"
DEFAULT_RECIPE = "camvid_segnet_basic_v7"  # the bundled recipe that trained it (--config NAME)


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over ``path``. A crash leaves the previous file intact."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise OSError(e.errno, f"cannot write checkpoint {str(path)!r}: {_why(e)}; {kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_partial_writes(folder: Union[str, Path]) -> None:
    """Delete the temporary files of writes (checkpoints, rewritten logs) that a killed
    process never finished."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _why(e: OSError) -> str:
    hint = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}.get(e.errno)
    return f"{hint} ({e.strerror or e})" if hint else str(e.strerror or e)


def ensure_writable(folder: Union[str, Path], need_bytes: int) -> None:
    """Fail early, with a clear message, when ``folder`` cannot be created or written, or
    its disk has less than ``need_bytes`` free."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise OSError(e.errno, f"output folder {str(folder)!r} is not writable: {_why(e)}") from None
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"output folder {str(folder)!r} has {free / 2**20:.0f} MiB free, but its checkpoints "
                                    f"need about {need_bytes / 2**20:.0f} MiB")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Union[str, Path], trust: bool = False) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (tensors, numbers, strings, lists and
    dicts only: a crafted file cannot run code). ``trust=True`` allows full unpickling, for
    files from a source you trust, with a warning. ``path`` may also name a bundled model."""
    path = resolve_checkpoint(path)
    if not (zipfile.is_zipfile(path) or _first_byte(path) == b"\x80"):  # torch.save's zip, or a raw pickle
        raise ValueError(f"checkpoint {str(path)!r} is not a readable torch file (neither a torch.save archive nor a pickle)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects other than tensors and plain data, which are not "
            f"loaded from untrusted files ({str(e).splitlines()[0]}). If you trust its source, pass "
            f"--trust-checkpoint."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable torch file: {e}") from None
    if trust:
        warnings.warn(f"loaded {path} with full unpickling (--trust-checkpoint)", stacklevel=2)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a segnet checkpoint (it lacks 'model' and 'config')")
    return state


def pretrained_names() -> List[str]:
    return sorted(p.stem for p in PRETRAINED.glob("*.pt"))


def resolve_checkpoint(name_or_path: Union[str, Path]) -> Path:
    """A checkpoint file, or the bundled model of that name (``segnet_basic_camvid_v7``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = PRETRAINED / f"{name_or_path}.pt"
    if path.name == str(name_or_path) and bundled.is_file():
        return bundled
    raise FileNotFoundError(f"checkpoint {str(name_or_path)!r} does not exist (nor is it a bundled model: "
                            f"{', '.join(pretrained_names()) or 'none'})")


def weights_only_checkpoint(state: Dict[str, Any], dtype: torch.dtype = torch.float16) -> Dict[str, Any]:
    """What inference needs from a training checkpoint: the weights (floating-point ones in
    ``dtype``; they load into float32 models), the settings and the history; no optimiser."""
    model = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state["model"].items()}
    keep = ("config", "dataset", "epoch", "step", "best_miou", "history")
    return {"model": model, **{k: state[k] for k in keep if k in state}}


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def checkpoint_description(state: Dict[str, Any], source: str = "checkpoint") -> DatasetDescription:
    """The dataset description a checkpoint was trained with (older ones: their config's dataset, CamVid)."""
    if "dataset" in state:
        return DatasetDescription.from_dict(state["dataset"], f"{source}: its dataset description")
    return load_description(state["config"].get("dataset", "camvid"))


def build_from_config(config: Dict[str, Any], num_classes: int, backend: Optional[str] = None) -> nn.Module:
    """The network a checkpoint's ``config`` describes, freshly initialised (``num_classes``
    where the config has none; ``backend`` overrides its own)."""
    return build_model(config["model"], config.get("num_classes") or num_classes,
                       backend or config.get("backend", "segnet_ext"), config.get("dropout", 0.0),
                       config.get("input_norm", "none"))


def load_model(
    checkpoint: Union[str, Path], device: torch.device, backend: Optional[str] = None, trust: bool = False,
    dataset: Union[str, Path, DatasetDescription, None] = None,
) -> Tuple[nn.Module, Dict]:
    """The model of a training checkpoint, in eval mode on ``device``, and its configuration.
    ``model.dataset`` is its dataset description (classes, colours, ignore index), or
    ``dataset`` where given, which must have as many classes. ``backend`` overrides the one
    it was trained with (the weights fit both)."""
    state = load_checkpoint(checkpoint, trust=trust)
    config = dict(state["config"])
    description = checkpoint_description(state, f"checkpoint {str(checkpoint)!r}")
    if dataset is not None:
        given = load_description(dataset)
        if given.num_classes != description.num_classes:
            raise ValueError(f"dataset {given.name!r} has {given.num_classes} classes but checkpoint {str(checkpoint)!r} "
                             f"was trained on {description.num_classes} ({description.name})")
        description = given
    model = build_from_config(config, description.num_classes, backend)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit model {config['model']!r}: {e}") from None
    model.to(device).eval()
    if config.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    model.dataset = description
    return model, config


def init_from_checkpoint(model: nn.Module, checkpoint: Union[str, Path], model_name: str, input_norm: str,
                         classes: List[str], trust: bool = False) -> List[str]:
    """Fine-tuning's start: copy into ``model``, freshly built for a run, the weights and BN
    statistics of ``checkpoint`` (a file, or a bundled model's name such as
    ``segnet_basic_camvid_v7``), not its optimiser state or schedule. The network and the input
    normalisation must be the checkpoint's. Its classifier is copied only where it learned the
    same ``classes`` (names, in order); elsewhere the run's fresh classifier stays, as
    torchvision's and mmsegmentation's fine-tuning replace the head. Returns the names of the
    tensors left as initialised."""
    state = load_checkpoint(checkpoint, trust=trust)
    source = f"init_from: checkpoint {str(checkpoint)!r}"
    for setting, flag, mine in (("model", "--model", model_name), ("input_norm", "--input-norm", input_norm)):
        theirs = state["config"].get(setting, "none")
        if theirs != mine:
            raise ValueError(f"{source} has {setting} {theirs!r}, but this run has {mine!r}; fine-tune it with {flag} {theirs}")
    weights = dict(state["model"])
    fresh = []
    if list(checkpoint_description(state, source).classes) != list(classes):
        fresh = [k for k in model.state_dict() if k.startswith("classifier.")]
        for k in fresh:
            weights.pop(k, None)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{source} does not fit model {model_name!r}: {e}") from None
    if sorted(missing) != sorted(fresh) or unexpected:
        raise ValueError(f"{source} does not fit model {model_name!r}: missing {sorted(set(missing) - set(fresh))}, "
                         f"unexpected {sorted(unexpected)}")
    return fresh


def load_pretrained(name: str = DEFAULT_PRETRAINED, device: Union[str, torch.device] = "cpu",
                    backend: Optional[str] = None) -> nn.Module:
    """A model shipped with the package (``pretrained_names()``), in eval mode on ``device``,
    float32; ``model.dataset`` is its dataset description (class names, colours, ignore index).
    ``backend="torch"`` runs it without segnet_ext's kernels."""
    if name not in pretrained_names():
        raise ValueError(f"no bundled model {name!r}; bundled: {', '.join(pretrained_names()) or 'none'}")
    model, _ = load_model(PRETRAINED / f"{name}.pt", torch.device(device), backend=backend)
    return model
