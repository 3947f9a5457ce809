"""`dgm-scale serve` under concurrent load, on this machine only (127.0.0.1).

    python benchmarks/serve_load.py [--clients 1,4,16,64] [--seconds 10] [--num 16] [--queue 8]
                                    [--connections 32] [--threads 1] [--checkpoint CKPT]

Trains a small GAN (the default DCGAN, 16x16 digits, a few steps: what it draws does not matter
here) unless `--checkpoint` names one, starts `dgm-scale serve` on it in its own process (CPU,
`--threads` torch threads, a free port), and for each client count runs that many client threads
for `--seconds`, each asking for grids of `--num` samples at random seeds, one request after the
other. A client answered 503 waits the Retry-After it is given, as a polite client does. One
table row per client count: answered requests/s (200s), p50 / p99 latency of those, 503s, other
errors (anything else, timeouts and refused connections included), and the server's resident
memory (VmRSS) before and after the row. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_CLIENTS = 256   # client threads per row
MAX_SECONDS = 120   # seconds per row
REQUEST_TIMEOUT = 60


def small_checkpoint(folder: Path) -> Path:
    from dgm_scale.config import load_config
    from dgm_scale.training import train

    overrides = ["tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false", "trainer.max_steps=4",
                 "trainer.accelerator=cpu", "trainer.progress_bar=false",
                 f"run.dir={folder / 'run'}"]
    return Path(train(load_config(overrides=overrides)).checkpoint)


def start_server(checkpoint: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "dgm_scale.cli", "serve", str(checkpoint), "--port", "0", "--device", "cpu",
               "--queue", str(args.queue), "--connections", str(args.connections)]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if " at http://127.0.0.1:" not in line:
        server.kill()
        raise SystemExit(f"the server did not start: {line.strip() or 'no output'}")
    return server, line.split(" at ")[1].split()[0]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def one_request(host: str, port: int, path: str) -> tuple[int, float, int]:
    """(status, seconds, Retry-After seconds or 0); status 0: no HTTP answer."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        answer.read()
        return answer.status, time.perf_counter() - start, int(answer.headers.get("Retry-After") or 0)
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - start, 0
    finally:
        connection.close()


def client(url: str, num: int, deadline: float, results: list, seed: int) -> None:
    parts, draw = urlsplit(url), random.Random(seed)
    while (now := time.monotonic()) < deadline:
        status, seconds, retry_after = one_request(parts.hostname, parts.port,
                                                   f"/api/grid.png?seed={draw.randrange(2**31)}&num={num}")
        results.append((status, seconds))
        if retry_after:
            time.sleep(max(0.0, min(retry_after, deadline - time.monotonic())))


def milliseconds(ordered: list[float], quantile: float) -> float:
    """The `quantile` of sorted seconds, in ms (nearest rank; NaN when there are none)."""
    return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else float("nan")


def load_row(url: str, pid: int, clients: int, args: argparse.Namespace) -> dict:
    before = rss_mib(pid)
    results: list[tuple[int, float]] = []  # list.append is atomic: the threads share it
    start = time.monotonic()
    deadline = start + args.seconds
    threads = [threading.Thread(target=client, args=(url, args.num, deadline, results, index))
               for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.seconds + REQUEST_TIMEOUT + 10)
    elapsed = time.monotonic() - start  # the last requests end after the deadline
    ok = sorted(seconds for status, seconds in results if status == 200)
    return {"clients": clients, "ok_per_s": len(ok) / elapsed,
            "p50": milliseconds(ok, 0.5), "p99": milliseconds(ok, 0.99),
            "busy": sum(status == 503 for status, _ in results),
            "errors": sum(status not in (200, 503) for status, _ in results),
            "rss_before": before, "rss_after": rss_mib(pid)}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16,64", help="client counts, one row each (default 1,4,16,64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per row (default 10)")
    parser.add_argument("--num", type=int, default=16, help="samples per grid request (default 16)")
    parser.add_argument("--queue", type=int, default=8, help="the server's --queue (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="the server's --connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead of training one")
    args = parser.parse_args()
    args.clients = [int(count) for count in args.clients.split(",")]
    if not all(1 <= count <= MAX_CLIENTS for count in args.clients):
        parser.error(f"--clients: each count must be 1 .. {MAX_CLIENTS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds: must be in (0, {MAX_SECONDS}]")
    return args


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or small_checkpoint(Path(folder))
        server, url = start_server(checkpoint, args)
        try:
            one_request("127.0.0.1", urlsplit(url).port, f"/api/grid.png?num={args.num}")  # warm-up
            rows = [load_row(url, server.pid, clients, args) for clients in args.clients]
        finally:
            server.terminate()
            server.wait(30)
    print(f"\nserve --queue {args.queue} --connections {args.connections}, grids of {args.num} samples, "
          f"{args.seconds:g} s per row, server on {args.threads} torch thread(s), CPU\n")
    print("| clients | answered req/s | p50 ms | p99 ms | 503s | other errors | server RSS before / after (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['ok_per_s']:.1f} | {row['p50']:.1f} | {row['p99']:.1f} | {row['busy']} | "
              f"{row['errors']} | {row['rss_before']:.0f} / {row['rss_after']:.0f} |")


if __name__ == "__main__":
    main()
