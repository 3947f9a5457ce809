"""W&B offline run files read back."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path





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
