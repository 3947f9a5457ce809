"""Tar shards (webdataset layout) of image datasets: build, manifest, inspect, stream.

Writing: `build_shards(SRC, OUT, BuildOptions(...))` writes OUT/<name>-000000.tar ... and,
last, OUT/manifest.json; `read_manifest(OUT)` loads and validates the manifest;
`inspect_shards` verifies a set against it. The sample layout is documented in `layout.py`,
the manifest format in `manifest.py`, the accepted sources in `sources.py`.
Reading: `expand_urls` (urls.py) turns a spec into shards, `ShardStream` (stream.py) makes
batches in loader workers, split by rank and worker, resumable; `make_stream_loader`
(loader.py) wraps it in a DataLoader that tracks the consumed position. tario.py is the fast
tar parser both sides use.
"""
from .loader import StreamLoader, make_stream_loader
from .stream import ShardStream
from .urls import expand_urls
from .layout import ENCODINGS, format_key, iter_tar_samples, shard_name
from .manifest import FORMAT, MANIFEST_NAME, read_manifest
from .sources import open_source
from .verify import InspectReport, inspect_shards
from .writer import BuildOptions, BuildResult, build_shards, parse_size

__all__ = [
    "ENCODINGS",
    "FORMAT",
    "MANIFEST_NAME",
    "BuildOptions",
    "BuildResult",
    "InspectReport",
    "ShardStream",
    "StreamLoader",
    "build_shards",
    "expand_urls",
    "format_key",
    "inspect_shards",
    "iter_tar_samples",
    "make_stream_loader",
    "open_source",
    "parse_size",
    "read_manifest",
    "shard_name",
]
