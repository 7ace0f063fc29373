"""Dataset descriptions: the one place every part of the application takes a dataset's
classes from (the model's class count, the loss's ignore index, class weights, metric
names, the palette of predictions, the checks on label values).

A description is a small JSON file, or the name of a bundled preset (``datasets/*.json``:
camvid, cityscapes, voc)::

    {"name": "roads",
     "layout": "generic",                 # camvid | generic | cityscapes | voc (see data.py)
     "ignore_index": 255,                 # label value left out of loss and metrics, 0..255
     "ignore_color": [0, 0, 0],           # optional: its colour in colour-coded label PNGs
     "class_weights": [1.0, 2.5],         # optional: published weights (--class-weights paper)
     "classes": [{"name": "road", "color": [128, 64, 128]},
                 {"name": "car",  "color": [0, 0, 142]}]}

Class ``i`` is the i-th entry. Label PNGs hold class ids (grey or palette PNGs, whose
indices are the ids) or are colour-coded with the classes' colours (RGB PNGs).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

PRESETS = Path(__file__).parent / "datasets"
LAYOUTS = ("camvid", "generic", "cityscapes", "voc")
Color = Tuple[int, int, int]


@dataclass(frozen=True)
class DatasetDescription:
    name: str
    classes: Tuple[str, ...]
    colors: Tuple[Color, ...]
    ignore_index: int
    layout: str = "generic"
    ignore_color: Optional[Color] = None
    class_weights: Optional[Tuple[float, ...]] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "dataset description") -> "DatasetDescription":
        """Validates every field; errors name the source, the field, the expected and the given value."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        known = {"name", "classes", "ignore_index", "ignore_color", "layout", "class_weights"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown}; known: {sorted(known)}")
        for field in ("name", "classes", "ignore_index"):
            if field not in values:
                raise ValueError(f"{source}: the field {field!r} is missing")
        name = values["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{source}: 'name' must be a non-empty string, got {name!r}")
        classes = values["classes"]
        if not isinstance(classes, list) or not 1 <= len(classes) <= 255:
            raise ValueError(f"{source}: 'classes' must be a list of 1 to 255 {{\"name\", \"color\"}} objects, got {classes!r:.80}")
        names, colors = [], []
        for i, entry in enumerate(classes):
            if not isinstance(entry, dict) or set(entry) != {"name", "color"} or not isinstance(entry["name"], str):
                raise ValueError(f"{source}: classes[{i}] must be {{\"name\": str, \"color\": [r, g, b]}}, got {entry!r}")
            names.append(entry["name"])
            colors.append(_color(entry["color"], f"{source}: classes[{i}].color"))
        for what, items in (("name", names), ("color", colors)):
            repeated = sorted({str(x) for x in items if items.count(x) > 1})
            if repeated:
                raise ValueError(f"{source}: class {what}s must differ (labels are decoded by them), repeated: {repeated}")
        ignore = values["ignore_index"]
        if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255:
            raise ValueError(f"{source}: 'ignore_index' must be an integer in 0..255, got {ignore!r}")
        layout = values.get("layout", "generic")
        if layout not in LAYOUTS:
            raise ValueError(f"{source}: 'layout' must be one of {LAYOUTS}, got {layout!r}")
        ignore_color = values.get("ignore_color")
        if ignore_color is not None:
            ignore_color = _color(ignore_color, f"{source}: ignore_color")
            if ignore_color in colors and colors.index(ignore_color) != ignore:
                raise ValueError(f"{source}: ignore_color {list(ignore_color)} is also the colour of class {names[colors.index(ignore_color)]!r}")
        weights = values.get("class_weights")
        if weights is not None:
            if (not isinstance(weights, list) or len(weights) != len(names)
                    or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)):
                raise ValueError(f"{source}: 'class_weights' must be {len(names)} numbers >= 0 (one per class), got {weights!r:.80}")
            weights = tuple(float(w) for w in weights)
        return cls(name, tuple(names), tuple(colors), ignore, layout, ignore_color, weights)

    def to_dict(self) -> Dict[str, Any]:
        values = {"name": self.name, "layout": self.layout, "ignore_index": self.ignore_index}
        if self.ignore_color is not None:
            values["ignore_color"] = list(self.ignore_color)
        if self.class_weights is not None:
            values["class_weights"] = list(self.class_weights)
        values["classes"] = [{"name": n, "color": list(c)} for n, c in zip(self.classes, self.colors)]
        return values

    def palette(self) -> np.ndarray:
        """uint8 [256, 3]: each class id's colour; the ignore index (where it is no class) in
        ``ignore_color`` and every other value black."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        if self.ignore_color is not None:
            palette[self.ignore_index] = self.ignore_color
        palette[: self.num_classes] = self.colors
        return palette

    def is_valid_label(self, values: np.ndarray) -> np.ndarray:
        return (values >= 0) & ((values < self.num_classes) | (values == self.ignore_index))

    def check_ids(self, ids: np.ndarray, path: str) -> np.ndarray:
        """``ids`` unchanged, or an error naming the file and the values that are neither a class nor ignored."""
        if ids.size and not self.is_valid_label(ids).all():
            bad = np.unique(ids[~self.is_valid_label(ids)])[:5].tolist()
            raise ValueError(f"label {path!r} has values {bad}: {self.name} has class ids 0..{self.num_classes - 1} "
                             f"and ignore_index {self.ignore_index}")
        return ids

    def ids_from_colors(self, rgb: np.ndarray, path: str) -> np.ndarray:
        """[H, W, 3] uint8 colour-coded labels -> int64 [H, W] class ids (ignore_color ->
        ignore_index); a colour that is no class's is an error naming it and the file."""
        keys = _keys(rgb.reshape(-1, 3))
        table = dict(zip(_keys(np.array(self.colors, dtype=np.uint8)).tolist(), range(self.num_classes)))
        if self.ignore_color is not None:
            table.setdefault(int(_keys(np.array([self.ignore_color], dtype=np.uint8))[0]), self.ignore_index)
        unique, inverse = np.unique(keys, return_inverse=True)
        unknown = [int(k) for k in unique if int(k) not in table]
        if unknown:
            shown = [[k >> 16, (k >> 8) & 255, k & 255] for k in unknown[:5]]
            raise ValueError(f"label {path!r} has colours {shown}{' ...' if len(unknown) > 5 else ''} that are no class "
                             f"of {self.name} (nor its ignore_color {list(self.ignore_color) if self.ignore_color else None})")
        ids = np.array([table[int(k)] for k in unique], dtype=np.int64)
        return ids[inverse].reshape(rgb.shape[:2])


