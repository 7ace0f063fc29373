"""Checkpoints: written atomically, loaded without unpickling arbitrary objects."""
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .model import build_model


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over ``path``. A crash leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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
    files from a source you trust, with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
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


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1)


def load_model(
    checkpoint: Union[str, Path], device: torch.device, backend: Optional[str] = None, trust: bool = False
) -> Tuple[nn.Module, Dict]:
    """The model of a training checkpoint, in eval mode on ``device``, and its configuration.
    ``backend`` overrides the one it was trained with (the weights fit both)."""
    state = load_checkpoint(checkpoint, trust=trust)
    config = dict(state["config"])
    model = build_model(config["model"], config.get("num_classes", 11), backend or config.get("backend", "segnet_ext"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit model {config['model']!r}: {e}") from None
    model.to(device).eval()
    if config.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    return model, config
