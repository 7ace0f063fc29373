"""Prediction on images and videos: class-id PNGs, colour maps and overlays with a legend of
the classes, in the colours of the model's dataset description."""
import math
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm import tqdm

from .checkpoint import load_model
from .data import CAMVID, IMAGE_SUFFIXES, normalize, read_image, sample_root
from .description import DatasetDescription, class_names_present
from .evaluate import predict_logits, resolve_device, tta_scales

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def colorize(classes: np.ndarray, description: DatasetDescription = CAMVID) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 in the description's colours."""
    return description.palette()[np.clip(classes, 0, 255)]


def blend(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The photo blended with its colour labels."""
    return (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round().astype(np.uint8)


def overlay(image: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The photo and the photo blended with its colour labels, side by side."""
    return np.concatenate([image, blend(image, colour, alpha)], axis=1)


def legend(description: DatasetDescription, ids: Sequence[int], width: int) -> np.ndarray:
    """A white strip [H, width, 3] listing the classes among ``ids`` (a colour swatch and the
    name each), left to right in as many rows as ``width`` needs (wider if one entry is)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row, pad, swatch = 16, 6, 12
    entries = [(name, colour, pad + swatch + 4 + math.ceil(probe.textlength(name, font=font)) + pad)
               for _, name, colour in class_names_present(description, ids)]
    width = max([width, *(w + pad for *_, w in entries)])
    places, x, y = [], pad, pad
    for name, colour, w in entries:
        if x + w > width and x > pad:
            x, y = pad, y + row
        places.append((x, y, name, colour))
        x += w
    panel = Image.new("RGB", (width, y + row + pad if entries else 2 * pad), "white")
    draw = ImageDraw.Draw(panel)
    for x, y, name, colour in places:
        draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=tuple(colour), outline=(80, 80, 80))
        draw.text((x + swatch + 4, y + 1), name, fill="black", font=font)
    return np.asarray(panel)


def with_legend(picture: np.ndarray, description: DatasetDescription, ids: Sequence[int]) -> np.ndarray:
    """``picture`` above the legend of the classes among ``ids``."""
    return above(picture, legend(description, ids, picture.shape[1]))


def above(picture: np.ndarray, strip: np.ndarray) -> np.ndarray:
    """``picture`` above ``strip``, the narrower of the two padded white to the other's width."""
    width = max(picture.shape[1], strip.shape[1])
    widen = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)
    return np.concatenate([widen(picture), widen(strip)], axis=0)


def list_inputs(path: Union[str, Path]) -> List[Path]:
    """An image or video file, or the images of a folder (sorted); ``sample`` = the bundled val images."""
    path = sample_root() / "val" if str(path) == "sample" else Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        if not files:
            raise ValueError(f"input folder {str(path)!r} has no images ({', '.join(IMAGE_SUFFIXES)}) "
                             f"nor videos ({', '.join(VIDEO_SUFFIXES)})")
        return files
    raise FileNotFoundError(f"input {str(path)!r} is neither an image or video file nor a folder")


