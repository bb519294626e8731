"""``accelerate launch --num_processes 2 -m dit_accel.batch`` on CPU (two real processes over gloo): a batch
half rendered by one process is finished by two, every job rendered exactly once, split by position, the
shards merged into manifest.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from dit_accel import batch

SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_finish_a_batch_one_process_started(tmp_path):
    names = [f"clip{i}" for i in range(7)]
    lines = [json.dumps({"prompt": f"a red circle {i}", "name": n}) + "\n" for i, n in enumerate(names)]
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "out"

    # one process renders the first three jobs
    jobs.write_text("".join(lines[:3]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert batch.main([str(jobs), "--out-dir", str(out), *SMALL, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)

    # two processes resume the whole list
    jobs.write_text("".join(lines))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate config of this machine's user
    }
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    proc = subprocess.run(
        [*launch, "-m", "dit_accel.batch", str(jobs), "--out-dir", str(out), *SMALL, "--no-progress"],
        cwd=tmp_path,  # not the repository root, whose kernels/ folder diffusers would import
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 jobs; 3 already done, 4 rendered, 0 failed; 2 processes" in proc.stdout, proc.stdout

    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest.jsonl"]  # shards merged
    entries = batch.read_manifest(out)
    assert sorted(e["id"] for e in entries) == names  # every job exactly once
    first, resumed = entries[:3], entries[3:]
    assert {e["world_size"] for e in first} == {1}
    assert {e["world_size"] for e in resumed} == {2}  # really two ranks, not two lone processes
    by_rank = {r: sorted(e["id"] for e in resumed if e["rank"] == r) for r in (0, 1)}
    assert by_rank == {0: ["clip3", "clip5"], 1: ["clip4", "clip6"]}  # pending jobs r, r + 2, ...
    assert len({e["pid"] for e in resumed}) == 2
    for e in entries:
        assert e["status"] == "done" and batch.output_sha256(out / e["output"]) == e["sha256"]
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"{n}.mp4" for n in names]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    # and once more with one process: nothing left to render
    assert batch.main([str(jobs), "--out-dir", str(out), *SMALL, "--no-progress"]) == 0
    assert len(batch.read_manifest(out)) == len(names)
