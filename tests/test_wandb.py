"""W&B tracking through Lightning's WandbLogger, checked on the offline run files W&B writes."""
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import (ROOT, TINY_TRAIN, config_values, history_keys, metrics_rows, offline_runs, records_of, torchrun,
                     wandb_logged_iterations)
from dgm_scale.config import ConfigError, load_config
from dgm_scale.modules import load_module
from dgm_scale.tracking.loggers import WANDB_RUN_ID_FILE, build_loggers, resolve_wandb_mode
from dgm_scale.training import train

# The test suite's TINY_TRAIN turns W&B off; these tests turn it on again (the later value wins).
OFFLINE = TINY_TRAIN + ["tracking.wandb.mode=offline"]
FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def wandb_dirs(tmp_path, monkeypatch):
    """Everything W&B writes (settings, caches, artifact staging) stays under tmp_path."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_mode_is_validated():
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_config(overrides=["tracking.wandb.mode=offlne"])
    with pytest.raises(ConfigError, match="tracking.wandb.init_timeout"):
        load_config(overrides=["tracking.wandb.init_timeout=0"])


def test_auto_mode_is_online_only_with_a_configured_key(tmp_path, monkeypatch):
    assert resolve_wandb_mode("auto") == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_wandb_mode("auto") == "offline"  # an entry for another host is not a W&B key
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + FAKE_KEY + "\n")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_wandb_mode("auto") == "online"
    assert [resolve_wandb_mode(m) for m in ("online", "offline", "disabled")] == ["online", "offline", "disabled"]


def test_disabled_mode_creates_no_wandb_files(tmp_path):
    cfg = load_config("configs/nsgan.yaml", TINY_TRAIN + ["trainer.max_steps=1", f"run.dir={tmp_path / 'run'}"])
    assert [type(logger).__name__ for logger in build_loggers(cfg, tmp_path / "run")] == ["AppendingCSVLogger"]
    run_dir = train(cfg).run_dir
    assert not (run_dir / "wandb").exists() and not (run_dir / WANDB_RUN_ID_FILE).exists()
    assert not (tmp_path / "wandb_home").exists()


def test_offline_run_records_metrics_images_config_and_resumes_the_same_run(tmp_path):
    run = tmp_path / "run"
    probe = ["eval.at_end=true", "eval.metrics=[probe]", "eval.options.probe_samples=200"]
    train(load_config("configs/nsgan.yaml", OFFLINE + probe + [f"run.dir={run}"]))
    (first,) = offline_runs(run)
    run_id = (run / WANDB_RUN_ID_FILE).read_text().strip()
    assert first.name.endswith(run_id) and (run / "wandb" / "latest-run").exists()
    keys = history_keys(first)
    assert {"train/d_loss", "train/g_loss", "perf/images_per_s", "perf/step_time_s", "trainer/global_step"} <= keys
    assert "samples/_type" in keys  # the sample grids, as W&B images
    media = first / "files" / "media" / "images"
    images = sorted(media.glob("samples_*.png"))
    assert len(images) == 3  # iterations 2 and 4 (run.sample_every=2) and the final grid
    # the probe metric, its projection and the latent interpolation strip (with every sample grid)
    assert {"eval/probe_kmeans_accuracy", "eval/probe_nmi", "eval/probe_linear_accuracy", "projection/_type",
            "interpolation/_type"} <= keys
    assert len(list(media.glob("projection_*.png"))) == 1 and len(list(media.glob("interpolation_*.png"))) == 3
    config = config_values(first)
    assert config["config"]["model"]["kind"] == "gan" and config["config"]["trainer"]["max_steps"] == 4
    assert config["params/generator"] > 0 and config["batch/global"] == 16
    assert [r.run_id for r in records_of(first, "run")] == [run_id]
    assert [e.exit_code for e in records_of(first, "exit")] == [0]  # finished with the training
    # System info (W&B's own: OS, Python, host, CPU/GPU), sent by W&B for every run.
    environment = records_of(first, "environment")
    assert environment and environment[0].os and environment[0].python.startswith("CPython")

    train(load_config("configs/nsgan.yaml", OFFLINE + probe + [f"run.dir={run}", "resume=auto", "trainer.max_steps=6"]))
    assert (run / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    runs = offline_runs(run)
    # (W&B names a part started in the same second as the previous one "...-ID-1")
    assert len(runs) == 2 and all(f"-{run_id}" in path.name for path in runs)
    (second,) = [path for path in runs if path != first]
    assert [r.run_id for r in records_of(second, "run")] == [run_id]
    assert wandb_logged_iterations(second) == [5, 6]  # the continuation logs only the new iterations


def test_text_samples_and_bits_per_char_reach_wandb(tmp_path):
    run = tmp_path / "run"
    overrides = [item for item in OFFLINE if not item.startswith("model.")] + [
        "model.kind=autoregressive", "data.name=text", "data.path=builtin:pydoc", "data.seq_len=16", "model.width=16",
        "model.layers=1", "eval.at_end=true", f"run.dir={run}"]
    train(load_config(None, overrides))
    (offline,) = offline_runs(run)
    keys = history_keys(offline)
    assert {"train/bits_per_char", "eval/bits_per_char", "samples/_type"} <= keys
    tables = list((offline / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 3 and '"sample"' in tables[0].read_text()  # iterations 2, 4 and the final samples


def test_checkpoint_artifact_and_no_api_key_anywhere(tmp_path):
    # A separate process, so that everything it and W&B's service print is captured; a key is
    # set, but mode=offline, so nothing goes online.
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_API_KEY=FAKE_KEY, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WANDB_SILENT", None)  # W&B's own console output is checked too
    proc = subprocess.run([sys.executable, "-m", "dgm_scale", "train", "configs/nsgan.yaml", *OFFLINE,
                           f"run.dir={run}", "tracking.wandb.log_checkpoints=true", "tracking.wandb.tags=[test]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = offline_runs(run)
    (artifact,) = records_of(offline, "artifact")
    assert artifact.type == "model" and artifact.name.startswith("checkpoints-")
    assert [entry.path for entry in artifact.manifest.contents] == ["last.ckpt"]  # no best.ckpt without evaluation
    assert list(records_of(offline, "run")[0].tags) == ["test"]

    assert "wandb sync" in proc.stdout + proc.stderr  # W&B did print (its sync hint), just not the key
    assert FAKE_KEY not in proc.stdout + proc.stderr
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) > 10
    assert [path for path in files if FAKE_KEY.encode() in path.read_bytes()] == []


def test_only_rank_zero_creates_the_wandb_run(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(["tests/ddp_worker.py", "configs/nsgan.yaml", str(tmp_path), *OFFLINE, "trainer.devices=2",
                     "trainer.max_steps=2", f"run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = offline_runs(run)  # rank 1 would have made a second one here (same save_dir)
    assert offline.name.endswith((run / WANDB_RUN_ID_FILE).read_text().strip())
    assert config_values(offline)["batch/world_size"] == 2 and "train/d_loss" in history_keys(offline)


def test_a_training_started_by_a_wandb_process_uses_its_own_service(tmp_path):
    # wandb shares its service with child processes (WANDB_SERVICE). Were the training to log
    # through its parent's service, a killed training's run would stay open there and the resumed
    # one would fail with "run ID ... is in use" (as a requeued SLURM job did).
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tests/wandb_parent.py", str(run), *OFFLINE, "run.checkpoint_every=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert "resumed training exit status: 0" in proc.stdout, proc.stderr[-3000:]
    run_id = (run / WANDB_RUN_ID_FILE).read_text().strip()
    runs = offline_runs(run)
    assert len(runs) == 2 and all(f"-{run_id}" in path.name for path in runs)
    resumed = max(runs, key=lambda path: path.stat().st_mtime)
    assert [r.run_id for r in records_of(resumed, "run")] == [run_id]
    assert [e.exit_code for e in records_of(resumed, "exit")] == [0]
    start = int(re.search(r"resumed from iteration (\d+)", proc.stdout).group(1))
    assert wandb_logged_iterations(resumed) == list(range(start + 1, start + 5))


def test_a_wandb_sweep_agents_run_id_names_the_run(tmp_path, monkeypatch):
    """`wandb agent` sets WANDB_SWEEP_ID and WANDB_RUN_ID and passes the parameters as key=value
    arguments (`${args_no_hyphens}`): the run directory and the W&B run take the agent's id."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep42")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun7")
    monkeypatch.chdir(tmp_path)
    result = train(load_config(str(ROOT / "configs" / "nsgan.yaml"),
                               OFFLINE + ["optim.g.lr=0.0003", f"run.root={tmp_path / 'runs'}"]))
    assert result.run_dir.name == "nsgan-agentrun7"
    assert (result.run_dir / WANDB_RUN_ID_FILE).read_text().strip() == "agentrun7"
    (offline,) = offline_runs(result.run_dir)
    assert offline.name.endswith("agentrun7")
    assert config_values(offline)["config"]["optim"]["g"]["lr"] == 0.0003


