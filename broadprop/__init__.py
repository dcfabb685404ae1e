"""Broadprop in a notebook or a script.

    %load_ext broadprop        # then `%%backward` on top of a backward cell
    from broadprop import check
    report = check(backward_text, globals()); assert report.all_close

The notebook edge lives in app/notebook; this package is the name a learner types.
"""

from app.notebook.check import Report, check

__all__ = ["Report", "check", "load_ipython_extension"]


def load_ipython_extension(ipython):  # noqa: ANN001, ANN201  (IPython's hook)
    from app.notebook.magics import load_ipython_extension as load

    load(ipython)
