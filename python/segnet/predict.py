"""Prediction: class-id PNGs, colour PNGs in the CamVid palette and side-by-side overlays."""
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_model
from .data import IMAGE_SUFFIXES, PALETTE, normalize, read_image, sample_root
from .evaluate import predict_logits, resolve_device


def colorize(classes: np.ndarray) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 in the CamVid palette."""
    palette = np.array(PALETTE, dtype=np.uint8)
    return palette[np.clip(classes, 0, len(palette) - 1)]


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The photo and the photo blended with its colour labels, side by side."""
    blended = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round().astype(np.uint8)
    return np.concatenate([image, blended], axis=1)


def list_inputs(path: Union[str, Path]) -> List[Path]:
    """An image file, or the images of a folder (sorted); ``sample`` = the bundled val images."""
    path = sample_root() / "val" if str(path) == "sample" else Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"input folder {str(path)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise FileNotFoundError(f"input {str(path)!r} is neither an image file nor a folder")


def predict(
    checkpoint: Union[str, Path],
    inputs: Union[str, Path],
    output: Union[str, Path],
    device: str = "auto",
    amp: str = "none",
    backend: Optional[str] = None,
    trust: bool = False,
) -> List[Dict[str, str]]:
    """Segment every input image; for each writes ``NAME_labels.png`` (class ids),
    ``NAME_color.png`` and ``NAME_overlay.png`` into ``output``."""
    torch_device = resolve_device(device)
    model, config = load_model(checkpoint, torch_device, backend=backend, trust=trust)
    files = list_inputs(inputs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(files, desc="predict", unit="image", disable=len(files) == 1):
        image = read_image(path)
        logits = predict_logits(model, normalize(image)[None].to(torch_device), amp, config.get("channels_last", False))
        classes = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        colour = colorize(classes)
        names = {kind: output / f"{path.stem}_{kind}.png" for kind in ("labels", "color", "overlay")}
        Image.fromarray(classes).save(names["labels"])
        Image.fromarray(colour).save(names["color"])
        Image.fromarray(overlay(image.permute(1, 2, 0).numpy(), colour)).save(names["overlay"])
        written.append({"input": str(path), **{k: str(v) for k, v in names.items()}})
    return written
