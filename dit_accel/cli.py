"""The ``dit-accel`` command.

    dit-accel render --prompt "a large red circle moving right on a black background" --out clip.mp4
    dit-accel render --prompt "..." --out clip.gif --preset balanced --compare
    dit-accel render --prompt "..." --out clip.gif --method window --opt density=0.25 --dense-steps 0.25
    dit-accel render --model ./my_wan_pipeline --prompt "..." --out clip.mp4 --preset fast
    dit-accel render --model ./my_flux_pipeline --prompt "..." --out image.png --preset quality
    dit-accel presets [--family wan] [--markdown]
    dit-accel batch jobs.jsonl --out-dir renders/ --preset balanced      # dit_accel.batch, docs/batch.md
    dit-accel demo [--port N] [--model PATH] [--device auto|cpu|cuda]
    dit-accel bench [--model PATH] [--configs quality,balanced,"window:density=0.25"] [--out bench.json]

``render`` draws with the embedded tiny text-to-video model by default (offline; docs/tiny_model.md), or
with ``--model``: a pipeline folder written by ``save_pretrained`` or a hub id (passed to diffusers as it is),
of any family dit_accel supports. Stock attention unless ``--preset`` or ``--method`` is given;
``--compare`` renders stock and accelerated with the same seed, writes the accelerated output and a
side-by-side file, and prints PSNR/SSIM, times, speedup and density. Every argument is checked before a
model is loaded.

``bench`` times whole renders of one call and seed, stock attention first, then each configuration (the
family's sparse presets by default): untimed warm-up renders, then timed ones (median), each output compared
with stock's; it prints a table and, with ``--out``, writes JSON after every configuration
(``dit_accel.pipelines.bench``).

Outputs by the ``--out`` suffix: video families ``.mp4``/``.webm``/``.mkv``/``.mov`` through imageio +
imageio-ffmpeg (``pip install "dit-accel[video]"``), ``.gif`` through Pillow, a path without a suffix (or an
existing folder) one PNG per frame; image families ``.png`` (one file per image) or a folder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

__all__ = ["build_parser", "check_output", "main", "write_frames", "write_images"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")
IMAGE_SUFFIXES = (".png",)
# The embedded model's VAE and patches: frames 4k + 1, height and width multiples of 16.
_EMBEDDED_FRAMES, _EMBEDDED_MULTIPLE = 4, 16
# Every supported pipeline's VAE compresses space at least 8x.
_MODEL_MULTIPLE = 8


class UsageError(ValueError):
    """A command-line argument that cannot work; ``argument`` names it."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")
        self.argument = argument


def build_parser() -> argparse.ArgumentParser:
    from dit_accel.methods import method_names
    from dit_accel.pipelines.presets import FAMILIES, all_preset_names

    parser = argparse.ArgumentParser(
        prog="dit-accel", description="dit_accel: sparse attention for diffusers DiTs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "render",
        help="render with the embedded tiny text-to-video model or any supported pipeline",
        description="Render a clip (video families) or images (image families); every argument is checked "
        "before the model is loaded.",
    )
    r.set_defaults(_parser=r)
    r.add_argument(
        "--prompt", required=True, help='e.g. "a small blue square orbiting clockwise on a gray background"'
    )
    r.add_argument(
        "--out",
        required=True,
        help="video: clip.mp4 | clip.gif | a folder for PNG frames; image: image.png | a folder",
    )
    r.add_argument(
        "--preset", choices=all_preset_names(), help="dit_accel preset (docs/pipelines.md); default: stock"
    )
    r.add_argument("--method", choices=method_names(), help="dit_accel method instead of a preset")
    r.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method knob or config field, repeatable; overrides the preset's",
    )
    r.add_argument("--dense-steps", type=float, help="dense warm-up: a count (>= 1) or a fraction in [0, 1)")
    r.add_argument(
        "--compare",
        action="store_true",
        help="also render stock attention with the same seed; write a side-by-side file, print the numbers",
    )
    _render_shape_arguments(r)
    r.add_argument("--fps", type=int, default=16, help="frames per second of a video file")

    p = sub.add_parser("presets", help="list the presets with their knobs and measured numbers")
    p.set_defaults(_parser=p)
    p.add_argument("--family", choices=list(FAMILIES), help="only this family")
    p.add_argument("--markdown", action="store_true", help="the markdown table of docs/pipelines.md")

    from dit_accel import batch

    b = sub.add_parser(
        "batch", help="render every job of a job file: resumable, with a manifest (docs/batch.md)"
    )
    batch.add_arguments(b)

    k = sub.add_parser(
        "bench",
        help="time whole renders: stock attention against presets or methods, same call and seed",
        description="Time whole renders on this machine: stock attention, then each configuration; every "
        "argument is checked before the model is loaded.",
    )
    k.set_defaults(_parser=k)
    k.add_argument(
        "--configs",
        help="comma-separated presets of the model's family or method specs (method:key=value,...; quote "
        "specs with commas: 'window:density=0.25'); default: the family's quality, balanced and fast",
    )
    k.add_argument("--prompt", default=_BENCH_PROMPT, help=f"default: {_BENCH_PROMPT!r}")
    k.add_argument("--warmup", type=int, default=1, help="untimed renders per configuration (default 1)")
    k.add_argument(
        "--repeats", type=int, default=2, help="timed renders per configuration (median; default 2)"
    )
    k.add_argument("--out", help="JSON file, rewritten after every configuration")
    _render_shape_arguments(k)

    from dit_accel.demo.launch import add_arguments as demo_arguments

    d = sub.add_parser("demo", help="the Gradio demo: dense and accelerated side by side (docs/demo.md)")
    d.set_defaults(_parser=d)
    demo_arguments(d)
    return parser