# ----------------------------------------------------------------------------- server unreachable
@contextlib.contextmanager
def refusing_server():
    """The URL of a closed port on 127.0.0.1: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def silent_server():
    """The URL of a server that accepts every connection and never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    held = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed at the end
            while True:
                held.append(listener.accept()[0])
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for connection in held:
            connection.close()


@pytest.mark.parametrize("error_reporting, bound_s", [
    ("false", 90),  # the whole processes; wandb's default init timeout alone is 90 s
    # W&B's own error report (WANDB_ERROR_REPORTING) then waits for the silent server at exit (~20 s more)
    pytest.param("true", 150, marks=pytest.mark.slow),
])
def test_an_unreachable_wandb_server_neither_stops_nor_holds_up_training(tmp_path, error_reporting, bound_s):
    """W&B online, its server refusing connections or never answering: each training (a real
    process; both at once) ends in bounded time with exit code 0, one warning, the run logged to
    W&B offline instead, and metrics.csv, the report and the checkpoints complete."""
    with refusing_server() as refused, silent_server() as silent:
        start = time.monotonic()
        procs = {name: subprocess.Popen(
            [sys.executable, "-m", "dgm_scale", "train", "configs/nsgan.yaml", *TINY_TRAIN,
             "tracking.wandb.mode=online", "tracking.wandb.init_timeout=2", f"run.dir={tmp_path / name}"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, WANDB_BASE_URL=url, WANDB_API_KEY=FAKE_KEY, WANDB_ERROR_REPORTING=error_reporting,
                     PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
            for name, url in (("refused", refused), ("silent", silent))}
        try:
            outputs = {name: proc.communicate(timeout=max(1.0, start + bound_s - time.monotonic()))[0]
                       for name, proc in procs.items()}
        finally:
            for proc in procs.values():
                proc.kill()
    print(f"both trainings done in {time.monotonic() - start:.0f} s")
    for name, output in outputs.items():
        run = tmp_path / name
        assert procs[name].returncode == 0, output[-3000:]
        assert "Traceback" not in output
        mentions = [line for line in output.splitlines() if re.search(r"W&B|(^|\s)wandb\b", line, re.IGNORECASE)]
        assert len(mentions) == 1, output[-3000:]
        (warning,) = mentions
        assert "W&B server not reachable" in warning and "logs to W&B offline instead" in warning
        assert [int(float(row["train/iteration"])) for row in metrics_rows(run)] == [1, 2, 3, 4]
        assert "finished" in (run / "report.html").read_text()
        assert load_module(run / "checkpoints" / "last.ckpt").checkpoint_iteration == 4
        (offline,) = offline_runs(run)
        assert wandb_logged_iterations(offline) == [1, 2, 3, 4]
