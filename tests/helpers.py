"""Helpers shared by several test files (import them from here, never from another test file)."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dgm_scale.config.loader import family_of
from dgm_scale.data.transforms import to_8bit
from dgm_scale.modules import load_module


def adapt(config: str | Path | None, overrides: list[str]) -> list[str]:
    """`overrides` written with the GAN's names (model.generator.*, model.discriminator.*,
    optim.g.*) in the names of the family `config` trains (a VAE: model.decoder.*,
    model.encoder.*, optim.*; its `renamed` map), so that one list of tiny settings serves
    every family; keys the family dropped are left out."""
    family = family_of(OmegaConf.load(config) if config is not None else {})
    adapted = []
    for item in overrides:
        key, _, value = item.partition("=")
        for old, new in family.renamed.items():
            if key == old or key.startswith(old + "."):
                key = None if new is None else new + key[len(old):]
                break
        if key is not None:
            adapted.append(f"{key}={value}")
    return adapted


def adapt_args(args: list[str]) -> list[str]:
    """[CONFIG, key=value, ...] with the overrides adapted to CONFIG's family (see adapt)."""
    return [args[0], *adapt(args[0], list(args[1:]))]


class Hang(BaseException):
    """Raised by hang_guard. A BaseException: code under test that catches OSError (TimeoutError
    is one) or Exception, as decoders and shard readers do, must not swallow it and run on."""


@contextlib.contextmanager
def hang_guard(seconds: int):
    """Fail (Hang) instead of hanging when the block runs longer than `seconds` (main thread)."""
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested dict (an empty mapping is a leaf)."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.extend(leaf_keys(value, dotted + ".") if isinstance(value, dict) and value else [dotted])
    return keys