_BENCH_PROMPT = "a large red circle moving right on a black background"


def _render_shape_arguments(r: argparse.ArgumentParser) -> None:
    """What render and bench share: the model, the call's size and steps, seed, device, dtype, embedded
    weights."""
    r.add_argument(
        "--model",
        default="embedded",
        metavar="PATH_OR_ID",
        help="a pipeline folder (save_pretrained), a hub id, or 'embedded' (the default: the tiny model)",
    )
    r.add_argument("--steps", type=int, help="denoising steps (embedded model: 10 on CPU, 30 on GPU)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--frames", type=int, help="frames (embedded model: 4k + 1; 17 on CPU, 49 on GPU)")
    r.add_argument("--height", type=int, help="embedded model: multiple of 16 (96 on CPU, 192 on GPU)")
    r.add_argument("--width", type=int, help="embedded model: multiple of 16 (128 on CPU, 256 on GPU)")
    r.add_argument("--guidance", type=float, help="classifier-free guidance scale (embedded model: 5.0)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    r.add_argument(
        "--weights", help="weights folder of the embedded model (default: the installed package's)"
    )
    add_compile_argument(r)
    add_graphs_argument(r)


def add_compile_argument(r: argparse.ArgumentParser) -> None:
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks (regional; the first render pays for compiling; on the "
        "CPU inductor needs a C++ compiler)",
    )


def add_graphs_argument(r: argparse.ArgumentParser) -> None:
    r.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the accelerated transformer forwards as CUDA graphs (cuda_graphs=True): removes the "
        "host cost that bounds small geometries such as the embedded model's; GPU only (docs/graphs.md)",
    )
    r.add_argument(
        "--fuse-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each transformer block's elementwise work (residuals, LayerNorms, modulation) as one "
        "Triton pass per step (fuse_blocks=True; Wan; GPU, eager: docs/kernels.md#block-elementwise-work); "
        "default: the preset's (Wan's sparse presets fuse)",
    )


def graph_knobs(args) -> dict:
    """The config switches of ``--cuda-graphs`` and ``--fuse-blocks`` (``cuda_graphs``, ``fuse_blocks``)."""
    knobs = {"cuda_graphs": True} if getattr(args, "cuda_graphs", False) else {}
    if getattr(args, "fuse_blocks", None) is not None:
        knobs["fuse_blocks"] = args.fuse_blocks
    return knobs


def compile_loaded(args, pipe, prog: str = "dit-accel") -> None:
    """With ``--compile``: compile the loaded pipeline's transformer blocks (stock and accelerated renders
    alike), saying so."""
    if not args.compile:
        return
    from dit_accel.pipelines import wrapped

    try:
        n = wrapped.compile_blocks(pipe)
    except ValueError as exc:
        raise UsageError("--compile", str(exc)) from None
    print(f"{prog}: torch.compile on {n} transformer blocks; the first render includes compiling", flush=True)


