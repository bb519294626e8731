"""Batch rendering (``dit-accel batch``, dit_accel.batch) on the embedded model at its smallest geometry
(5 x 32 x 32, 2 steps), on CPU: job files and their errors, outputs and the manifest, resume rules, failure
isolation, and a real SIGKILL of a running batch followed by resumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from dit_accel import batch, cli
from dit_accel.pipelines import presets, wrapped

SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu"]
BLOCKS = {"block_q": 16}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the batch loaded a model before rejecting its jobs")

    monkeypatch.setattr(wrapped, "load_pipeline", load)


def _jsonl(path: Path, jobs: list) -> Path:
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return path


def _batch(jobs: Path, out: Path, *extra) -> int:
    return batch.main([str(jobs), "--out-dir", str(out), *SMALL, "--no-progress", *extra])


def _entries(out: Path) -> list[dict]:
    return batch.read_manifest(out)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _counts(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in _entries(out):
        counts[e["id"]] = counts.get(e["id"], 0) + 1
    return counts


def _final_files(out: Path) -> list[Path]:
    """What the batch wrote under final names (not temporary files, manifests or the lock)."""
    return sorted(
        p
        for p in out.iterdir()
        if ".tmp-" not in p.name and not p.name.startswith("manifest") and p.name != ".batch.lock"
    )


# ---------------------------------------------------------------- job files


def test_reads_jsonl_csv_and_text(tmp_path):
    jsonl = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "a red circle", "seed": 3, "knobs": {"sparsity": 0.85}, "guidance": 4},
            "",
            {"prompt": "b"},
        ],
    )
    assert batch.read_job_file(jsonl) == [
        (1, {"prompt": "a red circle", "seed": 3, "knobs": {"sparsity": 0.85}, "guidance": 4.0}),
        (3, {"prompt": "b"}),
    ]
    csv_file = tmp_path / "a.csv"
    csv_file.write_text(
        'prompt,seed,steps,knobs,name\n"a red circle, moving",7,3,"sparsity=0.85,dense_layers=(0,)",x\n'
        "b,,,,\n"
    )
    assert batch.read_job_file(csv_file) == [
        (
            2,
            {
                "prompt": "a red circle, moving",
                "seed": 7,
                "steps": 3,
                "knobs": {"sparsity": 0.85, "dense_layers": (0,)},
                "name": "x",
            },
        ),
        (3, {"prompt": "b"}),
    ]
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\na red circle\n\n  a blue square  \n")
    assert batch.read_job_file(text) == [(2, {"prompt": "a red circle"}), (4, {"prompt": "a blue square"})]


def test_bad_lines_are_named_before_any_loading(tmp_path, capsys, no_loading):
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "fine"},
            {"prompt": "x", "seed": "one"},
            {"promt": "typo"},
            {"prompt": "x", "frames": 6},
            {"prompt": "x", "method": "window", "knobs": {"sparsityy": 0.5}},
            "not json",
            {"prompt": "y", "name": "a/b"},
            {"prompt": "fine"},
            {"prompt": "z", "knobs": {"density": 0.5}},
            {"prompt": "z", "preset": "turbo"},
            {"prompt": "z", "height": 40},
            {"prompt": "  "},
            {"prompt": "z", "format": "png"},
        ],
    )
    out = tmp_path / "out"
    assert _batch(jobs, out) == 2
    err = capsys.readouterr().err
    expected = [
        ("line 2, field 'seed'", "must be an integer"),
        ("line 3, field 'promt'", "unknown field"),
        ("line 4, field 'frames'", "4k + 1"),
        ("line 5, field 'knobs'", "'density'"),  # the method's knobs are named
        ("line 6:", "not JSON"),
        ("line 7, field 'name'", "without a folder"),
        ("line 8, field 'name'", "also line 1's"),
        ("line 9, field 'knobs'", "need a preset or a method"),
        ("line 10, field 'preset'", "no preset 'turbo'"),
        ("line 11, field 'height'", "multiple of 16"),
        ("line 12, field 'prompt'", "must not be empty"),
        ("line 13, field 'format'", "cannot write png"),
    ]
    for where, what in expected:
        assert any(where in line and what in line for line in err.splitlines()), (where, what, err)
    assert "12 bad job line(s), nothing rendered" in err
    assert not out.exists()


def test_command_line_errors_name_the_argument(tmp_path, capsys, no_loading):
    jobs = _jsonl(tmp_path / "jobs.jsonl", [{"prompt": "a"}])
    for args, argument, text in [
        (["--opt", "sparsity=0.8"], "--opt", "needs --method or --preset"),
        (["--preset", "fast", "--opt", "sparsityy=0.8"], "--opt", "takes no knob"),
        (["--seeds", "3-1"], "--seeds", "0-7"),
        (["--model", str(tmp_path)], "--model", "model_index.json"),
    ]:
        with pytest.raises(SystemExit) as info:
            _batch(jobs, tmp_path / "out", *args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {argument}:" in err and text in err, err
    with pytest.raises(SystemExit):
        batch.main([str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "out")])
    assert "no job file" in capsys.readouterr().err
    (tmp_path / "j.json").write_text("[]")
    assert batch.main([str(tmp_path / "j.json"), "--out-dir", str(tmp_path / "out")]) == 2
    assert ".jsonl" in capsys.readouterr().err


def test_seeds_expand_jobs_without_a_seed(tmp_path, no_loading, capsys):
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [{"prompt": "a"}, {"prompt": "b", "seed": 9}, {"prompt": "c", "name": "c.gif"}],
    )
    args = batch.build_parser().parse_args(
        [str(jobs), "--out-dir", str(tmp_path / "o"), *SMALL, "--seeds", "0-1,5"]
    )
    resolved = batch.load_jobs(jobs, args, batch.make_plan(args))
    assert [(j.line, j.seed) for j in resolved] == [(1, 0), (1, 1), (1, 5), (2, 9), (3, 0), (3, 1), (3, 5)]
    assert [j.id for j in resolved if j.line == 3] == ["c_s0", "c_s1", "c_s5"]
    assert {j.format for j in resolved if j.line == 3} == {"gif"}
    assert len({j.id for j in resolved}) == len({j.hash for j in resolved}) == 7
    assert _batch(jobs, tmp_path / "o", "--seeds", "0-1,5", "--dry-run") == 0
    assert "7 to render" in capsys.readouterr().out


def test_job_settings_and_hash(tmp_path, no_loading):
    """A job's preset/method replaces the command line's; its knobs go over the command line's. The hash
    covers the resolved job, so a changed default changes it."""
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a", "knobs": {"density": 0.1}},
            {"prompt": "a", "method": "window", "knobs": {"density": 0.5}},
            {"prompt": "a", "preset": "quality"},
            {"prompt": "a"},
        ],
    )

    def resolve(*extra):
        argv = [str(jobs), "--out-dir", str(tmp_path / "o"), *SMALL, "--preset", "fast", *extra]
        args = batch.build_parser().parse_args(argv)
        return batch.load_jobs(jobs, args, batch.make_plan(args))

    a, b, c, d = resolve()
    fast = {"density": 0.05, "dense_steps": 0.1, "refresh_at": (0.3,), "fuse_blocks": True}
    assert (a.spec["preset"], a.spec["method"], a.spec["knobs"]) == (
        "fast",
        "rettention",
        {**fast, "density": 0.1},
    )
    assert (b.spec["preset"], b.spec["method"], b.spec["knobs"]) == (None, "window", {"density": 0.5})
    assert (c.spec["preset"], c.spec["method"]) == ("quality", "radial")
    assert (d.spec["preset"], d.spec["knobs"]) == ("fast", fast)
    assert len({a.id, b.id, c.id, d.id}) == 4
    for job in (a, b, c, d):
        assert job.hash == batch.job_hash(job.spec)
        assert job.spec["frames"] == 5 and job.spec["steps"] == 2 and job.spec["guidance"] == 5.0
    a2, b2, c2, d2 = resolve("--guidance", "4.5")
    assert a2.hash != a.hash and a2.id != a.id and a2.spec["guidance"] == 4.5
    assert resolve()[0].hash == a.hash  # deterministic


# ---------------------------------------------------------------- rendering, manifest, resume


def test_renders_every_format_and_writes_the_manifest(tmp_path, capsys):
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a large red circle moving right on a black background", "seed": 1},
            {"prompt": "a small blue square", "name": "blue.gif", "negative_prompt": "green"},
            {"prompt": "a red circle", "preset": "fast", "knobs": {**BLOCKS, "timing": True}, "name": "fast"},
            {"prompt": "a red circle", "format": "frames", "name": "frames_out", "steps": 3},
        ],
    )
    out = tmp_path / "out"
    assert cli.main(["batch", str(jobs), "--out-dir", str(out), *SMALL, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 jobs; 0 already done, 4 rendered, 0 failed" in printed
    assert "clips/min" in printed and "mean density" in printed

    entries = _entries(out)
    assert [e["id"] for e in entries] == [
        "a-large-red-circle-moving-right-on-a_s1_" + entries[0]["id"][-8:],
        "blue",
        "fast",
        "frames_out",
    ]
    for e in entries:
        assert e["status"] == "done" and e["error"] is None
        assert e["hash"] == batch.job_hash(e["job"])
        path = out / e["output"]
        assert path.exists() and batch.output_sha256(path) == e["sha256"]
        assert e["job"]["model"] == "embedded" and e["job"]["dtype"] == "float32"
        assert {"dit_accel", "torch", "diffusers"} <= set(e["versions"])
        assert e["timings"]["total_s"] >= e["timings"]["render_s"] > 0
        assert e["timings"]["per_step_s"] > 0 and e["world_size"] == 1 and e["rank"] == 0
        assert e["finished"] >= e["started"]
    first, blue, fast, frames = entries
    assert first["output"].endswith(".mp4") and first["job"]["seed"] == 1 and first["job"]["preset"] is None
    assert first["bytes"] == (out / first["output"]).stat().st_size
    assert "density" not in first  # stock attention: nothing measured
    clip = np.stack(imageio.mimread(out / first["output"]))
    assert clip.shape == (5, 32, 32, 3)
    assert blue["output"] == "blue.gif" and blue["job"]["negative_prompt"] == "green"
    assert (fast["job"]["preset"], fast["job"]["method"]) == ("fast", "rettention")
    assert fast["job"]["knobs"] == {
        "density": 0.05,
        "dense_steps": 0.1,
        "refresh_at": [0.3],
        "fuse_blocks": True,
        **BLOCKS,
        "timing": True,
    }
    assert 0 < fast["density"] <= 1 and fast["attention_calls"] > 0
    assert fast["timings"]["attention_s"] > 0 and 0 < fast["timings"]["attention_share"] < 1
    assert frames["output"] == "frames_out" and len(list((out / "frames_out").iterdir())) == 5
    assert len(frames["timings"]["step_s"]) == 2  # 3 steps: 2 intervals between step ends
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_compile_flag_compiles_once_and_is_recorded(tmp_path, capsys, monkeypatch):
    real, calls = wrapped.compile_blocks, []

    def compile_blocks(pipe, **kwargs):  # aot_eager: no C++ compiler needed on the CPU
        calls.append(pipe)
        return real(pipe, backend="aot_eager", **kwargs)

    monkeypatch.setattr(wrapped, "compile_blocks", compile_blocks)
    torch._dynamo.reset()
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [{"prompt": "a red circle", "preset": "balanced", "knobs": BLOCKS}, {"prompt": "a blue square"}],
    )
    out = tmp_path / "out"
    try:
        rc = cli.main(["batch", str(jobs), "--out-dir", str(out), *SMALL, "--no-progress", "--compile"])
    finally:
        torch._dynamo.reset()
    assert rc == 0 and len(calls) == 1
    assert "dit-accel batch: torch.compile on" in capsys.readouterr().out
    assert [e["compiled"] for e in _entries(out)] == [True, True]


def test_an_image_model_writes_png(tmp_path, capsys):
    from _tiny_pipes import flux_with_text
    from PIL import Image

    folder = tmp_path / "flux"
    flux_with_text().save_pretrained(folder)
    jobs = _jsonl(
        tmp_path / "jobs.jsonl", [{"prompt": "a lighthouse", "frames": 5}, {"prompt": "x", "format": "mp4"}]
    )
    argv = [
        str(jobs),
        "--out-dir",
        str(tmp_path / "out"),
        "--model",
        str(folder),
        "--height",
        "32",
        "--width",
        "32",
    ]
    argv += ["--steps", "2", "--device", "cpu", "--no-progress"]
    assert batch.main(argv) == 2
    err = capsys.readouterr().err
    assert "line 1, field 'frames': flux is an image family" in err and "line 2, field 'format'" in err
    _jsonl(
        jobs,
        [
            {"prompt": "a lighthouse"},
            {"prompt": "a lighthouse at dusk", "preset": "quality", "knobs": BLOCKS},
        ],
    )
    assert batch.main(argv) == 0
    entries = _entries(tmp_path / "out")
    assert [e["output"][-4:] for e in entries] == [".png", ".png"]
    assert entries[0]["job"]["frames"] is None and entries[0]["job"]["fps"] is None
    assert entries[1]["job"]["method"] == "adaspa" and entries[1]["density"] > 0
    for e in entries:
        assert Image.open(tmp_path / "out" / e["output"]).size == (32, 32)
    with pytest.raises(SystemExit):
        batch.main([*argv, "--format", "mp4"])
    assert "argument --format: flux is an image family" in capsys.readouterr().err


def test_resume_skips_done_jobs_and_redoes_changed_missing_or_altered_ones(tmp_path, capsys):
    jobs_list = [{"prompt": f"a red circle {i}", "name": f"j{i}"} for i in range(5)]
    jobs_list[1]["format"] = "frames"
    jobs = _jsonl(tmp_path / "jobs.jsonl", jobs_list)
    out = tmp_path / "out"
    assert _batch(jobs, out) == 0
    shas = {e["id"]: e["sha256"] for e in _entries(out)}
    mtimes = {p.name: p.stat().st_mtime_ns for p in _final_files(out)}

    assert _batch(jobs, out) == 0  # the same command: nothing to do
    assert "5 already done, 0 rendered" in capsys.readouterr().out
    assert _counts(out) == dict.fromkeys(shas, 1)
    assert {p.name: p.stat().st_mtime_ns for p in _final_files(out)} == mtimes

    jobs_list[1]["steps"] = 3  # changed inputs, same name
    _jsonl(jobs, jobs_list)
    (out / "j2.mp4").unlink()  # output gone
    (out / "j3.mp4").write_bytes(b"not the clip")  # output altered
    assert _batch(jobs, out) == 0
    assert "2 already done, 3 rendered" in capsys.readouterr().out
    assert _counts(out) == {"j0": 1, "j1": 2, "j2": 2, "j3": 2, "j4": 1}
    latest = batch.latest_entries(_entries(out))
    assert latest["j1"]["job"]["steps"] == 3 and latest["j1"]["sha256"] != shas["j1"]
    assert (
        batch.output_sha256(out / "j1") == latest["j1"]["sha256"] and len(list((out / "j1").iterdir())) == 5
    )
    assert latest["j2"]["sha256"] == shas["j2"] == _sha(out / "j2.mp4")  # same inputs: the same clip again
    assert latest["j3"]["sha256"] == shas["j3"] == _sha(out / "j3.mp4")

    _jsonl(jobs, [*jobs_list, {"prompt": "an appended one", "name": "j5"}])  # appended jobs: only they render
    assert _batch(jobs, out) == 0
    assert "5 already done, 1 rendered" in capsys.readouterr().out


def test_a_failing_job_is_recorded_and_the_batch_goes_on(tmp_path, capsys, monkeypatch):
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "good one", "name": "g1"},
            {
                "prompt": "x",
                "method": "window",
                "knobs": {"density": 0.5, "dense_layers": [99]},
                "name": "bad",
            },
            {"prompt": "too big for the device", "name": "oom"},
            {"prompt": "good two", "name": "g2"},
        ],
    )
    render = batch._Renderer.render
    freed = []

    def render_or_run_out_of_memory(self, job):
        if job.id == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return render(self, job)

    monkeypatch.setattr(batch._Renderer, "render", render_or_run_out_of_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    out = tmp_path / "out"
    assert _batch(jobs, out) == 1
    captured = capsys.readouterr()
    status = {e["id"]: (e["status"], e["error"]) for e in _entries(out)}
    assert status["g1"] == status["g2"] == ("done", None)
    assert status["bad"][0] == "failed" and "dense_layers [99]" in status["bad"][1]
    assert status["oom"][0] == "failed" and status["oom"][1].startswith(
        "torch.OutOfMemoryError: CUDA out of memory"
    )
    assert freed == [True]
    assert "2 rendered, 2 failed" in captured.out
    assert "  bad (line 2): ValueError: dense_layers [99]" in captured.out
    assert "  oom (line 3): torch.OutOfMemoryError" in captured.out
    assert sorted(p.name for p in _final_files(out)) == ["g1.mp4", "g2.mp4"]

    monkeypatch.setattr(batch._Renderer, "render", render)
    assert _batch(jobs, out) == 1  # failed jobs are tried again; the done ones are not
    assert _counts(out) == {"g1": 1, "bad": 2, "oom": 2, "g2": 1}
    assert batch.latest_entries(_entries(out))["oom"]["status"] == "done"


def test_compare_dense_records_quality_and_speed(tmp_path, capsys):
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "a red circle", "name": "a"},
            {"prompt": "a blue square", "name": "b", "preset": "dense"},
        ],
    )
    out = tmp_path / "out"
    assert _batch(jobs, out, "--compare-dense", "--opt", "block_q=16") == 0
    printed = capsys.readouterr().out
    a, b = _entries(out)
    assert a["job"]["preset"] == "balanced"  # as `dit-accel render --compare`: the default preset
    for e in (a, b):
        c = e["compare"]
        assert c["speedup"] > 0 and c["seconds_dense"] > 0 and 0 < c["ssim"] <= 1
        assert c["psnr"] is None or c["psnr"] > 10
    assert b["compare"]["identical_frames"] == 5 and b["compare"]["psnr"] is None  # dense method = stock
    assert "vs dense: mean speedup" in printed and "PSNR" in printed and "SSIM" in printed


def test_torn_manifest_line_and_stale_temporary_files(tmp_path, capsys):
    jobs = _jsonl(tmp_path / "jobs.jsonl", [{"prompt": "a", "name": "a"}, {"prompt": "b", "name": "b"}])
    out = tmp_path / "out"
    assert _batch(jobs, out) == 0
    manifest = out / batch.MANIFEST
    with open(manifest, "ab") as f:
        f.write(b'{"id": "b", "hash": "torn')  # a kill in the middle of appending
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f"c.tmp-{dead.pid}.mp4").write_bytes(b"half a clip")
    (out / f"d.tmp-{dead.pid}").mkdir()
    (out / f"e.tmp-{os.getpid()}.mp4").write_bytes(b"a live process's")
    _jsonl(jobs, [{"prompt": "a", "name": "a"}, {"prompt": "b", "name": "b"}, {"prompt": "c", "name": "c"}])
    assert _batch(jobs, out) == 0
    assert "2 already done, 1 rendered" in capsys.readouterr().out
    assert not (out / f"c.tmp-{dead.pid}.mp4").exists() and not (out / f"d.tmp-{dead.pid}").exists()
    assert (out / f"e.tmp-{os.getpid()}.mp4").exists()
    lines = manifest.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[-3] == b'{"id": "b", "hash": "torn'
    assert json.loads(lines[-2])["id"] == "c"  # the next entry starts on a line of its own
    assert _counts(out) == {"a": 1, "b": 1, "c": 1}


def test_a_second_batch_on_the_same_folder_is_refused(tmp_path, capsys):
    jobs = _jsonl(tmp_path / "jobs.jsonl", [{"prompt": "a"}])
    out = tmp_path / "out"
    out.mkdir()
    held = batch._take_lock(out)
    try:
        assert _batch(jobs, out) == 2
        assert f"another dit-accel batch (pid {os.getpid()})" in capsys.readouterr().err
    finally:
        held.close()
    assert _batch(jobs, out) == 0


def test_merge_manifests_and_latest_entries(tmp_path):
    def entry(id_, finished, status="done"):
        return {"id": id_, "hash": "h", "status": status, "finished": finished}

    (tmp_path / batch.MANIFEST).write_text(json.dumps(entry("a", "2026-01-01T00:00:01")) + "\n")
    (tmp_path / "manifest.rank0.jsonl").write_text(
        json.dumps(entry("b", "2026-01-01T00:00:05"))
        + "\n"
        + json.dumps(entry("a", "2026-01-01T00:00:03"))
        + "\n"
    )
    (tmp_path / "manifest.rank1.jsonl").write_text(
        json.dumps(entry("a", "2026-01-01T00:00:02", "failed")) + "\n" + '{"id": "c", "ha'
    )
    before = batch.read_manifest(tmp_path)
    latest = batch.latest_entries(before)
    assert latest["a"]["finished"] == "2026-01-01T00:00:03" and set(latest) == {"a", "b"}
    batch.merge_manifests(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [batch.MANIFEST]
    merged = batch.read_manifest(tmp_path)
    assert [e["finished"][-2:] for e in merged] == ["01", "02", "03", "05"]
    (tmp_path / "manifest.rank0.jsonl").write_text(json.dumps(merged[1]) + "\n")  # merged before: dropped
    batch.merge_manifests(tmp_path)
    assert batch.read_manifest(tmp_path) == merged


def test_processes_flag_launches_this_command_under_accelerate(tmp_path, no_loading):
    argv = [
        str(tmp_path / "j.txt"),
        "--out-dir",
        str(tmp_path / "o"),
        "--preset",
        "fast",
        "--opt",
        "sparsity=0.85",
    ]
    argv += [
        "--opt",
        "block_q=16",
        "--compare-dense",
        "--steps",
        "3",
        "--guidance",
        "4.5",
        "--processes",
        "3",
    ]
    args = batch.build_parser().parse_args(argv)
    cmd = batch.relaunch_command(args, port=29611)
    head = cmd[: cmd.index("dit_accel.batch") + 1]
    assert head == [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        "29611", "-m", "dit_accel.batch",
    ]  # fmt: skip
    again = batch.build_parser().parse_args(cmd[len(head) :])
    assert {**vars(again), "processes": 3, "_parser": None} == {**vars(args), "_parser": None}


# ---------------------------------------------------------------- a real kill -9


def _start(tmp_path: Path, argv: list[str], driver: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = ["-c", driver] if driver else ["-m", "dit_accel.batch"]
    return subprocess.Popen(
        [sys.executable, *code, *argv],
        cwd=tmp_path,  # not the repository root, whose kernels/ folder diffusers would import
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"the batch ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: its pid no longer runs
    assert proc.returncode == -signal.SIGKILL


def _done(out: Path) -> dict[str, dict]:
    return {e["id"]: e for e in _entries(out) if e["status"] == "done"} if out.exists() else {}


def _check_after_kill(out: Path) -> dict[str, dict]:
    """Every finished job's output is in place with its recorded hash; every file under a final name is
    recorded as done with that hash, or (a kill between the rename and the manifest line) a whole clip."""
    done = _done(out)
    for e in done.values():
        assert _sha(out / e["output"]) == e["sha256"], e["id"]
    recorded = {e["output"]: e["sha256"] for e in done.values()}
    for path in _final_files(out):
        if recorded.get(path.name) != _sha(path):
            assert len(imageio.mimread(path)) == 5, f"{path.name} is under a final name, unrecorded, partial"
    return done


# Runs the batch with the second output's write held between its temporary file and the rename.
_HOLD_SECOND_WRITE = """
import sys, time
from dit_accel import batch
real, temporary = batch.output_sha256, []
def held(path):
    digest = real(path)
    if ".tmp-" in str(path):
        temporary.append(path)
        if len(temporary) == 2:
            time.sleep(600)
    return digest
