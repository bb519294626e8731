"""Markdown tables from benchmarks/results/kernels_*.json (the numbers quoted in docs/kernels.md).

Usage: python benchmarks/report.py benchmarks/results/kernels_nvidia_h200.json [more.json ...]
Rows of later files replace rows of earlier ones with the same (config, pattern, target density).
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    configs: dict[str, dict] = {}
    rows: dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        print(f"<!-- {path}: {report['gpu']}, torch {report['torch']}, triton {report['triton']} -->")
        for c in report["configs"]:
            configs[c["config"]] = c
            for r in c["rows"]:
                rows[(c["config"], r["pattern"], r["density_target"])] = r
    print("| config | B,H,S,D | cuDNN ms (TF/s) | block_mass / cuDNN | dense_attention triton / cuDNN |")
    print("|---|---|---|---|---|")
    for name, c in configs.items():
        tri = c.get("dense_attention_triton_ms")
        print(
            f"| {name} | {c['B']},{c['H']},{c['S']},{c['D']} | {c['cudnn_ms']:.2f} ({c['cudnn_tflops']:.0f}) "
            f"| {c['block_mass_vs_cudnn']:.2f} | {tri / c['cudnn_ms']:.2f} |"
        )
    print()
    cols = [
        "config",
        "pattern",
        "density",
        "ours ms",
        "ours TF/s",
        "Flex ms",
        "Flex TF/s",
        "ours / cuDNN TF/s",
    ]
    print("| " + " | ".join(cols + ["Flex ms / ours"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, pattern, _), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        ok = r["correct"]
        vs_cudnn = f"{r['ours_tflops_vs_cudnn']:.2f}" if ok else "check failed"
        vs_flex = f"{r['speedup_vs_flex']:.2f}" if ok else "check failed"
        print(
            f"| {name} | {pattern} | {r['density']:.3f} | {r['ours_ms']:.2f} | {r['ours_tflops']:.0f} "
            f"| {r['flex_ms']:.2f} | {r['flex_tflops']:.0f} | {vs_cudnn} | {vs_flex} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
