"""Dense warm-up against quality on the embedded model: radial, adaspa and rettention at several fractions.

The dense warm-up is the biggest lever left on end-to-end speed (DESIGN.md §6: ~35% of a Wan-14B run), so its
default should be the smallest fraction that keeps quality. Per method and fraction f, the embedded trained
tiny model (``dit_accel.pipelines.load_tiny_video_pipeline``; on a GPU 49 frames x 192 x 256, 30 steps)
renders the held-out prompts dense and with ``dense_steps=f`` (the knob every method shares: floor(f x steps)
dense steps; for adaspa its fused search moves with it, its cached search stays at 0.6), and
``dit_accel.pipelines.quality.quality_table`` compares the raw frames (PSNR, SSIM, prompt adherence).

With ``--speed E2E_JSON`` (a result of benchmarks/bench_e2e.py, e.g. Wan-14B 720p) each row also gets the
50-step end-to-end speedup that fraction would have at that geometry: the method's measured step-kind times
from the JSON over the schedule of the same configuration with that fraction (read from the method by
bench_e2e's probe, on the CPU). Quality and speed come from different models and geometries; the table puts
them side by side, it does not claim one predicts the other.

GPU run (about 5 min on an H200: 24 prompts x (1 dense + 15) renders of ~0.7 s, plus loading; ``--methods
radial,adaspa`` for 3.5 min):

    python benchmarks/sweep_dense_steps.py --device cuda --prompts 24

Speed column afterwards, on any machine (no rendering; reads the rows the GPU run wrote):

    python benchmarks/sweep_dense_steps.py --from benchmarks/results/dense_steps_nvidia_h200.json \
        --speed benchmarks/results/e2e_wan14b_720p_81f_nvidia_h200.json

On the CPU at the training geometry (about 10 minutes a prompt on 2 cores):
``--device cpu --steps 30 --frames 49 --height 192 --width 256 --prompts 4``.

CPU smoke run (tiny clip, 2 prompts, 2 fractions): ``--device cpu --prompts 2 --warmups 0,0.25 --steps 4``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import gpu_tag, versions, write_json  # noqa: E402

from dit_accel.methods import method_names  # noqa: E402

WARMUPS = (0.0, 0.1, 0.2, 0.25, 0.3)
# One entry per method; a method this checkout lacks is skipped with a note.
# ``e2e_row``: the bench_e2e row whose step-kind times the speed column uses (same knobs but the warm-up).
METHODS = [
    {"label": "radial", "e2e_row": "radial", "knobs": {"method": "radial"}},
    {"label": "adaspa", "e2e_row": "adaspa_0.8", "knobs": {"method": "adaspa"}},
    {
        "label": "rettention",
        "e2e_row": "rettention_window_0.05",
        "knobs": {"method": "rettention", "base": "window", "density": 0.05},
    },
]


def sweep_rows(warmups, methods) -> tuple[dict[str, dict], list[str]]:
    """label -> dit_accel.apply knobs for every (method, fraction); notes for skipped methods."""
    rows, notes = {}, []
    for m in methods:
        if m["knobs"]["method"] not in method_names():
            notes.append(f"{m['label']}: method {m['knobs']['method']!r} not available in this checkout")
            continue
        for f in warmups:
            rows[f"{m['label']} dense_steps={f:g}"] = {**m["knobs"], "dense_steps": float(f)}
    return rows, notes


def speed_column(rows: list[dict], e2e_path: str) -> dict:
    """Per row, the composed end-to-end speedup at the e2e JSON's geometry (see the module docstring)."""
    import bench_e2e

    e2e = json.loads(Path(e2e_path).read_text())
    geom = e2e["geometry"]
    steps, contexts = e2e["steps"], tuple(geom["contexts"])
    measured = {r["row"]: r for r in e2e["rows"] if r["status"] == "ok" and not r["compiled"]}
    stock = measured.get("stock")
    if stock is None:
        raise SystemExit(f"{e2e_path} has no eager stock row")
    out = {"geometry": geom["name"], "steps": steps, "rows": {}}
    for row in rows:
        knobs = row["knobs"]
        if not knobs:
            continue
        label = row["method"].split(" ")[0]
        name = next((m["e2e_row"] for m in METHODS if m["label"] == label), None)
        base = measured.get(name)
        if base is None:
            out["rows"][row["method"]] = {"note": f"no eager {name} row in {Path(e2e_path).name}"}
            continue
        schedule = bench_e2e.probe_schedule(geom["family"], knobs, steps, contexts)
        times = {k: v["ms_per_call"] for k, v in base["step_kinds"].items()}
        missing = {k for ctx in contexts for k in schedule[ctx]} - set(times)
        if missing:
            out["rows"][row["method"]] = {"note": f"{base['row']} has no time for {sorted(missing)}"}
            continue
        total_ms = sum(times[k] for ctx in contexts for k in schedule[ctx])
        out["rows"][row["method"]] = {
            "from_row": base["row"],
            "dense_steps_of_run": schedule[contexts[0]].count("dense"),
            "total_s": total_ms / 1e3,
            "speedup": stock["total_s"] * 1e3 / total_ms,
        }
    return out


