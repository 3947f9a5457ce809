"""The on-disk sample layout of a shard set, in one place (the writer and `inspect` use it).

A shard is a plain POSIX (ustar) tar. Sample i is stored as consecutive members
`<key>.<ext>` (the image: png | jpg | webp, or npy = a uint8 H x W x C array) followed by
`<key>.cls` (the label in ASCII decimal) when the set is labelled, where
`key = format_key(i)` is the zero-padded global index, e.g. `000000012`. Every member has
mtime 0, mode 0444, uid/gid 0 and no user names, so rebuilding gives byte-identical tars.
"""
from __future__ import annotations

import re
import tarfile
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, Optional, Tuple

ENCODINGS = ("png", "jpg", "webp", "npy")
# Extensions accepted as the image member when reading existing shards ("jpeg" = "jpg").
READ_IMAGE_EXTS = ENCODINGS + ("jpeg",)
LABEL_EXT = "cls"
KEY_DIGITS = 9
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads a closed archive to a multiple of this
SHARD_RE = r"-(\d{6})\.tar"

Sample = Tuple[str, Dict[str, bytes]]  # (key, {ext: payload})


def format_key(index: int) -> str:
    """The `__key__` of global sample `index`: zero-padded decimal, e.g. 12 -> '000000012'."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(name: str, index: int) -> str:
    """File name of shard `index` of set `name`: 'name-000000.tar'."""
    return f"{name}-{index:06d}.tar"


def is_shard_of(name: str, filename: str) -> bool:
    """True when `filename` is named like a shard of set `name`."""
    return re.fullmatch(re.escape(name) + SHARD_RE, filename) is not None


def sample_members(key: str, ext: str, payload: bytes, label: Optional[int]) -> list:
    """[(member name, bytes)] of one sample in the fixed member order: image, then label."""
    members = [(f"{key}.{ext}", payload)]
    if label is not None:
        members.append((f"{key}.{LABEL_EXT}", str(int(label)).encode("ascii")))
    return members


def member_bytes(payload_size: int) -> int:
    """Bytes one member takes in a ustar archive: a 512-byte header + the padded payload."""
    return BLOCK + -(-payload_size // BLOCK) * BLOCK


def archive_bytes(members_total: int) -> int:
    """Final file size of a closed archive whose members take `members_total` bytes."""
    # Two zero blocks end the archive, then tarfile pads to a whole record.
    return -(-(members_total + 2 * BLOCK) // RECORD) * RECORD


def open_writer(fileobj: BinaryIO) -> tarfile.TarFile:
    """A tar writer on an open binary file, in ustar format (no PAX headers: nothing time-
    or host-dependent). Closing it leaves `fileobj` open (for fsync)."""
    return tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Append one regular-file member with fixed metadata (the source of byte-identity)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, BytesIO(payload))


def iter_tar_samples(path: Path) -> Iterator[Sample]:
    """Samples of one tar in file order, grouping consecutive members that share a key.

    Uses the stream reader's fast tar parser; a truncated or corrupt tar raises tario.TarError,
    and a tar cut exactly between samples just yields fewer samples.
    """
    from .samples import split_name
    from .tario import iter_members

    key: Optional[str] = None
    fields: Dict[str, bytes] = {}
    with open(path, "rb") as handle:
        for name, data in iter_members(handle, str(path)):
            parts = split_name(name)
            if parts is None:  # no extension, or a hidden companion file
                continue
            member_key, ext = parts
            if member_key != key and fields:
                yield key, fields  # type: ignore[misc]
                fields = {}
            key = member_key
            fields[ext] = data
    if fields:
        yield key, fields  # type: ignore[misc]
