"""Segmentation datasets in four layouts, their labels, augmentation, sampling and class weights.

What the classes are comes from a dataset description (description.py); where the files
are, from its layout, under a data root (``--data``):

- ``camvid`` (SegNet tutorial): ``ROOT/{split}/*`` images and ``ROOT/{split}annot/*`` labels
  of the same file name, or a list file ``ROOT/{split}.txt`` of ``image label`` pairs
  relative to ROOT. ``sample`` names the six CamVid images bundled with the package.
- ``generic``: ``ROOT/images/{split}/**`` and ``ROOT/labels/{split}/**``, an image and its
  label matched by relative folder and file stem, any image extension.
- ``cityscapes``: ``ROOT/leftImg8bit/{split}/CITY/X_leftImg8bit.png`` and
  ``ROOT/gtFine/{split}/CITY/X_gtFine_labelTrainIds.png`` (the 19 train ids, 255 ignored).
- ``voc``: ``ROOT/JPEGImages/X.jpg`` and ``ROOT/SegmentationClass/X.png`` for the stems
  listed in ``ROOT/ImageSets/Segmentation/{split}.txt``.

Labels hold class ids (grey or palette PNGs) or the classes' colours (RGB PNGs).

Randomness is per sample: each sample is drawn as ``(index, seed)`` and augmented with a
generator seeded from ``seed``, so a run is reproducible whatever the number of
DataLoader workers, and resuming mid-epoch replays exactly the batches not yet seen.
"""
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from .description import DatasetDescription, load_description

# CamVid, the default dataset (datasets/camvid.json): 11 classes, 11 = void, the SegNet
# tutorial's colours, the paper's class weights (median frequency balancing over train).
CAMVID = load_description("camvid")
NUM_CLASSES = CAMVID.num_classes
VOID = CAMVID.ignore_index
CLASSES = CAMVID.classes
PALETTE = CAMVID.colors + (CAMVID.ignore_color,)
PAPER_CLASS_WEIGHTS = CAMVID.class_weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Files are untrusted: a header may promise far more pixels than its bytes (a decompression
# bomb). The size is checked before decoding; SEGNET_MAX_IMAGE_PIXELS raises the limit.
MAX_IMAGE_PIXELS = 64 * 2**20


def sample_root() -> Path:
    """The bundled CamVid sample (4 train, 2 val images)."""
    return Path(__file__).resolve().parent / "sample" / "camvid"


def resolve_root(root: Union[str, Path]) -> Path:
    """``sample`` -> the bundled sample; otherwise the folder itself, which must exist."""
    if str(root) == "sample":
        return sample_root()
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data root {str(path)!r} is not a folder (expected a dataset's root, or 'sample')")
    return path


def sequence_of(path: Union[str, Path]) -> str:
    """The sequence (video, drive, city) a frame belongs to: its file name up to the first
    underscore (CamVid's 0006R0_f02340.png -> 0006R0; Cityscapes' aachen_000000_000019 -> aachen)."""
    return Path(path).stem.split("_", 1)[0]


def list_pairs(root: Union[str, Path], split: str, layout: str = "camvid",
               exclude_sequences: Sequence[str] = ()) -> List[Tuple[Path, Path]]:
    """(image, label) paths of a split of a dataset in ``layout`` (see the module's text).

    ``split`` may join splits (``train+val``) and keep only some sequences (``train@0006R0``,
    ``train+val@0001TP,0006R0``; see :func:`sequence_of`); ``exclude_sequences`` leaves
    sequences out (``--holdout-sequence``)."""
    root = resolve_root(root)
    finders = {"camvid": _camvid_pairs, "generic": _generic_pairs, "cityscapes": _cityscapes_pairs, "voc": _voc_pairs}
    if layout not in finders:
        raise ValueError(f"layout must be one of {sorted(finders)}, got {layout!r}")
    names, _, keep = split.partition("@")
    pairs = [pair for name in names.split("+") for pair in finders[layout](root, name)]
    present = sorted({sequence_of(image) for image, _ in pairs})
    for wanted in [*filter(None, keep.split(",")), *exclude_sequences]:
        if wanted not in present:
            raise ValueError(f"sequence {wanted!r} is not in split {names!r} of {root} (its sequences: {', '.join(present)})")
    if keep:
        pairs = [pair for pair in pairs if sequence_of(pair[0]) in keep.split(",")]
    pairs = [pair for pair in pairs if sequence_of(pair[0]) not in exclude_sequences]
    if not pairs:
        raise ValueError(f"split {split!r} of {root} ({layout} layout) has no images"
                         + (f" once sequences {list(exclude_sequences)} are left out" if exclude_sequences else ""))
    return pairs


def _folders(split: str, layout: str, *folders: Path) -> None:
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"split {split!r}: the folder {folder} does not exist (the {layout} layout)")


def _images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _generic_pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    images, labels = root / "images" / split, root / "labels" / split
    _folders(split, "generic", images, labels)
    by_stem = {p.relative_to(labels).with_suffix(""): p for p in _images(labels)}
    pairs = []
    for image in _images(images):
        label = by_stem.get(image.relative_to(images).with_suffix(""))
        if label is None:
            raise FileNotFoundError(f"split {split!r}: no label {labels / image.relative_to(images).with_suffix('.*')} "
                                    f"for image {image}")
        pairs.append((image, label))
    return pairs


def _cityscapes_pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    images, labels = root / "leftImg8bit" / split, root / "gtFine" / split
    _folders(split, "cityscapes", images, labels)
    pairs = []
    for image in sorted(images.rglob("*_leftImg8bit.png")):
        relative = image.relative_to(images)
        label = labels / relative.parent / relative.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        if not label.is_file():
            raise FileNotFoundError(f"split {split!r}: no label {label} for image {image} (Cityscapes' trainId files: "
                                    "make them with cityscapesscripts' createTrainIdLabelImgs)")
        pairs.append((image, label))
    return pairs


def _voc_pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"split {split!r}: no list {list_file} (the voc layout)")
    pairs = []
    for stem in list_file.read_text().split():
        image, label = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
        for path in (image, label):
            if not path.is_file():
                raise FileNotFoundError(f"split {split!r}: {list_file} lists {stem!r} but {path} does not exist")
        pairs.append((image, label))
    return pairs


