"""What a dry run's lines add up to, as it goes (app/programs/plan.py `admit`): the seconds of
work and the bytes held, line by line, loops counted in full, and the refusal (a 422 at the
line) once either passes its limit."""

from __future__ import annotations

from typing import Any

from app.cost.work import OP_S, _elementwise_s, _matmul_s
from app.lab import formulas
from app.lab.statements import Executed
from app.ops.traced import Step


class ProgramRefused(Exception):
    """A 422 at `["body", which, line]` (app/api/program.py raises it as FastAPI's own)."""

    def __init__(self, which: str, line: int | None, message: str, kind: str, **ctx: Any):
        super().__init__(message)
        self.which, self.line, self.kind, self.ctx = which, line, kind, ctx


class DryCost:
    """Seconds and bytes, step by step, as the dry run goes (loops counted in full). In the
    forward every run of a line keeps its result (autograd saves it); in the backward a
    rebound name frees the old value, so a loop's line keeps one; a list keeps all it holds."""

    def __init__(
        self, itemsize: int, seconds_limit: float, bytes_limit: int, which: str, budget: int = 0
    ):
        self.itemsize, self.seconds_limit, self.bytes_limit = itemsize, seconds_limit, bytes_limit
        self.which = which
        self.budget = max(budget, bytes_limit)  # the whole budget: bytes_limit is what it leaves
        self.seconds = 0.0
        self.peak_temp = 0
        self.kept = 0
        # a step's content -> what it adds (`_of`): a loop's line makes the same steps anew
        # every iteration, each read once as the trace's dict
        self._costs: dict[tuple, tuple[float | None, float, int, int, int]] = {}

    def _of(self, step: Step) -> tuple[float | None, float, int, int, int]:
        """(matmul seconds or None, elementwise seconds, temporary bytes, bytes a list's
        append keeps, bytes its result keeps) of one step, read from its dict as the trace
        shows it: by content (every field the dict's reading looks at), so a step like one
        seen before is read once."""
        key = (step.action, step.op, tuple(step.inputs), step.output, step.bytes)
        if step.detail:
            key += tuple(map(step.detail.get, _COST_FIELDS, _ABSENT))
        try:
            cost = self._costs.get(key)
        except TypeError:  # an unhashable field: read it every time
            return self._read(step)
        if cost is None:
            cost = self._costs[key] = self._read(step)
        return cost

    def _read(self, step: Step) -> tuple[float | None, float, int, int, int]:
        d = step.as_dict()
        flops = formulas.step_flops(d)
        matmul_s = _matmul_s(flops, self.itemsize) if flops else None
        elementwise_s = _elementwise_s(formulas.step_work(d) * self.itemsize)
        made = not formulas.is_view(d) and d["action"] != "write"
        temp = d["bytes"] + d.get("temp_bytes", 0) if made else 0
        return matmul_s, elementwise_s, temp, d.get("keeps", 0), d["bytes"] if made else 0

    def add(self, entry: Executed, steps: list[Step]) -> None:
        temp = 0
        keeps = self.which != "forward"  # (the forward keeps every result already)
        seconds = self.seconds
        for step in steps:
            matmul_s, elementwise_s, step_temp, step_keeps, _ = self._of(step)
            if matmul_s is not None:  # matmuls and einsums at the BLAS rate, as the built-ins
                seconds += matmul_s
            seconds += elementwise_s
            seconds += OP_S
            temp += step_temp
            if keeps:
                self.kept += step_keeps  # a list's append keeps what it holds
        self.seconds = seconds
        self.peak_temp = max(self.peak_temp, temp)
        if (entry.runs == 1 or self.which == "forward") and steps:
            self.kept += self._of(steps[-1])[4]
        if self.seconds > self.seconds_limit:
            raise ProgramRefused(
                self.which,
                entry.line,
                f"line {entry.line} (`{entry.code}`): the {self.which} would take about "
                f"{self.seconds:.1f} s of work by here, over the limit of "
                f"{self.seconds_limit:.1f} s (loops are counted in full): shrink the shapes, "
                "or write a loop as one tensor operation",
                "work",
                seconds=self.seconds,
                limit_s=self.seconds_limit,
            )
        if self.kept + self.peak_temp > self.bytes_limit:
            raise ProgramRefused(
                self.which,
                entry.line,
                f"line {entry.line} (`{entry.code}`): the {self.which}'s tensors would take "
                f"{mib(self.kept + self.peak_temp)} by here, over "
                + (
                    f"the server's memory budget of {mib(self.bytes_limit)} per run"
                    if self.bytes_limit >= self.budget
                    else f"the {mib(max(self.bytes_limit, 0))} that the server's memory "
                    f"budget of {mib(self.budget)} per run leaves beside the inputs and "
                    "what autograd keeps"
                ),
                "budget",
                bytes=self.kept + self.peak_temp,
                budget_bytes=self.bytes_limit,
            )


# the detail fields a step's cost reads, and those that would stand in for its own fields
# (its dict is its fields updated by its detail)
_COST_FIELDS = ("view", "temp_bytes", "keeps", "flops", "index_product",
                "action", "op", "inputs", "output", "bytes")  # fmt: skip
_ABSENT = (object(),) * len(_COST_FIELDS)  # (a field set to None is not one left out)


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"
