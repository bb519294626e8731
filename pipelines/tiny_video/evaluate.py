"""Proof that the embedded model learned: prompt adherence over held-out prompts, and sample frames.

    python -m dit_accel.pipelines.tiny_video.evaluate --device cuda --prompts 64 --out docs/tiny_model

renders ``--prompts`` held-out captions (attribute combinations never shown in training,
:data:`.data.HELD_OUT`), scores each clip with :mod:`.adherence`, and writes ``adherence.json`` (per-attribute
accuracy, per-prompt rows) and ``samples.png`` (five frames of the first ``--png`` prompts, one row each,
captioned in the JSON) to ``--out``. It prints the ground-truth check of the same prompts (the renderer's own
clips) as the ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..quality import render_frames
from .adherence import score_clips
from .data import held_out_prompts, render, to_frames
from .model import load_tiny_video_pipeline, render_defaults

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dit_accel.pipelines.tiny_video.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--weights")
    p.add_argument("--png", type=int, default=6, help="prompts shown in samples.png")
    p.add_argument(
        "--split",
        choices=("held_out", "train"),
        default="held_out",
        help="train: captions of trained combinations (does the model fail to learn or to generalise?)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    d = render_defaults(args.device)
    call = {
        "num_frames": args.frames or d["frames"],
        "height": args.height or d["height"],
        "width": args.width or d["width"],
        "num_inference_steps": args.steps or d["steps"],
        "guidance_scale": args.guidance,
    }
    pipe = load_tiny_video_pipeline(device=args.device, weights_dir=args.weights)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(args.prompts, split=args.split)
    clips, t0 = [], time.perf_counter()
    for i, (text, _) in enumerate(prompts):
        clips.append(render_frames(pipe, text, args.seed + i, **call))
    seconds = time.perf_counter() - t0
    result = score_clips(clips, [lab for _, lab in prompts])

    g = torch.Generator().manual_seed(0)
    truth = []
    for start in range(0, len(prompts), 8):
        chunk = prompts[start : start + 8]
        labels = {k: torch.tensor([lab[k] for _, lab in chunk]) for k in chunk[0][1]}
        video, _ = render(labels, call["num_frames"], call["height"], call["width"], g, device=args.device)
        truth += list(to_frames(video).cpu())
    ceiling = score_clips(truth, [lab for _, lab in prompts])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "call": call,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "seconds_per_clip": seconds / len(prompts),
        "prompts": len(prompts),
        "split": args.split,
        "accuracy": result["accuracy"],
        "measured": result["measured"],
        "mean_score": result["mean_score"],
        "core_all_correct": result["core_all_correct"],
        "ground_truth_accuracy": ceiling["accuracy"],
        "rows": [{"prompt": t, **r} for (t, _), r in zip(prompts, result["rows"])],
        "png_rows": [t for t, _ in prompts[: args.png]],
    }
    for row in report["rows"]:
        row.pop("target", None)
    (out / "adherence.json").write_text(json.dumps(report, indent=1))

    from PIL import Image

    picks = np.linspace(0, call["num_frames"] - 1, 5).round().astype(int)
    strip = np.concatenate([np.concatenate([clip[f] for f in picks], 1) for clip in clips[: args.png]], 0)
    Image.fromarray((np.clip(strip, 0, 1) * 255).round().astype(np.uint8)).save(out / "samples.png")

    print(f"{len(prompts)} {args.split} prompts, {call}, {report['seconds_per_clip']:.2f}s per clip")
    print("accuracy:", {k: round(v, 3) for k, v in result["accuracy"].items()})
    print(
        f"mean score {result['mean_score']:.3f}; "
        f"colour+motion+shape all right {result['core_all_correct']:.3f}"
    )
    print("ground truth:", {k: round(v, 3) for k, v in ceiling["accuracy"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
