"""What a sandbox worker does for a program, as plain functions: decode and validate a body,
dry-run it (the estimates' 422 at the line), run it, prepare and step a training. Each raises
Refused for what the learner must change; the worker (worker.py) turns results and refusals
into messages."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from app.lab.statements import ProgramError
from app.ops.cancel import cancel_token
from app.programs import run as programs
from app.programs import train as training
from app.programs.admission import admit_program, refuse_program
from app.programs.outcome import Outcome, outcome_of_payload, rerun_payload
from app.programs.schemas import ProgramRequest, ProgramTrainRequest
from app.refusal import Refused
from app.settings import Settings


def decode(body: bytes, model: type[BaseModel]) -> Any:
    """`body` as `model`, or Refused with the errors FastAPI gives a body it cannot use: the
    same types and locations (["body", ...]), so a client sees no difference."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        raise Refused(
            [_json_invalid(["body", e.pos], "JSON decode error", {"error": e.msg})]
        ) from None
    except UnicodeDecodeError:
        raise Refused([_json_invalid(["body"], "JSON decode error: not UTF-8")]) from None
    except RecursionError:
        raise Refused([_json_invalid(["body"], "JSON decode error: nested too deeply")]) from None
    except ValueError as e:  # an integer with more digits than Python parses
        why = "an integer with too many digits" if "digits" in str(e) else "invalid"
        raise Refused([_json_invalid(["body"], f"JSON decode error: {why}")]) from None
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise Refused([_body_error(err) for err in e.errors(include_url=False)]) from None


def _json_invalid(loc: list, msg: str, ctx: dict | None = None) -> dict:
    error = {"type": "json_invalid", "loc": loc, "msg": msg, "input": {}}
    return {**error, "ctx": ctx} if ctx else error


def _body_error(error: dict) -> dict:
    """A pydantic error as FastAPI words it (under "body"), with a context that pickles and
    encodes (an exception in `ctx` becomes its text)."""
    out = {**error, "loc": ("body", *error["loc"])}
    if "ctx" in error:
        out["ctx"] = {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                      for k, v in error["ctx"].items()}  # fmt: skip
    return out


@dataclass(frozen=True)
class Admitted:
    """A program that passed its dry run, and what the run is estimated to take."""

    request: ProgramRequest
    plan: programs.Plan
    seconds: float
    bytes: int


def admit(body: bytes, settings: Settings, cancel: Any) -> Admitted:
    """Decode, validate and dry-run a POST /api/program body, under `cancel` (its deadline):
    whatever the program's length, its dry run is stopped at the deadline."""
    request = decode(body, ProgramRequest)
    with cancel_token(cancel):
        plan = admit_program(request, settings)
    return Admitted(request, plan, plan.seconds, plan.bytes)


def run(admitted: Admitted, cancel: Any,
        rerun_beside: Callable[[], Outcome | None] | None = None) -> bytes:  # fmt: skip
    """The program's answer, as the JSON bytes the route sends. `rerun_beside`: its float64
    rerun, made by another worker (None from it: rerun here)."""
    try:
        answer = programs.run(admitted.request, admitted.plan, cancel, rerun_beside)
    except ProgramError as err:  # the forward failed on real data (an index out of range)
        refuse_program(programs.ProgramRefused("forward", err.line, str(err), err.kind))
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def rerun(body: bytes, settings: Settings, cancel: Any, max_seconds: float) -> bytes | None:
    """A program's float64 rerun, for the worker that runs it (`rerun_payload`); None where it
    is not wanted (no float64 rerun in the plan, or a run estimated over `max_seconds`) or
    cannot travel (that worker then reruns itself)."""
    admitted = admit(body, settings, cancel)
    if not admitted.plan.rerun or admitted.seconds > max_seconds:
        return None
    try:
        outcome = programs.execute_float64(admitted.request, admitted.plan, cancel)
    except ProgramError:  # the forward fails on real data: the run says so, at its line
        return None
    return rerun_payload(outcome)


def rerun_outcome(payload: bytes | None) -> Outcome | None:
    return None if payload is None else outcome_of_payload(payload)


def prepare_training(body: bytes, settings: Settings, cancel: Any) -> training.Setup:
    """Decode, validate and dry-run a POST /api/program/train body (every plan the training
    needs): a 422 at the line before the stream starts."""
    request = decode(body, ProgramTrainRequest)
    with cancel_token(cancel):
        return training.prepare(
            request.program,
            steps=request.steps,
            batch=request.batch,
            lr=request.lr,
            seed=request.seed,
            eval_every=request.eval_every,
            report_every=request.report_every,
            admit=lambda req: admit_program(req, settings),
        )


def training_events(
    setup: training.Setup, should_stop: Callable[[], bool], time_limit_s: float
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The training's events; a failure after the stream started is an `error` event."""
    try:
        yield from training.train(setup, should_stop, time_limit_s)
    except MemoryError:
        raise  # the worker says it in the learner's terms
    except Exception as e:  # the stream has started: an event, never a lost stream
        yield "error", {"detail": f"training failed: {type(e).__name__}: {e}"}
