"""`%load_ext broadprop`: the cell magic `%%backward` (the cell is a backward text, checked
against the kernel's tensors and their `.grad`) and its display bundle:

- application/vnd.jupyter.widget-view+json: the widget (app/notebook/widget.py);
- text/html: the same as a static page (app/notebook/html.py), for where no widget draws;
- text/plain: the verdict and what differs;
- application/vnd.broadprop.check+json: the check as POST /api/program answers it.
"""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from app.notebook import html
from app.notebook.check import Report, check

MIME = "application/vnd.broadprop.check+json"


def bundle(report: Report, loss: str = "loss", widget: bool = True) -> dict[str, Any]:
    """The cell's one display bundle."""
    notes = [report.refused] if report.refused else report.missing_lines(loss)
    answer = report.json()
    data: dict[str, Any] = {
        "text/plain": html.plain(report.answer, notes),
        "text/html": html.page(report.answer, notes),
        MIME: answer,
    }
    if widget:
        from app.notebook.widget import CheckWidget

        view = CheckWidget(answer=answer if report.answer else {}, notes=notes)
        shown = view._repr_mimebundle_()
        shown = shown[0] if isinstance(shown, tuple) else shown
        data.update({k: v for k, v in shown.items() if k != "text/plain"})
    return data


@magics_class
class BroadpropMagics(Magics):
    @magic_arguments()
    @argument("--loss", default="loss", help="the kernel's name for the scalar loss")
    @argument("--no-widget", action="store_true", help="only the static HTML and the JSON")
    @cell_magic
    def backward(self, line: str, cell: str) -> None:
        """Check the cell, a backward text, against the kernel's tensors' .grad."""
        args = parse_argstring(self.backward, line)
        ns = self.shell.user_ns
        report = check(cell, ns, loss=args.loss)
        for name, value in report.written.items():  # what the cell wrote stays in the kernel
            if name.endswith(".g") and name[:-2] in ns:
                ns[name[:-2]].g = value
            else:
                ns[name] = value
        ns["_broadprop"] = report  # the last check, for a test in the notebook
        display(bundle(report, args.loss, widget=not args.no_widget), raw=True)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(BroadpropMagics)
