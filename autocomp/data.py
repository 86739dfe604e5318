"""Dataset specs: turn ``digits``, ``npz:PATH``, ``imagefolder:DIR`` or ``cifar10:DIR`` into arrays.

Every spec ends in the same :class:`ImageDataset`: float32 NCHW images, resized to one square
resolution, converted to the requested channels and normalised per channel with statistics of the
training split only, plus int64 labels. Everything is held in memory; the datasets this project
targets (small images, on-device budgets) fit. Malformed input of any kind is an
:class:`~autocomp.errors.AutocompError` with one line naming the file, key or folder at fault.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from autocomp.errors import AutocompError

ACCEPTED_FORMS = (
    "'digits', 'npz:PATH' or PATH.npz (arrays x_train, y_train, x_test, y_test), "
    "'imagefolder:DIR' (DIR/train/<class>/*, DIR/val/<class>/*), 'cifar10:DIR' (the python batches)"
)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
DIGITS_TEST_SIZE = 360  # 1797 digits → 1437 train / 360 test, stratified, random_state=0
MAX_RESOLUTION = 1024  # a guard against typos that would allocate tens of GB
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L" mode
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array rebuilder (its module moved in numpy 2)

# x_train, y_train, x_test, y_test, class names (None: "0".."K-1"), as the readers return them
Parts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str] | None]


@dataclass
class ImageDataset:
    """Normalised images and labels of one dataset, split into train and test."""

    name: str
    x_train: np.ndarray  # float32, N×C×H×W
    y_train: np.ndarray  # int64, N
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]  # per channel, subtracted from the [0, 1] images
    std: tuple[float, ...]  # per channel, divided by afterwards

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """What the dataset holds, as JSON-serialisable values."""
        k = self.num_classes
        return {
            "name": self.name,
            "train": len(self.y_train),
            "test": len(self.y_test),
            "input_shape": list(self.input_shape),
            "num_classes": k,
            "classes": self.classes,
            "train_counts": np.bincount(self.y_train, minlength=k).tolist(),
            "test_counts": np.bincount(self.y_test, minlength=k).tolist(),
            "mean": [round(m, 4) for m in self.mean],
            "std": [round(s, 4) for s in self.std],
        }

    def validation_split(self, fraction: float = 0.2, seed: int = 0) -> ImageDataset:
        """Carve a stratified validation split out of the training split.

        The result's *test* split is the validation split and the real test split is dropped, so a
        search that is handed the result cannot look at test images. Normalisation statistics stay
        those of the full training split, which the final model is trained on.
        """
        if not 0 < fraction < 1:
            raise AutocompError(f"validation fraction must lie between 0 and 1, got {fraction}")
        try:
            x_fit, x_val, y_fit, y_val = train_test_split(
                self.x_train,
                self.y_train,
                test_size=fraction,
                stratify=self.y_train,
                random_state=seed,
            )
        except ValueError as err:
            raise AutocompError(
                f"cannot carve a {fraction:.0%} stratified validation split out of "
                f"{len(self.y_train)} training images: {_one_line(err)}"
            ) from None
        return replace(
            self,
            name=f"{self.name}/validation",
            x_train=x_fit,
            y_train=y_fit,
            x_test=x_val,
            y_test=y_val,
        )

    def loader(
        self, split: str, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """Batches of (images, labels) tensors from the ``"train"`` or ``"test"`` split."""
        if split not in ("train", "test"):
            raise AutocompError(f"unknown split {split!r}; use 'train' or 'test'")
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        return DataLoader(
            TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed),
        )


def load(spec: str, *, resolution: int | None = None, channels: int | None = None) -> ImageDataset:
    """Load a dataset spec (see :data:`ACCEPTED_FORMS`).

    ``resolution`` resizes every image to a square of that side (bilinear, antialiased when
    shrinking); ``None`` keeps the native size. ``channels`` (1 or 3) converts grey to RGB by
    repetition and RGB to grey by BT.601 luminance; ``None`` keeps the source's channels.
    """
    _check_options(resolution, channels)
    kind, _, arg = spec.partition(":")
    if spec == "digits":
        name, parts = "digits", _read_digits()
    elif kind == "imagefolder":
        root = _path(arg, spec)
        name, parts = root.name, _read_imagefolder(root, resolution, channels)
    elif kind == "cifar10":
        name, parts = "cifar10", _read_cifar10(_path(arg, spec))
    elif kind == "npz" or spec.endswith(".npz"):
        path = _path(arg if kind == "npz" else spec, spec)
        name, parts = path.stem, _read_npz(path)
    else:
        raise AutocompError(f"unknown data spec {spec!r}; accepted forms: {ACCEPTED_FORMS}")
    return _finish(name, *parts, resolution=resolution, channels=channels)


def _check_options(resolution: int | None, channels: int | None) -> None:
    if resolution is not None and (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or not 1 <= resolution <= MAX_RESOLUTION
    ):
        raise AutocompError(
            f"resolution must be a whole number from 1 to {MAX_RESOLUTION}, got {resolution!r}"
        )
    if channels not in (None, 1, 3):
        raise AutocompError(f"channels must be 1 or 3, got {channels!r}")


def _path(text: str, spec: str) -> Path:
    if not text:
        raise AutocompError(f"data spec {spec!r} names no path")
    return Path(text)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    classes: list[str] | None,
    *,
    resolution: int | None,
    channels: int | None,
) -> ImageDataset:
    """Check labels, resize, convert channels and normalise (float32 NCHW images in [0, 1])."""
    if not len(y_train) or not len(y_test):
        raise AutocompError(f"{name}: the {'test' if len(y_train) else 'training'} split is empty")
    k = len(classes) if classes is not None else int(y_train.max()) + 1
    _check_labels(y_train, y_test, k)  # before naming classes: a label of 10**9 must not allocate
    classes = classes if classes is not None else [str(i) for i in range(k)]
    x_train, x_test = (_convert(x, resolution, channels) for x in (x_train, x_test))
    mean, std = [], []
    for c in range(x_train.shape[1]):
        m = float(x_train[:, c].mean(dtype=np.float64))
        s = float(np.sqrt(np.square(x_train[:, c] - np.float32(m)).mean(dtype=np.float64)))
        s = s if s > 1e-6 else 1.0  # a constant channel carries nothing; do not blow it up
        for x in (x_train, x_test):
            x[:, c] -= m
            x[:, c] /= s
        mean.append(m)
        std.append(s)
    return ImageDataset(name, x_train, y_train, x_test, y_test, classes, tuple(mean), tuple(std))


def _check_labels(y_train: np.ndarray, y_test: np.ndarray, k: int) -> None:
    present = np.unique(y_train)
    if present[-1] >= k:
        raise AutocompError(f"y_train has label {present[-1]} but there are only {k} classes")
    if len(present) < k:
        missing = int(np.flatnonzero(present != np.arange(len(present)))[0])
        raise AutocompError(
            f"label {missing} has no training images; "
            "labels must be 0..K-1 with every class in the training split"
        )
    if y_test.max() >= k:
        raise AutocompError(f"y_test has label {y_test.max()}, which y_train never uses")


def _convert(x: np.ndarray, resolution: int | None, channels: int | None) -> np.ndarray:
    """Resize to ``resolution``² and convert to ``channels`` (may return ``x`` itself).

    The readers hand over fresh float32 arrays that nothing else holds, so :func:`_finish` may
    normalise whatever comes back in place: no extra copy of a large training set.
    """
    if channels == 3 and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    elif channels == 1 and x.shape[1] == 3:
        x = np.einsum("nchw,c->nhw", x, LUMA)[:, None]
    h, w = x.shape[2:]
    if resolution is None or (h, w) == (resolution, resolution):
        return x
    resized = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(x)),
        size=(resolution, resolution),
        mode="bilinear",
        align_corners=False,
        antialias=resolution < max(h, w),
    )
    return resized.numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    """uint8 → C-contiguous float32 in [0, 1] in one allocation (CIFAR-10 train split: 600 MB)."""
    return np.divide(x, 255, dtype=np.float32, order="C")


def _read_digits() -> Parts:
    """scikit-learn's embedded 8×8 handwritten digits (grey 0..16), split as DIGITS_TEST_SIZE."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=0
    )
    return x_train, y_train, x_test, y_test, [str(c) for c in digits.target_names]