def _color(value, what: str) -> Color:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{what} must be [r, g, b] with integers 0..255, got {value!r}")
    return tuple(value)


def _keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_description(spec: Union[str, Path, Dict, DatasetDescription, None] = None) -> DatasetDescription:
    """A description from a preset's name (``camvid``, the default for None), a JSON file's
    path, a dict, or a description (returned as is)."""
    if isinstance(spec, DatasetDescription):
        return spec
    if isinstance(spec, dict):
        return DatasetDescription.from_dict(spec)
    spec = "camvid" if spec is None else str(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        preset = PRESETS / f"{spec}.json"
        if path.name != spec or not preset.is_file():
            raise FileNotFoundError(f"dataset {spec!r} is neither a JSON file nor a preset ({', '.join(preset_names())})")
        path = preset
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"dataset description {str(path)!r} is not readable JSON: {e}") from None
    return DatasetDescription.from_dict(values, f"dataset description {str(path)!r}")


def class_names_present(description: DatasetDescription, ids: Sequence[int]) -> List[Tuple[int, str, Color]]:
    """(id, name, colour) of the classes among ``ids``, in id order."""
    present = sorted({int(i) for i in ids if 0 <= int(i) < description.num_classes})
    return [(i, description.classes[i], description.colors[i]) for i in present]