def format_table(result: dict) -> str:
    steps = result["call"]["num_inference_steps"]
    speed = result.get("speed")
    head = f"| method | dense steps (of {steps}) | PSNR dB (mean / worst frame) | SSIM | adherence | density "
    sep = "|---|---|---|---|---|---|"
    if speed:
        head += f"| {speed['geometry']} speedup ({speed['steps']} steps) "
        sep += "---|"
    lines = [head + "|", sep]
    for r in result["rows"]:
        knobs = r["knobs"]
        dense = math.floor(knobs["dense_steps"] * steps) if "dense_steps" in knobs else "-"
        cells = [
            r["method"],
            str(dense),
            f"{_num(r['psnr'])} / {_num(r['psnr_min_frame'])}",
            _num(r["ssim"], ".4f"),
            _num(r["adherence"], ".3f"),
            _num(r["density"], ".3f"),
        ]
        if speed:
            s = speed["rows"].get(r["method"], {})
            cells.append(f"{s['speedup']:.2f}x" if "speedup" in s else s.get("note", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v, fmt=".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=24, help="held-out grammar prompts")
    parser.add_argument("--warmups", default=",".join(f"{f:g}" for f in WARMUPS), help="dense-step fractions")
    parser.add_argument("--methods", help="comma-separated labels (default: every available method)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 30 on GPU, 10 on CPU)")
    for dim in ("frames", "height", "width"):
        parser.add_argument(
            f"--{dim}", type=int, help=f"clip {dim} (default: the embedded model's for the device)"
        )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument(
        "--out", help="JSON path (default benchmarks/results/dense_steps_<gpu>.json; .md beside)"
    )
    parser.add_argument("--from", dest="from_json", help="reuse the rows of an earlier run (no rendering)")
    parser.add_argument("--speed", help="a bench_e2e result JSON: add the end-to-end speedup column")
    args = parser.parse_args(argv)

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        out = Path(args.out or args.from_json)
    else:
        out = Path(args.out or Path(__file__).parent / "results" / f"dense_steps_{gpu_tag()}.json")
        result = render(args, save=lambda partial: write_json(out, partial))
    if args.speed:
        result["speed"] = speed_column(result["rows"], args.speed)
    text = (
        f"Embedded tiny model, {result['geometry']}, {result['call']['num_inference_steps']} steps, guidance "
        f"{result['call']['guidance_scale']}, seed {result['seed']}, {result['prompts']} held-out prompts, "
        f"{result['device']}.\n\n" + format_table(result)
    )
    if result.get("notes"):
        text += "\n\n" + "\n".join(f"- {n}" for n in result["notes"])
    write_json(out, result)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return result


def render(args, save=None) -> dict:
    """The sweep's result; ``save(partial)`` after every prompt (rows over the prompts done so far, and
    ``prompts_done``), so a run that is stopped keeps what it finished."""
    from dit_accel.pipelines.quality import quality_table
    from dit_accel.pipelines.tiny_video.data import held_out_prompts
    from dit_accel.pipelines.tiny_video.model import load_tiny_video_pipeline, render_defaults

    warmups = [float(x) for x in args.warmups.split(",")]
    methods = METHODS
    if args.methods:
        wanted = args.methods.split(",")
        methods = [m for m in METHODS if m["label"] in wanted]
    rows, notes = sweep_rows(warmups, methods)
    defaults = render_defaults(args.device)
    call = {
        "num_frames": args.frames or defaults["frames"],
        "height": args.height or defaults["height"],
        "width": args.width or defaults["width"],
        "num_inference_steps": args.steps or defaults["steps"],
        "guidance_scale": args.guidance,
    }
    pipe = load_tiny_video_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p, _ in held_out_prompts(args.prompts)]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {
        "benchmark": "sweep_dense_steps",
        "geometry": f"{call['num_frames']}x{call['height']}x{call['width']}",
        "call": call,
        "seed": args.seed,
        "prompts": len(prompts),
        "device": device,
        "versions": versions(),
        "warmups": warmups,
        "notes": notes,
        "rows": [],
    }
    done = 0

    def on_prompt(table):
        nonlocal done
        done += 1
        if save is not None:
            save({**result, "rows": table, "prompts_done": done})

    result["rows"] = quality_table(pipe, prompts, rows, seed=args.seed, call_kwargs=call, on_prompt=on_prompt)
    return result


if __name__ == "__main__":
    main()
