"""Dataset layer of deqbench: local, offline-first loading of the benchmark image sets.

Everything here returns images as ``float32`` tensors of shape ``(N, C, H, W)`` with values in
``[0, 1]`` (``uint8 / 255``; no normalisation -- models own their normalisation so that attacks
work in pixel space) and labels as ``int64`` tensors of shape ``(N,)`` with values in
``[0, num_classes)``.

Model code must never import this module: models take tensors, the benchmark feeds them.

Datasets (see :data:`DATASETS`):

* ``fashion_mnist`` -- IDX files (gzipped or plain).  Default folder
  ``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``), then
  ``$DEQBENCH_DATA/fashion_mnist``.  Shape ``(1, 28, 28)``.
* ``mnist`` -- IDX files from ``$DEQBENCH_DATA/mnist`` (or a given folder).  Shape ``(1, 28, 28)``.
* ``cifar10`` -- the official python pickle batches in ``cifar-10-batches-py/`` under
  ``$DEQBENCH_DATA/cifar10`` (or a given folder / its parent).  Shape ``(3, 32, 32)``.
* ``synthetic`` -- deterministic, seeded, learnable toy data for tests.

``$DEQBENCH_DATA`` defaults to ``~/.cache/deqbench``.  Nothing is ever downloaded unless the
caller passes ``download=True`` (then torchvision fetches the files into the data folder).

Splits: ``'train'``, ``'val'``, ``'test'``.  ``'val'`` is a fixed, seeded held-out part of the
*training* set and ``'train'`` excludes it.  Why: the reference DEQ code selected checkpoints
(and tuned hyper-parameters) on the test set, which makes the reported test accuracy -- and
every robust accuracy measured on top of it -- optimistically biased.  Model selection here
must use ``'val'``; ``'test'`` is only for the final numbers.
"""

from __future__ import annotations

import gzip
import http.client
import math
import os
import pickle
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetError",
    "DatasetInfo",
    "ImageDataset",
    "augment_batch",
    "available_datasets",
    "data_root",
    "get_info",
    "load_cifar10_batch",
    "load_dataset",
    "load_idx_pair",
    "make_loader",
    "make_synthetic",
    "read_idx",
    "split_indices",
    "subset",
]


class DatasetError(ValueError):
    """Bad dataset input: missing/corrupt files, wrong format, unknown name or split.

    The message always names the offending file or folder and says what was wrong (and, for
    missing data, how to fix it).
    """


# --------------------------------------------------------------------------------------------
# Metadata and registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    ``input_shape`` is ``(C, H, W)`` of one image; ``train_size``/``test_size`` are the sizes of
    the official files (the ``'train'`` split is ``train_size - val_size``);
    ``default_val_size`` is how many training images ``'val'`` holds unless told otherwise;
    ``augment_pad``/``augment_flip`` is the train-time augmentation used by
    :func:`make_loader` with ``augment=True``.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    train_size: int
    test_size: int
    default_val_size: int
    augment_pad: int
    augment_flip: bool
    description: str = ""


SPLITS: tuple[str, ...] = ("train", "val", "test")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# Synthetic defaults are small so that tests stay fast on a 2-core CPU.
_SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "n_train": 1000,
    "n_test": 200,
    "shape": (3, 16, 16),
    "num_classes": 10,
    "seed": 0,
    "noise": 0.1,
}

DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", input_shape=(1, 28, 28), num_classes=10,
        class_names=FASHION_MNIST_CLASSES, train_size=60_000, test_size=10_000,
        default_val_size=5_000, augment_pad=2, augment_flip=False,
        description="Fashion-MNIST (Zalando), 28x28 grey-scale, IDX files",
    ),
    "mnist": DatasetInfo(
        name="mnist", input_shape=(1, 28, 28), num_classes=10,
        class_names=tuple(str(i) for i in range(10)), train_size=60_000, test_size=10_000,
        # No flip: digits are not mirror-symmetric.
        default_val_size=5_000, augment_pad=2, augment_flip=False,
        description="MNIST handwritten digits, 28x28 grey-scale, IDX files",
    ),
    "cifar10": DatasetInfo(
        name="cifar10", input_shape=(3, 32, 32), num_classes=10,
        class_names=CIFAR10_CLASSES, train_size=50_000, test_size=10_000,
        default_val_size=5_000, augment_pad=4, augment_flip=True,
        description="CIFAR-10, 32x32 RGB, official python pickle batches",
    ),
    "synthetic": DatasetInfo(
        name="synthetic", input_shape=_SYNTHETIC_DEFAULTS["shape"],
        num_classes=_SYNTHETIC_DEFAULTS["num_classes"],
        class_names=tuple(f"class_{i}" for i in range(_SYNTHETIC_DEFAULTS["num_classes"])),
        train_size=_SYNTHETIC_DEFAULTS["n_train"], test_size=_SYNTHETIC_DEFAULTS["n_test"],
        default_val_size=_SYNTHETIC_DEFAULTS["n_train"] // 10, augment_pad=2, augment_flip=False,
        description="seeded class templates + Gaussian noise (tests only)",
    ),
}

