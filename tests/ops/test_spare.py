"""A run's spare core (app/ops/spare.py): pieces side by side, the same answer bit for bit."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from app.ops import spare
from app.ops.cancel import CancelToken, RunCancelled, cancel_token, check_cancelled
from app.runs import pipeline
from app.schemas import RunRequest


def test_parts_fold_in_the_keys_order_whoever_made_them(with_spare):
    made_by: dict[int, str] = {}
    folded: list[int] = []

    def compute(k: int) -> int:
        made_by[k] = threading.current_thread().name
        time.sleep(0.002)  # both threads get turns
        return k

    spare.in_order(range(40), compute, folded.append, lambda: None)
    assert folded == list(range(40))
    assert len(set(made_by.values())) == 2, "the spare took no part"


def test_each_part_is_folded_by_the_thread_that_made_it_in_the_keys_order(with_spare):
    """No part crosses threads (what one thread allocates, it frees): the thread that made
    part k folds it, once part k - 1 is folded."""
    made_by: dict[int, int] = {}
    folds: list[tuple[int, int]] = []
    me = threading.get_ident()

    def compute(k: int) -> int:
        made_by[k] = threading.get_ident()
        time.sleep(0.004 if made_by[k] == me else 0.001)  # the spare runs faster
        return k

    spare.in_order(
        range(30), compute, lambda k: folds.append((k, threading.get_ident())), lambda: None
    )
    assert [k for k, _ in folds] == list(range(30))
    assert all(made_by[k] == thread for k, thread in folds)
    assert len(set(made_by.values())) == 2


@pytest.mark.parametrize("hold", [1, 4])
def test_a_thread_that_holds_parts_takes_more_when_the_other_is_slow(with_spare, hold):
    """One part held (the lockstep): each thread takes every other key, whatever their speed.
    A few held: the faster thread (here the spare, its core not shared) takes more keys;
    every part still folded in the keys' order, by the thread that made it."""
    made_by: dict[int, int] = {}
    folds: list[tuple[int, int]] = []
    me = threading.get_ident()

    def compute(k: int) -> int:
        made_by[k] = threading.get_ident()
        time.sleep(0.004 if made_by[k] == me else 0.001)
        return k

    fold = lambda k: folds.append((k, threading.get_ident()))  # noqa: E731
    spare.in_order(range(40), compute, fold, lambda: None, hold=hold)
    assert [k for k, _ in folds] == list(range(40))
    assert all(made_by[k] == thread for k, thread in folds)
    by_spare = sum(thread != me for thread in made_by.values()) / 40
    if hold == 1:
        assert by_spare <= 0.6, by_spare
    else:
        assert by_spare >= 0.65, by_spare


def test_a_part_that_fails_on_the_spare_raises_on_the_run_thread(with_spare):
    def compute(k: int) -> int:
        if threading.current_thread().name.startswith("test-spare"):
            raise ValueError(f"part {k}")
        time.sleep(0.005)
        return k

    with pytest.raises(ValueError, match="part"):
        spare.in_order(range(20), compute, lambda _: None, lambda: None)


def test_without_a_spare_everything_is_computed_here():
    names = set()
    spare.in_order(
        range(5), lambda k: names.add(threading.current_thread().name), lambda _: None, lambda: None
    )
    assert names == {threading.current_thread().name}
    assert spare.alongside(lambda a, b: a + b, 2, 3).result() == 5


def test_the_spare_sees_the_token_as_a_flag_and_lends_its_cpu_time(with_spare):
    token = CancelToken()
    token.arm(0.05)
    token.is_set()  # this thread polls first: the deadline's clock is this thread's

    def busy() -> bool:
        end = time.thread_time() + 0.1
        while time.thread_time() < end:
            pass
        check_cancelled()  # a flag read only: never the spare's own clock
        return True

    with cancel_token(token):
        assert spare.alongside(busy).result()
    assert not token.was_set()
    assert token.is_set(), "0.1 s lent by the spare did not count toward a 0.05 s deadline"
    assert token.reason == "deadline"


def test_a_set_token_stops_the_spares_parts(with_spare):
    token = CancelToken()
    made = []

    def compute(k: int) -> int:
        made.append(k)
        if k == 3:
            token.set("disconnect")
        check_cancelled()
        return k

    def check() -> None:
        if token.is_set():
            raise RunCancelled("stopped")

    with cancel_token(token), pytest.raises(RunCancelled):
        spare.in_order(range(200), compute, lambda _: None, check)
    assert len(made) < 20


@pytest.mark.parametrize("body", [{}, {"batch": 64, "hidden": [30, 20]}, {"dtype": "float64"}])
def test_a_run_with_a_spare_answers_the_same_whether_it_is_free_or_busy(body):
    """The broadcast's chunks split between two threads and autograd's reference beside the
    backward: every gradient and check figure the same, bit for bit, whether the spare takes
    half the chunks or joins late (busy with something else first); and the same gradients as
    a run without a spare (whose chunks are cut at the whole cap) within float rounding."""
    cfg = RunRequest(**body)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small lane's run: one torch thread on either side
    helper = spare.Spare("run-spare")
    try:
        alone = pipeline.run(cfg, 1 << 20)
        spare.attach(helper)
        free = pipeline.run(cfg, 1 << 20)
        helper.submit(time.sleep, 0.05)  # busy when the run starts: it joins late
        late = pipeline.run(cfg, 1 << 20)
    finally:
        spare.attach(None)
        torch.set_num_threads(threads)
    for name, view in free["gradients"].items():
        other = late["gradients"][name]
        assert view["stats"] == other["stats"], name
        assert view["heatmap"]["z"].tobytes() == other["heatmap"]["z"].tobytes(), name
        assert view["stats"] == pytest.approx(alone["gradients"][name]["stats"], rel=1e-5), name
    for name, row in free["check"]["tensors"].items():
        assert row["max_abs_err"] == late["check"]["tensors"][name]["max_abs_err"], name
        assert row["allclose"] is True and alone["check"]["tensors"][name]["allclose"], name
