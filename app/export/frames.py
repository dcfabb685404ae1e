"""The functions an exported file wraps around lines it is given: real code, carried by its
source (app/export/lines.py `framed`), so that no function of the file is Python kept in a
string.

A frame has marks where its file's own lines go: a statement that is a mark alone (`FORWARD`)
is replaced by lines (the learner's, or the run's traced statements), a mark inside a
statement (`LOSS.backward()`) by an expression or a literal. The lines are data to the frame:
they are laid out, never run here.
"""

import sys

import torch

from app.export.witness import _skip, _stopped, _written

# The marks, defined so that the frames import and lint as code; `framed` replaces every one,
# so the file never sees them.
SEED = INPUTS = LEAVES = FORWARD = RETAIN = LOSS = AUTOGRAD = DETACH = BACKWARD = WRITTEN = None
TENSORS = MANUAL_PASS = GRADIENTS = None
MARKS = ("SEED", "INPUTS", "LEAVES", "FORWARD", "RETAIN", "LOSS", "AUTOGRAD", "DETACH",
         "BACKWARD", "WRITTEN", "TENSORS", "MANUAL_PASS", "GRADIENTS")  # fmt: skip


# --------------------------------------------------------------------------- a program's file


def program(DTYPE):
    """Inputs, forward, autograd and your backward, in precision DTYPE."""
    torch.set_default_dtype(torch.float32)  # the inputs are drawn as the server draws them
    g = torch.Generator().manual_seed(SEED)
    INPUTS
    LEAVES
    # tensors the program makes take the run's dtype, and its draws (torch.rand, randn,
    # F.dropout) continue the inputs' generator, as on the server
    torch.set_default_dtype(DTYPE)
    torch.set_rng_state(g.get_state())
    torch.set_grad_enabled(True)
    # ---- your forward
    FORWARD
    RETAIN
    LOSS.backward()
    autograd = AUTOGRAD
    # ---- your backward: no autograd, on detached copies
    torch.set_grad_enabled(False)
    DETACH
    cmp = _skip  # a notebook's own check lines: the check below covers them
    first = sys._getframe().f_lineno + 2  # the line of your backward's line 1
    try:
        BACKWARD
    except Exception as error:  # as on the server: the lines before it are checked
        _stopped(error, first)
    manual = _written(locals(), WRITTEN)
    return LOSS.item(), manual, autograd


# --------------------------------------------------------------------------- a run's file


def manual_gradients(TENSORS):
    """The forward and backward statements above, again, as a function: the rounding
    recheck runs them on the tensors in the other precision."""
    MANUAL_PASS
    return GRADIENTS
