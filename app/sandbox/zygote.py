"""Imported by the sandbox's forkserver only (its preload): torch, the interpreter and their
first-call costs (about a second of CPU), paid once there, so that every worker forked from it
starts warm in milliseconds.

On one thread: no OpenMP thread team exists in the forkserver, so a worker forked from it may
start its own (a fork after a team has started can hang in the child)."""

import torch

torch.set_num_threads(1)

from app.ops import meta_kernels  # noqa: E402  (after the thread count)
from app.sandbox import worker  # noqa: E402

meta_kernels.use_native()  # the dry runs on C++ meta kernels (app/ops/meta_kernels.py)

worker.warm_up()
