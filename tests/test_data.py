"""Tests of benchmark/data.py: file formats, error messages, splits, loaders (CPU, offline, fast).

All data is written into tmp_path in the exact official formats (big-endian IDX, Python 2
protocol-2 CIFAR pickles), so nothing depends on installed packages or the network.
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark import data
from benchmark.data import (
    DatasetError,
    ImageDataset,
    augment_batch,
    available_datasets,
    get_info,
    load_cifar10_batch,
    load_dataset,
    make_loader,
    make_synthetic,
    read_idx,
    split_indices,
    subset,
)

IMG = "t10k-images-idx3-ubyte"
LAB = "t10k-labels-idx1-ubyte"
TRAIN_IMG = "train-images-idx3-ubyte"
TRAIN_LAB = "train-labels-idx1-ubyte"


# ----------------------------------------------------------------------------------------------
# Writers for the official formats
# ----------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """Big-endian unsigned-byte IDX: magic 0x000008<ndim>, one int32 per dim, row-major data."""
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | arr.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    raw = idx_bytes(arr, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def tiny_idx_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 27, 27] = 0, 255  # make sure both ends of the range occur
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_idx_folder(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    train = tiny_idx_set(n_train, 1)
    test = tiny_idx_set(n_test, 2)
    write_idx(folder / TRAIN_IMG, train[0], gz)
    write_idx(folder / TRAIN_LAB, train[1], gz)
    write_idx(folder / IMG, test[0], gz)
    write_idx(folder / LAB, test[1], gz)
    return train, test


def py2_cifar_pickle(data_arr: np.ndarray, labels: list[int], batch_label: bytes = b"batch") -> bytes:
    """Protocol-2 pickle as Python 2 cPickle + numpy 1 wrote the official CIFAR-10 batches.

    py2 ``str`` is stored as (SHORT_)BINSTRING and numpy arrays reference
    ``numpy.core.multiarray._reconstruct`` -- byte-level what ``pickle.load(f, encoding='bytes')``
    sees in the real ``data_batch_k`` files.
    """
    out = bytearray(b"\x80\x02")  # PROTO 2

    def s(b: bytes) -> None:  # py2 str
        nonlocal out
        if len(b) < 256:
            out += b"U" + bytes([len(b)]) + b
        else:
            out += b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> None:  # BININT
        nonlocal out
        out += b"J" + struct.pack("<i", v)

    n = data_arr.shape[0]
    out += b"}("  # EMPTY_DICT, MARK
    s(b"batch_label")
    s(batch_label)
    s(b"labels")
    out += b"]("  # EMPTY_LIST, MARK
    for v in labels:
        i(int(v))
    out += b"e"  # APPENDS
    s(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\n"
    out += b"cnumpy\nndarray\n"
    i(0)
    out += b"\x85"  # TUPLE1 -> (0,)
    s(b"b")
    out += b"\x87R"  # TUPLE3, REDUCE -> empty ndarray
    out += b"("  # MARK: array state (version, shape, dtype, is_fortran, raw bytes)
    i(1)
    i(n)
    i(3072)
    out += b"\x86"  # TUPLE2 -> shape
    out += b"cnumpy\ndtype\n"
    s(b"u1")
    i(0)
    i(1)
    out += b"\x87R"  # dtype('u1', 0, 1)
    out += b"("
    i(3)
    s(b"|")
    out += b"NNN"
    i(-1)
    i(-1)
    i(0)
    out += b"tb"  # dtype state, BUILD
    out += b"\x89"  # NEWFALSE: C order
    s(np.ascontiguousarray(data_arr, dtype=np.uint8).tobytes())
    out += b"tb"  # TUPLE, BUILD -> filled array
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


def write_cifar_folder(parent: Path, per_batch: int = 4, n_test: int = 6, py2: bool = True):
    """Writes parent/cifar-10-batches-py/{data_batch_1..5,test_batch}; returns (train, test)."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, train_y = [], []
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    test = None
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        if py2:
            raw = py2_cifar_pickle(x, y, name.encode())
        else:  # what a Python 3 re-export with str keys would look like
            raw = pickle.dumps({"data": x, "labels": y}, protocol=4)
        (folder / name).write_bytes(raw)
        if name == "test_batch":
            test = (x, np.array(y))
        else:
            train_x.append(x)
            train_y += y
    return (np.concatenate(train_x), np.array(train_y)), test


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network, no torchvision downloads, empty data root, no system Fashion-MNIST."""
    import torchvision.datasets

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    class NoDownload:
        def __init__(self, *a, **k):
            raise AssertionError("torchvision dataset constructed")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for cls in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, cls, NoDownload)
    monkeypatch.setenv("DEQBENCH_DATA", str(tmp_path / "dataroot"))
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    return tmp_path


# ----------------------------------------------------------------------------------------------
# IDX
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    train, test = write_idx_folder(tmp_path, gz=gz)
    ds = load_dataset("fashion_mnist", "test", root=tmp_path)
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (20,) and ds.labels.dtype == torch.int64
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    expected = torch.from_numpy(test[0].astype(np.float32) / 255.0)[:, None]
    assert torch.equal(ds.images, expected)
    assert torch.equal(ds.labels, torch.from_numpy(test[1].astype(np.int64)))
    assert ds.images[3, 0, 5, 7].item() == pytest.approx(test[0][3, 5, 7] / 255.0)
    assert ds.info.input_shape == (1, 28, 28) and ds.info.num_classes == 10
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and int(label) == 3


def test_idx_mixed_gz_and_plain_and_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = tiny_idx_set(12, 3)
    write_idx(raw / IMG, images, gz=True)
    write_idx(raw / LAB, labels, gz=False)
    ds = load_dataset("mnist", "test", root=tmp_path)
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal((ds.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))


def test_read_idx_generic(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "x-idx3-ubyte", arr)
    out = read_idx(p, 0x00000803)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_fashion_mnist_default_folder_and_env_root(tmp_path, monkeypatch, offline):
    system = tmp_path / "system"
    _, test = write_idx_folder(system, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 20 and ds.meta["folder"] == str(system)
    # Fallback: $DEQBENCH_DATA/fashion_mnist when the Debian folder is absent.
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    write_idx_folder(tmp_path / "dataroot" / "fashion_mnist", n_test=7, gz=False)
    assert len(load_dataset("fashion_mnist", "test")) == 7


# ----------------------------------------------------------------------------------------------
# IDX error cases
# ----------------------------------------------------------------------------------------------


def test_error_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_dataset("mnist", "test", root=missing)
    assert str(missing) in str(e.value) and IMG in str(e.value)


def test_error_missing_file(tmp_path):
    images, _ = tiny_idx_set(5, 0)
    write_idx(tmp_path / IMG, images, gz=True)
    with pytest.raises(DatasetError, match="not found") as e:
        load_dataset("mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert f"Missing: {LAB}" in msg and str(tmp_path) in msg and "download=True" in msg


def test_error_missing_fashion_mnist_prints_fix(offline):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion_mnist", "train")
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert TRAIN_IMG in msg and TRAIN_LAB in msg
    assert str(offline / "no-system-dir") in msg and "folder does not exist" in msg
    assert "root=" in msg


def test_error_truncated_gzip(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    p = tmp_path / (IMG + ".gz")
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(DatasetError, match="corrupt or truncated gzip") as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert p.name in str(e.value)


def test_error_gz_name_not_gzip(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    p = tmp_path / (LAB + ".gz")
    p.write_bytes(b"hello world")
    with pytest.raises(DatasetError, match="not a gzip file") as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert p.name in str(e.value)


def test_error_short_read(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    p = tmp_path / IMG
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated") as e:
        load_dataset("mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert IMG in msg and f"{20 * 784} data bytes expected, found {20 * 784 - 100}" in msg


def test_error_short_header(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(struct.pack(">I", 0x803) + b"\x00\x00")
    with pytest.raises(DatasetError, match="header needs 16 bytes, found 6"):
        read_idx(p, 0x803)


def test_error_trailing_bytes(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    p = tmp_path / LAB
    p.write_bytes(p.read_bytes() + b"\x00\x01\x02")
    with pytest.raises(DatasetError, match="3 unexpected trailing bytes") as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert LAB in str(e.value)


def test_error_wrong_magic(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    # Labels written where images are expected: magic 0x801 instead of 0x803.
    _, labels = tiny_idx_set(20, 2)
    write_idx(tmp_path / IMG, labels, gz=True)
    with pytest.raises(DatasetError, match="wrong magic number") as e:
        load_dataset("mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert "0x00000801" in msg and "expected 0x00000803" in msg and IMG + ".gz" in msg


def test_error_count_mismatch(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / LAB, np.zeros(19, dtype=np.uint8))
    with pytest.raises(DatasetError, match="count mismatch") as e:
        load_dataset("mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert f"{IMG} has 20 images" in msg and f"{LAB} has 19 labels" in msg


def test_error_wrong_image_size(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / IMG, np.zeros((20, 20, 20), dtype=np.uint8))
    with pytest.raises(DatasetError, match="wrong image size 20x20, expected 28x28") as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert IMG in str(e.value)


def test_error_label_out_of_range(tmp_path):
    write_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / LAB, np.full(20, 10, dtype=np.uint8))
    with pytest.raises(DatasetError, match="label value 10 out of range") as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert LAB in str(e.value)


def test_error_unknown_name_and_split():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'") as e:
        load_dataset("imagenet", "test")
    for name in ("cifar10", "fashion_mnist", "mnist", "synthetic"):
        assert name in str(e.value)
    with pytest.raises(DatasetError, match="unknown split 'valid'.*train, val, test"):
        load_dataset("synthetic", "valid")
    assert isinstance(DatasetError("x"), ValueError)


def test_error_bad_options():
    with pytest.raises(DatasetError, match="unknown option"):
        load_dataset("synthetic", "test", n_images=3)
    with pytest.raises(DatasetError, match="takes no options"):
        load_dataset("mnist", "test", shape=(1, 2, 3))
    with pytest.raises(DatasetError, match="val_size must be in"):
        load_dataset("synthetic", "val", n_train=50, val_size=50)


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [True, False])
def test_cifar10_loader(tmp_path, py2):
    (train_x, train_y), (test_x, test_y) = write_cifar_folder(tmp_path, py2=py2)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        ds = load_dataset("cifar10", "test", root=root)
        assert ds.images.shape == (6, 3, 32, 32) and ds.images.dtype == torch.float32
        assert torch.equal(ds.labels, torch.from_numpy(test_y.astype(np.int64)))
        # Official layout: 1024 R, 1024 G, 1024 B, each row-major 32x32.
        n, c, y, x = 2, 1, 5, 7
        assert ds.images[n, c, y, x].item() == pytest.approx(test_x[n, c * 1024 + y * 32 + x] / 255)
        assert ds.images[n, 2, 31, 0].item() == pytest.approx(test_x[n, 2048 + 31 * 32] / 255)
        assert torch.equal(
            ds.images, torch.from_numpy(test_x.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
        )
    full = load_dataset("cifar10", "train", root=tmp_path, val_size=0)
    assert full.images.shape == (20, 3, 32, 32)
    assert torch.equal(full.labels, torch.from_numpy(train_y.astype(np.int64)))
    assert ds.info.class_names[0] == "airplane" and ds.info.input_shape == (3, 32, 32)


def test_cifar10_pixel_layout_explicit(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x = np.zeros((1, 3072), dtype=np.uint8)
    x[0, 1024 + 3 * 32 + 9] = 200  # green channel, row 3, column 9
    (folder / "test_batch").write_bytes(py2_cifar_pickle(x, [4]))
    images, labels = load_cifar10_batch(folder / "test_batch")
    assert images.shape == (1, 3, 32, 32) and images[0, 1, 3, 9] == 200 and images.sum() == 200
    assert labels.tolist() == [4]


def _evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2))


def test_cifar10_rejects_disallowed_global(tmp_path):
    write_cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    _evil_pickle(target, marker)
    with pytest.raises(DatasetError, match="refused to unpickle: disallowed global") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "system" in str(e.value) and "test_batch" in str(e.value)
    assert not marker.exists()


def test_cifar10_rejects_other_globals(tmp_path):
    p = tmp_path / "b"
    p.write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x85R.")
    with pytest.raises(DatasetError, match="disallowed global builtins.eval"):
        load_cifar10_batch(p)


def test_cifar10_errors(tmp_path):
    write_cifar_folder(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    x = np.zeros((2, 3072), dtype=np.uint8)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x}, protocol=3))
    with pytest.raises(DatasetError, match="missing key 'labels'") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "test_batch" in str(e.value)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x[:, :1000], b"labels": [1, 2]}, protocol=3))
    with pytest.raises(DatasetError, match=r"wrong data shape/dtype: expected \(N, 3072\) uint8, found \(2, 1000\)"):
        load_dataset("cifar10", "test", root=tmp_path)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": [1]}, protocol=3))
    with pytest.raises(DatasetError, match="count mismatch: 2 images"):
        load_dataset("cifar10", "test", root=tmp_path)

    (folder / "test_batch").write_bytes(pickle.dumps([1, 2], protocol=3))
    with pytest.raises(DatasetError, match="expected a pickled dict, found list"):
        load_dataset("cifar10", "test", root=tmp_path)

    good = py2_cifar_pickle(np.zeros((3, 3072), np.uint8), [0, 1, 2])
    (folder / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated pickle") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert "test_batch" in str(e.value)

    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing file.*data_batch_3") as e:
        load_dataset("cifar10", "train", root=tmp_path)
    assert str(folder) in str(e.value)


def test_cifar10_missing_folders(tmp_path, offline):
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_dataset("cifar10", "test")  # default $DEQBENCH_DATA/cifar10
    assert str(offline / "dataroot" / "cifar10") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no CIFAR-10 data") as e:
        load_dataset("cifar10", "test", root=tmp_path / "empty")
    assert "cifar-10-batches-py" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Downloads: only on request, offline -> DatasetError
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_download_false_never_touches_network(offline, name):
    with pytest.raises(DatasetError) as e:
        load_dataset(name, "test")
    assert "download=True" in str(e.value)


@pytest.mark.parametrize(
    "name, cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")]
)
@pytest.mark.parametrize(
    "exc", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
            RuntimeError("Error downloading train-images-idx3-ubyte.gz"),
            TimeoutError("timed out")]
)
def test_download_offline_raises_dataset_error(offline, monkeypatch, name, cls, exc):
    import torchvision.datasets

    calls = []

    class Offline:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, download))
            raise exc

    monkeypatch.setattr(torchvision.datasets, cls, Offline)
    root = offline / "empty"
    with pytest.raises(DatasetError, match="downloading into .* failed.*probably offline") as e:
        load_dataset(name, "test", root=root, download=True)
    assert str(root) in str(e.value) and type(exc).__name__ in str(e.value)
    assert "by hand" in str(e.value)
    assert calls == [(str(root), True)]


def test_download_true_uses_torchvision_layout(offline, monkeypatch):
    import torchvision.datasets

    _, labels = tiny_idx_set(9, 5)

    class FakeMNIST:  # mimics torchvision: files land in <root>/MNIST/raw
        def __init__(self, root, train=True, download=False, **kw):
            raw = Path(root) / "MNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            write_idx(raw / IMG, tiny_idx_set(9, 5)[0], gz=True)
            write_idx(raw / LAB, labels, gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = load_dataset("mnist", "test", download=True)  # default root $DEQBENCH_DATA/mnist
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert (offline / "dataroot" / "mnist" / "MNIST" / "raw" / (IMG + ".gz")).is_file()


# ----------------------------------------------------------------------------------------------
# Splits, synthetic data, subsets
# ----------------------------------------------------------------------------------------------


def test_validation_split_idx(tmp_path):
    train, _ = write_idx_folder(tmp_path, n_train=40, gz=True)
    tr = load_dataset("mnist", "train", root=tmp_path, val_size=8)
    va = load_dataset("mnist", "val", root=tmp_path, val_size=8)
    assert len(tr) == 32 and len(va) == 8
    assert set(tr.indices.tolist()).isdisjoint(va.indices.tolist())
    assert sorted(tr.indices.tolist() + va.indices.tolist()) == list(range(40))
    # Images really are the training-file images at those positions.
    src = torch.from_numpy(train[0].astype(np.float32) / 255)[:, None]
    assert torch.equal(va.images, src[va.indices]) and torch.equal(tr.images, src[tr.indices])
    assert va.meta["val_size"] == 8 and va.meta["val_seed"] == 0
    again = load_dataset("mnist", "val", root=tmp_path, val_size=8)
    assert torch.equal(again.indices, va.indices) and torch.equal(again.images, va.images)
    other = load_dataset("mnist", "val", root=tmp_path, val_size=8, val_seed=1)
    assert not torch.equal(other.indices, va.indices)


def test_split_indices_defaults():
    tr, va = split_indices(60_000, 5_000, seed=0)
    assert len(tr) == 55_000 and len(va) == 5_000
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(60_000))
    assert np.array_equal(split_indices(60_000, 5_000, 0)[1], va)
    assert not np.array_equal(split_indices(60_000, 5_000, 1)[1], va)
    for key in ("fashion_mnist", "mnist", "cifar10"):
        assert get_info(key).default_val_size == 5_000


def test_synthetic_deterministic_and_learnable():
    kw = dict(n_train=200, n_test=100, shape=(3, 8, 8), num_classes=4, seed=7)
    a = load_dataset("synthetic", "test", **kw)
    b = load_dataset("synthetic", "test", **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = load_dataset("synthetic", "test", **{**kw, "seed": 8})
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (100, 3, 8, 8) and a.images.dtype == torch.float32
    assert a.labels.dtype == torch.int64 and torch.bincount(a.labels).tolist() == [25] * 4
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    assert a.info.num_classes == 4 and a.info.input_shape == (3, 8, 8)
    # Learnable: nearest class mean (fitted on train) classifies test almost perfectly.
    tr = load_dataset("synthetic", "train", val_size=0, **kw)
    means = torch.stack([tr.images[tr.labels == k].mean(0) for k in range(4)])
    dist = ((a.images[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == a.labels).float().mean() > 0.95
    # train and test use independent noise
    x_tr, _ = make_synthetic(100, (3, 8, 8), 4, 7, part="train")
    x_te, _ = make_synthetic(100, (3, 8, 8), 4, 7, part="test")
    assert not torch.equal(x_tr, x_te)


def test_synthetic_val_split_default():
    tr = load_dataset("synthetic", "train", n_train=100)
    va = load_dataset("synthetic", "val", n_train=100)
    assert len(tr) == 90 and len(va) == 10
    assert set(tr.indices.tolist()).isdisjoint(va.indices.tolist())


def test_subset():
    ds = load_dataset("synthetic", "test", n_test=100, num_classes=5)
    s1 = subset(ds, 20, seed=3)
    assert len(s1) == 20 and torch.equal(subset(ds, 20, seed=3).indices, s1.indices)
    assert not torch.equal(subset(ds, 20, seed=4).indices, s1.indices)
    assert set(s1.indices.tolist()) <= set(subset(ds, 40, seed=3).indices.tolist())
    assert torch.equal(s1.images, ds.images[s1.indices]) and s1.meta["subset_n"] == 20
    strat = subset(ds, 23, seed=0, stratified=True)
    counts = torch.bincount(strat.labels, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    with pytest.raises(DatasetError, match="subset size"):
        subset(ds, 101)


def test_registry():
    assert available_datasets() == ["cifar10", "fashion_mnist", "mnist", "synthetic"]
    info = get_info("FashionMNIST".lower())
    assert info.class_names[9] == "Ankle boot" and info.num_classes == 10
    assert get_info("synthetic", num_classes=3).class_names == ("class_0", "class_1", "class_2")


# ----------------------------------------------------------------------------------------------
# Loaders and augmentation
# ----------------------------------------------------------------------------------------------


def _collect(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def test_make_loader_deterministic():
    ds = load_dataset("synthetic", "test", n_test=50, shape=(3, 8, 8))
    loader = make_loader(ds, batch_size=16, shuffle=True, seed=5)
    assert len(loader) == 4
    x1, y1 = _collect(loader)
    x2, y2 = _collect(make_loader(ds, batch_size=16, shuffle=True, seed=5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = _collect(make_loader(ds, batch_size=16, shuffle=True, seed=6))
    assert not torch.equal(x1, x3)
    # Every image exactly once per epoch.
    assert sorted(map(tuple, x1.flatten(1).tolist())) == sorted(map(tuple, ds.images.flatten(1).tolist()))
    x_epoch2, _ = _collect(loader)
    assert not torch.equal(x1, x_epoch2)
    xs, ys = _collect(make_loader(ds, batch_size=16))
    assert torch.equal(xs, ds.images) and torch.equal(ys, ds.labels)
    assert len(make_loader(ds, batch_size=16, drop_last=True)) == 3


def test_make_loader_augment():
    ds = load_dataset("synthetic", "test", n_test=32, shape=(3, 16, 16))
    xa, ya = _collect(make_loader(ds, batch_size=8, shuffle=False, seed=1, augment=True))
    xb, _ = _collect(make_loader(ds, batch_size=8, shuffle=False, seed=1, augment=True))
    assert torch.equal(xa, xb) and torch.equal(ya, ds.labels)
    assert xa.shape == ds.images.shape and not torch.equal(xa, ds.images)
    assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0


def test_augment_batch_crop_and_flip():
    x = torch.rand(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, pad=1, flip=False, generator=g)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(len(x)):  # each output is one of the 9 shifted crops
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in crops)
    flipped = augment_batch(x, pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    same = [torch.equal(flipped[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    assert get_info("cifar10").augment_pad == 4 and get_info("cifar10").augment_flip
    assert get_info("mnist").augment_pad == 2 and not get_info("mnist").augment_flip


# ----------------------------------------------------------------------------------------------
# Real data (only where the Debian package is installed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_test_split():
    ds = load_dataset("fashion_mnist", "test", root="/usr/share/datasets/fashion-mnist")
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1_000] * 10
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
