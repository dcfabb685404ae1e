"""The sandbox's messages (app/sandbox/messages.py): multiprocessing's framing, a descriptor
in the same write as its message, and replies read on the event loop."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import anyio
import pytest

from app.sandbox import messages
from app.sandbox.pool import Worker, WorkerLate, WorkerLost


@pytest.fixture
def ends():
    server, worker = multiprocessing.Pipe(duplex=True)
    yield server, worker
    server.close()
    worker.close()


def test_a_message_and_its_descriptor_arrive_together(ends):
    server, worker = ends
    read_end, write_end = os.pipe()
    try:
        messages.send_with_handle(server, ("rerun", b"{}", None, 0.25), write_end)
        message, handles = messages.receive_with_handles(worker)
        assert message == ("rerun", b"{}", None, 0.25) and len(handles) == 1
        os.write(handles[0], b"through the duplicate")  # the same pipe, another descriptor
        os.close(handles[0])
        assert os.read(read_end, 100) == b"through the duplicate"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_multiprocessings_own_messages_read_alike(ends):
    server, worker = ends
    server.send(("go", 2))  # (the edge still sends these with Connection.send)
    assert messages.receive_with_handles(worker) == (("go", 2), [])
    worker.send(("ok", b"x"))
    assert server.recv() == ("ok", b"x")


def test_a_long_message_with_a_descriptor_is_whole(ends):
    # a job's body may be 1 MiB, past the socket's buffer: the rest follows the first write
    server, worker = ends
    body = os.urandom(3 << 20)
    read_end, write_end = os.pipe()
    got: dict = {}
    reader = threading.Thread(target=lambda: got.update(m=messages.receive_with_handles(worker)))
    reader.start()
    try:
        messages.send_with_handle(server, ("program", body), read_end)
        reader.join(10)
        message, handles = got["m"]
        assert message == ("program", body) and len(handles) == 1
        os.close(handles[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_reply_is_read_on_the_loop_as_it_comes(ends):
    # a reply that comes in pieces: each read only once the loop saw the socket readable,
    # so the loop keeps running between the pieces (a blocking read would stop it)
    server, worker = ends
    answer = ("ok", os.urandom(1 << 20))
    framed = messages._framed(answer)
    ticks: list[int] = []

    def write_slowly() -> None:
        for start in range(0, len(framed), len(framed) // 8 + 1):
            os.write(worker.fileno(), framed[start : start + len(framed) // 8 + 1])
            time.sleep(0.02)

    async def main() -> tuple:
        async def tick() -> None:
            while True:
                ticks.append(1)
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as group:
            group.start_soon(tick)
            threading.Thread(target=write_slowly).start()
            reply = await messages.receive_on_loop(server)
            group.cancel_scope.cancel()
        return reply

    assert anyio.run(main) == answer
    assert len(ticks) > 20  # ~150 ms of pieces, the loop ticking every 2 ms meanwhile


@pytest.mark.parametrize("read", ["on the loop", "in the worker"])
def test_a_message_cut_short_is_an_eof(ends, read):
    server, worker = ends
    os.write(worker.fileno(), (1000).to_bytes(4, "big") + b"only part")
    worker.close()
    with pytest.raises(EOFError):
        if read == "on the loop":
            anyio.run(messages.receive_on_loop, server)
        else:
            messages.receive_with_handles(server)


def _replies(conn, how: str) -> None:
    """A worker's stand-in: half a reply, then silence or an exit."""
    os.write(conn.fileno(), (1000).to_bytes(4, "big") + b"half")
    if how == "exits":
        os._exit(0)
    time.sleep(60)


@pytest.mark.parametrize("how", ["goes silent", "exits"])
def test_a_worker_cut_off_mid_reply_is_ended(how):
    # a real process (forked: it only writes and sleeps) that sends half a reply: past the
    # timeout it is late, or lost once it exits; either way killed, its pipe closed
    context = multiprocessing.get_context("fork")
    worker = Worker.__new__(Worker)
    worker.conn, child = context.Pipe(duplex=True)
    worker.process = context.Process(target=_replies, args=(child, how), daemon=True)
    worker.process.start()
    child.close()
    worker._closing = threading.Lock()
    # (late, not lost: the child would exit only after a minute of silence)
    with pytest.raises(WorkerLate if how == "goes silent" else WorkerLost):
        anyio.run(worker.receive_on_loop, 0.5)
    assert not worker.alive and worker.conn.closed and worker.process.exitcode is not None