# ------------------------------------------------------------------------------------------------ checks


def _knobs(args) -> dict | None:
    """The dit_accel knobs of ``--method``/``--opt``/``--dense-steps`` (None: no ``--method``).

    Raises:
        UsageError: a malformed ``--opt``, or knobs without ``--method``/``--preset``.
    """
    from dit_accel.pipelines.quality import parse_value

    if args.method is None and getattr(args, "preset", None) is None and not getattr(args, "compare", False):
        if args.opt:
            raise UsageError("--opt", "needs --method or --preset")
        if args.dense_steps is not None:
            raise UsageError("--dense-steps", "needs --method or --preset")
        return None
    knobs: dict = {"method": args.method} if args.method else {}
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError("--opt", f"expected KEY=VALUE, got {item!r}")
        if key.strip() == "method":
            raise UsageError("--opt", "give the method with --method")
        knobs[key.strip()] = parse_value(value.strip())
    if args.dense_steps is not None:
        d = args.dense_steps
        if not math.isfinite(d) or d < 0:
            raise UsageError("--dense-steps", f"must be a count >= 1 or a fraction in [0, 1), got {d}")
        knobs["dense_steps"] = int(d) if d >= 1 and float(d).is_integer() else d
    return {**knobs, **graph_knobs(args)}


def _positive(args, name: str, what: str) -> None:
    value = getattr(args, name, None)
    if value is not None and value < 1:
        raise UsageError(f"--{name}", f"must be a positive {what}, got {value}")


def _check_numbers(args, embedded: bool) -> None:
    _positive(args, "frames", "number of frames")
    _positive(args, "steps", "number of denoising steps")
    _positive(args, "fps", "frame rate")
    for name in ("height", "width"):
        value = getattr(args, name)
        multiple = _EMBEDDED_MULTIPLE if embedded else _MODEL_MULTIPLE
        if value is not None and (value < multiple or value % multiple):
            who = "the embedded model needs" if embedded else "every supported pipeline needs"
            raise UsageError(f"--{name}", f"{who} a positive multiple of {multiple}, got {value}")
    if embedded and args.frames is not None and (args.frames - 1) % _EMBEDDED_FRAMES:
        k = (args.frames - 1) // _EMBEDDED_FRAMES
        raise UsageError(
            "--frames",
            f"the embedded model needs 4k + 1 frames (e.g. {4 * k + 1} or {4 * k + 5}), got {args.frames}",
        )
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError("--guidance", f"must be a finite number, got {args.guidance}")


def _device(args) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device",
            f"cuda was asked for, but torch {torch.__version__} sees no CUDA device; use --device cpu",
        )
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _compare_path(out: str) -> Path:
    path = Path(out)
    if path.suffix:
        return path.with_name(f"{path.stem}_compare{path.suffix}")
    return path.with_name(f"{path.name}_compare")


