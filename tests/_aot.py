"""Compile dit_accel's Triton kernels for a Hopper GPU (sm_90) on a machine without one: Triton's own compiler
and ptxas, no launch. Run as a script in a process without TRITON_INTERPRET (under it ``triton.jit`` gives
interpreted functions, which do not compile). Prints one JSON object per configuration: the PTX's code section
hashed (debug info and its scope labels left out), the shared memory, the tensor-core instruction shapes,
the tensor-memory copies, and the registers and spilled bytes that Triton's ptxas reports (``ptxas -v``).

    python tests/_aot.py '[{"kernel": "attention", "HEAD_DIM": 72, "USE_TMA": false}]'

A configuration names a kernel of KERNELS and overrides its default constexprs (and ``num_warps``,
``num_stages``); the attention kernel's are those of a sparse, TMA, uncorrected bf16 launch at head dim 128.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile


def _attention(head_dim: int = 128, **_) -> dict:
    pad = 1 << (head_dim - 1).bit_length()
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PLAN_BQ=128, PLAN_BK=128, MAX_K_LOG2=9, DENSE=False,
        HAS_KV_LEN=False, DOT_F32=False, USE_TMA=True, HAS_CORR=False, R_SCALED=False, CLAMP=True,
        RHO_DEV=False, BLOCK_M=128, BLOCK_N=128,
    )  # fmt: skip


def _refresh(head_dim: int = 128, **_) -> dict:
    pad = 1 << (head_dim - 1).bit_length()
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PLAN_BQ=128, PLAN_BK=128, MAX_K_LOG2=9, HAS_KV_LEN=False,
        DOT_F32=False, USE_TMA=True, R_FP8=False, BLOCK_M=128, BLOCK_N=128,
    )  # fmt: skip


def _mass(head_dim: int = 128, **_) -> dict:
    pad = 1 << (head_dim - 1).bit_length()
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PLAN_BQ=128, PLAN_BK=128, HAS_KV_LEN=False, DOT_F32=False,
        USE_TMA=True, CHUNK=16, BLOCK_M=128, BLOCK_N=128,
    )  # fmt: skip


def _rotary(head_dim: int = 128, **_) -> dict:
    return dict(D=head_dim, BLOCK_H=16, BLOCK_D=1 << (head_dim - 1).bit_length(), MODE=1, PAIRS=False)


def _block(_: int = 0, **__) -> dict:
    # Wan-14B's hidden size (5,120) padded: a gated residual and a modulated LayerNorm in one pass
    return dict(RESIDUAL=2, WRITE_H=True, NORM=1, BLOCK_D=8192)


# name: (module, kernel, default constexprs, pointer argument types, default warps and stages)
KERNELS = {
    "attention": (
        "triton_attention", "_block_sparse_attn_fwd_kernel", _attention,
        {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "R": "*bf16", "LSE": "*fp32",
         "KV_IDX": "*i32", "KV_CNT": "*i32", "KV_LEN": "*i32", "RHO": "*fp32", "R_SCALE": "*fp32",
         "RHO_ADD": "*fp32"},
        (8, 3),
    ),
    "refresh": (
        "triton_refresh", "_refresh_attn_fwd_kernel", _refresh,
        {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "R": "*bf16", "LSE": "*fp32", "RHO": "*fp32",
         "R_SCALE": "*fp32", "KV_IDX": "*i32", "KV_CNT": "*i32", "KV_LEN": "*i32"},
        (8, 3),
    ),
    "mass": (
        "triton_mass", "_block_mass_kernel", _mass,
        {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "W": "*fp32", "KV_LEN": "*i32"},
        (8, 2),
    ),
    "rotary": (
        "triton_rotary", "_rotary_qk_fwd_kernel", _rotary,
        {"Q": "*bf16", "K": "*bf16", "QO": "*bf16", "KO": "*bf16", "COS": "*fp32", "SIN": "*fp32"},
        (4, 1),
    ),
    "block": (
        "triton_block", "_block_step_kernel", _block,
        {"X": "*bf16", "Y": "*bf16", "GATE": "*fp32", "H_OUT": "*bf16", "N_OUT": "*bf16", "SCALE": "*fp32",
         "SHIFT": "*fp32", "W": "*fp32", "B": "*fp32"},
        (16, 1),
    ),
}  # fmt: skip
FLOATS = ("qk_scale", "rho_add", "eps")


def constexprs(kernel: str, **overrides) -> dict:
    """A kernel's default constexprs (``head_dim`` picks the widths) with ``overrides``."""
    const = KERNELS[kernel][2](overrides.pop("head_dim", overrides.get("HEAD_DIM", overrides.get("D", 128))))
    const.update(overrides)
    return const


def compile_kernel(kernel: str, const: dict, num_warps: int | None = None, num_stages: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, _, pointers, (warps, stages) = KERNELS[kernel]
    from triton.runtime.autotuner import Autotuner

    fn = getattr(importlib.import_module(f"dit_accel.kernels.{module}"), name)
    if isinstance(fn, Autotuner):
        fn = fn.fn  # the JIT function it tunes
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n in FLOATS else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    options = {"num_warps": num_warps or warps, "num_stages": num_stages or stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    code = "\n".join(
        line for line in ptx.split(".section")[0].splitlines()
        if line.strip() and not line.strip().startswith((".loc", ".file", "//", "$L__tmp"))
    )  # fmt: skip
    return {
        **ptxas_usage(ptx),
        "code_md5": hashlib.md5(code.encode()).hexdigest(),
        "shared": compiled.metadata.shared,
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        "tma_loads": ptx.count("cp.async.bulk.tensor"),
    }


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes (stores + loads) of ``ptx`` for sm_90a, from Triton's ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")]
        run = subprocess.run(cmd, capture_output=True, text=True)
    text = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
    }


if __name__ == "__main__":
    for config in json.loads(sys.argv[1]):
        kernel = config.pop("kernel", "attention")
        warps, stages = config.pop("num_warps", None), config.pop("num_stages", None)
        print(json.dumps(compile_kernel(kernel, constexprs(kernel, **config), warps, stages)), flush=True)