def _read_npz(path: Path) -> Parts:
    if not path.is_file():
        raise AutocompError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise AutocompError(f"{path} is not an .npz archive (a zip of .npy arrays, np.savez)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises several types on a damaged archive
        raise AutocompError(f"cannot read npz file {path}: {_one_line(err)}") from None
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise AutocompError(
                f"{path} lacks array(s) {', '.join(missing)}; it has "
                f"{', '.join(archive.files) or 'none'} and needs {', '.join(NPZ_KEYS)}"
            )
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except Exception as err:  # object arrays (pickles) are refused here, among others
                raise AutocompError(f"cannot read {key} from {path}: {_one_line(err)}") from None
    x_train, x_test = (_npz_images(arrays[key], key) for key in ("x_train", "x_test"))
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise AutocompError(
            f"x_train images have shape {arrays['x_train'].shape[1:]} but x_test images "
            f"{arrays['x_test'].shape[1:]}; both splits need the same layout and size"
        )
    y_train = _npz_labels(arrays["y_train"], "y_train", len(x_train))
    y_test = _npz_labels(arrays["y_test"], "y_test", len(x_test))
    return x_train, y_train, x_test, y_test, None


def _npz_images(x: np.ndarray, key: str) -> np.ndarray:
    """float32 NCHW from uint8 (scaled to [0, 1]) or float N×H×W, N×C×H×W or N×H×W×C.

    With C in {1, 3}, the channel axis is axis 1 when its size is 1 or 3 and the last axis
    otherwise; so images whose side is itself 1 or 3 (3×3×3) are read as NCHW, PyTorch's layout.
    """
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise AutocompError(f"{key} has dtype {x.dtype}; images must be uint8 or float")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4 or x.shape[1] not in (1, 3):
        raise AutocompError(
            f"{key} has shape {x.shape}; expected N×H×W, N×C×H×W or N×H×W×C with C = 1 or 3"
        )
    if len(x) == 0:
        raise AutocompError(f"{key} is empty")
    x = _unit(x) if x.dtype == np.uint8 else x.astype(np.float32, order="C")
    if not np.isfinite(x).all():
        raise AutocompError(f"{key} contains NaN or inf values (or floats too large for float32)")
    return x


def _npz_labels(y: np.ndarray, key: str, n_images: int) -> np.ndarray:
    if y.ndim != 1:
        raise AutocompError(f"{key} must be a 1-D array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise AutocompError(f"{key} must hold integer class indices, got dtype {y.dtype}")
    if len(y) != n_images:
        x_key = key.replace("y_", "x_")
        raise AutocompError(f"{x_key} has {n_images} images but {key} has {len(y)} labels")
    if y.min() < 0:
        raise AutocompError(f"{key} has negative label {y.min()}")
    return y.astype(np.int64)


def _read_imagefolder(root: Path, resolution: int | None, channels: int | None) -> Parts:
    """DIR/train/<class>/* and DIR/val/<class>/*; classes are the sorted train folder names."""
    if not root.is_dir():
        raise AutocompError(f"image folder not found: {root}")
    class_dirs = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise AutocompError(f"{root} has no {split}/ folder (expected {split}/<class>/*)")
        class_dirs[split] = sorted(
            d for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith(".")
        )
    classes = [d.name for d in class_dirs["train"]]
    if not classes:
        raise AutocompError(f"{root / 'train'} has no class folders")
    for d in class_dirs["val"]:
        if d.name not in classes:
            raise AutocompError(f"val class folder {d} has no matching folder in train/")
    mode = "L" if channels == 1 else "RGB"
    size = (resolution, resolution) if resolution else None
    first: tuple[Path, tuple[int, ...]] | None = None  # an image and its H×W, to compare with
    splits = []
    for split in ("train", "val"):
        images, labels = [], []
        for d in class_dirs[split]:
            files = sorted(
                f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
            )
            if not files:
                raise AutocompError(f"class folder {d} has no images")
            for f in files:
                image = _read_image(f, mode, size)
                first = first or (f, image.shape[:2])
                if image.shape[:2] != first[1]:
                    (h, w), (h0, w0) = image.shape[:2], first[1]
                    raise AutocompError(
                        f"image {f} is {w}×{h} but {first[0]} is {w0}×{h0}; "
                        "give a resolution to resize them all"
                    )
                images.append(image)
            labels += [classes.index(d.name)] * len(files)
        x = np.stack(images)
        x = _unit(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))
        splits += [x, np.array(labels, dtype=np.int64)]
    return (*splits, classes)  # type: ignore[return-value]


def _read_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size:  # PIL's bilinear filter widens with the scale factor: antialiased shrinking
                image = image.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(image)
    except Exception as err:  # PIL's plugins raise many types on damaged files
        raise AutocompError(f"cannot read image {path}: {_one_line(err)}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can only build dicts, lists, strings, numbers and numpy arrays.

    The CIFAR-10 python batches are pickles, and unpickling runs whatever callables the stream
    names. This one resolves exactly the numpy functions that rebuild a plain array
    (``_reconstruct``/``_frombuffer`` with ``ndarray`` and ``dtype``, all of which only allocate
    and fill memory) and ``_codecs.encode`` restricted to latin-1 (how protocol-2 pickles written
    by Python 3 spell bytes); any other global, such as ``os.system``, is refused before anything
    runs. This is the allow-list approach of ``torch.load(weights_only=True)``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _RECONSTRUCT
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _frombuffer
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        raise AutocompError(f"refusing {module}.{name}: only numpy arrays may be unpickled")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise AutocompError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _frombuffer(buffer: bytes, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _unpickle(path: Path) -> dict[str, Any]:
    """One CIFAR batch as a dict with str keys (the files hold Python 2 str → bytes keys)."""
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as err:  # a damaged pickle fails in many ways; none of them runs code
        raise AutocompError(f"cannot read CIFAR-10 batch {path}: {_one_line(err)}") from None
    if not isinstance(obj, dict):
        raise AutocompError(f"CIFAR-10 batch {path} holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar10(root: Path) -> Parts:
    """The CIFAR-10 python version: data_batch_*, test_batch and batches.meta in DIR.

    DIR may also be the folder that holds the extracted cifar-10-batches-py/.
    """
    if not root.is_dir():
        raise AutocompError(f"CIFAR-10 folder not found: {root}")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = sorted(root.glob("data_batch_*"))
    for needed in ("batches.meta", "test_batch"):
        if not (root / needed).is_file():
            raise AutocompError(f"{root} has no {needed} (expected the CIFAR-10 python batches)")
    if not train_files:
        raise AutocompError(f"{root} has no data_batch_* files (expected the CIFAR-10 batches)")
    meta = _unpickle(root / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise AutocompError(f"{root / 'batches.meta'} has no list of label_names")
    classes = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    batches = [_cifar_batch(f) for f in [*train_files, root / "test_batch"]]
    x_train = _unit(np.concatenate([x for x, _ in batches[:-1]]))
    y_train = np.concatenate([y for _, y in batches[:-1]])
    x_test, y_test = batches[-1]
    return x_train, y_train, _unit(x_test), y_test, classes


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise AutocompError(f"CIFAR-10 batch {path} lacks the key {key!r}")
    data, labels = batch["data"], batch["labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise AutocompError(f"CIFAR-10 batch {path}: 'data' is not a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise AutocompError(
            f"CIFAR-10 batch {path}: rows of 'data' have {data.shape[1]} values, not 3072 (3×32×32)"
        )
    if not (isinstance(labels, list) and all(type(v) is int and v >= 0 for v in labels)):
        raise AutocompError(f"CIFAR-10 batch {path}: 'labels' is not a list of class indices")
    if len(labels) != len(data):
        raise AutocompError(
            f"CIFAR-10 batch {path} has {len(data)} images but {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)