batch.output_sha256 = held
sys.exit(batch.main(sys.argv[1:]))
"""


def test_sigkill_mid_write_and_mid_render_loses_nothing(tmp_path):
    names = [f"clip{i}" for i in range(6)]
    jobs = _jsonl(
        tmp_path / "jobs.jsonl", [{"prompt": f"a red circle {i}", "name": n} for i, n in enumerate(names)]
    )
    out = tmp_path / "out"
    argv = [str(jobs), "--out-dir", str(out), *SMALL, "--no-progress"]

    # 1. killed while the second clip sits in its temporary file
    proc = _start(tmp_path, argv, _HOLD_SECOND_WRITE)
    _wait_for(proc, lambda: len(_done(out)) == 1 and list(out.glob("clip1.tmp-*.mp4")), "the second write")
    _kill(proc)
    done = _check_after_kill(out)
    assert set(done) == {"clip0"}
    assert not (out / "clip1.mp4").exists() and list(out.glob("clip1.tmp-*"))

    # 2. resumed, then killed while rendering (the manifest has one more clip)
    proc = _start(tmp_path, argv)
    _wait_for(proc, lambda: len(_done(out)) >= 2, "a resumed clip")
    time.sleep(0.1)
    _kill(proc)
    done = _check_after_kill(out)
    assert {"clip0", "clip1"} <= set(done) and len(done) < len(names)
    assert not list(out.glob("clip1.tmp-*"))  # the stale temporary file of run 1 is gone

    # 3. resumed to the end: each clip rendered exactly once over the three runs
    proc = _start(tmp_path, argv)
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    summary = proc.stdout.read()
    assert (
        f"{len(names)} jobs; {len(done)} already done, {len(names) - len(done)} rendered, 0 failed" in summary
    )
    assert _counts(out) == dict.fromkeys(names, 1)
    done = _check_after_kill(out)
    assert sorted(p.name for p in _final_files(out)) == [f"{n}.mp4" for n in names]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_cuda_graphs_flag_reaches_every_accelerated_job_and_is_recorded(tmp_path):
    """A job with its own preset gets ``cuda_graphs`` too; a stock job stays stock. On the CPU every forward
    runs eagerly (dit_accel.graphs), so the clips render as without the flag."""
    jobs = _jsonl(
        tmp_path / "jobs.jsonl",
        [{"prompt": "a red circle", "preset": "balanced", "knobs": BLOCKS}, {"prompt": "a blue square"}],
    )
    out = tmp_path / "out"
    assert (
        cli.main(["batch", str(jobs), "--out-dir", str(out), *SMALL, "--no-progress", "--cuda-graphs"]) == 0
    )
    accelerated, stock = _entries(out)
    balanced = dict(presets.get_preset("wan", "balanced").knobs)
    expected = json.loads(json.dumps({**balanced, **BLOCKS, "cuda_graphs": True}))  # tuples: lists in JSON
    assert accelerated["job"]["knobs"] == expected
    assert stock["job"]["knobs"] == {} and [e["cuda_graphs"] for e in (accelerated, stock)] == [True, True]


def test_the_process_group_is_destroyed_when_the_ranks_finish(tmp_path, monkeypatch):
    """Every process destroys the process group before exiting (done or failed): an undestroyed gloo group
    can abort a finished process at interpreter exit, which fails the whole launch."""
    import accelerate

    destroyed = []

    class TwoRanks:
        num_processes = 2

        def __init__(self, **kwargs):
            pass

    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a red circle\n")
    monkeypatch.setattr(accelerate, "PartialState", TwoRanks)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: destroyed.append(True))
    args = batch.build_parser().parse_args([str(jobs), "--out-dir", str(tmp_path / "out"), *SMALL])
    monkeypatch.setattr(batch, "_run_ranks", lambda *a: 1)
    assert batch.run(args) == 1 and destroyed == [True]

    def fails(*a):
        raise RuntimeError("a rank failed")

    monkeypatch.setattr(batch, "_run_ranks", fails)
    with pytest.raises(RuntimeError, match="a rank failed"):
        batch.run(args)
    assert destroyed == [True, True]
