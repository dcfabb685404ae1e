"""`%load_ext broadprop`: the cell magics `%%backward` (the cell is a backward text, checked
against the kernel's tensors and their `.grad`) and `%%forward` (the cell is a forward text,
run through Broadprop's interpreter: app/notebook/forward.py), and their display bundle:

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
from app.notebook.forward import Forward, ForwardFailed, run_forward

MIME = "application/vnd.broadprop.check+json"
FORWARD = "_broadprop_forward"  # the kernel's name for what the last %%forward ran


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
        data.update(_widget(answer if report.answer else {}, notes))
    return data


def forward_bundle(forward: Forward, namespace: dict[str, Any], widget: bool = True) -> dict:
    """A %%forward cell's bundle: its lines and shapes (the widget draws the shape flow)."""
    answer = forward.answer(namespace)
    data: dict[str, Any] = {
        "text/plain": html.forward_plain(answer),
        "text/html": html.forward_page(answer),
        MIME: answer,
    }
    if widget:
        data.update(_widget(answer, []))
    return data


def _widget(answer: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    from app.notebook.widget import CheckWidget

    shown = CheckWidget(answer=answer, notes=notes)._repr_mimebundle_()
    shown = shown[0] if isinstance(shown, tuple) else shown
    return {k: v for k, v in shown.items() if k != "text/plain"}


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
        forward = ns.get(FORWARD)
        report = check(cell, ns, loss=args.loss, forward=forward)
        for name, value in report.written.items():  # what the cell wrote stays in the kernel
            if name.endswith(".g") and name[:-2] in ns:
                ns[name[:-2]].g = value
            else:
                ns[name] = value
        ns["_broadprop"] = report  # the last check, for a test in the notebook
        display(bundle(report, args.loss, widget=not args.no_widget), raw=True)

    @magic_arguments()
    @argument("--loss", default="loss", help="the name the cell gives the scalar loss")
    @argument(
        "--grad",
        default=None,
        help="the inputs that get a gradient, comma-separated "
        "(default: those that require one, else every float tensor the cell reads)",
    )
    @argument("--no-widget", action="store_true", help="only the static HTML and the JSON")
    @cell_magic
    def forward(self, line: str, cell: str) -> None:
        """Run the cell, a forward text, through Broadprop: every tensor it names keeps its
        gradient, `loss.backward()` runs, the names stay in the kernel."""
        args = parse_argstring(self.forward, line)
        ns = self.shell.user_ns
        try:
            grad = [n.strip() for n in args.grad.split(",") if n.strip()] if args.grad else None
            forward = run_forward(cell, ns, loss=args.loss, grad=grad)
        except ForwardFailed as err:  # one line, never a traceback
            ns.pop(FORWARD, None)
            display({"text/plain": f"Broadprop forward: {err}",
                     "text/html": html.page(None, [str(err)])}, raw=True)  # fmt: skip
            return
        ns[FORWARD] = forward
        display(forward_bundle(forward, ns, widget=not args.no_widget), raw=True)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(BroadpropMagics)