def _writable(path: Path, folder: bool) -> None:
    """Raise UsageError("--out") when ``path`` (a file, or a folder when ``folder``) cannot be written."""
    if path.exists():
        if folder and not path.is_dir():
            raise UsageError("--out", f"{path} exists and is not a folder")
        if not os.access(path, os.W_OK):
            raise UsageError("--out", f"{path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError("--out", f"cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError("--out", f"cannot create {path}: {parent} is not writable")


def check_output(out: str, kind: str | None = None, compare: bool = False) -> None:
    """Check that ``out`` can be written here for a ``kind`` ("video", "image" or None: not known yet)
    pipeline, and its side-by-side file with ``compare``.

    Raises:
        UsageError: the suffix does not fit the kind, the video writer is missing, or the path (or its
            folder) cannot be written.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    folder = not suffix or path.is_dir()
    allowed = {
        "video": (*VIDEO_SUFFIXES, ".gif"),
        "image": IMAGE_SUFFIXES,
        None: (*VIDEO_SUFFIXES, ".gif", *IMAGE_SUFFIXES),
    }[kind]
    if not folder and suffix not in allowed:
        what = {"video": "a video pipeline", "image": "an image pipeline", None: "dit-accel"}[kind]
        raise UsageError(
            "--out", f"{what} cannot write {suffix!r} files: use {', '.join(allowed)} or a folder"
        )
    if suffix in VIDEO_SUFFIXES:
        try:
            import imageio.v2  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UsageError(
                "--out",
                f'writing {suffix} needs imageio and imageio-ffmpeg: pip install "dit-accel[video]"; or '
                "write --out clip.gif, or --out a_folder/ for PNG frames",
            ) from None
    _writable(path, folder)
    if compare:
        _writable(_compare_path(out), folder)


# ------------------------------------------------------------------------------------------------ output


def write_frames(frames, out: str, fps: int = 16) -> Path:
    """Write [F, H, W, 3] frames in [0, 1] to ``out`` (see the module docstring for the formats)."""
    import numpy as np

    path = Path(out)
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


def write_images(images, out: str) -> list[Path]:
    """Write [N, H, W, 3] images in [0, 1] as PNG: ``out`` itself for one image to a ``.png`` path,
    ``<stem>_<i>.png`` for several, ``<folder>/image_<i>.png`` for a folder."""
    import numpy as np
    from PIL import Image

    path = Path(out)
    data = (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)
    if path.suffix and not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        paths = (
            [path]
            if len(data) == 1
            else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(data))]
        )
    else:
        path.mkdir(parents=True, exist_ok=True)
        paths = [path / f"image_{i:04d}.png" for i in range(len(data))]
    for p, img in zip(paths, data):
        Image.fromarray(img).save(p)
    return paths


def _write(output, out: str, kind: str, fps: int) -> str:
    """Write a render_output result; returns what was written, for the log line."""
    from dit_accel.pipelines.quality import as_frames

    if kind == "image":
        paths = write_images(as_frames(output), out)
        shape = output.shape[1:3]
        where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        return f"{where}: {len(paths)} image{'s' if len(paths) > 1 else ''} {shape[0]}x{shape[1]}"
    frames = output[0]
    path = write_frames(frames, out, fps)
    return f"{path}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}"


# ------------------------------------------------------------------------------------------------ render


def _check_model(args) -> tuple[str | None, bool]:
    """``(family, embedded)`` of ``--model`` (family None for a hub id, known once loaded), with
    ``--weights`` and the call's numbers checked, before anything is loaded.

    Raises:
        UsageError: the first argument that cannot work.
    """
    from dit_accel.pipelines import wrapped

    try:
        family = wrapped.family_of_source(args.model)
    except ValueError as exc:
        raise UsageError("--model", str(exc)) from None
    embedded = wrapped.source_kind(args.model)[0] == "embedded"
    if args.weights is not None and args.model != "embedded":
        raise UsageError("--weights", "is for the embedded model; give --model a weights folder instead")
    _check_numbers(args, embedded)
    return family, embedded


def _plan(args) -> dict:
    """Everything about a render that can be checked without loading the model.

    Raises:
        UsageError: the first argument that cannot work.
    """
    from dit_accel.pipelines import presets

    family, embedded = _check_model(args)
    knobs = _knobs(args)
    if knobs is None and args.cuda_graphs:
        raise UsageError("--cuda-graphs", "replays dit_accel's forwards: needs --method or --preset")
    if knobs is None and getattr(args, "fuse_blocks", None) is not None:
        raise UsageError("--fuse-blocks", "is a dit_accel knob: needs --method or --preset")
    settings = None
    if knobs is not None:
        try:
            settings = presets.resolve(family, args.preset, knobs)
        except ValueError as exc:
            raise UsageError(
                "--opt" if args.opt else "--preset" if args.preset else "--method", str(exc)
            ) from None
    kind = presets.FAMILIES[family] if family else None
    if kind == "image" and args.frames is not None:
        raise UsageError("--frames", f"{family} is an image family; it draws no frames")
    check_output(args.out, kind, args.compare)
    device = _device(args)
    return {"family": family, "kind": kind, "knobs": knobs, "settings": settings, "device": device}


def _call_kwargs(args, plan, embedded: bool) -> dict:
    call = {"prompt": args.prompt}
    if embedded:
        from dit_accel.pipelines.tiny_video.model import render_defaults

        d = render_defaults(plan["device"])
        call.update(
            num_frames=args.frames or d["frames"],
            height=args.height or d["height"],
            width=args.width or d["width"],
            num_inference_steps=args.steps or d["steps"],
            guidance_scale=5.0 if args.guidance is None else args.guidance,
        )
        return call
    given = {
        "num_frames": args.frames,
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
    }
    call.update({k: v for k, v in given.items() if v is not None})
    return call


def _dtype(args, device: str):
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def _load(args, device: str):
    """``(pipe, family)`` of ``--model``, or an exit code after printing why it could not be loaded."""
    from dit_accel.pipelines import wrapped
    from dit_accel.pipelines.tiny_video.model import WeightsNotFoundError

    embedded = wrapped.source_kind(args.model)[0] == "embedded"
    load = {"weights_dir": args.weights} if args.weights else {}
    dtype = None if embedded and args.dtype == "auto" else _dtype(args, device)
    try:
        pipe = wrapped.load_pipeline(args.model, torch_dtype=dtype, device=device, **load)
    except WeightsNotFoundError as exc:
        print(f"dit-accel: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # not found locally or on the hub, no network, ...: diffusers says which
        print(f"dit-accel: cannot load {args.model}: {exc}", file=sys.stderr)
        return 1
    try:
        return pipe, wrapped.family_of(pipe)
    except ValueError as exc:
        raise UsageError("--model", str(exc)) from None


def _render(args) -> int:
    from dit_accel.pipelines import quality, wrapped

    plan = _plan(args)
    device = plan["device"]
    embedded = wrapped.source_kind(args.model)[0] == "embedded"
    loaded = _load(args, device)
    if isinstance(loaded, int):
        return loaded
    pipe, family = loaded
    compile_loaded(args, pipe)
    kind = wrapped.FAMILIES[family]
    if plan["kind"] is None:  # a hub id: what the folder did not say before loading
        if kind == "image" and args.frames is not None:
            raise UsageError("--frames", f"{family} is an image family; it draws no frames")
        check_output(args.out, kind, args.compare)
    call = _call_kwargs(args, plan, embedded)
    if kind == "image":
        call.pop("num_frames", None)
    knobs = plan["knobs"]
    if knobs is None:
        output, seconds = quality.timed(quality.render_output, pipe, seed=args.seed, **call)
        written = _write(output, args.out, kind, args.fps)
        print(f"wrote {written}, {_steps_text(call)}on {device} in {seconds:.1f}s")
        return 0
    try:
        accel = wrapped.wrap(pipe, args.preset, **knobs)
    except ValueError as exc:
        raise UsageError(
            "--opt" if args.opt else "--preset" if args.preset else "--method", str(exc)
        ) from None
    if args.compare:
        result = accel.compare(seed=args.seed, **call)
        written = _write(result.accelerated, args.out, kind, args.fps)
        side = _write(
            result.side_by_side()[None] if kind == "video" else result.side_by_side(),
            str(_compare_path(args.out)),
            kind,
            args.fps,
        )
        print(f"wrote {written}, {_steps_text(call)}on {device}")
        print(f"wrote {side} (dense | accelerated)")
        print(result.summary())
        if device == "cuda":
            print("(the accelerated render's time includes compiling dit_accel's kernels on first use)")
        accel.remove()
        return 0
    output, seconds = quality.timed(quality.render_output, accel, seed=args.seed, **call)
    print(
        f"wrote {_write(output, args.out, kind, args.fps)}, {_steps_text(call)}on {device} in {seconds:.1f}s"
    )
    print(accel.stats().summary().splitlines()[0])
    accel.remove()
    return 0


def _steps_text(call: dict) -> str:
    steps = call.get("num_inference_steps")
    return f"{steps} steps " if steps else ""


# ------------------------------------------------------------------------------------------------ bench


def _bench_configs(args, family: str | None) -> list[str]:
    """The ``--configs`` list (default: the family's presets but dense), each checked against ``family``
    when it is known (a hub id's family is known only once loaded).

    Raises:
        UsageError("--configs"): an empty entry, an unknown preset or method, or a bad knob.
    """
    from dit_accel.pipelines import bench, presets

    if args.configs is None:
        if family is None:
            return []
        return [p.name for p in presets.family_presets(family) if p.method != "dense"]
    configs = [c.strip() for c in _split_configs(args.configs)]
    if not configs or any(not c for c in configs):
        raise UsageError(
            "--configs", f"expected comma-separated presets or method specs, got {args.configs!r}"
        )
    if family is not None:
        for spec in configs:
            try:
                preset, knobs = bench.parse_config(spec)
                presets.resolve(family, preset, knobs)
            except ValueError as exc:
                raise UsageError("--configs", f"{spec!r}: {exc}") from None
    return configs


def _split_configs(text: str) -> list[str]:
    """Split at commas that start a new configuration: ``balanced,window:density=0.25,block_q=64`` is two
    (a ``key=value`` part after a method spec belongs to it)."""
    out: list[str] = []
    for part in text.split(","):
        if out and ":" in out[-1] and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _bench(args) -> int:
    import json

    from dit_accel.pipelines import bench, wrapped

    for name in ("warmup", "repeats"):
        value = getattr(args, name)
        if value < (0 if name == "warmup" else 1):
            raise UsageError(f"--{name}", f"must be >= {0 if name == 'warmup' else 1}, got {value}")
    family, embedded = _check_model(args)
    _bench_configs(args, family)
    if args.out is not None:
        _writable(Path(args.out), folder=False)
    device = _device(args)
    loaded = _load(args, device)
    if isinstance(loaded, int):
        return loaded
    pipe, family = loaded
    compile_loaded(args, pipe)
    configs = _bench_configs(args, family)
    call = _call_kwargs(args, {"device": device}, embedded)
    if wrapped.FAMILIES[family] == "image":
        call.pop("num_frames", None)
    report = {
        "benchmark": "dit-accel bench",
        "model": args.model,
        "family": family,
        "device": _device_name(device),
        "call": call,
        "seed": args.seed,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "compiled": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "fuse_blocks": args.fuse_blocks,
        "rows": [],
    }

    def on_row(row):
        report["rows"].append(row.as_dict())
        line = (
            f"{row.name}: failed: {row.error}"
            if row.error
            else (f"{row.name}: {row.seconds:.2f} s, {row.speedup:.2f}x stock, PSNR {row.psnr_mean:.2f} dB")
        )
        print(line, flush=True)
        if args.out is not None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")

    print(f"dit-accel bench: {family} on {report['device']}, stock then {', '.join(configs)}", flush=True)
    rows = bench.run(
        pipe,
        configs,
        seed=args.seed,
        warmup=args.warmup,
        repeats=args.repeats,
        on_row=on_row,
        knobs=graph_knobs(args),
        **call,
    )
    print(bench.format_table(rows))
    if device == "cpu":
        print(
            "(on the CPU dit_accel runs PyTorch's CPU flash kernel on each plan's blocks, not its GPU "
            "kernels: these ratios say nothing about speed on a GPU)"
        )
    if args.out is not None:
        print(f"wrote {args.out}")
    return 1 if any(r.error for r in rows) else 0


def _device_name(device: str) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"


# ------------------------------------------------------------------------------------------------ presets


def _presets(args) -> int:
    from dit_accel.pipelines import presets

    if args.markdown:
        sources = presets.sources_text(args.family)
        print(presets.markdown_table(args.family) + (f"\n\n{sources}" if sources else ""))
        return 0
    families = [args.family] if args.family else list(presets.FAMILIES)
    rows = [p for family in families for p in presets.family_presets(family)]
    method_w = max(len(p.method) for p in rows) + 2  # columns wide enough for every row shown
    knobs_w = max(len(p.knob_text()) for p in rows) + 2
    for family in families:
        print(f"{family} ({presets.FAMILIES[family]})")
        for p in presets.family_presets(family):
            print(f"  {p.name:<10}{p.method:<{method_w}}{p.knob_text():<{knobs_w}}[{p.status}]")
            print(f"  {'':<10}speed:   {presets.speed_text(p)}")
            print(f"  {'':<10}quality: {presets.quality_text(p)}")
            if p.note:
                print(f"  {'':<10}note:    {p.note}")
        print()
    print("Speed: speedup over stock attention at the geometry named (docs/pipelines.md says how measured);")
    print(
        "quality: PSNR / SSIM against dense on the embedded model. Untuned: no measurement for that family."
    )
    return 0


def main(argv=None) -> int:
    """Entry point of the ``dit-accel`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            return _render(args)
        if args.command == "presets":
            return _presets(args)
        if args.command == "batch":
            from dit_accel import batch

            return batch.run(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "demo":
            from dit_accel.demo.launch import run as demo

            return demo(args)
    except UsageError as exc:
        args._parser.error(str(exc))
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
