"""Dataset specs: valid forms load the right arrays; malformed ones are one-line CLI errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from autocomp import cli, data
from autocomp.errors import AutocompError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- fixture writers


def write_npz(tmp_path: Path, name: str = "set.npz", **arrays: np.ndarray | None) -> Path:
    """A valid 3-class uint8 N×H×W set; keyword arrays replace (or, when None, drop) entries."""
    base = {
        "x_train": RNG.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        "y_train": np.repeat(np.arange(3), 4),
        "x_test": RNG.integers(0, 256, (6, 8, 8), dtype=np.uint8),
        "y_test": np.repeat(np.arange(3), 2),
    }
    base.update(arrays)
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def write_images(tmp_path: Path, files: dict[str, tuple[int, int]]) -> Path:
    """PNG files of the given (width, height) at paths relative to tmp_path/imgs."""
    root = tmp_path / "imgs"
    for i, (rel, size) in enumerate(files.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i % 256, 100, 200)).save(root / rel)
    return root


FOLDER = {
    "train/cat/a.png": (10, 10),
    "train/cat/b.png": (10, 10),
    "train/cat/c.png": (10, 10),
    "train/dog/a.png": (10, 10),
    "train/dog/b.png": (10, 10),
    "val/cat/a.png": (10, 10),
    "val/dog/a.png": (10, 10),
}


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 str (BINSTRING), as the real CIFAR-10 batches are."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def dump(obj: object, path: Path, protocol: int | str = 2) -> None:
    if protocol == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        # Python 2's numpy named the module numpy.core.multiarray.
        path.write_bytes(buf.getvalue().replace(b"numpy._core.", b"numpy.core."))
    else:
        path.write_bytes(pickle.dumps(obj, protocol=protocol))


CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer"] + [
    b"c%d" % i for i in range(5)
]


def cifar_batch(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch %d" % seed,
        b"labels": [i % 10 for i in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar(tmp_path: Path, protocol: int | str = 2, **batches: object) -> Path:
    """Two 10-image training batches, a 10-image test batch and batches.meta in tmp_path/cifar."""
    root = tmp_path / "cifar"
    root.mkdir(exist_ok=True)
    files: dict[str, object] = {
        "batches.meta": {b"label_names": CIFAR_NAMES, b"num_cases_per_batch": 10},
        "data_batch_1": cifar_batch(10, 1),
        "data_batch_2": cifar_batch(10, 2),
        "test_batch": cifar_batch(10, 3),
    }
    files.update(batches)
    for name, obj in files.items():
        if obj is not None:
            dump(obj, root / name, protocol)
    return root


class Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- digits


def test_digits_default_split_shapes_and_normalisation():
    ds = data.load("digits")
    assert (len(ds.y_train), len(ds.y_test)) == (1437, 360)
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.input_shape == (1, 8, 8)
    assert ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10
    assert np.bincount(ds.y_test).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-4)
    # The test split is scaled with the training statistics, not its own.
    raw_test = ds.x_test * ds.std[0] + ds.mean[0]
    assert raw_test.min() >= -1e-6 and raw_test.max() <= 1 + 1e-6
    assert abs(float(ds.x_test.mean())) > 1e-3


def test_digits_resized_to_32_rgb():
    ds = data.load("digits", resolution=32, channels=3)
    assert ds.x_train.shape == (1437, 3, 32, 32) and ds.x_test.shape == (360, 3, 32, 32)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2, 3)), 1, atol=1e-4)
    np.testing.assert_array_equal(ds.x_train[:, 0], ds.x_train[:, 2])
    assert ds.summary()["input_shape"] == [3, 32, 32]


def test_digits_is_deterministic():
    a, b = data.load("digits"), data.load("digits")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_summary_is_json_and_cli_prints_it(capsys):
    assert cli.main(["data", "digits", "--resolution", "16", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input_shape"] == [1, 16, 16] and summary["train"] == 1437
    assert summary["test_counts"][:3] == [36, 36, 35] and len(summary["mean"]) == 1


# ---------------------------------------------------------------- npz


LAYOUTS = {
    "NHW uint8": lambda u8: u8[:, 0],
    "NCHW uint8": lambda u8: u8,
    "NHWC uint8": lambda u8: u8.transpose(0, 2, 3, 1),
    "NCHW float": lambda u8: u8.astype(np.float64) / 255,
    "NHWC float": lambda u8: (u8.astype(np.float32) / 255).transpose(0, 2, 3, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_npz_layouts_load_the_same_images(tmp_path, layout):
    train = RNG.integers(0, 256, (12, 1, 6, 5), dtype=np.uint8)
    test = RNG.integers(0, 256, (6, 1, 6, 5), dtype=np.uint8)
    make = LAYOUTS[layout]
    path = write_npz(tmp_path, x_train=make(train), x_test=make(test))
    ds = data.load(f"npz:{path}")
    assert ds.input_shape == (1, 6, 5) and ds.name == "set"
    assert ds.x_train.flags.c_contiguous and ds.x_test.flags.c_contiguous
    mean, std = train.mean() / 255, train.std() / 255
    np.testing.assert_allclose(ds.x_train, (train / 255 - mean) / std, atol=1e-5)
    # The test split is normalised with the training statistics only.
    np.testing.assert_allclose(ds.x_test, (test / 255 - mean) / std, atol=1e-5)


def test_npz_plain_path_rgb_to_grey_and_ambiguous_layout(tmp_path):
    x = np.zeros((3, 3, 3, 3), dtype=np.float32)  # 3×3 images with 3 channels: read as NCHW
    x[:, 0], x[:, 1], x[:, 2] = 1.0, 0.5, 0.0
    x[0] = 0
    path = write_npz(tmp_path, x_train=x, y_train=np.arange(3), x_test=x, y_test=np.arange(3))
    rgb = data.load(str(path))
    assert rgb.input_shape == (3, 3, 3)
    np.testing.assert_allclose(rgb.mean, [2 / 3, 1 / 3, 0.0], atol=1e-6)
    grey = data.load(str(path), channels=1)
    np.testing.assert_allclose(grey.mean, [(0.299 + 0.587 * 0.5) * 2 / 3], atol=1e-6)


def test_downscaling_is_antialiased(tmp_path):
    board = (np.indices((12, 12)).sum(axis=0) % 2).astype(np.float32)  # 1-pixel checkerboard
    x = np.repeat(board[None], 4, axis=0)
    path = write_npz(
        tmp_path, x_train=x, y_train=np.arange(4) % 3, x_test=x, y_test=np.zeros(4, int)
    )
    ds = data.load(str(path), resolution=4)
    assert ds.input_shape == (1, 4, 4)
    # Point-sampling bilinear would keep pure 0/1 pixels (std 0.5); antialiasing averages them.
    assert abs(ds.mean[0] - 0.5) < 0.05 and ds.std[0] < 0.1


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_native_and_resized(tmp_path):
    root = write_images(tmp_path, FOLDER)
    ds = data.load(f"imagefolder:{root}")
    assert ds.classes == ["cat", "dog"] and ds.name == "imgs"
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1] and ds.y_test.tolist() == [0, 1]
    assert ds.x_train.shape == (5, 3, 10, 10) and ds.x_train.flags.c_contiguous
    np.testing.assert_allclose(ds.mean[1:], [100 / 255, 200 / 255], atol=1e-6)
    small = data.load(f"imagefolder:{root}", resolution=4, channels=1)
    assert small.x_train.shape == (5, 1, 4, 4) and small.x_test.shape == (2, 1, 4, 4)


def test_imagefolder_mixed_sizes_need_a_resolution(tmp_path):
    root = write_images(tmp_path, {**FOLDER, "train/dog/c.png": (16, 12)})
    assert data.load(f"imagefolder:{root}", resolution=8).x_train.shape == (6, 3, 8, 8)


# ---------------------------------------------------------------- cifar10


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar10_batches(tmp_path, protocol):
    root = write_cifar(tmp_path, protocol)
    ds = data.load(f"cifar10:{root}")
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert ds.x_train.shape == (20, 3, 32, 32) and len(ds.y_test) == 10
    assert ds.y_train.tolist() == list(range(10)) * 2
    rows = np.concatenate([cifar_batch(10, 1)[b"data"], cifar_batch(10, 2)[b"data"]])
    raw = ds.x_train * np.array(ds.std)[:, None, None] + np.array(ds.mean)[:, None, None]
    # Each row holds the red plane, then green, then blue, each row-major 32×32.
    np.testing.assert_allclose(raw[:, 1, 2, 3], rows[:, 1024 + 2 * 32 + 3] / 255, atol=1e-5)


def test_cifar10_found_in_parent_folder(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar").rename(tmp_path / "cifar-10-batches-py")
    assert len(data.load(f"cifar10:{tmp_path}").y_train) == 20


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    Evil.marker = str(marker)
    root = write_cifar(tmp_path, test_batch={b"data": Evil(), b"labels": [0]})
    with pytest.raises(AutocompError, match=r"refusing posix\.system"):
        data.load(f"cifar10:{root}")
    assert not marker.exists()


# ---------------------------------------------------------------- validation split and loaders


def test_validation_split_is_stratified_and_carved_from_train():
    ds = data.load("digits")
    val = ds.validation_split(0.25, seed=1)
    assert len(val.y_train) + len(val.y_test) == 1437 and len(val.y_test) == 360
    counts, val_counts = np.bincount(ds.y_train), np.bincount(val.y_test)
    assert np.all(np.abs(val_counts - counts * 0.25) <= 1)
    # Fit + validation rows are exactly the training rows; no test image appears.
    rows = lambda x: sorted(r.tobytes() for r in x)  # noqa: E731
    assert rows(np.concatenate([val.x_train, val.x_test])) == rows(ds.x_train)
    np.testing.assert_array_equal(ds.validation_split(0.25, seed=1).y_test, val.y_test)
    assert val.mean == ds.mean and val.name == "digits/validation"


def test_loader_batches_and_seeded_shuffle():
    ds = data.load("digits")
    batches = list(ds.loader("test", batch_size=100))
    assert [len(y) for _, y in batches] == [100, 100, 100, 60]
    assert batches[0][0].shape == (100, 1, 8, 8) and str(batches[0][1].dtype) == "torch.int64"
    first = [next(iter(ds.loader("train", 8, shuffle=True, seed=s)))[1].tolist() for s in (3, 3, 4)]
    assert first[0] == first[1] != first[2]
    with pytest.raises(AutocompError, match="unknown split 'val'"):
        ds.loader("val", 8)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"resolution": 0}, "resolution must be a whole number from 1 to 1024, got 0"),
        ({"resolution": True}, "got True"),
        ({"resolution": 2000}, "got 2000"),
        ({"resolution": 32.0}, "got 32.0"),
        ({"channels": 2}, "channels must be 1 or 3, got 2"),
    ],
)
def test_bad_options_are_refused(kwargs, phrase):
    with pytest.raises(AutocompError, match=phrase):
        data.load("digits", **kwargs)


def test_bad_validation_fraction(tmp_path):
    with pytest.raises(AutocompError, match=r"between 0 and 1, got 1\.5"):
        data.load("digits").validation_split(1.5)
    tiny = data.load(f"imagefolder:{write_images(tmp_path, FOLDER)}")  # 5 images, 2 classes
    with pytest.raises(AutocompError, match="cannot carve a 20% stratified validation split"):
        tiny.validation_split(0.2)


# ---------------------------------------------------------------- malformed specs through the CLI

Builder = Callable[[Path], list[str]]


def npz(**arrays: np.ndarray | None) -> Builder:
    return lambda tmp: [f"npz:{write_npz(tmp, **arrays)}"]


def folder(files: dict[str, tuple[int, int]], *extra: str) -> Builder:
    return lambda tmp: [f"imagefolder:{write_images(tmp, files)}", *extra]


def cifar(**batches: object) -> Builder:
    return lambda tmp: [f"cifar10:{write_cifar(tmp, **batches)}"]


def raw_file(content: bytes, name: str = "set.npz", prefix: str = "npz:") -> Builder:
    def build(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(content)
        return [f"{prefix}{tmp / name}"]

    return build


def npy_as_npz(tmp: Path) -> list[str]:
    with (tmp / "one.npz").open("wb") as f:
        np.save(f, np.zeros(3))
    return [str(tmp / "one.npz")]


def bad_image(tmp: Path) -> list[str]:
    root = write_images(tmp, FOLDER)
    (root / "train/dog/broken.png").write_bytes(b"\x89PNG not really")
    return [f"imagefolder:{root}"]


def empty_class(tmp: Path) -> list[str]:
    root = write_images(tmp, FOLDER)
    (root / "train/bird").mkdir()
    return [f"imagefolder:{root}"]


def corrupt_npz(tmp: Path) -> list[str]:
    path = write_npz(tmp)
    blob = bytearray(path.read_bytes())
    blob[200:260] = bytes(60)  # inside x_train's data: its CRC no longer matches
    path.write_bytes(bytes(blob))
    return [str(path)]


def garbage_cifar(tmp: Path) -> list[str]:
    root = write_cifar(tmp)
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    return [f"cifar10:{root}"]


def evil_cifar(tmp: Path) -> list[str]:
    Evil.marker = str(tmp / "pwned")
    return [f"cifar10:{write_cifar(tmp, data_batch_2={b'data': Evil()})}"]


F = np.zeros((12, 8, 8), dtype=np.float32)
MALFORMED: dict[str, tuple[Builder, str]] = {
    "unknown spec": (lambda tmp: ["mnist"], "unknown data spec 'mnist'; accepted forms: 'digits'"),
    "empty npz path": (lambda tmp: ["npz:"], "data spec 'npz:' names no path"),
    "missing npz": (lambda tmp: [f"npz:{tmp}/nope.npz"], "npz file not found: "),
    "not a zip": (raw_file(b"hello"), "is not an .npz archive"),
    "npy named npz": (npy_as_npz, "is not an .npz archive"),
    "empty archive": (raw_file(b"PK\x05\x06" + b"\0" * 18), "it has none and needs x_train"),
    "corrupt member": (corrupt_npz, "cannot read x_train from"),
    "missing key": (npz(y_test=None), "lacks array(s) y_test; it has x_train, y_train, x_test"),
    "object array": (npz(x_train=np.array([None] * 12)), "cannot read x_train from"),
    "length mismatch": (npz(y_train=np.zeros(11, int)), "x_train has 12 images but y_train has 11"),
    "2-D images": (npz(x_train=np.zeros((12, 64), np.uint8)), "x_train has shape (12, 64)"),
    "2 channels": (npz(x_train=np.zeros((12, 2, 8, 8), np.uint8)), "with C = 1 or 3"),
    "split sizes differ": (npz(x_test=np.zeros((6, 9, 9), np.uint8)), "both splits need the same"),
    "int images": (npz(x_train=F.astype(np.int64), x_test=F[:6].astype(int)), "dtype int64"),
    "float labels": (npz(y_train=np.zeros(12)), "y_train must hold integer class indices"),
    "2-D labels": (npz(y_test=np.zeros((6, 1), int)), "y_test must be a 1-D array"),
    "negative label": (npz(y_train=np.arange(12) - 1), "y_train has negative label -1"),
    "unknown test label": (npz(y_test=np.full(6, 5)), "y_test has label 5, which y_train never"),
    "class gap": (npz(y_train=np.repeat([0, 2, 3], 4)), "label 1 has no training images"),
    "huge label": (npz(y_train=np.array([0] * 11 + [10**12])), "label 1 has no training images"),
    "cifar label range": (
        cifar(test_batch={b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
        "y_test has label 10",
    ),
    "nan": (npz(x_train=np.full((12, 8, 8), np.nan)), "x_train contains NaN or inf"),
    "empty test": (npz(x_test=np.zeros((0, 8, 8), np.uint8)), "x_test is empty"),
    "missing folder": (lambda tmp: [f"imagefolder:{tmp}/none"], "image folder not found"),
    "no val": (folder({"train/a/x.png": (4, 4)}), "has no val/ folder"),
    "no classes": (folder({"train/x.png": (4, 4), "val/x.png": (4, 4)}), "has no class folders"),
    "empty class": (empty_class, "train/bird has no images"),
    "unreadable image": (bad_image, "cannot read image "),
    "stray val class": (folder({**FOLDER, "val/owl/a.png": (10, 10)}), "val/owl has no matching"),
    "mixed sizes": (folder({**FOLDER, "val/dog/b.png": (8, 8)}), "give a resolution"),
    "missing cifar": (lambda tmp: [f"cifar10:{tmp}/none"], "CIFAR-10 folder not found"),
    "no test batch": (cifar(test_batch=None), "has no test_batch"),
    "no train batch": (cifar(data_batch_1=None, data_batch_2=None), "has no data_batch_* files"),
    "malicious pickle": (evil_cifar, "refusing posix.system: only numpy arrays may be unpickled"),
    "garbage pickle": (garbage_cifar, "cannot read CIFAR-10 batch "),
    "cifar no labels": (cifar(test_batch={b"data": np.zeros((1, 3072), np.uint8)}), "key 'labels'"),
    "cifar narrow rows": (
        cifar(test_batch={b"data": np.zeros((1, 100), np.uint8), b"labels": [0]}),
        "have 100 values, not 3072",
    ),
    "cifar label count": (
        cifar(test_batch={b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
        "has 2 images but 1 labels",
    ),
    "bad resolution": (lambda tmp: ["digits", "--resolution", "0"], "'0' must be positive"),
    "bad channels": (lambda tmp: ["digits", "--channels", "2"], "invalid choice: 2"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_spec_is_one_line_error(tmp_path, capsys, case):
    build, phrase = MALFORMED[case]
    assert cli.main(["data", *build(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocomp: error: "), captured.err
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "pwned").exists()