_ALIASES = {
    "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10",
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (sorted)."""
    return sorted(DATASETS)


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}"
        )
    return key


def get_info(name: str, **kw: Any) -> DatasetInfo:
    """Metadata of dataset ``name``; for ``synthetic`` the options of :func:`load_dataset` apply."""
    key = _canonical_name(name)
    if key == "synthetic":
        return _synthetic_info(_synthetic_options(kw))
    if kw:
        raise DatasetError(f"dataset {key!r} takes no options, got {sorted(kw)}")
    return DATASETS[key]


def data_root() -> Path:
    """Root folder for downloaded/user data: ``$DEQBENCH_DATA``, default ``~/.cache/deqbench``."""
    return Path(os.environ.get("DEQBENCH_DATA") or "~/.cache/deqbench").expanduser()


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension (N,)
_MAGIC_KIND = {IDX_IMAGES_MAGIC: "IDX images", IDX_LABELS_MAGIC: "IDX labels"}

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# torchvision class used for download=True, and the sub-folder it writes raw files to.
_IDX_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _read_maybe_gzip(path: Path) -> bytes:
    """Whole file content, gunzipped if it is gzip data (decided by content, not only name)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            # EOFError: truncated stream; BadGzipFile/zlib.error: corrupted bytes.
            raise DatasetError(
                f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e}); "
                "replace it with a fresh copy"
            ) from e
    if path.name.endswith(".gz"):
        raise DatasetError(
            f"{path}: not a gzip file although its name ends in .gz "
            f"(starts with bytes {raw[:4].hex()}, gzip files start with 1f8b)"
        )
    return raw


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one unsigned-byte IDX file (``.gz`` or plain) into a read-only ``uint8`` array.

    The IDX format is big-endian: a 4-byte magic ``0x000008DD`` (``08`` = unsigned byte,
    ``DD`` = number of dimensions), one 4-byte size per dimension, then the data row-major.
    Raises :class:`DatasetError` on a wrong magic, short header, truncated data or trailing
    bytes.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DatasetError(
            f"{path}: file is truncated: {len(raw)} bytes, too short for a 4-byte IDX magic number"
        )
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong magic number 0x{magic:08X}, expected 0x{expected_magic:08X} "
            f"({_MAGIC_KIND.get(expected_magic, 'IDX')}); is this the right file?"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(
            f"{path}: wrong magic number 0x{magic:08X}: not an unsigned-byte IDX file "
            "(expected 0x000008XX)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"{path}: file is truncated: IDX header needs {header} bytes, found {len(raw)}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    found = len(raw) - header
    if found < expected:
        raise DatasetError(
            f"{path}: file is truncated: header declares shape {dims}, i.e. {expected} data "
            f"bytes expected, found {found}"
        )
    if found > expected:
        raise DatasetError(
            f"{path}: {found - expected} unexpected trailing bytes: header declares shape {dims}, "
            f"i.e. {expected} data bytes expected, found {found}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def load_idx_pair(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    image_hw: tuple[int, int] = (28, 28),
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an IDX image file and its label file.

    Returns ``(images, labels)``: ``uint8`` array ``(N, 1, H, W)`` in ``[0, 255]`` and ``int64``
    array ``(N,)`` in ``[0, num_classes)``.  Raises :class:`DatasetError` on a wrong image size,
    an image/label count mismatch or out-of-range labels.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if tuple(images.shape[1:]) != tuple(image_hw):
        raise DatasetError(
            f"{images_path}: wrong image size {images.shape[1]}x{images.shape[2]}, "
            f"expected {image_hw[0]}x{image_hw[1]}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"image/label count mismatch: {images_path.name} has {len(images)} images but "
            f"{labels_path.name} has {len(labels)} labels (files {images_path} and {labels_path})"
        )
    _check_label_range(labels, num_classes, labels_path)
    return images[:, None, :, :], labels.astype(np.int64)


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(
            f"{path}: label value {int(labels.max())} out of range, expected 0..{num_classes - 1}"
        )
    if labels.size and int(labels.min()) < 0:
        raise DatasetError(
            f"{path}: label value {int(labels.min())} out of range, expected 0..{num_classes - 1}"
        )


def _idx_default_folders(key: str) -> list[Path]:
    if key == "fashion_mnist":
        return [FASHION_MNIST_SYSTEM_DIR, data_root() / "fashion_mnist"]
    return [data_root() / key]


def _idx_download_folder(key: str, root: str | os.PathLike | None) -> Path:
    # The Debian folder is read-only system data: downloads go to the user data root.
    return Path(root).expanduser() if root is not None else data_root() / key


def _find_file(folders: Sequence[Path], base: str) -> Path | None:
    # Prefer the plain file: no decompression needed (torchvision keeps both).
    for folder in folders:
        for name in (base, base + ".gz"):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _idx_fix_hint(key: str) -> str:
    root_var = f"$DEQBENCH_DATA/{key} (DEQBENCH_DATA defaults to ~/.cache/deqbench)"
    if key == "fashion_mnist":
        return (
            "Fix: install the Debian package as root: `apt-get install -y dataset-fashion-mnist` "
            f"(it provides {FASHION_MNIST_SYSTEM_DIR}/), or pass root=FOLDER holding the four IDX "
            f"files (.gz or un-gzipped), or put them in {root_var}, or pass download=True "
            "(needs network)."
        )
    return (
        f"Fix: put the four IDX files (.gz or un-gzipped) in {root_var}, or pass root=FOLDER "
        "holding them, or pass download=True to fetch them with torchvision (needs network)."
    )


def _locate_idx(key: str, part: str, root: str | os.PathLike | None) -> tuple[Path, Path]:
    img_base, lab_base = _IDX_FILES[part]
    tv_sub = Path(_IDX_TORCHVISION[key]) / "raw"  # layout torchvision's download produces
    folders = [Path(root).expanduser()] if root is not None else _idx_default_folders(key)
    for folder in folders:
        search = [folder, folder / tv_sub]
        images, labels = _find_file(search, img_base), _find_file(search, lab_base)
        if images is not None and labels is not None:
            return images, labels
    if root is not None and not folders[0].is_dir():
        raise DatasetError(
            f"{key}: folder {folders[0]} does not exist (looked for {img_base}[.gz] and "
            f"{lab_base}[.gz] there). {_idx_fix_hint(key)}"
        )
    where = "; ".join(
        f"{f}{'' if f.is_dir() else ' (folder does not exist)'} and {f / tv_sub}" for f in folders
    )
    missing = [
        b for b in (img_base, lab_base)
        if all(_find_file([f, f / tv_sub], b) is None for f in folders)
    ]
    raise DatasetError(
        f"{key} {part} files not found: looked for {img_base}[.gz] and {lab_base}[.gz] in: "
        f"{where}. Missing: {', '.join(missing) or 'a matching images/labels pair'}. "
        f"{_idx_fix_hint(key)}"
    )


def _load_idx_dataset(
    key: str, part: str, root: str | os.PathLike | None, download: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    try:
        images_path, labels_path = _locate_idx(key, part, root)
    except DatasetError:
        if not download:
            raise
        folder = _idx_download_folder(key, root)
        _torchvision_download(key, _IDX_TORCHVISION[key], folder, train=(part == "train"))
        images_path, labels_path = _locate_idx(key, part, folder)
    info = DATASETS[key]
    images, labels = load_idx_pair(
        images_path, labels_path, image_hw=info.input_shape[1:], num_classes=info.num_classes
    )
    return images, labels, images_path.parent


# --------------------------------------------------------------------------------------------
# CIFAR-10 (official python pickle batches)
# --------------------------------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


class _DisallowedGlobal(pickle.UnpicklingError):
    pass


def _allowed_pickle_globals() -> dict[tuple[str, str], Any]:
    # The official files were written by Python 2 / numpy 1 (``numpy.core.multiarray``);
    # numpy 2 writes ``numpy._core.multiarray``.  Resolve the function directly instead of
    # importing ``numpy.core`` (a deprecated alias in numpy 2).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts/lists/bytes/ints and numpy arrays.

    A pickle can call any importable callable while loading; CIFAR files come from the
    internet, so every global except the four numpy names a numpy array needs is refused
    *before* it is resolved (nothing gets imported or called).
    """

    _allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _DisallowedGlobal(
                f"disallowed global {module}.{name} (only numpy arrays are allowed)"
            ) from None


def _unpickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            # encoding='bytes': the official files are Python 2 pickles whose str keys and
            # array buffers must stay bytes (the documented way to read them).
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except _DisallowedGlobal as e:
        raise DatasetError(f"{path}: refused to unpickle: {e}; not an official CIFAR-10 file") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError) as e:
        raise DatasetError(
            f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})"
        ) from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e


def _get_key(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    found = ", ".join(repr(k) for k in list(d)[:10])
    raise DatasetError(f"{path}: CIFAR-10 batch is missing key {key!r} (found keys: {found})")


def load_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR-10 python batch file (``data_batch_k`` or ``test_batch``).

    The file is a pickled dict with ``b'data'``: ``uint8 (N, 3072)`` -- per row 1024 red, then
    1024 green, then 1024 blue values, each a row-major 32x32 plane -- and ``b'labels'``: a list
    of N ints in ``0..9`` (str keys are accepted too).  Returns ``uint8 (N, 3, 32, 32)`` and
    ``int64 (N,)``.
    """
    path = Path(path)
    obj = _unpickle(path)
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    data = np.asarray(_get_key(obj, "data", path))
    labels_raw = _get_key(obj, "labels", path)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: wrong data shape/dtype: expected (N, 3072) uint8, "
            f"found {tuple(data.shape)} {data.dtype}"
        )
    try:
        labels = np.asarray(labels_raw, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: labels are not a list of integers ({e})") from e
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: image/label count mismatch: {len(data)} images in 'data' but labels of "
            f"shape {tuple(labels.shape)}"
        )
    _check_label_range(labels, 10, path)
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_folder(root: Path) -> Path:
    """The folder holding the batch files: ``root`` itself or ``root/cifar-10-batches-py``."""
    if not root.is_dir():
        raise DatasetError(
            f"cifar10: folder {root} does not exist. {_cifar_fix_hint()}"
        )
    if root.name == CIFAR10_FOLDER or any((root / n).exists() for n in ("data_batch_1", "test_batch")):
        return root
    sub = root / CIFAR10_FOLDER
    if sub.is_dir():
        return sub
    raise DatasetError(
        f"cifar10: no CIFAR-10 data in {root}: looked for {root}/data_batch_1..5 + test_batch "
        f"and for a sub-folder {sub}/. {_cifar_fix_hint()}"
    )


def _cifar_fix_hint() -> str:
    return (
        f"Fix: put the extracted official '{CIFAR10_FOLDER}/' folder (python version) in "
        f"$DEQBENCH_DATA/cifar10 (DEQBENCH_DATA defaults to ~/.cache/deqbench), or pass "
        f"root= that folder or its parent, or pass download=True (needs network)."
    )


def _locate_cifar(part: str, root: Path) -> list[Path]:
    folder = _cifar_folder(root)
    paths = [folder / n for n in CIFAR10_FILES[part]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"cifar10: missing file(s) {', '.join(missing)} in {folder} "
            f"(a {part} split needs {', '.join(CIFAR10_FILES[part])}). {_cifar_fix_hint()}"
        )
    return paths


def _load_cifar10(
    part: str, root: str | os.PathLike | None, download: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    base = Path(root).expanduser() if root is not None else data_root() / "cifar10"
    try:
        paths = _locate_cifar(part, base)
    except DatasetError:
        if not download:
            raise
        # torchvision extracts into <root>/cifar-10-batches-py.
        target = base.parent if base.name == CIFAR10_FOLDER else base
        _torchvision_download("cifar10", "CIFAR10", target, train=(part == "train"))
        paths = _locate_cifar(part, target)
    batches = [load_cifar10_batch(p) for p in paths]
    images = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
    return images, labels, paths[0].parent


# --------------------------------------------------------------------------------------------
# Download (only on explicit request)
# --------------------------------------------------------------------------------------------


def _torchvision_download(key: str, class_name: str, folder: Path, train: bool) -> None:
    """Let torchvision fetch ``key`` into ``folder``; network failures become DatasetError."""
    import torchvision.datasets  # lazy: only needed for downloads

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{key}: cannot create download folder {folder} ({e})") from e
    cls = getattr(torchvision.datasets, class_name)
    try:
        cls(str(folder), train=train, download=True)
    except (OSError, RuntimeError, http.client.HTTPException) as e:
        # URLError, socket errors and timeouts are OSErrors; torchvision wraps mirror
        # failures in RuntimeError.
        detail = " ".join(str(e).split())  # torchvision's messages span several lines
        if len(detail) > 300:
            detail = detail[:300] + "..."
        if key == "cifar10":
            by_hand = (
                f"extract the official cifar-10-python.tar.gz so that {folder / CIFAR10_FOLDER}/ "
                f"holds {', '.join(CIFAR10_FILES['train'] + CIFAR10_FILES['test'])}"
            )
        else:
            names = [f"{b}[.gz]" for pair in _IDX_FILES.values() for b in pair]
            by_hand = f"copy {', '.join(names)} into {folder}"
        raise DatasetError(
            f"{key}: downloading into {folder} failed ({type(e).__name__}: {detail}); "
            f"probably offline. Put the files there by hand: {by_hand}."
        ) from e


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def _synthetic_options(kw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kw) - set(_SYNTHETIC_DEFAULTS)
    if unknown:
        raise DatasetError(
            f"synthetic: unknown option(s) {sorted(unknown)}; known: {sorted(_SYNTHETIC_DEFAULTS)}"
        )
    opts = {**_SYNTHETIC_DEFAULTS, **kw}
    shape = tuple(int(s) for s in opts["shape"])
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(f"synthetic: shape must be (C, H, W) with positive sizes, got {opts['shape']}")
    opts["shape"] = shape
    for k in ("n_train", "n_test", "num_classes"):
        if int(opts[k]) < 1:
            raise DatasetError(f"synthetic: {k} must be >= 1, got {opts[k]}")
        opts[k] = int(opts[k])
    if float(opts["noise"]) < 0:
        raise DatasetError(f"synthetic: noise must be >= 0, got {opts['noise']}")
    return opts


def _synthetic_info(opts: dict[str, Any]) -> DatasetInfo:
    return replace(
        DATASETS["synthetic"],
        input_shape=opts["shape"],
        num_classes=opts["num_classes"],
        class_names=tuple(f"class_{i}" for i in range(opts["num_classes"])),
        train_size=opts["n_train"],
        test_size=opts["n_test"],
        default_val_size=opts["n_train"] // 10,
    )


def make_synthetic(
    n: int,
    shape: tuple[int, int, int] = (3, 16, 16),
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 0.1,
    part: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic learnable toy data: ``float32 (n, C, H, W)`` in ``[0, 1]``, ``int64 (n,)``.

    Each class has a fixed smooth random template (drawn from ``seed`` only, so train and test
    share it); an image is its class template plus Gaussian noise of std ``noise``, clamped to
    ``[0, 1]``.  Labels are balanced (``i % num_classes``) in seeded random order.  ``part``
    (``'train'``/``'test'``) selects an independent noise stream.  Same arguments -> identical
    tensors.
    """
    c, h, w = shape
    templates_rng = np.random.default_rng([seed, 0])
    sample_rng = np.random.default_rng([seed, 1 if part == "train" else 2])
    # Coarse grid upsampled bilinearly: spatially smooth, so crop augmentation keeps the class.
    coarse = templates_rng.uniform(0.15, 0.85, size=(num_classes, c, max(2, h // 4), max(2, w // 4)))
    templates = F.interpolate(
        torch.from_numpy(coarse).float(), size=(h, w), mode="bilinear", align_corners=False
    )
    labels = torch.from_numpy(sample_rng.permutation(np.arange(n) % num_classes).astype(np.int64))
    eps = torch.from_numpy(sample_rng.standard_normal((n, c, h, w)).astype(np.float32))
    images = (templates[labels] + float(noise) * eps).clamp_(0.0, 1.0)
    return images.contiguous(), labels


# --------------------------------------------------------------------------------------------
# Dataset object, splits, subsets, loaders
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ImageDataset(Dataset):
    """In-memory image classification set.

    ``images``: ``float32 (N, C, H, W)`` in ``[0, 1]``; ``labels``: ``int64 (N,)``;
    ``indices``: ``int64 (N,)`` positions of the images in the source file set (the official
    training files for ``'train'``/``'val'``, the test files for ``'test'``);
    ``meta``: provenance (folder, validation size and seed, subset parameters).
    ``ds[i]`` returns ``(image (C, H, W), label ())``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    split: str
    indices: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise DatasetError(
                f"images must be float32 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise DatasetError(
                f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if self.indices is None:
            self.indices = torch.arange(len(self.images))
        # Every loader hands out row-major (N, C, H, W) strides.  IDX images come out of numpy
        # with the strides of channels_last, (784, 1, 28, 1); with C = 1 torch calls that
        # "contiguous" (so .contiguous() is a no-op), but a conv then keeps channels_last and a
        # user model's x.view(x.size(0), -1) fails far from the data.  A row-major copy fixes it.
        if self.images.stride() != _row_major_strides(self.images.shape):
            self.images = self.images.clone(memory_format=torch.contiguous_format)
        if not self.labels.is_contiguous():
            self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.info.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])})"
        )