def _camvid_pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        pairs = []
        for line_no, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{line_no}: expected 'image label', got {line!r}")
            pairs.append((_inside(root, parts[0], list_file, line_no), _inside(root, parts[1], list_file, line_no)))
    else:
        images, labels = root / split, root / f"{split}annot"
        for folder in (images, labels):
            if not folder.is_dir():
                raise FileNotFoundError(f"split {split!r}: neither {list_file} nor the folder {folder} exists")
        pairs = [(p, labels / p.name) for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        for _, label in pairs:
            if not label.is_file():
                raise FileNotFoundError(f"split {split!r}: no label {label} for image {label.name}")
    return pairs


def _inside(root: Path, relative: str, list_file: Path, line_no: int) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{list_file}:{line_no}: path {relative!r} leaves the data root {root}")
    return path


def _open(path: Union[str, Path], what: str):
    """Opens an image file lazily (nothing decoded yet) after checking its pixel count."""
    limit = int(os.environ.get("SEGNET_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:  # Pillow's own, coarser guard
        raise ValueError(f"{what} {str(path)!r} is refused: {e}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e}") from None
    if im.width * im.height > limit:
        im.close()
        raise ValueError(f"{what} {str(path)!r} is {im.width}x{im.height} = {im.width * im.height} pixels, more than "
                         f"the limit of {limit} (a guard against decompression bombs; set SEGNET_MAX_IMAGE_PIXELS to raise it)")
    return im


def read_image(path: Union[str, Path]) -> Tensor:
    """An RGB image as uint8 [3, H, W]: 8- or 16-bit, grey, palette or colour, alpha dropped,
    turned upright as its EXIF orientation says."""
    with _open(path, "image") as im:
        try:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
                array = np.asarray(im).astype(np.int64)
                array = np.repeat((np.clip(array, 0, 65535) >> 8).astype(np.uint8)[..., None], 3, axis=2)
            elif im.mode == "F":
                raise ValueError("floating-point images are not supported; save it as 8- or 16-bit")
            else:
                array = np.asarray(im.convert("RGB")).copy()
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def read_label(path: Union[str, Path], description: DatasetDescription = CAMVID) -> Tensor:
    """A label map as int64 [H, W] of the description's class ids and its ignore index: from
    a single-channel PNG of ids (grey, or palette whose indices are the ids, as VOC's), or
    from an RGB PNG coloured with the classes' colours."""
    with _open(path, "label") as im:
        try:
            if im.mode in ("L", "P", "I", "I;16"):
                array = np.asarray(im).astype(np.int64)
            elif im.mode in ("RGB", "RGBA"):
                array = np.asarray(im.convert("RGB"))
            else:
                raise ValueError(f"expected a PNG of class ids (grey or palette) or of class colours (RGB), got mode {im.mode}")
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot read label {str(path)!r}: {e}") from None
    if array.ndim == 2:
        return torch.from_numpy(description.check_ids(array, str(path)))
    return torch.from_numpy(description.ids_from_colors(array, str(path)))


def normalize(image: Tensor) -> Tensor:
    """uint8 [..., 3, H, W] -> float32, ImageNet mean and std (what VGG weights expect;
    harmless from scratch, and one convention for every checkpoint)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


def rescale(images: Tensor, s: float) -> Tensor:
    """Float images [N, C, H, W] rescaled by ``s`` (each side rounded, at least 1 pixel):
    bilinear, antialiased when shrinking. Training's scale jitter and test-time scales share it."""
    size = [max(1, round(n * s)) for n in images.shape[-2:]]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=s < 1)


class Augment:
    """Random left-right flip (the paper's), then optional random scale and random crop
    (labels resized by nearest neighbour; crops past the border padded with ``ignore_index``),
    then optional photometric changes of the image: ``color = (brightness, contrast,
    saturation, hue)``, each factor drawn in 1 +- the value (hue: a rotation of +- value
    turns of the colour wheel), and a Gaussian ``blur`` with that probability (sigma 0.3-1.5
    pixels). Without photometric settings the random draws, and so the runs, are those of
    earlier versions."""

    def __init__(self, flip: bool = True, scale: Tuple[float, float] = (1.0, 1.0), crop: Optional[Tuple[int, int]] = None,
                 ignore_index: int = VOID, color: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0), blur: float = 0.0):
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be a range 0 < low <= high, got {scale}")
        if crop is not None and min(crop) < 1:
            raise ValueError(f"crop must be a positive H, W, got {crop}")
        if len(color) != 4 or not all(0 <= c < 1 for c in color[:3]) or not 0 <= color[3] <= 0.5:
            raise ValueError(f"color must be (brightness, contrast, saturation, hue) with the first three in [0, 1) "
                             f"and hue in [0, 0.5], got {tuple(color)}")
        if not 0 <= blur <= 1:
            raise ValueError(f"blur must be a probability in [0, 1], got {blur}")
        self.flip, self.scale, self.crop, self.ignore_index = flip, tuple(scale), crop, ignore_index
        self.color, self.blur = tuple(float(c) for c in color), float(blur)

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        if self.flip and torch.rand((), generator=generator) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        low, high = self.scale
        s = low + (high - low) * torch.rand((), generator=generator).item()
        if s != 1.0:
            image = rescale(image[None].float(), s)[0]
            label = F.interpolate(label[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0].long()
            image = image.round().clamp(0, 255).to(torch.uint8)
        if self.crop is not None:
            image, label = _random_crop(image, label, self.crop, generator, self.ignore_index)
        if any(self.color) or self.blur:
            image = _photometric(image, self.color, self.blur, generator)
        return image, label


# RGB <-> YIQ: a hue change is a rotation of the (I, Q) chroma plane
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _photometric(image: Tensor, color: Tuple[float, float, float, float], blur: float, generator: torch.Generator) -> Tensor:
    """uint8 [3, H, W] -> uint8: brightness, contrast, saturation, hue, then blur (see Augment)."""
    def factor(spread: float) -> float:
        return 1 + spread * (2 * torch.rand((), generator=generator).item() - 1)

    brightness, contrast, saturation = (factor(c) for c in color[:3])
    turns = color[3] * (2 * torch.rand((), generator=generator).item() - 1)
    sigma = 0.3 + 1.2 * torch.rand((), generator=generator).item()
    blurred = torch.rand((), generator=generator).item() < blur
    x = image.float() / 255 * brightness
    grey = (_RGB_TO_YIQ[0].view(3, 1, 1) * x).sum(0, keepdim=True)
    x = (x - grey.mean()) * contrast + grey.mean()
    grey = (_RGB_TO_YIQ[0].view(3, 1, 1) * x).sum(0, keepdim=True)
    x = (x - grey) * saturation + grey
    if turns:
        c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
        rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
        x = torch.einsum("ij,jhw->ihw", torch.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ, x)
    if blurred:
        radius = math.ceil(3 * sigma)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        taps = (taps / taps.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
        x = F.pad(x[None], (radius, radius, 0, 0), mode="replicate")
        x = F.conv2d(x, taps, groups=3)
        x = F.pad(x, (0, 0, radius, radius), mode="replicate")
        x = F.conv2d(x, taps.transpose(2, 3), groups=3)[0]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _random_crop(image: Tensor, label: Tensor, crop: Tuple[int, int], generator: torch.Generator, ignore_index: int):
    ch, cw = crop
    H, W = label.shape
    pad_h, pad_w = max(0, ch - H), max(0, cw - W)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
        H, W = label.shape
    top = int(torch.randint(0, H - ch + 1, (), generator=generator))
    left = int(torch.randint(0, W - cw + 1, (), generator=generator))
    return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


class CopyPaste:
    """Simple Copy-Paste (Ghiasi et al., CVPR 2021) for semantic labels: the pixels of
    ``classes`` in another image (a donor) are pasted over a sample, image and label, where
    they are in the donor (the top-left overlap when the two differ in size). The dataset
    draws whether to paste (``probability``), the donor and its own augmentation."""

    def __init__(self, probability: float, classes: Sequence[int]):
        if not 0 <= probability <= 1:
            raise ValueError(f"copy-paste probability must be in [0, 1], got {probability}")
        self.probability, self.classes = float(probability), torch.tensor(sorted(set(classes)), dtype=torch.long)

    def __call__(self, image: Tensor, label: Tensor, donor_image: Tensor, donor_label: Tensor) -> Tuple[Tensor, Tensor]:
        h, w = min(label.shape[0], donor_label.shape[0]), min(label.shape[1], donor_label.shape[1])
        pasted = torch.isin(donor_label[:h, :w], self.classes)
        image, label = image.clone(), label.clone()
        image[:, :h, :w] = torch.where(pasted, donor_image[:, :h, :w], image[:, :h, :w])
        label[:h, :w] = torch.where(pasted, donor_label[:h, :w], label[:h, :w])
        return image, label


class SegmentationDataset(torch.utils.data.Dataset):
    """One split of a dataset (CamVid unless ``description`` says otherwise: a description,
    a preset's name or a JSON file). Items are (normalised float image [3, H, W], int64
    label [H, W]). Index with an int, or with ``(index, seed)`` to augment reproducibly;
    with ``copy_paste``, a sample drawn to get one is pasted over by another, augmented
    with a seed drawn from its own."""

    def __init__(self, root: Union[str, Path], split: str, augment: Optional[Augment] = None,
                 description: Union[DatasetDescription, str, Path, None] = None, exclude_sequences: Sequence[str] = (),
                 copy_paste: Optional[CopyPaste] = None):
        self.description = load_description(description)
        self.root = resolve_root(root)
        self.split = split
        self.pairs = list_pairs(self.root, split, self.description.layout, exclude_sequences)
        self.augment = augment
        self.copy_paste = copy_paste

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> Tuple[Tensor, Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        generator = torch.Generator().manual_seed(seed)
        image, label = self._augmented(index, generator)
        if self.copy_paste is not None and torch.rand((), generator=generator) < self.copy_paste.probability:
            donor = int(torch.randint(len(self.pairs), (), generator=generator))
            donor_seed = int(torch.randint(2**62, (), generator=generator))
            image, label = self.copy_paste(image, label, *self._augmented(donor, torch.Generator().manual_seed(donor_seed)))
        return normalize(image), label

    def _augmented(self, index: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path, self.description)
        if image.shape[-2:] != label.shape:
            raise ValueError(
                f"image {str(image_path)!r} is {tuple(image.shape[-2:])} (HxW) but its label "
                f"{str(label_path)!r} is {tuple(label.shape)}"
            )
        if self.augment is not None:
            image, label = self.augment(image, label, generator)
        return image, label


CamVid = SegmentationDataset  # the default description is CamVid's


def collate(batch: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    sizes = {tuple(label.shape) for _, label in batch}
    if len(sizes) > 1:
        raise ValueError(f"images in one batch must have one size, got {sorted(sizes)}; use --crop or a batch size of 1")
    return torch.stack([image for image, _ in batch]), torch.stack([label for _, label in batch])


def derived_seed(*parts) -> int:
    """A 63-bit seed hashed from ``parts`` (the run's seed, the epoch, a position...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)`` for one epoch: a permutation drawn from (seed, epoch), the
    samples of one process (rank) of ``world_size``, starting after ``skip`` of them.
    Every process gets the same number of samples (the permutation wraps around)."""

    def __init__(self, size: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0, world_size: int = 1, skip: int = 0):
        self.size, self.seed, self.epoch, self.shuffle = size, seed, epoch, shuffle
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def _order(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = math.ceil(self.size / self.world_size) * self.world_size
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for position, index in enumerate(self._order()):
            if position >= self.skip:
                # Seeded by the place in the global order: the same image gets the same
                # augmentation whatever the number of processes.
                yield index, self._sample_seed(position * self.world_size + self.rank)

    def _sample_seed(self, global_position: int) -> int:
        return derived_seed(self.seed, self.epoch, global_position)

    def __len__(self) -> int:
        return max(0, math.ceil(self.size / self.world_size) - self.skip)


def class_frequencies(pairs: Sequence[Tuple[Path, Path]], description: DatasetDescription = CAMVID) -> Tuple[np.ndarray, np.ndarray]:
    """Per class: its pixel count, and the pixel count of the images it appears in (the
    ignore index counts for neither, also where it is a class's id)."""
    n = description.num_classes
    counts = np.zeros(n, dtype=np.int64)
    image_pixels = np.zeros(n, dtype=np.int64)
    for _, label_path in pairs:
        ids = read_label(label_path, description).numpy().ravel()
        hist = np.bincount(ids[ids != description.ignore_index], minlength=n)[:n]
        counts += hist
        image_pixels += np.where(hist > 0, int(hist.sum()), 0)
    return counts, image_pixels


def _weights_from_labels(name: str, weigh, root, split, cache_dir, description, exclude_sequences) -> List[float]:
    """``weigh(counts, image_pixels)`` (see :func:`class_frequencies`) over the labels of
    ``split``, cached in ``cache_dir`` (default ``~/.cache/segnet``) as ``name_KEY.json``, keyed
    by the description and the label files' paths, sizes and times."""
    description = load_description(description)
    pairs = list_pairs(root, split, description.layout, exclude_sequences)
    key = hashlib.sha256(json.dumps(description.to_dict(), sort_keys=True).encode())
    for _, label in pairs:
        st = os.stat(label)
        key.update(f"{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache_dir = Path(cache_dir or os.environ.get("SEGNET_CACHE", Path.home() / ".cache" / "segnet"))
    cache = cache_dir / f"{name}_{key.hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            return [float(w) for w in json.loads(cache.read_text())["weights"]]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache is recomputed
    weights = [float(w) for w in weigh(*class_frequencies(pairs, description))]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"root": str(resolve_root(root)), "split": split, "weights": weights}))
    except OSError:
        pass  # an unwritable cache costs only the recomputation
    return weights


def _median_frequency(counts: np.ndarray, image_pixels: np.ndarray) -> List[float]:
    present = image_pixels > 0
    freq = np.where(present, counts / np.maximum(image_pixels, 1), 0.0)
    median = float(np.median(freq[present])) if present.any() else 1.0
    return [median / f if f > 0 else 0.0 for f in freq]


def _enet(counts: np.ndarray, image_pixels: np.ndarray) -> List[float]:
    p = counts / max(int(counts.sum()), 1)
    return [1.0 / math.log(1.02 + q) if c > 0 else 0.0 for q, c in zip(p, counts)]


def median_frequency_weights(root: Union[str, Path], split: str = "train", cache_dir: Optional[Path] = None,
                             description: Union[DatasetDescription, str, Path, None] = None,
                             exclude_sequences: Sequence[str] = ()) -> List[float]:
    """Median frequency balancing (Eigen and Fergus, as SegNet): weight_c = median(f) / f_c,
    f_c = pixels of c / pixels of the images where c is present, over the labels of ``split``
    (see :func:`list_pairs`); cached (see :func:`_weights_from_labels`)."""
    return _weights_from_labels("median_frequency", _median_frequency, root, split, cache_dir, description,
                                exclude_sequences)


def enet_weights(root: Union[str, Path], split: str = "train", cache_dir: Optional[Path] = None,
                 description: Union[DatasetDescription, str, Path, None] = None,
                 exclude_sequences: Sequence[str] = ()) -> List[float]:
    """ENet's weighting (Paszke et al. 2016): weight_c = 1 / ln(1.02 + p_c), p_c = the class's
    share of the labelled pixels of ``split``. Bounded (1 / ln(1.02) ~ 50 at most, ~3 for a
    class of a third of the pixels), so the large classes keep more weight than under median
    frequency balancing; cached as that."""
    return _weights_from_labels("enet", _enet, root, split, cache_dir, description, exclude_sequences)


def rare_classes(root: Union[str, Path], split: str = "train", cache_dir: Optional[Path] = None,
                 description: Union[DatasetDescription, str, Path, None] = None,
                 exclude_sequences: Sequence[str] = ()) -> List[int]:
    """The classes with fewer labelled pixels in ``split`` than the median class (of those
    present): CamVid's Pole, SignSymbol, Fence, Pedestrian and Bicyclist. Cached as the
    class weights (see :func:`_weights_from_labels`)."""
    flags = _weights_from_labels("rare_classes", _rarer_than_median, root, split, cache_dir, description, exclude_sequences)
    return [c for c, flag in enumerate(flags) if flag]


def _rarer_than_median(counts: np.ndarray, image_pixels: np.ndarray) -> List[float]:
    median = float(np.median(counts[counts > 0])) if (counts > 0).any() else 0.0
    return [1.0 if 0 < c < median else 0.0 for c in counts]


def class_weights(kind: str, root: Union[str, Path], description: Union[DatasetDescription, str, Path, None] = None,
                  split: str = "train", exclude_sequences: Sequence[str] = (), power: float = 1.0) -> Optional[List[float]]:
    """``median`` or ``enet`` (from the labels of the training ``split``), ``paper`` (the
    description's published weights: SegNet's for CamVid) or ``none``; each weight raised to
    ``power`` (0.5: the square root, which halves the log-ratio of any two weights; 0: all 1,
    but a weight of 0 stays 0)."""
    if not (math.isfinite(power) and power >= 0.0):
        raise ValueError(f"class weight power must be a finite number >= 0 (1 = the weights as they are), got {power}")
    description = load_description(description)
    if kind == "median":
        weights = median_frequency_weights(root, split, description=description, exclude_sequences=exclude_sequences)
    elif kind == "enet":
        weights = enet_weights(root, split, description=description, exclude_sequences=exclude_sequences)
    elif kind == "paper":
        if description.class_weights is None:
            raise ValueError(f"class weights 'paper': the dataset {description.name!r} publishes none "
                             "(its description has no 'class_weights'); use 'median' or 'none'")
        weights = list(description.class_weights)
    elif kind == "none":
        return None
    else:
        raise ValueError(f"class weights must be 'median', 'enet', 'paper' or 'none', got {kind!r}")
    return weights if power == 1.0 else [w ** power if w > 0 else 0.0 for w in weights]  # a weight-0 class stays 0
