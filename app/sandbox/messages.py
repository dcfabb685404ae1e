"""Messages between the server and a sandbox worker, in multiprocessing's framing (a 4-byte
size, then the pickle), so that `Connection.send` and `Connection.recv` still read and write
them; and what multiprocessing does in more steps, done in one:

- `send_with_handle`: a message and a file descriptor in one write (SCM_RIGHTS on its first
  byte). `Connection.send` then `reduction.send_handle` wrote twice and woke the worker
  twice; on a 2-core machine each wake-up may take the server's core for a while (the
  server's two sends of a program's job measured 1.1 ms of its loop's time per request).
- `receive_with_handles`: a worker reads each message so, keeping what descriptors came with
  it (a plain read would close them).
- `receive_on_loop`: the server reads a worker's reply on its event loop, with no thread.

The worker is our own process, and the sizes it sends are read as they come: a message is
read into a buffer of its announced size, never parsed before it is whole."""

from __future__ import annotations

import array
import os
import pickle
import select
import socket
import struct
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import anyio

MAX_HANDLES = 4  # descriptors one message may bring (a job brings one: its rerun pipe's end)


def _framed(message: tuple) -> bytes:
    payload = bytes(ForkingPickler.dumps(message))
    if len(payload) > 0x7FFFFFFF:  # (multiprocessing's framing for over 2 GiB)
        return struct.pack("!iQ", -1, len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


def send_with_handle(conn: Connection, message: tuple, handle: int) -> None:
    """`message` and a duplicate of descriptor `handle` for the process at the other end, in
    one write (the rest of a long message follows in more). OSError if it cannot be sent."""
    data = _framed(message)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [handle]))]
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sent = sock.sendmsg([data], rights)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])


def receive_with_handles(conn: Connection) -> tuple[tuple, list[int]]:
    """The next message on `conn` (blocking) and the descriptors that came with it. EOFError
    when the other end has closed."""
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        handles: list[int] = []
        header = bytearray()
        while len(header) < 4:
            data, ancillary, _, _ = sock.recvmsg(4 - len(header), socket.CMSG_SPACE(
                MAX_HANDLES * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC)  # fmt: skip
            handles.extend(_handles_in(ancillary))
            if not data:
                _close_all(handles)
                raise EOFError
            header += data
        (size,) = struct.unpack("!i", header)
        if size == -1:
            (size,) = struct.unpack("!Q", _read_blocking(sock, 8))
        return pickle.loads(_read_blocking(sock, size)), handles


def _handles_in(ancillary: list) -> list[int]:
    found = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            found.frombytes(data[: len(data) - len(data) % found.itemsize])
    return list(found)


def _close_all(handles: list[int]) -> None:
    for handle in handles:
        os.close(handle)


def _read_blocking(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        read = sock.recv_into(view[got:])
        if read == 0:
            raise EOFError
        got += read
    return buffer


async def receive_on_loop(conn: Connection) -> tuple:
    """The next message on `conn`, read on the event loop: it waits for the socket to be
    readable and takes what is there, so it never blocks the loop. A wait cut short (a
    timeout, a cancellation) may leave part of a message unread: that worker must not be
    read again (the edge kills or discards a worker cut off mid-reply). EOFError when the
    other end has closed."""
    fd = conn.fileno()
    header = await _read_on_loop(fd, 4)
    (size,) = struct.unpack("!i", header)
    if size == -1:
        (size,) = struct.unpack("!Q", await _read_on_loop(fd, 8))
    return pickle.loads(await _read_on_loop(fd, size))


def _readable_now(fd: int) -> bool:
    poller = select.poll()  # (not select.select: it refuses descriptors past 1023)
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _read_on_loop(fd: int, n: int) -> bytearray:
    """`n` bytes from `fd` (a blocking socket): each read only once the loop has seen it
    readable (or `select` says it is now), so the read takes what is there."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        if not _readable_now(fd):
            await anyio.wait_readable(fd)
        read = os.readv(fd, [view[got:]])
        if read == 0:
            raise EOFError
        got += read
    return buffer
