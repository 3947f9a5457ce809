"""Property-based fuzzing of both image sources with malformed files (hypothesis, derandomised).

Generated: image files made from valid PNG / JPEG / WebP / BMP / npy encodings by truncation,
a bit flip, overwritten or inserted bytes, random bytes behind a real signature, random header
fields (with valid CRCs, so the decoders get past the checksums) and random EXIF blocks, under
their own or another image extension; and tar shards damaged whole (truncated, a bit flip,
overwritten bytes, random bytes, another archive format) or member by member (random header
fields with a valid checksum, odd member types, scattered samples).

Invariant, for every file: the source delivers the file's image with the right shape and range,
or skips it and counts the skip; with data.strict=true it stops with a one-line DataError naming
the file (and the shard) instead. Never another exception, a hang (SIGALRM guard) or a tensor of
the wrong shape. CI runs 300 generated files (120 folder, 90 shard members, 90 shards); the
`slow` variants 10 times as many. See the counts with --hypothesis-show-statistics.
"""
from __future__ import annotations

import bz2
import functools
import gzip
import io
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from helpers import encode_image, hang_guard, png_bytes, png_chunk, random_rgb, single_worker, tar_bytes
from dgm_scale.config.schema import DataConfig
from dgm_scale.data import DataError, build_dataset

R = 8
GUARD_S = 20  # per generated file: a hang fails the test instead of stalling the run
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


def fuzz(examples: int):
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@functools.lru_cache(maxsize=1)
def bases() -> dict[str, tuple[str, bytes]]:
    """Valid files to damage: name -> (extension, bytes)."""
    rgb = Image.fromarray(random_rgb(1, 12)[:, :10])
    exif = Image.Exif()
    exif[0x0112] = 6
    npy = io.BytesIO()
    np.save(npy, random_rgb(2, 10))
    return {
        "png_rgb": ("png", encode_image(rgb)),
        "png_grey": ("png", encode_image(rgb.convert("L"))),
        "png_palette": ("png", encode_image(rgb.convert("P"), transparency=3)),
        "png_rgba": ("png", encode_image(rgb.convert("RGBA"))),
        "png_16bit": ("png", encode_image(Image.fromarray(np.arange(120, dtype=np.uint16).reshape(10, 12) * 500))),
        "png_exif": ("png", encode_image(rgb, exif=exif.tobytes())),
        "jpeg": ("jpg", encode_image(rgb, "JPEG")),
        "jpeg_exif": ("jpg", encode_image(rgb, "JPEG", exif=exif.tobytes())),
        "jpeg_cmyk": ("jpg", encode_image(rgb.convert("CMYK"), "JPEG")),
        "webp": ("webp", encode_image(rgb, "WEBP")),
        "bmp": ("bmp", encode_image(rgb, "BMP")),
        "npy": ("npy", npy.getvalue()),
    }


# ----------------------------------------------------------------------------- file mutations
@st.composite
def damaged(draw, data: bytes) -> tuple[str, bytes]:
    """(how, bytes): `data` damaged one way (or replaced by random bytes)."""
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "random", "signature_then_random"]))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "truncate":
        return how, data[:at]
    if how == "flip":
        return how, data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
    junk = draw(st.binary(min_size=1, max_size=64))
    if how == "overwrite":
        return how, data[:at] + junk + data[at + len(junk):]
    if how == "insert":
        return how, data[:at] + junk + data[at:]
    if how == "random":
        return how, draw(st.binary(min_size=0, max_size=600))
    return how, data[:draw(st.integers(0, 24))] + draw(st.binary(max_size=400))


@st.composite
def png_header(draw) -> tuple[str, bytes]:
    """A PNG whose IHDR holds random sizes, bit depth, colour type and flags (valid CRC)."""
    import struct

    data = bases()["png_rgb"][1]
    size = st.one_of(st.integers(1, 64), st.integers(0, 2 ** 32 - 1))
    fields = struct.pack(">IIBBBBB", draw(size), draw(size), draw(st.sampled_from([1, 2, 4, 8, 16, 0, 3, 255])),
                         draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7])), *draw(st.lists(st.integers(0, 2), min_size=3, max_size=3)))
    return "png_header", data[:8] + png_chunk(b"IHDR", fields) + data[33:]


@st.composite
def jpeg_size(draw) -> tuple[str, bytes]:
    """A JPEG whose frame header claims random dimensions."""
    data = bytearray(bases()["jpeg"][1])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = draw(st.binary(min_size=4, max_size=4))
    return "jpeg_size", bytes(data)


