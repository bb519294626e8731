"""The ``dit-accel`` command.

    dit-accel render --prompt "a large red circle moving right on a black background" --out clip.mp4
    dit-accel render --prompt "..." --out clip.gif --method window --opt density=0.25 --dense-steps 0.25

``render`` draws a clip with the embedded tiny text-to-video model (offline; see docs/tiny_model.md), stock
attention by default or with a dit_accel method. Output by the ``--out`` suffix: ``.mp4``/``.webm``/``.mkv``/
``.mov`` through imageio + imageio-ffmpeg (``pip install "dit-accel[video]"``), ``.gif`` through Pillow, and a
path without a suffix (or an existing folder) gets one PNG per frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "check_output", "main", "write_frames"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit-accel", description="dit_accel: sparse attention for diffusers DiTs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="render a clip with the embedded tiny text-to-video model")
    r.add_argument(
        "--prompt", required=True, help='e.g. "a small blue square orbiting clockwise on a gray background"'
    )
    r.add_argument("--out", required=True, help="clip.mp4 | clip.gif | a folder for PNG frames")
    r.add_argument("--method", help="dit_accel method (dense, window, ...); default: stock attention")
    r.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option or config field, repeatable",
    )
    r.add_argument("--dense-steps", type=float, help="dense warm-up: a count (>= 1) or a fraction in [0, 1)")
    r.add_argument("--steps", type=int, help="denoising steps (default: 10 on CPU, 30 on GPU)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--frames", type=int, help="frames, 4k + 1 (default: 17 on CPU, 49 on GPU)")
    r.add_argument("--height", type=int, help="multiple of 16 (default: 96 on CPU, 192 on GPU)")
    r.add_argument("--width", type=int, help="multiple of 16 (default: 128 on CPU, 256 on GPU)")
    r.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    r.add_argument("--fps", type=int, default=16)
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--weights", help="weights folder of the tiny model (default: the installed package's)")
    return parser


def _knobs(args) -> dict | None:
    if args.method is None:
        if args.opt or args.dense_steps is not None:
            raise SystemExit("dit-accel: --opt and --dense-steps need --method")
        return None
    from dit_accel.pipelines.quality import parse_value

    knobs: dict = {"method": args.method}
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"dit-accel: --opt expects KEY=VALUE, got {item!r}")
        knobs[key] = parse_value(value)
    if args.dense_steps is not None:
        d = args.dense_steps
        knobs["dense_steps"] = int(d) if d >= 1 and float(d).is_integer() else d
    return knobs


def check_output(out: str) -> None:
    """Fail early (SystemExit with what to do) when ``out`` cannot be written here."""
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        try:
            import imageio.v2  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise SystemExit(
                f"dit-accel: writing {suffix} needs imageio and imageio-ffmpeg: "
                'pip install "dit-accel[video]"; or write --out clip.gif, or --out a_folder/ for PNG frames'
            ) from None
    elif suffix and suffix != ".gif" and not path.is_dir():
        raise SystemExit(f"dit-accel: unknown output type {suffix!r}: use .mp4, .gif or a folder")


def write_frames(frames, out: str, fps: int = 16) -> Path:
    """Write [F, H, W, 3] frames in [0, 1] to ``out`` (see the module docstring for the formats)."""
    import numpy as np

    path = Path(out)
    check_output(out)
    data = (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        import imageio.v2 as imageio

        path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimwrite(str(path), list(data), fps=fps, macro_block_size=1)
        return path
    from PIL import Image

    if suffix == ".gif":
        path.parent.mkdir(parents=True, exist_ok=True)
        images = [Image.fromarray(f) for f in data]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(data):
        Image.fromarray(f).save(path / f"frame_{i:04d}.png")
    return path


def _render(args) -> int:
    import time

    import torch

    import dit_accel
    from dit_accel.pipelines.quality import render_frames
    from dit_accel.pipelines.tiny_video.model import (
        WeightsNotFoundError,
        load_tiny_video_pipeline,
        render_defaults,
    )

    knobs = _knobs(args)
    check_output(args.out)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = render_defaults(device)
    try:
        pipe = load_tiny_video_pipeline(device=device, weights_dir=args.weights)
    except WeightsNotFoundError as exc:
        print(f"dit-accel: {exc}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    handle = dit_accel.apply(pipe, **knobs) if knobs else None
    call = {
        "num_frames": args.frames or defaults["frames"],
        "height": args.height or defaults["height"],
        "width": args.width or defaults["width"],
        "num_inference_steps": args.steps or defaults["steps"],
        "guidance_scale": args.guidance,
    }
    t0 = time.perf_counter()
    frames = render_frames(pipe, args.prompt, args.seed, **call)
    seconds = time.perf_counter() - t0
    path = write_frames(frames, args.out, args.fps)
    print(
        f"wrote {path}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}, "
        f"{call['num_inference_steps']} steps on {device} in {seconds:.1f}s"
    )
    if handle is not None:
        print(handle.stats().summary().splitlines()[0])
        dit_accel.remove(pipe)
    return 0


def main(argv=None) -> int:
    """Entry point of the ``dit-accel`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "render":
        return _render(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
