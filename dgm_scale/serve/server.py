"""The HTTP side of `dgm-scale serve`: query parameters checked against the documented caps,
request-size limits, the endpoints (see dgm_scale/serve/__init__.py), and the server, which takes
any source (see sources.py) and samples through a bounded queue (limits.py: one model, many
request threads)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import numpy as np

from dgm_scale.core.errors import ConfigError, described, first_line
from dgm_scale.dump import npz_bytes, png_bytes
from dgm_scale.serve.limits import BoundedHTTPServer, Limits, SampleQueue
from dgm_scale.serve.page import PAGE
from dgm_scale.serve.sources import BadRequest
from dgm_scale.tracking.images import tile

log = logging.getLogger(__name__)

MAX_NUM = 256          # samples per grid / batch
MAX_STEPS = 32         # frames per interpolation strip
MAX_SEED = 2**31 - 1   # seeds are 0 .. MAX_SEED (a JavaScript-safe integer)
MAX_URL = 2048         # characters of path and query: every valid request is far shorter
CAPS = {"num": MAX_NUM, "steps": MAX_STEPS, "seed": MAX_SEED}
FORMATS = ("png", "npz")


def _integer(query: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    text = query.pop(name, None)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name}: '{text[:40]}' is not an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is outside {low} .. {high}")
    return value


def _number(name: str, text: str, spec: dict) -> float:
    """A number within its spec: [min, max], or (0, max] without a min."""
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name}: '{text[:40]}' is not a number") from None
    low = spec.get("min")
    inside = value >= low if low is not None else value > 0
    if not (math.isfinite(value) and inside and value <= spec["max"]):
        span = f"[{low:g}, {spec['max']:g}]" if low is not None else f"(0, {spec['max']:g}]"
        raise BadRequest(f"{name}: {text[:40]} is outside {span}")
    return value


def _choice(name: str, text: str, spec: dict) -> str:
    if text not in spec["choices"]:
        raise BadRequest(f"{name}: '{text[:40]}' is not one of {', '.join(spec['choices'])}")
    return text


def _option_integer(name: str, text: str, spec: dict) -> int:
    return _integer({name: text}, name, None, spec["min"], spec["max"])


#: how a query value of each kind of option is read (see GenerativeModule.sampling_controls)
OPTION_READERS = {"number": _number, "integer": _option_integer, "choice": _choice}


def _options(query: dict, meta: dict) -> dict:
    """The model's sampling options given in the query, each read and checked by its spec."""
    options = {}
    for name, spec in meta["options"].items():
        text = query.pop(name, None)
        if text is not None:
            options[name] = OPTION_READERS[spec.get("type", "number")](name, text, spec)
    return options


def _label(query: dict, meta: dict) -> int | None:
    classes = meta["num_classes"]
    if "class" in query and classes == 0:
        raise BadRequest("class: this model is unconditional (it has no classes)")
    return _integer(query, "class", None, 0, classes - 1)


def _finish(query: dict, path: str) -> None:
    """Every parameter must have been taken: anything left is unknown to the endpoint."""
    if query:
        raise BadRequest(f"unknown parameter '{min(query)[:40]}' for {path}")


def _labels(meta: dict, num: int, label: int | None) -> np.ndarray | None:
    """The classes of the samples `images(seed, num, label)` returns (see sources.py)."""
    if meta["num_classes"] == 0:
        return None
    return np.full(num, label) if label is not None else np.arange(num) % meta["num_classes"]