def segment(model: nn.Module, images: torch.Tensor, amp: str = "none", channels_last: bool = False,
            flip: bool = False, scales: Sequence[float] = (1.0,)) -> np.ndarray:
    """uint8 [N, 3, H, W] photos -> uint8 [N, H, W] class ids (``flip``, ``scales``: test-time
    augmentation, see :func:`segnet.evaluate.predict_logits`)."""
    device = next(model.parameters()).device
    logits = predict_logits(model, normalize(images).to(device), amp, channels_last, flip, scales)
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def predict(
    checkpoint: Union[str, Path],
    inputs: Union[str, Path],
    output: Union[str, Path],
    device: str = "auto",
    amp: str = "none",
    backend: Optional[str] = None,
    trust: bool = False,
    batch_size: int = 4,
    dataset: Union[str, Path, DatasetDescription, None] = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> List[Dict[str, str]]:
    """Segment every input into ``output``. For an image: ``NAME_labels.png`` (class ids),
    ``NAME_color.png`` (colour map with a legend) and ``NAME_overlay.png`` (photo | blend,
    with a legend). For a video: ``NAME_overlay.mp4`` (the blend) and ``NAME_side_by_side.mp4``
    (photo | colour map, legend below), frames segmented ``batch_size`` at a time. ``flip``:
    flip test-time augmentation (twice the compute); ``scales``: multi-scale test-time
    augmentation, the image rescaled by each factor (see :func:`segnet.evaluate.predict_logits`)."""
    scales = tta_scales(scales)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    torch_device = resolve_device(device)
    model, config = load_model(checkpoint, torch_device, backend=backend, trust=trust, dataset=dataset)
    channels_last = config.get("channels_last", False)
    files = list_inputs(inputs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    images = [p for p in files if p.suffix.lower() not in VIDEO_SUFFIXES]
    for path in tqdm(images, desc="predict", unit="image", disable=len(images) <= 1):
        image = read_image(path)
        classes = segment(model, image[None], amp, channels_last, flip, scales)[0]
        colour, photo = colorize(classes, model.dataset), image.permute(1, 2, 0).numpy()
        present = np.unique(classes)
        names = {kind: output / f"{path.stem}_{kind}.png" for kind in ("labels", "color", "overlay")}
        Image.fromarray(classes).save(names["labels"])
        Image.fromarray(with_legend(colour, model.dataset, present)).save(names["color"])
        Image.fromarray(with_legend(overlay(photo, colour), model.dataset, present)).save(names["overlay"])
        written.append({"input": str(path), **{k: str(v) for k, v in names.items()}})
    for path in (p for p in files if p.suffix.lower() in VIDEO_SUFFIXES):
        written.append(predict_video(model, path, output, amp, channels_last, batch_size, flip, scales))
    return written


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise RuntimeError("video input needs imageio-ffmpeg (it brings its own ffmpeg): "
                           "pip install 'segnet-ext[video]', or pip install imageio-ffmpeg") from None
    return imageio_ffmpeg


def read_video(path: Union[str, Path]):
    """(frames: an iterator of uint8 [H, W, 3] arrays, frames per second, frame count or None)."""
    ffmpeg = _ffmpeg()
    try:
        reader = ffmpeg.read_frames(str(path))
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        raise ValueError(f"cannot read video {str(path)!r}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    width, height = meta["size"]
    fps = float(meta.get("fps") or 25.0)
    duration = meta.get("duration")
    count = round(duration * fps) if duration else None

    def frames() -> Iterator[np.ndarray]:
        try:
            for raw in reader:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
        finally:
            reader.close()

    return frames(), fps, count


class VideoWriter:
    """An H.264 MP4 written frame by frame through imageio-ffmpeg; odd sizes are padded by
    one pixel (yuv420p needs even ones), never rescaled."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps, self._writer, self.size = path, fps, None, None

    def write(self, frame: np.ndarray) -> None:
        if self._writer is None:
            h, w = frame.shape[:2]
            self.size = (w + w % 2, h + h % 2)
            self._writer = _ffmpeg().write_frames(str(self.path), self.size, fps=self.fps, codec="libx264",
                                                  macro_block_size=2, quality=7, ffmpeg_log_level="error")
            self._writer.send(None)
        pad_h, pad_w = self.size[1] - frame.shape[0], self.size[0] - frame.shape[1]
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)))
        self._writer.send(np.ascontiguousarray(frame))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def predict_video(model: nn.Module, path: Path, output: Path, amp: str = "none", channels_last: bool = False,
                  batch_size: int = 4, flip: bool = False,
                  scales: Sequence[float] = (1.0,)) -> Dict[str, str]:
    """Segment a video's frames ``batch_size`` at a time into ``NAME_overlay.mp4`` and
    ``NAME_side_by_side.mp4`` (photo | colour map, the legend of all classes below), at its frame rate."""
    frames, fps, count = read_video(path)
    names = {"overlay": output / f"{path.stem}_overlay.mp4", "side_by_side": output / f"{path.stem}_side_by_side.mp4"}
    writers = {kind: VideoWriter(name, fps) for kind, name in names.items()}
    key = None  # one legend of all classes for every frame: drawn once, and the frame size stays
    done, start = 0, time.perf_counter()
    try:
        with tqdm(total=count, desc=f"predict {path.name}", unit="frame") as bar:
            batch: List[np.ndarray] = []
            for frame in _then_none(frames):
                if frame is not None:
                    batch.append(frame)
                if batch and (len(batch) == batch_size or frame is None):
                    photos = np.stack(batch)
                    classes = segment(model, torch.from_numpy(photos).permute(0, 3, 1, 2), amp, channels_last, flip, scales)
                    for photo, ids in zip(photos, classes):
                        colour = colorize(ids, model.dataset)
                        writers["overlay"].write(blend(photo, colour))
                        side = np.concatenate([photo, colour], axis=1)
                        if key is None:
                            key = legend(model.dataset, range(model.dataset.num_classes), side.shape[1])
                        writers["side_by_side"].write(above(side, key))
                    done += len(batch)
                    bar.update(len(batch))
                    bar.set_postfix(frames_s=f"{done / (time.perf_counter() - start):.2f}")
                    batch = []
    finally:
        for writer in writers.values():
            writer.close()
    if not done:
        raise ValueError(f"video {str(path)!r} has no frames")
    seconds = time.perf_counter() - start
    print(f"{path.name}: {done} frames in {seconds:.1f} s ({done / seconds:.2f} frames/s)")
    return {"input": str(path), "frames": str(done), "frames_per_s": f"{done / seconds:.2f}", **{k: str(v) for k, v in names.items()}}


def _then_none(items):
    yield from items
    yield None
