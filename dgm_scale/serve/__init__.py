"""`dgm-scale serve CKPT_OR_EXPORT [--host H] [--port P] [--device D] [--queue N] [--connections N]
[--timeout S]`: a small local web page
with live samples of a trained image model, from its checkpoint or from a sampler `dgm-scale
export` wrote (the file beside its FILE.json sidecar; run on the CPU, the same samples as the
checkpoint it came from): seed, class and the controls the model's family offers
(truncation, temperature, a diffusion model's sampler / steps / guidance), a latent
interpolation strip, and a batch download.

Built on the standard library's `http.server.ThreadingHTTPServer`, not a web framework: nothing
to install, and the page is a handful of GET endpoints. It binds to 127.0.0.1 unless `--host`
says otherwise (the server has no authentication: expose it only on a network you trust).

Endpoints (GET; query parameters; every error is a 4xx with a one-line text body naming the
parameter, and the server keeps serving; a failure inside the model is a one-line 500):

- `/`: the page (self-contained HTML; `/?seed=3&class=2` opens it at that seed and class).
- `/api/meta`: JSON: name, family, modality, num_classes, sample_shape, latent_dim (null without
  a latent space), iteration, options (name -> spec: a number {default, max[, min]}, an integer
  {type: integer, default, min, max} or a choice {type: choice, default, choices}) and caps.
- `/api/grid.png?seed=S&num=N&class=K&truncation=T|temperature=T`: a PNG grid (square, 2 px black
  padding, native resolution) of samples 0 .. N-1 of seed S: those of `dgm-scale sample --seed S`.
- `/api/batch?seed=&num=&class=&truncation=|temperature=&format=npz|png`: the same samples to
  download: npz (default) with `samples` uint8 [N, H, W, C] and, for conditional models,
  `labels` [N] (the keys `dgm-scale sample --format npz` writes); png: the grid.
- `/api/interpolate.png?seed_a=&seed_b=&steps=&class=&truncation=`: one row of `steps` frames
  from sample 0 of seed_a to sample 0 of seed_b (spherical interpolation of the latents; latent
  families only).

Parameters and caps: seed, seed_a, seed_b in 0 .. 2^31-1 (default 0; seed_b 1); num in 1 .. 256
(default 16; batch 64); steps in 2 .. 32 (default 8); class in 0 .. num_classes-1, conditional
models only (default: sample i has class i % num_classes; the strip: class 0); truncation
(GAN, VAE: latents z * psi, psi in (0, 1], default 1) or temperature (autoregressive: (0, 10],
default the model's; an autoregressive export's was fixed when it was exported: none), or a
diffusion model's sampler (ddpm, ddim, euler, heun, dpmpp_2m; default its sampler.name), steps
(1 .. 250, at most a discrete model's loss.timesteps; default sampler.steps) and, for a
class-conditional model trained with label dropout, guidance ([0, 10], default sampler.guidance;
a diffusion export's were fixed when it was exported: none); format npz | png. The options are
the family's (GenerativeModule.sampling_controls), checked here by their spec. Unknown or
repeated parameters are refused.

The server asks a "source" for samples (sources.py): `open_source(path)` gives an export's (a
file with a sidecar) or a checkpoint's, and `serve(source, host, port)` takes any object with
the source interface; `serving(source)` serves it in a thread while a `with` block runs.

Load and abuse (limits.py; `--queue`, `--connections`, `--timeout`, defaults 8, 32, 10 s): at most
`queue` sample requests (grid, batch, interpolate) are in the server at once, generating one at a
time; more get a 503 with `Retry-After: 1` at once. At most `connections` connections get a
thread; more get the same 503. A connection whose client leaves a read or a write waiting
`timeout` seconds (a socket opened and left silent) is closed. Requests are GET without a body
(any body: 413) and URLs of at most 2048 characters (414); other methods get 501, and
http.server's own limits (a request line over 64 KiB, over 100 headers) a one-line 4xx. No
response carries a traceback: a failure inside the model is logged with it, answered in one line.
"""
from __future__ import annotations

import argparse

from dgm_scale.core.imports import lazy_attributes
from dgm_scale.core.trust import add_trust_option

# The server and sources import torch: loaded on first use, so that the CLI's parser stays light.
_LAZY = {name: f"{__name__}.{module}" for name, module in (
    ("serve", "server"), ("serving", "server"), ("make_server", "server"), ("url_of", "server"), ("CAPS", "server"), ("Limits", "limits"),
    ("open_source", "sources"), ("CheckpointSource", "sources"), ("ModuleSource", "sources"),
    ("ExportSource", "sources"), ("SampleSource", "sources"), ("BadRequest", "sources"))}
__getattr__ = lazy_attributes(__name__, _LAZY)


def add_serve_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `dgm-scale serve` on the CLI's subcommands."""
    parser = commands.add_parser("serve", help="a local web page with live samples of an image model: seed, class, "
                                               "truncation / temperature, latent interpolation, npz download")
    parser.add_argument("checkpoint", metavar="CKPT_OR_EXPORT",
                        help="a dgm_scale checkpoint (.ckpt) or an exported sampler (dgm-scale export's "
                             ".pt / .pt2 / .onnx with its FILE.json sidecar beside it; run on the CPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; the page has no login)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available; exports: cpu)")
    parser.add_argument("--queue", type=int, default=8,
                        help="sample requests in the server at once, generating one at a time (default 8); "
                             "more get 503 with Retry-After")
    parser.add_argument("--connections", type=int, default=32,
                        help="open connections given a thread (default 32); more get 503 with Retry-After")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds a connection may keep a read or write waiting before it is closed (default 10)")
    add_trust_option(parser)
    parser.set_defaults(func=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from dgm_scale.core.errors import ConfigError
    from dgm_scale.serve.limits import Limits
    from dgm_scale.serve.server import serve
    from dgm_scale.serve.sources import open_source

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 0 .. 65535")
    limits = Limits(args.queue, args.connections, args.timeout)  # a bad value stops before the model loads
    serve(open_source(args.checkpoint, args.device, trust_code=args.trust_code), args.host, args.port, limits)
    return 0


__all__ = [
    "CAPS",
    "BadRequest",
    "CheckpointSource",
    "ExportSource",
    "Limits",
    "ModuleSource",
    "SampleSource",
    "add_serve_parser",
    "cmd_serve",
    "make_server",
    "open_source",
    "serve",
    "serving",
    "url_of",
]
