"""The ``dit-accel demo`` command: its arguments and what it runs (gradio is imported only when it runs)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]

_MISSING = 'the demo needs gradio, imageio and imageio-ffmpeg: pip install "dit-accel[demo]"'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dit-accel demo`` arguments."""
    parser.add_argument("--port", type=int, help="port to serve on (default: 7860, or the next free one)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only); another host is served with a warning",
    )
    parser.add_argument(
        "--model",
        default="embedded",
        metavar="PATH",
        help="'embedded' (the default: the tiny model in the package) or a local diffusers pipeline folder",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    """Serve the demo until interrupted; returns the exit status (2 for arguments that cannot work)."""
    if args.port is not None and not 0 < args.port < 65536:
        args._parser.error(f"argument --port: must be in 1..65535, got {args.port}")
    try:
        from .app import launch
        from .engine import Engine
    except ImportError as exc:
        print(f"dit-accel demo: {_MISSING} ({exc})", file=sys.stderr)
        return 2
    try:
        engine = Engine(model=args.model, device=args.device)
        engine.load(args.model)  # errors now rather than at the first request; the first render is quicker
    except ValueError as exc:  # RequestError included
        args._parser.error(str(exc))
    print(f"dit_accel demo: {engine.model} on {engine.device}; clips in {engine.out_dir}")
    try:
        blocks, url = launch(engine, host=args.host, port=args.port, block=False, quiet=True)
    except OSError as exc:  # the port is taken, or the host is not an address of this machine
        args._parser.error(f"cannot serve on {args.host}:{args.port or 'a free port'}: {exc}")
    print(f"dit_accel demo: serving on {url} (Ctrl+C stops it)", flush=True)
    blocks.block_thread()
    return 0