@st.composite
def random_exif(draw) -> tuple[str, bytes]:
    """A PNG (eXIf chunk) or a JPEG (APP1) with a random or damaged EXIF block: decoders parse it."""
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(0, 9))
    block = draw(st.one_of(st.binary(max_size=200), damaged(exif.tobytes()).map(lambda pair: pair[1])))
    if draw(st.booleans()):
        png = bases()["png_rgb"][1]
        return "png_exif", png[:33] + png_chunk(b"eXIf", block) + png[33:]
    jpeg = bases()["jpeg"][1]
    app1 = b"Exif\0\0" + block
    return "jpeg_exif", jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:]


@st.composite
def malformed_image(draw, exts=IMAGE_EXTS) -> tuple[str, str, bytes]:
    """(extension, how, bytes) of a damaged image file; the extension is mostly its own."""
    kind = draw(st.sampled_from(["damaged", "damaged", "damaged", "png_header", "jpeg_size", "exif"]))
    if kind == "damaged":
        name = draw(st.sampled_from(sorted(n for n, (ext, _) in bases().items() if ext in exts)))
        ext, data = bases()[name]
        how, data = draw(damaged(data))
        how = f"{name}/{how}"
    else:
        how, data = draw({"png_header": png_header(), "jpeg_size": jpeg_size(), "exif": random_exif()}[kind])
        ext = "png" if how.startswith("png") else "jpg"
    if draw(st.integers(0, 9)) == 0:  # now and then under another image extension
        ext = draw(st.sampled_from(exts))
    return ext, how, data


# ----------------------------------------------------------------------------- checks
def check_batch(x: torch.Tensor, channels: int) -> None:
    assert x.dtype == torch.float32 and tuple(x.shape[-3:]) == (channels, R, R)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


def check_strict_error(error: DataError, *names: str) -> None:
    message = str(error)
    assert "\n" not in message and "data.strict=true" in message
    assert all(name in message for name in names), (message, names)


def folder_item(root: Path, channels: int, strict: bool):
    return build_dataset(DataConfig(name="folder", path=str(root), resolution=R, channels=channels,
                                    val_fraction=0.0, strict=strict), "train")[1]


def check_folder(ext: str, how: str, data: bytes, channels: int) -> None:
    """Folder [good file, damaged file]: the damaged one decodes, or is replaced by the good one
    and flagged; strict: the same image, or one line naming the file."""
    with tempfile.TemporaryDirectory() as tmp, hang_guard(GUARD_S):
        root = Path(tmp)
        (root / "a.png").write_bytes(png_bytes(0))
        path = root / f"b.{ext}"
        path.write_bytes(data)
        x, _, replaced = folder_item(root, channels, strict=False)
        check_batch(x, channels)
        try:
            strict_x = folder_item(root, channels, strict=True)[0]
        except DataError as error:
            check_strict_error(error, str(path))
            strict_x = None
    if int(replaced):
        event("folder: skipped and counted")
        assert strict_x is None
    else:
        event("folder: decoded")
        assert strict_x is not None and torch.equal(strict_x, x)


def read_shard(shard: Path, channels: int, strict: bool):
    """(keys delivered, faults counted) of one pass over `shard`, every batch checked."""
    worker = single_worker(str(shard), resolution=R, channels=channels, strict=strict)
    keys = []
    for x, labels, info in worker.batches():
        check_batch(x, channels)
        assert labels.dtype == torch.int64 and labels.shape == (1,)
        keys += info["keys"]
    return keys, sum(worker.faults.counts.values())


def check_shard(tar: bytes, channels: int, accountable: bool, member: str | None = None) -> None:
    """A shard [a, b, c]: what is not delivered is counted (when the damage cannot forge a valid
    header: `accountable`); strict: success or one line naming the shard (and the member)."""
    with tempfile.TemporaryDirectory() as tmp, hang_guard(GUARD_S):
        shard = Path(tmp) / "x-000000.tar"
        shard.write_bytes(tar)
        keys, faults = read_shard(shard, channels, strict=False)
        try:
            strict_keys = read_shard(shard, channels, strict=True)[0]
        except DataError as error:
            check_strict_error(error, shard.name, *([member] if member else []))
            strict_keys = None
    lost = {"a", "b", "c"} - set(keys)
    if accountable:
        assert set(keys) <= {"a", "b", "c"} and (not lost or faults > 0), (keys, faults)
    event("shard: " + ("all delivered" if not lost else "lost samples counted" if faults else "samples renamed"))
    assert (strict_keys is None) == (faults > 0) and strict_keys in (None, keys)


# ----------------------------------------------------------------------------- folder
@fuzz(120)
@given(file=malformed_image(), channels=st.sampled_from([1, 3]))
def test_fuzz_folder(file, channels):
    check_folder(*file, channels)


@pytest.mark.slow
@fuzz(1200)
@given(file=malformed_image(), channels=st.sampled_from([1, 3]))
def test_fuzz_folder_long(file, channels):
    check_folder(*file, channels)


