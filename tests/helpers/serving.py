"""`dgm-scale serve` run in-process, and HTTP requests to it."""
from __future__ import annotations

import urllib.error
import urllib.request





# ----------------------------------------------------------------------------- serve
def running(source, limits=None):
    """`source` served on 127.0.0.1 in a thread (`limits` as make_server's); a context manager
    yielding the server's URL. Port 0: a free port, no race with other tests."""
    from dgm_scale.serve import serving

    return serving(source, "127.0.0.1", 0, limits)


def response(url: str, timeout: float = 60):
    """(status, headers, body) of a GET, 4xx / 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def get(url: str, timeout: float = 60) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a GET, 4xx / 5xx included."""
    status, headers, body = response(url, timeout)
    return status, headers["Content-Type"], body
