"""torch's own C++ meta kernels for the dry runs, where torch has them.

A dry run computes every formula on meta tensors (shapes, dtypes and bytes, no numbers).
`import torch` registers Python meta functions (torch/_meta_registrations.py, for symbolic
shapes and torch.compile) over the C++ meta kernels of hundreds of ops, and they cost: a
broadcast multiply takes 160 us on meta through Python against 3.4 us in C++, an add 40x more,
the first call of one imports torch._dynamo and sympy (~85 MB and ~1 s for a process that
never compiles anything). `use_native` takes those Python registrations back wherever a C++
meta kernel is there to answer, and keeps them for the ops that have none.

Called by the processes Broadprop owns (the server, its sandbox workers, the test suite), never
in a learner's notebook kernel, whose torch stays as the learner has it.
"""

from __future__ import annotations

import threading

import torch

_done = False
_lock = threading.Lock()
_kept: list[torch.library.Library] = []  # the Python meta functions kept, alive for good


def use_native() -> bool:
    """Once per process: C++ meta kernels where torch has them. True if it changed anything
    (False when already done, or when this torch lays its meta registrations out otherwise)."""
    global _done
    with _lock:
        if _done:
            return False
        _done = True
        try:
            from torch import _meta_registrations as registrations
            from torch._decomp import global_decomposition_table

            library = registrations._meta_lib_dont_use_me_use_register_meta
        except (ImportError, AttributeError):
            return False
        registered = _python_meta_functions(global_decomposition_table)
        library._destroy()  # every aten Python meta function over the Meta key, at once
        keep = torch.library.Library("aten", "IMPL", "Meta")
        for op, fn in registered.items():
            native = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")
            if not native and op.name() not in COMPOSITE_ON_META:
                keep.impl(op, fn)  # no C++ meta kernel: the Python one stays
        _kept.append(keep)
        return True


def _python_meta_functions(table) -> dict:
    """The aten ops torch/_meta_registrations.py's activate_meta gave a Python meta function
    over the Meta key, with that function: the same choice, made again."""
    chosen: dict = {}
    for kind in ("meta", "post_autograd", "pre_autograd"):
        for op, fn in table[kind].items():
            chosen.setdefault(op, fn)
    registered = {}
    for op, fn in chosen.items():
        if not isinstance(op, torch._ops.OpOverload) or op.is_view:
            continue
        name = op.name()
        if not name.startswith("aten::") or name in _NEVER_REGISTERED:
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd"):
            continue
        registered[op] = fn
    return registered


# activate_meta's own exceptions: ops it leaves to C++
_NEVER_REGISTERED = {
    "aten::empty_strided",
    "aten::clone",
    "aten::_to_copy",
    "aten::copy_",
    "aten::constant_pad_nd",
    "aten::rot90",
    "aten::as_strided_scatter",
}


# Ops with no meta kernel of their own whose C++ composite kernel answers on meta through ops
# that have one (tests/ops/test_meta_kernels.py holds each to the CPU's shape and dtype).
# Others, such as `where`, `relu`, `abs`, `var` or `im2col`, raise NotImplementedError on meta
# without their Python meta function, so theirs stays.
COMPOSITE_ON_META = {
    "aten::_unsafe_index_put",
    "aten::_unsafe_view",
    "aten::arange",
    "aten::arange.start_step",
    "aten::empty_like",
    "aten::eye",
    "aten::full",
    "aten::index_put",
    "aten::index_put_",
    "aten::masked_fill.Scalar",
    "aten::mean",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::new_zeros",
    "aten::ones_like",
    "aten::scalar_tensor",
    "aten::select_backward",
    "aten::select_scatter",
    "aten::stack",
    "aten::sum",
    "aten::zeros",
    "aten::zeros_like",
}