# ----------------------------------------------------------------------------- shard members
def three_samples(ext: str = "png", data: bytes | None = None, label: bytes = b"2") -> bytes:
    """A shard of samples a, b (its image `data` as .`ext`, its label), c."""
    data = png_bytes(2) if data is None else data
    return tar_bytes([("a.png", png_bytes(0)), ("a.cls", b"1"), (f"b.{ext}", data), ("b.cls", label),
                      ("c.png", png_bytes(3))])


@st.composite
def malformed_member(draw):
    ext, how, data = draw(malformed_image(exts=(*IMAGE_EXTS[:-1], "npy")))
    label = draw(st.one_of(st.just(b"2"), st.binary(max_size=8)))  # now and then a bad label too
    return how, three_samples(ext, data, label)


def _check_member(shard, channels):
    how, tar = shard
    check_shard(tar, channels, accountable=True, member="sample 'b'")


@fuzz(90)
@given(shard=malformed_member(), channels=st.sampled_from([1, 3]))
def test_fuzz_shard_members(shard, channels):
    _check_member(shard, channels)


@pytest.mark.slow
@fuzz(900)
@given(shard=malformed_member(), channels=st.sampled_from([1, 3]))
def test_fuzz_shard_members_long(shard, channels):
    _check_member(shard, channels)


# ----------------------------------------------------------------------------- whole shards
def _checksummed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)


@st.composite
def forged_header(draw) -> tuple[str, bytes]:
    """One member header's field set to random bytes, the checksum made valid again."""
    tar = bytearray(three_samples())
    with tarfile.open(fileobj=io.BytesIO(bytes(tar))) as archive:
        offsets = [member.offset for member in archive.getmembers()]
    at = draw(st.sampled_from(offsets))
    field = draw(st.sampled_from([(0, 100), (124, 136), (156, 157), (257, 263), (345, 500)]))  # name size type magic prefix
    header = bytearray(tar[at:at + 512])
    value = draw(st.one_of(st.binary(min_size=field[1] - field[0], max_size=field[1] - field[0]),
                           st.sampled_from([b"x", b"5", b"S", b"L", b"K", b"g", b"\x80" + b"\xff" * 11, b"77777777777\0",
                                            b"-1", b"nodot", b"a.png\0"]).map(lambda v: v[:field[1] - field[0]])))
    header[field[0]:field[0] + len(value)] = value
    tar[at:at + 512] = _checksummed(header)
    return "forged_header", bytes(tar)


@st.composite
def odd_members(draw) -> tuple[str, bytes]:
    """Members a dataset writer would not make: directories, links, PAX / GNU records, scattered keys."""
    out = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    names = draw(st.lists(st.sampled_from(["a.png", "a.cls", "b.png", "c.png", "a.png", "x" * 120 + ".png",
                                           "dir/", "link", "._b.png", ".png", "b.", "b.PNG"]), min_size=1, max_size=6))
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for name in names:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            elif name == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "l" * draw(st.integers(1, 150))
            if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
                info.pax_headers = {draw(st.sampled_from(["comment", "size", "path", "mtime"])):
                                    draw(st.text(max_size=20))}
            data = png_bytes(1) if name != "link" and not name.endswith("/") and "png" in name.lower() else b"3"
            info.size = 0 if info.type in (tarfile.DIRTYPE, tarfile.SYMTYPE) else len(data)
            try:
                archive.addfile(info, io.BytesIO(data) if info.size else None)
            except (ValueError, tarfile.TarError, UnicodeError):
                pass  # tarfile refuses some records itself
    return "odd_members", out.getvalue()


@st.composite
def damaged_archive(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["bytes", "bytes", "forged", "odd", "zip", "gzip", "bz2", "empty", "image"]))
    if kind == "bytes":
        how, data = draw(damaged(three_samples()))
        return f"tar/{how}", data
    if kind == "forged":
        return draw(forged_header())
    if kind == "odd":
        return draw(odd_members())
    if kind == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("a.png", png_bytes(0))
        return "zip", out.getvalue()
    if kind in ("gzip", "bz2"):
        return kind, (gzip.compress if kind == "gzip" else bz2.compress)(three_samples())
    return kind, b"" if kind == "empty" else png_bytes(0)


def _check_archive(shard, channels):
    how, tar = shard
    # A forged header or odd members may rename samples legitimately: only shapes and errors checked.
    check_shard(tar, channels, accountable=how not in ("forged_header", "odd_members") and "overwrite" not in how
                and "insert" not in how)


@fuzz(90)
@given(shard=damaged_archive(), channels=st.sampled_from([1, 3]))
def test_fuzz_shards(shard, channels):
    _check_archive(shard, channels)


@pytest.mark.slow
@fuzz(900)
@given(shard=damaged_archive(), channels=st.sampled_from([1, 3]))
def test_fuzz_shards_long(shard, channels):
    _check_archive(shard, channels)