def under_ci() -> bool:
    """Whether the suite runs under CI (env CI set, as CI services do): optional test
    dependencies (the `test` extra, the torch-fidelity reference) must then be there."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: Exception) -> str:
    """The message of `error`, which must be one line."""
    message = str(error)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- runs
ROOT = Path(__file__).resolve().parents[1]
TOY_FAMILY = ROOT / "tests" / "toy_family.py"  # a family defined outside the package (no encode_features)


TINY = ["tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false", "data.resolution=8", "data.batch_size=8", "model.generator.width=4", "model.discriminator.width=4",
        "model.latent_dim=8", "trainer.max_steps=3", "trainer.log_every=1", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", "run.sample_every=2", "run.checkpoint_every=2", "run.num_samples=4"]


# TINY without the GAN's network keys: for families without a generator and discriminator
TINY_RUN = [item for item in TINY if not item.startswith("model.")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], timeout: int = 240, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={free_port()}", "--rdzv-id=test", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


TINY_TRAIN = ["tracking.wandb.mode=disabled", "eval.every=0", "eval.at_end=false", "data.resolution=8", "data.batch_size=16", "model.generator.width=8", "model.discriminator.width=8",
        "model.latent_dim=8", "trainer.max_steps=4", "trainer.log_every=1", "trainer.progress_bar=false",
        "run.sample_every=2", "run.checkpoint_every=2", "run.num_samples=16"]


def metrics_rows(run_dir: Path) -> list[dict]:
    """The logged training rows, without the perf/* timings (which differ from run to run)."""
    with open(run_dir / "metrics.csv") as handle:
        return [{key: value for key, value in row.items() if not key.startswith("perf/")}
                for row in csv.DictReader(handle) if row.get("train/iteration")]


def assert_same_weights(first: Path, second: Path, atol: float = 0.0) -> None:
    a, b = load_module(first).state_dict(), load_module(second).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def with_callback(callback: L.Callback, setattr=setattr) -> None:
    """Runs of `dgm_scale.training.train` get `callback` first among their callbacks (pass
    monkeypatch.setattr in a test)."""
    import dgm_scale.training as train_module

    build = train_module.build_callbacks
    setattr(train_module, "build_callbacks", lambda *a, **k: [callback] + build(*a, **k))


def lean_zero_state(zero_state: dict) -> dict:
    """A ZeRO-1/2 partition's flat per-group tensors without the end padding: {"fp32", Adam's
    "exp_avg", "exp_avg_sq"} by group, plus "step" (from DeepSpeed's own state_dict layout)."""
    groups = {}
    for group, fp32 in enumerate(zero_state["single_partition_of_fp32_groups"]):
        state = zero_state["base_optimizer_state"]["state"].get(group)  # none before the first step
        groups[group] = {"fp32": fp32.reshape(-1).clone()}
        if state is not None:
            groups[group].update({"step": float(state["step"]), **{
                k: state[k].reshape(-1)[:fp32.numel()].clone() for k in ("exp_avg", "exp_avg_sq")}})
    return groups


class ElasticProbe(L.Callback):
    """What a (resumed) run holds right after loading - its weights and optimizer state (ZeRO:
    this rank's partition, lean; FSDP: gathered) - and every training batch's first tensor, saved to
    `out/loaded{rank}.pt` and `out/batches{rank}.pt` (tests/test_elastic.py)."""

    def __init__(self, out: str):
        self.out, self.batches = Path(out), []

    def on_train_start(self, trainer, pl_module) -> None:
        from fsdp_state import full  # FSDP's shards gathered (a collective on every rank, in one order)

        optimizers = []
        for optimizer in trainer.strategy.optimizers:
            if type(optimizer).__name__ == "DeepSpeedZeroOptimizer":
                optimizers.append(lean_zero_state(optimizer.state_dict()))
            else:
                optimizers.append({int(k): {n: full(v) for n, v in st.items()}
                                   for k, st in optimizer.state_dict()["state"].items()})
        params = {name: full(p) for name, p in pl_module.state_dict().items()}
        torch.save({"params": params, "optimizers": optimizers, "world": trainer.world_size},
                   self.out / f"loaded{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch[0].detach().clone())
        torch.save(self.batches, self.out / f"batches{trainer.global_rank}.pt")


class ActivationDtypes(L.Callback):
    """The dtypes of the outputs of every linear and convolution layer in the forwards of the
    training steps (not those of sample grids or evaluations, which run outside them): what
    `trainer.precision` computes in."""

    def __init__(self):
        self.dtypes: set[str] = set()
        self._recording = False

    def on_train_start(self, trainer, pl_module) -> None:
        for layer in pl_module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                layer.register_forward_hook(self._record)

    def _record(self, layer, inputs, output) -> None:
        if self._recording:
            self.dtypes.add(str(output.dtype).removeprefix("torch."))

    def on_train_batch_start(self, *args) -> None:
        self._recording = True

    def on_train_batch_end(self, *args) -> None:  # first of the callbacks (with_callback): before the sample grids
        self._recording = False


def train_computing(config: str | Path, overrides: list[str]):
    """`train()` of CONFIG with OVERRIDES, and the dtypes its training steps computed in
    (ActivationDtypes)."""
    import pytest

    from dgm_scale.config import load_config
    from dgm_scale.training import train

    activations = ActivationDtypes()
    with pytest.MonkeyPatch.context() as patch:
        with_callback(activations, patch.setattr)
        result = train(load_config(config, overrides))
    return result, activations.dtypes


def assert_same_final_run(reference: Path, resumed: Path, steps: int) -> None:
    """A resumed run ended as the uninterrupted `reference`: the same final weights (EMA and
    buffers included), bit for bit, and the same logged training rows, each iteration once."""
    assert_same_weights(reference / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")
    assert metrics_rows(reference) == metrics_rows(resumed)
    assert [float(row["train/iteration"]) for row in metrics_rows(resumed)] == list(range(1, steps + 1))


def assert_same_phema(reference: Path, resumed: Path, iterations: list[int]) -> None:
    """Two diffusion runs hold the same power-function EMAs (post-hoc EMA): in last.ckpt, and in
    the snapshots of `iterations` (RUN/phema/), bit for bit."""
    states = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["phema"] for run in (reference, resumed)]
    assert states[0]["iteration"] == states[1]["iteration"]
    for a, b in zip(sum(states[0]["averages"], []), sum(states[1]["averages"], []), strict=True):
        assert torch.equal(a, b)
    for iteration in iterations:
        name = f"phema/phema_{iteration:07d}.pt"
        a, b = (torch.load(run / name, weights_only=True)["profiles"] for run in (reference, resumed))
        assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b))
        assert all(torch.equal(x[key], y[key]) for x, y in zip(a, b) for key in x), name


@contextlib.contextmanager
def one_thread():
    """In-process runs compute like the OMP_NUM_THREADS=1 subprocesses (same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_here(args: list[str], run_dir: Path) -> None:
    """`dgm-scale train ARGS run.dir=RUN_DIR` in this process (ARGS: a config file, then
    overrides), computing like a one-thread subprocess, to compare with one."""
    from dgm_scale.config import load_config
    from dgm_scale.training import train

    with one_thread():
        train(load_config(args[0], [*args[1:], f"run.dir={run_dir}"]))


def stop_and_resume(run_train, tmp_path: Path, common: list[str]) -> tuple[Path, Path]:
    """Train 6 iterations straight, and 3 + 3 with a resume; return both run directories."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(common + ["trainer.max_steps=6", f"run.dir={full}"])
    run_train(common + ["trainer.max_steps=3", f"run.dir={part}"])
    run_train(common + ["trainer.max_steps=6", f"run.dir={part}", "resume=auto"])
    return full, part


# ----------------------------------------------------------------------------- W&B offline files
def read_records(path: Path) -> list:
    """The records of a `.wandb` file: W&B's LevelDB-style log (a 7-byte header, 32 KiB blocks
    of chunks with a 7-byte header each: crc32, length, type full/first/middle/last), each
    record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2  # here: W&B's import is slow, and few tests read its files

    data, block, header = path.read_bytes(), 32 * 1024, 7
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", header
    while offset + header <= len(data):
        if block - offset % block < header:  # too little room left: the block is padded
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + header])
        chunk, offset = data[offset + header:offset + header + length], offset + header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def finished_records(offline_run: Path, timeout: float = 30.0) -> list:
    """The run's records once its `exit` record is on disk: wandb.finish() can return before
    W&B's service has flushed the file (seen: header only, complete 0.2 s later)."""
    (path,) = offline_run.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def records_of(offline_run: Path, kind: str) -> list:
    return [getattr(r, kind) for r in finished_records(offline_run) if r.WhichOneof("record_type") == kind]


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B stores "train/d_loss" as a nested key


def history_keys(offline_run: Path) -> set[str]:
    return {item_key(item) for h in records_of(offline_run, "history") for item in h.item}


def config_values(offline_run: Path) -> dict:
    return {item_key(u): json.loads(u.value_json)
            for c in records_of(offline_run, "config") for u in c.update}


def wandb_logged_iterations(offline_run: Path) -> list[int]:
    return [json.loads(item.value_json) for h in records_of(offline_run, "history") for item in h.item
            if item_key(item) == "train/iteration"]


# ----------------------------------------------------------------------------- plain environments
def _distribution_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need (their requirements, recursively; extras left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def plain_site(folder: Path, packages: tuple[str, ...] = ("torch",)) -> Path:
    """A folder holding links to exactly the installed `packages` and what they require, nothing
    else (no dgm_scale, no lightning): a fresh virtual environment with only those installed, for
    `python -S` with PYTHONPATH set to it (see run_plain)."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    for name in _distribution_closure(packages):
        dist = metadata.distribution(name)
        for top in {Path(str(entry)).parts[0] for entry in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top.endswith(".dist-info") or top in ("..", "__pycache__") or not source.exists():
                continue
            target = folder / top
            if not target.exists():
                target.symlink_to(source)
    return folder


def run_plain(code: str, site: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`code` in an interpreter that sees only the standard library and `site` (-S: no
    site-packages, no .pth files; -c in a folder without dgm_scale)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- full disks
@contextlib.contextmanager
def small_tmpfs(directory: Path, size: int):
    """A tmpfs of `size` bytes mounted at `directory` for the block (the tests run as root, as in
    CI); skips the test where mounting is not allowed."""
    import pytest

    directory.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        reason = (mount.stderr.strip().splitlines() or ["not root?"])[0]
        pytest.skip(f"cannot mount a tmpfs at {directory} ({reason}): the full-disk tests need one")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def fill_disk(directory: Path, leave: int = 0) -> Path:
    """A file that takes all the free space of `directory`'s file system but `leave` bytes."""
    stats = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(stats.f_bavail * stats.f_frsize - leave, 1))
    return filler


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


# ----------------------------------------------------------------------------- image files
def encode_image(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """The bytes of `image` saved as `fmt` (PIL's save options, e.g. exif=..., transparency=...)."""
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def random_rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (for what PIL does not write, e.g. 16-bit colour); `rows`: the
    scanlines, each after its filter byte."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def bomb_png(side: int) -> bytes:
    """An 8-bit grey side x side PNG of zeros: ~0.1% of the side**2 bytes it decodes to
    (deflated 100 rows at a time, never holding the whole image)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    packer, rows = zlib.compressobj(6), bytes((side + 1) * 100)
    data = b"".join(packer.compress(rows[:(side + 1) * min(100, side - done)]) for done in range(0, side, 100))
    data += packer.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- tar shards
def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive of (name, payload) members, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.write_bytes(tar_bytes(members))


def png_bytes(i: int, size: int = 8, fmt: str = "PNG") -> bytes:
    return encode_image(Image.fromarray(random_rgb(i, size)), fmt)


def sample(index: int, bad: bool = False) -> list[tuple[str, bytes]]:
    """The members of sample `index` (key = the index, 9 digits): a PNG (garbage if `bad`), a label."""
    key = f"{index:09d}"
    image = b"\x89PNG not really" if bad else png_bytes(index)
    return [(f"{key}.png", image), (f"{key}.cls", str(index % 10).encode())]


def write_set(root: Path, sizes: list[int], manifest: bool = True, bad: frozenset = frozenset(),
              first: int = 0) -> list[str]:
    """Shards x-000000.tar ... with sizes[i] samples (global keys from `first`; those in `bad`
    with an undecodable image) and a manifest as our writer makes it; returns all keys."""
    root.mkdir(parents=True, exist_ok=True)
    index, entries = first, []
    for i, size in enumerate(sizes):
        name = f"x-{i:06d}.tar"
        write_tar(root / name, [m for j in range(index, index + size) for m in sample(j, j in bad)])
        data = (root / name).read_bytes()  # (read_manifest validates the entries)
        entries.append({"name": name, "num_samples": size, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        index += size
    if manifest:
        (root / "manifest.json").write_text(json.dumps({
            "format": "dgm_scale.shards/1", "name": "x", "num_samples": index - first, "encoding": "png",
            "shards": entries, "image": {}, "labels": {"num_classes": 10}}))
    return [f"{i:09d}" for i in range(first, index)]


def make(spec, workers: int = 2, **kwargs):
    """A StreamLoader over `spec` (batches of 8 at 8 x 8 with keys, shuffle buffer 16 unless set)."""
    from dgm_scale.data.shards.loader import make_stream_loader
    from dgm_scale.data.shards.stream import ShardStream

    options = dict(batch_size=8, resolution=8, return_keys=True, shuffle_buffer=16)
    options.update(kwargs)
    return make_stream_loader(ShardStream(spec, **options), num_workers=workers, persistent_workers=False)


def single_worker(spec, **options):
    """Epoch 0 of a stream's only worker, in this process (keys returned, batches of 1 at 8 x 8,
    no shuffling, a last partial batch kept unless set): iterate `.batches()`, then
    `.faults.counts` holds every fault it met, also those after its last batch (which reach no
    batch's info)."""
    from dgm_scale.data.shards.stream import ShardStream, WorkerEpoch, WorkerPosition

    settings = dict(batch_size=1, resolution=8, shuffle_buffer=0, drop_last=False, return_keys=True)
    return WorkerEpoch(ShardStream(spec, **{**settings, **options}), 0, 0, 1, WorkerPosition())


def epoch_keys(loader, consume: bool = True, limit: int | None = None) -> list[list[str]]:
    """Key lists of the batches of one epoch (marking them consumed)."""
    out = []
    for _, _, info in loader:
        out.append(info["keys"])
        if consume:
            loader.consumed(info)
        if limit is not None and len(out) == limit:
            break
    return out


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def interrupted(spec, k: int, epochs: int = 2, **kwargs) -> list[list[str]]:
    """Batches of `epochs` epochs, stopping after k consumed batches and resuming (a new loader)."""
    loader, got, state = make(spec, **kwargs), [], None
    for _ in range(epochs):
        got += epoch_keys(loader, limit=k - len(got))
        if len(got) == k:
            state = loader.state_dict()
            break
    loader = make(spec, **kwargs)
    loader.load_state_dict(state)
    for _ in range(state["ranks"][str(kwargs.get("rank", 0))]["epoch"], epochs):
        got += epoch_keys(loader)
    return got


# ----------------------------------------------------------------------------- host-device syncs
#: Tensor methods that read a tensor's value on the host: on a GPU each waits for the device
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")
#: aten ops that read values on the host, or whose output size depends on the values
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2",
            "unique_consecutive", "repeat_interleave")


def _caller() -> str:
    """`file:line` of the innermost frame outside torch (and this file): who asked for the sync."""
    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


class SyncCounter:
    """Records every host-device synchronisation point - calls of SYNC_METHODS, the aten ops
    SYNC_OPS (also from C++: a TorchDispatchMode), indexing with a boolean mask,
    torch.cuda.synchronize and torch.distributed.barrier - made from the first callback's
    on_train_batch_start to the last callback's on_train_batch_end of every iteration that is
    not a multiple of `log_every` (logged iterations, sample grids and checkpoints fall on
    those in the runs that use it). `first` and `last` are its two callbacks (with_callbacks);
    `syncs`: (iteration, what, caller) of each."""

    def __init__(self, log_every: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.log_every, self.syncs, self.iteration, self._mode = log_every, [], 0, None
        self._patched: list = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                masked = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                                 for i in (args[1] if len(args) > 1 else ()) if i is not None)
                if name in SYNC_OPS or masked:
                    counter.record(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        self._mode_class = Mode

        class Edge(L.Callback):
            def __init__(self, start: bool):
                self.start = start

            def on_train_batch_start(self, trainer, pl_module, *args) -> None:
                if self.start and (pl_module.iteration + 1) % counter.log_every != 0:
                    counter.begin(pl_module.iteration + 1)

            def on_train_batch_end(self, trainer, pl_module, *args) -> None:
                if not self.start:
                    counter.end()

        self.first, self.last = Edge(True), Edge(False)

    def record(self, what: str) -> None:
        self.syncs.append((self.iteration, what, _caller()))

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.record(name)
            return original(*args, **kwargs)
        self._patched.append((owner, name, original))
        setattr(owner, name, counted)

    def begin(self, iteration: int) -> None:
        self.iteration = iteration
        for name in SYNC_METHODS:
            self._wrap(torch.Tensor, name)
        self._wrap(torch.cuda, "synchronize")
        self._wrap(torch.distributed, "barrier")
        self._mode = self._mode_class()
        self._mode.__enter__()

    def end(self) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched = []


def with_callbacks(first: L.Callback, last: L.Callback, setattr=setattr) -> None:
    """Runs of `dgm_scale.training.train` get `first` before and `last` after all their callbacks."""
    import dgm_scale.training as train_module

    build = train_module.build_callbacks
    setattr(train_module, "build_callbacks", lambda *a, **k: [first] + build(*a, **k) + [last])


# ----------------------------------------------------------------------------- sample grids
def grid_cells(grid: np.ndarray, num: int, nrow: int, size: int = 8, padding: int = 2) -> np.ndarray:
    """The images [num, size, size] tiled in a grey grid (2 px padding, nrow columns), as
    `dgm-scale sample` and `dgm-scale serve` tile them (at native resolution)."""
    step = size + padding
    return np.stack([grid[padding + (i // nrow) * step:][:size, padding + (i % nrow) * step:][:, :size]
                     for i in range(num)])


def grey_8bit(samples: torch.Tensor) -> np.ndarray:
    """Model-range grey images [N, 1, H, W] -> the uint8 [N, H, W] they are saved and served as."""
    return to_8bit(samples)[:, 0].to(torch.uint8).numpy()
