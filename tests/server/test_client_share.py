"""Each client address gets a share of the connection bound (issue 25, item 6): one address
holding many silent sockets cannot keep another out."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.servers import LiveServer

# many requests or sockets at once: the slow lane
pytestmark = pytest.mark.load


def test_one_address_with_many_silent_sockets_does_not_keep_another_out():
    live = LiveServer(BROADPROP_MAX_CONNECTIONS="20")
    held: list[socket.socket] = []
    try:
        for _ in range(30):  # more than the whole bound, from 127.0.0.2, saying nothing
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", live.port))
            held.append(s)
        time.sleep(0.5)  # the server has accepted (and dropped) what it will
        answered = 0
        for _ in range(5):
            conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
            try:
                body = json.dumps({"batch": 2, "in_features": 2, "hidden": [2]})
                conn.request("POST", "/api/run", body, {"Content-Type": "application/json"})
                answered += conn.getresponse().status == 200
            except OSError:
                pass
            finally:
                conn.close()
        assert answered == 5
        # 127.0.0.2 kept at most half the bound
        open_ = 0
        for s in held:
            s.setblocking(False)
            try:
                open_ += s.recv(1) != b""
            except BlockingIOError:
                open_ += 1  # nothing to read: still open
            except OSError:
                pass
        assert open_ <= 10
    finally:
        for s in held:
            s.close()
        live.stop()