class Endpoints:
    """What each path answers: (status, content type, body, extra headers); BadRequest -> 4xx."""

    def __init__(self, source, queue: int):
        self.source = source
        self.queue = SampleQueue(queue)
        self.meta = {**source.meta, "caps": CAPS}
        self.routes: dict[str, Callable] = {"/": self.page, "/api/meta": self.meta_json,
                                            "/api/grid.png": self.grid, "/api/batch": self.batch,
                                            "/api/interpolate.png": self.interpolate}

    def answer(self, path: str, query: dict):
        if path not in self.routes:
            raise BadRequest(f"no such page '{path[:60]}'; there are {', '.join(self.routes)}", status=404)
        return self.routes[path](query)

    def page(self, query: dict):
        return 200, "text/html; charset=utf-8", PAGE.encode("utf-8"), {}  # the page reads its own query

    def meta_json(self, query: dict):
        _finish(query, "/api/meta")
        return 200, "application/json", json.dumps(self.meta).encode("utf-8"), {}

    def _samples(self, query: dict, path: str, default_num: int):
        seed = _integer(query, "seed", 0, 0, MAX_SEED)
        num = _integer(query, "num", default_num, 1, MAX_NUM)
        label, options = _label(query, self.meta), _options(query, self.meta)
        _finish(query, path)
        with self.queue.turn():
            images = self.source.images(seed, num, label, **options)
        return seed, num, label, images

    def grid(self, query: dict):
        images = self._samples(query, "/api/grid.png", 16)[-1]
        return 200, "image/png", png_bytes(tile(images)), {}

    def batch(self, query: dict):
        fmt = query.pop("format", "npz")
        if fmt not in FORMATS:
            raise BadRequest(f"format: '{fmt[:40]}' is not one of {', '.join(FORMATS)}")
        seed, num, label, images = self._samples(query, "/api/batch", 64)
        if fmt == "png":
            body, kind = png_bytes(tile(images)), "image/png"
        else:
            body, kind = npz_bytes(images, _labels(self.meta, num, label)), "application/octet-stream"
        disposition = f'attachment; filename="samples_seed{seed}_{num}.{fmt}"'
        return 200, kind, body, {"Content-Disposition": disposition}

    def interpolate(self, query: dict):
        seed_a = _integer(query, "seed_a", 0, 0, MAX_SEED)
        seed_b = _integer(query, "seed_b", 1, 0, MAX_SEED)
        steps = _integer(query, "steps", 8, 2, MAX_STEPS)
        label, options = _label(query, self.meta), _options(query, self.meta)
        _finish(query, "/api/interpolate.png")
        if self.meta["latent_dim"] is None:
            raise BadRequest(f"interpolation needs a latent space; this {self.meta['family']} model has none")
        with self.queue.turn():
            frames = self.source.interpolate(seed_a, seed_b, steps, label, **options)
        return 200, "image/png", png_bytes(tile(frames, nrow=steps)), {}


def _within_size(url: str, headers) -> None:
    """GET only: a request body is refused unread (413); an overlong URL is refused (414)."""
    if "Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() != "0":
        size = headers.get("Content-Length") or headers.get("Transfer-Encoding")
        raise BadRequest(f"request body: this server takes none (got {size[:20]!r})", status=413)
    if len(url) > MAX_URL:
        raise BadRequest(f"URL: {len(url)} characters, more than {MAX_URL}", status=414)


def _single_values(url: str) -> tuple[str, dict]:
    parts = urlsplit(url)
    try:
        pairs = parse_qs(parts.query, keep_blank_values=True, max_num_fields=64)
    except ValueError as error:
        raise BadRequest(f"malformed query: {first_line(error)[:80]}") from None
    twice = [name for name, values in pairs.items() if len(values) > 1]
    if twice:
        raise BadRequest(f"{twice[0][:40]}: given more than once")
    return parts.path, {name: values[0] for name, values in pairs.items()}


class Handler(BaseHTTPRequestHandler):
    """GET only; every failure is one line of text: 4xx for the request, 503 when full (with
    Retry-After), 500 for a bug (its traceback logged, never sent)."""

    endpoints: Endpoints  # set on the class made for each server (make_server), with `timeout`
    server_version = "dgm-scale-serve"
    # http.server's own refusals (malformed request line, too many headers, other methods)
    error_message_format = "%(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    default_request_version = "HTTP/1.0"  # so that those given before the version is read have a status line

    def do_GET(self) -> None:
        try:
            _within_size(self.path, self.headers)
            path, query = _single_values(self.path)
            status, kind, body, headers = self.endpoints.answer(path, query)
        except BadRequest as error:
            status, kind, headers = error.status, "text/plain; charset=utf-8", error.headers
            body = f"{error}\n".encode()
        except Exception as error:  # a bug or a failing model: say so, keep serving
            log.exception("serve: %s failed", self.path[:MAX_URL])
            status, kind, headers = 500, "text/plain; charset=utf-8", {}
            body = f"internal error: {described(error)[:240]}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("serve: " + format, *args)  # quiet: one line per image request is noise


def make_server(source, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits | None = None) -> BoundedHTTPServer:
    """A bound (not yet serving) HTTP server for `source` within `limits` (default: Limits());
    port 0 picks a free port (see `server.server_address`). Call `serve_forever()` on it,
    `shutdown()` from another thread."""
    limits = limits or Limits()
    handler = type("SourceHandler", (Handler,), {"endpoints": Endpoints(source, limits.queue),
                                                 "timeout": limits.timeout})
    return BoundedHTTPServer((host, port), handler, limits)


def url_of(server: BoundedHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


@contextlib.contextmanager
def serving(source, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None) -> Iterator[str]:
    """`source` served in a background thread while the block runs (port 0: a free port);
    yields the page's URL. For code that shows the page itself (the tests, the docs' pictures)."""
    server = make_server(source, host, port, limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url_of(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def serve(source, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> None:
    """Serve `source` until Ctrl-C; prints one line with the URL first."""
    try:
        server = make_server(source, host, port, limits)
    except OSError as error:  # the port is taken, the address is not this machine's
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {error.strerror or error}") from None
    print(f"serving {source.meta.get('name', 'samples')} at {url_of(server)} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["CAPS", "Endpoints", "make_server", "serve", "serving", "url_of"]
