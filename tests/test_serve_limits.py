"""`dgm-scale serve` under load and abuse (dgm_scale/serve/limits.py): a silent connection is
closed after the timeout and blocks nobody; connections beyond the thread bound and sample
requests beyond the queue get a one-line 503 with Retry-After and the server serves on; a body,
an overlong URL or request line, too many headers, another method get one-line 4xx / 501.
Everything on 127.0.0.1 with a stand-in model, each wait bounded."""
import socket
import threading
import time
from typing import ClassVar
from urllib.parse import urlsplit

import numpy as np
import pytest
from helpers import get, response, running

from dgm_scale.config import ConfigError
from dgm_scale.serve import Limits

WAIT = 30  # seconds: the longest any step may wait before the test fails instead of hanging
TIMEOUT = 2.0  # seconds: the server's --timeout where a test waits for it (room for a slow machine)


class Gated:
    """A stand-in model that generates only while its gate is open (grey images)."""

    meta: ClassVar[dict] = {"name": "gated", "family": "gan", "modality": "images", "num_classes": 0,
                            "sample_shape": [1, 8, 8], "latent_dim": 8, "options": {}, "iteration": 0}

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()

    def images(self, seed, num, label=None, **options):
        assert self.gate.wait(WAIT)
        return np.full((num, 8, 8, 1), 128, np.uint8)


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def still_open(sock: socket.socket) -> bool:
    """True while the server has neither closed nor answered `sock` (nothing to read yet)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def closed_by_server(sock: socket.socket) -> float:
    """Seconds until the server closes `sock` without a word (recv gives b'')."""
    start = time.monotonic()
    sock.settimeout(WAIT)
    assert sock.recv(1024) == b""
    return time.monotonic() - start


def assert_busy(status: int, headers, body: bytes, limit: str) -> None:
    assert status == 503 and headers["Retry-After"] == "1", (status, body)
    text = body.decode()
    assert text.startswith("busy: ") and text.count("\n") == 1 and limit in text, text


def test_a_silent_connection_is_closed_after_the_timeout_and_blocks_nobody():
    with running(Gated(), Limits(timeout=TIMEOUT)) as url, socket.create_connection(address(url)) as silent:
        start = time.monotonic()
        assert get(url + "api/grid.png?num=2")[0] == 200
        assert still_open(silent)
        closed_by_server(silent)
        assert time.monotonic() - start >= TIMEOUT - 0.1  # not before its timeout (from the accept)
        assert get(url + "api/grid.png?num=2")[0] == 200


def test_beyond_the_connection_threads_a_new_connection_gets_503_and_serving_resumes():
    with running(Gated(), Limits(connections=2, timeout=TIMEOUT)) as url:
        silent = [socket.create_connection(address(url)) for _ in range(2)]  # every thread held
        try:
            assert_busy(*response(url + "api/meta", timeout=WAIT), "--connections 2")
            for sock in silent:
                closed_by_server(sock)  # the timeout frees the threads
        finally:
            for sock in silent:
                sock.close()
        assert get(url + "api/grid.png?num=2")[0] == 200


def test_a_flood_beyond_the_queue_gets_503_and_the_server_keeps_serving():
    model, flood, queue = Gated(), 10, 3
    answers: list[tuple] = []
    with running(model, Limits(queue=queue)) as url:
        model.gate.clear()  # the first admitted request holds the model; the others wait
        clients = [threading.Thread(target=lambda: answers.append(response(url + "api/grid.png?num=2", timeout=WAIT)))
                   for _ in range(flood)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + WAIT
        while len(answers) < flood - queue and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = list(answers)  # answered while the model was held: all refusals
        assert len(refused) == flood - queue, f"{len(refused)} answers while the queue was full"
        for status, headers, body in refused:
            assert_busy(status, headers, body, f"--queue {queue}")
        assert get(url + "api/meta")[0] == 200  # the page and its description do not queue
        model.gate.set()
        for client in clients:
            client.join(WAIT)
        assert sorted(status for status, _, _ in answers) == [200] * queue + [503] * (flood - queue)
        assert get(url + "api/grid.png?num=2")[0] == 200


def exchange(url: str, request: bytes) -> tuple[int, dict, str]:
    """Send raw bytes, read the answer to the end: (status, headers, body text)."""
    with socket.create_connection(address(url), timeout=WAIT) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body.decode()


OVERSIZE = [  # (request bytes, status, a word of the one-line answer)
    (b"GET /api/meta HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n", 413, "request body"),
    (b"GET /api/meta HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 413, "request body"),
    (b"GET /api/grid.png?seed=" + b"1" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
     "URL: 3019 characters, more than 2048"),
    (b"GET /" + b"a" * 65532, 414, "Request-URI Too Long"),  # a request line past http.server's 64 KiB
    (b"GET /api/meta HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)), 431, "Too many headers"),
    (b"POST /api/meta HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 501, "Unsupported method"),
    (b"GET /api/meta HTTP/x.y\r\n\r\n", 400, "Bad request version"),
]


@pytest.fixture(scope="module")
def gated():
    with running(Gated()) as url:
        yield url


@pytest.mark.parametrize("request_bytes, status, word", OVERSIZE, ids=[str(row[1]) + row[2] for row in OVERSIZE])
def test_oversize_and_malformed_requests_get_a_one_line_answer(gated, request_bytes, status, word):
    code, headers, text = exchange(gated, request_bytes)
    assert code == status and headers["Content-Type"].startswith("text/plain"), (code, text)
    assert text.count("\n") == 1 and word in text, text
    assert get(gated + "api/grid.png?num=2")[0] == 200


def test_limits_are_checked_naming_the_option():
    for kwargs, message in [({"queue": 0}, "--queue 0: must be a whole number >= 1"),
                            ({"connections": -1}, "--connections -1: must be a whole number >= 1"),
                            ({"timeout": 0.0}, "--timeout 0.0: must be a number of seconds > 0"),
                            ({"timeout": float("inf")}, "--timeout inf: must be a number of seconds > 0")]:
        with pytest.raises(ConfigError, match=f"^{message}$"):
            Limits(**kwargs)