def _row_major_strides(shape) -> tuple:
    strides, acc = [], 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def split_indices(n_train: int, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/validation partition of ``range(n_train)``.

    A seeded permutation (numpy PCG64, ``seed``) is drawn; its first ``val_size`` entries are
    the validation set, the rest the training set.  Both are returned sorted (``int64``),
    disjoint, and together cover ``range(n_train)``.
    """
    val_size = int(val_size)
    if not 0 <= val_size < n_train:
        raise DatasetError(
            f"val_size must be in [0, {n_train}) for a training set of {n_train} images, "
            f"got {val_size}"
        )
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[val_size:]).astype(np.int64), np.sort(perm[:val_size]).astype(np.int64)


def _to_float(images: np.ndarray | torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Select ``idx`` first, then convert, so only the chosen split is materialised as float."""
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(idx)].contiguous()
    return torch.from_numpy(images[idx]).to(torch.float32).div_(255.0)


def load_dataset(
    name: str,
    split: str = "test",
    root: str | os.PathLike | None = None,
    download: bool = False,
    *,
    val_size: int | None = None,
    val_seed: int = 0,
    **kw: Any,
) -> ImageDataset:
    """Load ``split`` (``'train'``, ``'val'`` or ``'test'``) of dataset ``name``.

    ``root``: folder with the files (see the module docstring for defaults; CIFAR-10 accepts
    ``cifar-10-batches-py/`` or its parent).  ``download=True`` lets torchvision fetch missing
    files (network); otherwise nothing leaves the machine.  ``val_size`` (default
    ``info.default_val_size``, 5,000 for the real sets) and ``val_seed`` define the held-out
    validation part of the training files; ``'train'`` is the rest.  ``**kw`` are options of
    ``synthetic`` (``n_train``, ``n_test``, ``shape``, ``num_classes``, ``seed``, ``noise``).

    Returns an :class:`ImageDataset` with ``float32 (N, C, H, W)`` images in ``[0, 1]`` and
    ``int64 (N,)`` labels.
    """
    key = _canonical_name(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    part = "test" if split == "test" else "train"
    meta: dict[str, Any] = {}

    if key == "synthetic":
        opts = _synthetic_options(kw)
        info = _synthetic_info(opts)
        images, labels_t = make_synthetic(
            opts[f"n_{part}"], opts["shape"], opts["num_classes"], opts["seed"], opts["noise"], part
        )
        labels = labels_t.numpy()
        meta["options"] = opts
    else:
        if kw:
            raise DatasetError(f"dataset {key!r} takes no options, got {sorted(kw)}")
        info = DATASETS[key]
        if key == "cifar10":
            images, labels, folder = _load_cifar10(part, root, download)
        else:
            images, labels, folder = _load_idx_dataset(key, part, root, download)
        meta["folder"] = str(folder)

    if split == "test":
        idx = np.arange(len(labels), dtype=np.int64)
    else:
        vs = info.default_val_size if val_size is None else int(val_size)
        if split == "val" and vs == 0:
            raise DatasetError("split 'val' needs val_size > 0")
        train_idx, val_idx = split_indices(len(labels), vs, val_seed)
        idx = val_idx if split == "val" else train_idx
        meta.update(val_size=vs, val_seed=val_seed)

    return ImageDataset(
        images=_to_float(images, idx),
        labels=torch.from_numpy(np.ascontiguousarray(labels[idx], dtype=np.int64)),
        info=info,
        split=split,
        indices=torch.from_numpy(idx),
        meta=meta,
    )


def subset(ds: ImageDataset, n: int, seed: int = 0, stratified: bool = False,
           first_n: bool = False) -> ImageDataset:
    """Fixed evaluation subset of ``n`` images of ``ds``.

    ``first_n=True``: the first ``n`` images in the split's order (published numbers are
    usually on the first n test images; ``seed`` and ``stratified`` are then unused).
    Otherwise the first ``n`` of a seeded permutation (``seed``); with ``stratified=True`` the permutation
    is reordered round-robin over classes, so class counts differ by at most one (where the
    classes have enough images).  Indices are kept in original order; for one seed a smaller
    subset is contained in a larger one.
    """
    total = len(ds)
    if not 0 < int(n) <= total:
        raise DatasetError(f"subset size must be in 1..{total} for {ds!r}, got {n}")
    if first_n:
        meta = {**ds.meta, "subset_n": int(n), "subset_first_n": True}
        assert ds.indices is not None
        return ImageDataset(ds.images[:int(n)], ds.labels[:int(n)], ds.info, ds.split,
                            ds.indices[:int(n)], meta)
    perm = np.random.default_rng(seed).permutation(total)
    if stratified:
        lab = ds.labels.numpy()[perm]
        k = int(lab.max()) + 1
        onehot = lab[:, None] == np.arange(k)[None, :]
        rank = np.cumsum(onehot, axis=0)[np.arange(total), lab] - 1  # occurrence number in class
        perm = perm[np.lexsort((np.arange(total), rank))]
    sel = torch.from_numpy(np.sort(perm[: int(n)]).astype(np.int64))
    meta = {**ds.meta, "subset_n": int(n), "subset_seed": seed, "subset_stratified": stratified}
    assert ds.indices is not None
    return ImageDataset(
        ds.images[sel], ds.labels[sel], ds.info, ds.split, ds.indices[sel], meta
    )


def augment_batch(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding ``pad`` (+ random horizontal flip if ``flip``).

    ``x``: ``(N, C, H, W)``; returns a new tensor of the same shape and value range.  Each image
    gets its own offset in ``[0, 2*pad]`` per axis and its own flip coin from ``generator``.
    """
    n, _, h, w = x.shape
    if pad > 0:
        c = x.shape[1]
        hp, wp = h + 2 * pad, w + 2 * pad
        padded = F.pad(x, (pad, pad, pad, pad)).reshape(n, c, hp * wp)
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        # Flat index of every output pixel in its padded image, shared by all channels; one
        # gather is ~4x faster on CPU than advanced indexing or a loop over offsets.
        rows = oy[:, None, None] + torch.arange(h)[None, :, None]  # (n, h, 1)
        cols = ox[:, None, None] + torch.arange(w)[None, None, :]  # (n, 1, w)
        flat = (rows * wp + cols).reshape(n, 1, h * w).expand(n, c, h * w)
        x = padded.gather(2, flat).reshape(n, c, h, w)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class _SeededBatchSampler(Sampler):
    """Yields ``(indices, batch_seed)``; all randomness comes from one seeded generator.

    Drawing each batch's augmentation seed here (main process) keeps results identical for any
    ``num_workers``; consecutive epochs differ because the generator advances.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start: start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield idx, int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1


class _BatchView(Dataset):
    def __init__(self, ds: ImageDataset, augment: bool):
        self.ds, self.augment = ds, augment

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, batch_seed = item
        x, y = self.ds.images[idx], self.ds.labels[idx]
        if self.augment:
            g = torch.Generator().manual_seed(batch_seed)
            x = augment_batch(x, self.ds.info.augment_pad, self.ds.info.augment_flip, g)
        return x, y


def _identity(batch: Any) -> Any:
    return batch


def make_loader(
    ds: ImageDataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    *,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Deterministic :class:`~torch.utils.data.DataLoader` over ``ds``.

    Yields ``(images float32 (B, C, H, W) in [0, 1], labels int64 (B,))``.  Batches are sliced
    from the in-memory tensors (no per-sample collation).  Order and augmentation depend only on
    ``seed``: two loaders built with the same arguments yield identical batches.
    ``augment=True`` applies the dataset's train-time policy (:attr:`DatasetInfo.augment_pad`,
    :attr:`DatasetInfo.augment_flip`: crop pad 4 + flip for CIFAR-10, crop pad 2 for 28x28).
    """
    if int(batch_size) < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    sampler = _SeededBatchSampler(len(ds), int(batch_size), shuffle, drop_last, seed)
    return DataLoader(
        _BatchView(ds, augment),
        sampler=sampler,
        batch_size=None,  # the sampler already yields whole batches
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
