"""Compile the attention kernel for a Hopper GPU (sm_90) on a machine without one: Triton's own compiler and
ptxas, no launch. Run as a script in a process without TRITON_INTERPRET (under it ``triton.jit`` gives
interpreted functions, which do not compile). Prints one JSON object per configuration: the PTX's code section
hashed (debug info left out), the shared memory, the tensor-core instruction shapes, and the registers and
spilled bytes that Triton's ptxas reports (``ptxas -v``).

    python tests/_aot.py '[{"HEAD_DIM": 72, "D_LO": 64, "D_HI": 16}]'
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys

POINTERS = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "R": "*bf16", "LSE": "*fp32", "KV_IDX": "*i32",
    "KV_CNT": "*i32", "KV_LEN": "*i32", "RHO": "*fp32", "R_SCALE": "*fp32", "RHO_ADD": "*fp32",
}  # fmt: skip
FLOATS = ("qk_scale", "rho_add")


def attention_constexprs(head_dim: int, **overrides) -> dict:
    """The attention kernel's constexprs for a sparse, TMA, uncorrected bf16 launch with 128x128 tiles."""
    pad = 1 << (head_dim - 1).bit_length()
    const = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, PLAN_BQ=128, PLAN_BK=128, MAX_K_LOG2=9, DENSE=False,
        HAS_KV_LEN=False, DOT_F32=False, USE_TMA=True, HAS_CORR=False, R_SCALED=False, CLAMP=True,
        RHO_DEV=False, D_LO=pad, D_HI=0, BLOCK_M=128, BLOCK_N=128,
    )  # fmt: skip
    const.update(overrides)
    return const


def compile_attention(const: dict, num_warps: int = 8, num_stages: int = 3) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dit_accel.kernels import triton_attention

    fn = triton_attention._block_sparse_attn_fwd_kernel.fn
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n in FLOATS else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = kernel.asm["ptx"]
    code = "\n".join(
        line for line in ptx.split(".section")[0].splitlines()
        if line.strip() and not line.strip().startswith((".loc", ".file", "//"))
    )  # fmt: skip
    return {
        **ptxas_usage(ptx),
        "code_md5": hashlib.md5(code.encode()).hexdigest(),
        "shared": kernel.metadata.shared,
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        "tma_loads": ptx.count("cp.async.bulk.tensor"),
    }


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes (stores + loads) of ``ptx`` for sm_90a, from Triton's ptxas."""
    import os
    import subprocess
    import tempfile

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
    for overrides in json.loads(sys.argv[1]):
        head_dim = overrides.pop("HEAD_DIM")
        print(json.dumps(compile_attention(attention_constexprs(head_dim, **overrides))), flush=True)
