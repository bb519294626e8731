"""Batch rendering: many clips from a job file, resumable and crash-safe, with a manifest, on one or many
processes.

    dit-accel batch prompts.txt --out-dir renders/                   # embedded model, stock attention
    dit-accel batch jobs.jsonl --out-dir renders/ --preset balanced --steps 30 --compare-dense
    dit-accel batch jobs.csv --out-dir renders/ --model ./wan_pipeline --preset fast --seeds 0-3
    accelerate launch --multi_gpu --num_processes 4 -m dit_accel.batch jobs.jsonl --out-dir renders/
    dit-accel batch jobs.jsonl --out-dir renders/ --processes 4      # the same launch, made for you

``python -m dit_accel.batch`` takes the same arguments as ``dit-accel batch``. The job file is JSONL (one
object per line), CSV (a header row of field names) or plain text (one prompt a line); each job may set the
fields of :data:`FIELDS`, and what it leaves out comes from the command line, then from the model's defaults.
docs/batch.md has the formats, the manifest's schema and the resume rules.

What a run guarantees:

- Every job is checked (fields, values, knobs against the method's) before a model is loaded; a bad job is
  an error naming its line and field, and nothing renders.
- An output is written to ``<name>.tmp-<pid><suffix>`` beside its final name, fsynced, hashed and renamed
  with ``os.replace``: a final name only ever holds a complete file. Temporary files of processes that no
  longer run are removed when a run starts.
- ``manifest.jsonl`` in the output folder gets one JSON line per finished or failed job (flushed and fsynced
  before the next job starts): the job's id, the hash of the resolved job, the resolved job itself (model,
  preset, method, knobs, prompt, seed, geometry, steps, guidance, output name and format), versions,
  timings, achieved density, the output's path and sha256, status and error. A torn last line (a kill
  mid-write) is skipped when read.
- Re-running the same command skips every job whose latest manifest entry is ``done`` with the same job hash
  and whose output still has the recorded sha256; everything else (failed, never finished, inputs changed,
  output missing or altered) renders again.
- A job that fails (a bad knob for this model, out of memory, ...) is recorded with its error and the batch
  goes on; the exit status is 1 when any job failed, 2 for bad arguments or job lines.
- Under ``accelerate launch`` with N processes, the jobs still to render are split by their position
  (process r takes pending jobs r, r + N, ...), each process renders on its own device and appends to
  ``manifest.rank<r>.jsonl``; process 0 merges the shards into ``manifest.jsonl`` at the end. Resume reads
  every shard, so a run may be resumed with any N.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dit_accel
from dit_accel import cli
from dit_accel.cli import UsageError

__all__ = [
    "FIELDS",
    "FORMATS",
    "MANIFEST",
    "Job",
    "JobFileError",
    "add_arguments",
    "build_parser",
    "job_is_done",
    "latest_entries",
    "load_jobs",
    "main",
    "merge_manifests",
    "output_sha256",
    "read_job_file",
    "read_manifest",
    "run",
]

MANIFEST = "manifest.jsonl"
_SHARD = "manifest.rank{rank}.jsonl"
_SHARD_GLOB = "manifest.rank*.jsonl"
_LOCK = ".batch.lock"
_TMP = re.compile(r"\.tmp-(\d+)")
_WAIT_TIMEOUT = datetime.timedelta(days=7)

# Output format -> the kind of pipeline that writes it ("frames": a folder of PNG frames).
FORMATS: dict[str, str] = {
    "mp4": "video",
    "webm": "video",
    "mkv": "video",
    "mov": "video",
    "gif": "video",
    "frames": "video",
    "png": "image",
}

# The fields a job may set, with what each takes; anything else on a job line is an error.
FIELDS: dict[str, str] = {
    "prompt": "the text prompt (required)",
    "negative_prompt": "text",
    "seed": "an integer >= 0",
    "frames": "an integer (embedded model: 4k + 1)",
    "height": "an integer (embedded model: a multiple of 16)",
    "width": "an integer (embedded model: a multiple of 16)",
    "steps": "an integer >= 1",
    "guidance": "a number",
    "preset": "a preset name (dense, quality, balanced, fast)",
    "method": "a method name, with knobs instead of a preset",
    "knobs": 'method knobs and config fields: a JSON object, or in CSV "key=value,key=value"',
    "name": "the output's name, unique in the batch (default: from the prompt, seed and a hash)",
    "format": "one of " + ", ".join(FORMATS),
}
_INTS = ("seed", "frames", "height", "width", "steps")
_TEXTS = ("prompt", "negative_prompt", "preset", "method", "name", "format")
_NEEDS_TEXT = ("prompt", "preset", "method", "name", "format")
_MAX_ERRORS = 50


# ------------------------------------------------------------------------------------------ job files


class JobFileError(ValueError):
    """Bad lines of a job file: ``errors`` holds one message per problem, each naming its line and field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        shown = self.errors[:_MAX_ERRORS]
        more = len(self.errors) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


def _where(source: str, line: int, field: str | None) -> str:
    return f"{source} line {line}" + (f", field {field!r}" if field else "")


def _convert(name: str, value: Any, from_text: bool) -> Any:
    """A field's value in its type, or a ValueError saying what the field takes."""
    if name in _INTS:
        if from_text:
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"must be an integer, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {json.dumps(value)}")
        if name == "seed" and not 0 <= value < 2**63:
            raise ValueError(f"must be an integer in [0, 2**63), got {value}")
        return value
    if name == "guidance":
        if from_text:
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {json.dumps(value)}")
        return float(value)
    if name == "knobs":
        return _knobs_value(value, from_text)
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {json.dumps(value)}")
    if name in _NEEDS_TEXT:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
    return value


def _knobs_value(value: Any, from_text: bool) -> dict:
    from dit_accel.pipelines.quality import parse_method_spec

    if from_text:
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object: {exc.msg}") from None
        else:
            value = parse_method_spec(f"_:{text}")[1]
    if not isinstance(value, dict):
        raise ValueError(f"must be an object of knob: value, got {json.dumps(value)}")
    if "method" in value:
        raise ValueError("give the method in the job's 'method' field, not among its knobs")
    return dict(value)


def _typed(source: str, line: int, raw: dict, from_text: bool, errors: list[str]) -> dict | None:
    """The job's fields converted to their types; problems are appended to ``errors`` (then None)."""
    out, bad = {}, False
    for key, value in raw.items():
        if key not in FIELDS:
            errors.append(f"{_where(source, line, key)}: unknown field; the fields are {', '.join(FIELDS)}")
            bad = True
            continue
        if value is None:  # JSON null: not set
            continue
        try:
            out[key] = _convert(key, value, from_text)
        except ValueError as exc:
            errors.append(f"{_where(source, line, key)}: {exc}")
            bad = True
    if "prompt" not in out and not bad:
        errors.append(f"{_where(source, line, 'prompt')}: missing; every job needs a prompt")
        bad = True
    return None if bad else out


def read_job_file(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """The jobs of a job file as ``(line number, fields)``, fields converted to their types.

    ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines skipped). ``.csv``: a header row of field
    names, one job per row, empty cells not set. Anything else: plain text, one prompt a line (blank lines
    and lines starting with ``#`` skipped).

    Raises:
        JobFileError: every bad line, each naming its line and field.
        OSError: the file cannot be read.
    """
    jobs, errors = _read_rows(Path(path))
    if errors:
        raise JobFileError(errors)
    return jobs


def _read_rows(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(the well-formed jobs, a message per bad line) of a job file (see :func:`read_job_file`)."""
    source = path.name
    suffix = path.suffix.lower()
    errors: list[str] = []
    jobs: list[tuple[int, dict]] = []
    if suffix == ".json":
        return [], [
            f"{source}: a .json file is not a job file; write one JSON object per line in a .jsonl file"
        ]
    text = path.read_text(encoding="utf-8-sig")
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{_where(source, n, None)}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(raw, dict):
                errors.append(f"{_where(source, n, None)}: expected a JSON object, got {line.strip()[:60]}")
                continue
            job = _typed(source, n, raw, False, errors)
            if job is not None:
                jobs.append((n, job))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        header = reader.fieldnames or []
        unknown = [h for h in header if h not in FIELDS]
        for h in unknown:
            errors.append(f"{_where(source, 1, h)}: unknown column; the fields are {', '.join(FIELDS)}")
        if unknown:
            return [], errors
        for row in reader:
            n = reader.line_num
            if None in row:
                errors.append(f"{_where(source, n, None)}: more cells than the header has columns")
                continue
            raw = {k: v for k, v in row.items() if v is not None and v.strip() != ""}
            if not raw:
                continue
            job = _typed(source, n, raw, True, errors)
            if job is not None:
                jobs.append((n, job))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            prompt = line.strip()
            if prompt and not prompt.startswith("#"):
                jobs.append((n, {"prompt": prompt}))
    if not jobs and not errors:
        errors.append(f"{source}: no jobs")
    return jobs, errors


# ------------------------------------------------------------------------------------------ resolution


@dataclass
class Plan:
    """What the command line settles for every job, checked before a model is loaded."""

    model: str  # the model as recorded in the job hash: "embedded", an absolute folder, or a hub id
    weights: str | None
    family: str | None  # None: a hub id, known once loaded
    kind: str | None
    embedded: bool
    device: str  # "cpu" or "cuda"
    dtype: str  # the dtype name the model is loaded in
    cli_knobs: dict | None  # --method/--opt/--dense-steps (None: no --preset/--method)
    seeds: list[int] | None


@dataclass(frozen=True)
class Job:
    """One resolved job.

    Attributes:
        index: position in the batch (after ``--seeds`` expansion); line: its line in the job file.
        id: its output name, unique in the batch: the manifest's key for it.
        spec: the resolved job (everything that determines the output); hash: sha256 of its canonical JSON
            with the dit_accel version.
        preset, knobs: what :func:`dit_accel.pipelines.wrap` gets (knobs may hold ``method``);
            accelerated: False for stock attention.
        call: the pipeline call's arguments except the generator.
    """

    index: int
    line: int
    id: str
    spec: dict
    hash: str
    preset: str | None
    knobs: dict
    accelerated: bool
    call: dict

    @property
    def seed(self) -> int:
        return self.spec["seed"]

    @property
    def format(self) -> str | None:
        return self.spec["format"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def job_hash(spec: dict) -> str:
    """sha256 of the canonical JSON of a resolved job and the dit_accel version."""
    import dit_accel

    return _sha(_canonical({"dit_accel": dit_accel.__version__, "job": spec}))


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > limit:
        slug = slug[:limit].rsplit("-", 1)[0] or slug[:limit]
    return slug or "job"


def _check_name(name: str) -> str | None:
    """Why ``name`` cannot be an output name, or None."""
    if name in (".", "..") or name.startswith("."):
        return "must not start with a dot"
    if any(c in name for c in "/\\\0"):
        return "must be a plain name, without a folder"
    if _TMP.search(name):
        return "must not contain '.tmp-' (the temporary files' mark)"
    if name.startswith("manifest") or name == _LOCK:
        return "is a name of the batch's own files"
    if len(name.encode()) > 200:
        return "is longer than 200 bytes"
    return None


def _suffix(fmt: str) -> str:
    return "" if fmt == "frames" else f".{fmt}"


def _parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UsageError("--seeds", f"expected seeds like 0,1,2 or 0-7, got {part!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError("--seeds", f"expected seeds >= 0 like 0,1,2 or 0-7, got {text!r}")
    return list(dict.fromkeys(seeds))


def _relabel(exc: UsageError, argument: str) -> UsageError:
    return UsageError(argument, str(exc).removeprefix(f"argument {exc.argument}: "))


@functools.cache
def _writer_problem(fmt: str, kind: str | None, out_dir: str) -> str | None:
    """Why ``fmt`` cannot be written in ``out_dir`` (its writer is not installed, ...; cli.check_output's
    checks), or None."""
    try:
        cli.check_output(str(Path(out_dir) / ("probe" + _suffix(fmt))), kind)
    except UsageError as exc:
        return str(exc).removeprefix(f"argument {exc.argument}: ")
    return None


def make_plan(args) -> Plan:
    """Check the command line (before anything is loaded) and settle what it fixes for every job.

    Raises:
        UsageError: the first argument that cannot work.
    """
    from dit_accel.pipelines import presets, wrapped

    if not Path(args.jobs).is_file():
        raise UsageError("JOBS", f"no job file at {args.jobs}")
    try:
        family = wrapped.family_of_source(args.model)
        kind_of_source, path = wrapped.source_kind(args.model)
    except ValueError as exc:
        raise UsageError("--model", str(exc)) from None
    embedded = kind_of_source == "embedded"
    if args.weights is not None and args.model != "embedded":
        raise UsageError("--weights", "is for the embedded model; give --model a weights folder instead")
    cli._check_numbers(args, embedded)
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
    knobs = cli._knobs(argparse.Namespace(**{**vars(args), "compare": args.compare_dense}))
    if knobs is not None:
        try:
            presets.resolve(family, args.preset, knobs)
        except ValueError as exc:
            raise UsageError(
                "--opt" if args.opt else "--preset" if args.preset else "--method", str(exc)
            ) from None
    kind = presets.FAMILIES[family] if family else None
    if kind == "image" and args.frames is not None:
        raise UsageError("--frames", f"{family} is an image family; it draws no frames")
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError("--out-dir", f"{out_dir} exists and is not a folder")
    try:
        cli._writable(out_dir, folder=True)
    except UsageError as exc:
        raise _relabel(exc, "--out-dir") from None
    if args.format is not None:
        if kind is not None and FORMATS[args.format] != kind:
            raise UsageError("--format", f"{family} is an {kind} family; it cannot write {args.format}")
        problem = _writer_problem(args.format, kind, str(out_dir))
        if problem:
            raise UsageError("--format", problem)
    device = cli._device(args)
    if embedded:
        model = "embedded"
        weights = (
            str(Path(args.weights).resolve()) if args.weights else (str(path.resolve()) if path else None)
        )
    else:
        model = str(path.resolve()) if path is not None else str(args.model)
        weights = None
    dtype = ("bfloat16" if device == "cuda" else "float32") if args.dtype == "auto" else args.dtype
    return Plan(
        model=model,
        weights=weights,
        family=family,
        kind=kind,
        embedded=embedded,
        device=device,
        dtype=dtype,
        cli_knobs=knobs,
        seeds=seeds,
    )


def _settings_for(fields: dict, args, plan: Plan) -> tuple[str | None, dict, bool, str]:
    """(preset, knobs for wrap, accelerated, the field an error belongs to) of a job.

    A job that sets ``preset`` or ``method`` takes its settings from its own fields only; otherwise the
    command line's preset/method apply, with the job's knobs over the command line's.
    """
    job_knobs = dict(fields.get("knobs", {}))
    blame = "knobs" if "knobs" in fields else "preset" if "preset" in fields else "method"
    if "preset" in fields or "method" in fields:
        method = {"method": fields["method"]} if "method" in fields else {}
        return fields.get("preset"), {**method, **cli.graph_knobs(args), **job_knobs}, True, blame
    if plan.cli_knobs is not None:
        return args.preset, {**plan.cli_knobs, **job_knobs}, True, blame
    if job_knobs:
        raise ValueError("knobs need a preset or a method, in the job or on the command line")
    return None, {}, False, blame


@functools.cache
def _resolve_settings(family: str | None, preset: str | None, knobs_json: str):
    """presets.resolve, once per distinct (family, preset, knobs) of a batch."""
    from dit_accel.pipelines import presets

    return presets.resolve(family, preset, json.loads(knobs_json))


def _resolve_one(index: int, line: int, fields: dict, args, plan: Plan, source: str, out_dir: Path) -> Job:
    """One job resolved and checked; a ValueError whose message names the line and field otherwise."""

    def fail(field, message):
        return ValueError(f"{_where(source, line, field)}: {message}")

    numbers = argparse.Namespace(
        frames=fields.get("frames"),
        steps=fields.get("steps"),
        height=fields.get("height"),
        width=fields.get("width"),
        guidance=fields.get("guidance"),
        fps=None,
    )
    try:
        cli._check_numbers(numbers, plan.embedded)
    except UsageError as exc:
        raise fail(exc.argument.lstrip("-"), str(exc).removeprefix(f"argument {exc.argument}: ")) from None
    if plan.kind == "image" and "frames" in fields:
        raise fail("frames", f"{plan.family} is an image family; it draws no frames")

    try:
        preset, knobs, accelerated, blame = _settings_for(fields, args, plan)
    except ValueError as exc:
        raise fail("knobs", str(exc)) from None
    settings = None
    if accelerated:
        try:
            settings = _resolve_settings(plan.family, preset, _canonical(knobs))
        except ValueError as exc:
            raise fail(blame, str(exc)) from None

    values = argparse.Namespace(
        prompt=fields["prompt"],
        frames=fields.get("frames", args.frames),
        height=fields.get("height", args.height),
        width=fields.get("width", args.width),
        steps=fields.get("steps", args.steps),
        guidance=fields.get("guidance", args.guidance),
    )
    call = cli._call_kwargs(values, {"device": plan.device}, plan.embedded)
    if plan.kind == "image":
        call.pop("num_frames", None)
    negative = fields.get("negative_prompt", args.negative_prompt)
    if negative is not None:
        call["negative_prompt"] = negative

    name = fields.get("name")
    fmt = fields.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise fail("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if name is not None:
        stem, dot, ext = name.rpartition(".")
        if dot and ext.lower() in FORMATS and ext.lower() != "frames":
            if fmt is not None and fmt != ext.lower():
                raise fail("format", f"{fmt!r} differs from the name's suffix .{ext}")
            name, fmt = stem, ext.lower()
        why = _check_name(name)
        if why:
            raise fail("name", f"{name!r} {why}")
    fmt = fmt or args.format or {"video": "mp4", "image": "png"}.get(plan.kind)
    if fmt is not None and plan.kind is not None and FORMATS[fmt] != plan.kind:
        raise fail("format", f"{plan.family} is an {plan.kind} family; it cannot write {fmt}")
    problem = _writer_problem(fmt, plan.kind, str(out_dir)) if fmt is not None else None
    if problem:
        raise fail("format", problem)

    method = settings.method if settings is not None and isinstance(settings.method, str) else None
    if settings is not None and method is None:
        method = knobs.get("method")
    spec = {
        "model": plan.model,
        "weights": plan.weights,
        "dtype": plan.dtype,
        "preset": settings.preset if settings is not None else None,
        "method": method,
        "knobs": dict(settings.knobs) if settings is not None else {},
        "prompt": call["prompt"],
        "negative_prompt": negative,
        "seed": fields.get("seed", args.seed),
        "frames": call.get("num_frames"),
        "height": call.get("height"),
        "width": call.get("width"),
        "steps": call.get("num_inference_steps"),
        "guidance": call.get("guidance_scale"),
        "fps": args.fps if plan.kind != "image" else None,
    }
    if name is None:
        key = _sha(_canonical(spec))[:8]
        name = f"{_slug(spec['prompt'])}_s{spec['seed']}_{key}"
    spec["name"] = name
    spec["format"] = fmt
    return Job(
        index=index,
        line=line,
        id=name,
        spec=spec,
        hash=job_hash(spec),
        preset=preset,
        knobs=knobs,
        accelerated=accelerated,
        call=call,
    )


def load_jobs(path, args, plan: Plan) -> list[Job]:
    """Read, expand (``--seeds``), resolve and check every job of a job file.

    Raises:
        JobFileError: every bad line (each naming its line and field), or two jobs with one output name.
    """
    source = Path(path).name
    out_dir = Path(args.out_dir)
    rows, errors = _read_rows(Path(path))
    if plan.seeds is not None:
        expanded = []
        for line, fields in rows:
            if "seed" in fields:
                expanded.append((line, fields))
                continue
            for seed in plan.seeds:
                f = {**fields, "seed": seed}
                if "name" in f:
                    stem, dot, ext = f["name"].rpartition(".")
                    f["name"] = (
                        f"{stem}_s{seed}.{ext}" if dot and ext.lower() in FORMATS else f"{f['name']}_s{seed}"
                    )
                expanded.append((line, f))
        rows = expanded
    jobs, seen = [], {}
    for index, (line, fields) in enumerate(rows):
        try:
            job = _resolve_one(index, line, fields, args, plan, source, out_dir)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if job.id in seen:
            first = seen[job.id]
            errors.append(
                f"{_where(source, line, 'name')}: the output name {job.id!r} is also line {first}'s"
                + ("" if "name" in fields else " (the same job twice?)")
            )
            continue
        seen[job.id] = line
        jobs.append(job)
    if errors:
        errors.sort(key=_line_of)
        raise JobFileError(list(dict.fromkeys(errors)))
    return jobs


def _line_of(message: str) -> int:
    m = re.search(r" line (\d+)", message)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------------ files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_sha256(path: str | os.PathLike) -> str:
    """sha256 of an output: of the file, or for a frames folder of its sorted ``name\\0sha256\\n`` lines."""
    path = Path(path)
    if path.is_dir():
        lines = "".join(f"{p.name}\0{_file_sha256(p)}\n" for p in sorted(path.iterdir()) if p.is_file())
        return _sha(lines)
    return _file_sha256(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove the temporary outputs (``*.tmp-<pid>*``) of processes that no longer run; returns them."""
    removed = []
    for p in out_dir.iterdir():
        m = _TMP.search(p.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _write_atomic(output, out_dir: Path, job: Job, fmt: str, kind: str, fps: int) -> tuple[str, str, int]:
    """Write a render to its final name through a temporary one; returns (relative path, sha256, bytes)."""
    from dit_accel.pipelines.quality import as_frames

    final = out_dir / f"{job.id}{_suffix(fmt)}"
    tmp = out_dir / f"{job.id}.tmp-{os.getpid()}{_suffix(fmt)}"
    old = None
    try:
        if fmt == "frames":
            tmp.mkdir()
            cli.write_frames(output[0], str(tmp), fps)
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            for p in files:
                _fsync_file(p)
            _fsync_dir(tmp)
            nbytes = sum(p.stat().st_size for p in files)
        else:
            if kind == "image":
                cli.write_images(as_frames(output)[:1], str(tmp))
            else:
                cli.write_frames(output[0], str(tmp), fps)
            _fsync_file(tmp)
            nbytes = tmp.stat().st_size
        digest = output_sha256(tmp)
        if fmt == "frames" and final.exists():  # a folder cannot replace a non-empty one: move it aside
            old = out_dir / f"{job.id}.tmp-{os.getpid()}-old"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return final.name, digest, nbytes


# ------------------------------------------------------------------------------------------ manifest


def _clean_json(obj):
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


class ManifestWriter:
    """Appends one JSON line per job to a manifest file, flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = path
        created = not path.exists()
        torn = not created and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self._file = open(path, "ab")
        if torn:  # a kill mid-line: end it, so the next entry starts on a line of its own
            self._file.write(b"\n")
            self._sync()
        if created:
            _fsync_dir(path.parent)

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, entry: dict) -> None:
        self._file.write((json.dumps(_clean_json(entry), ensure_ascii=False) + "\n").encode())
        self._sync()

    def close(self) -> None:
        self._file.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _manifest_files(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / MANIFEST, *sorted(out_dir.glob(_SHARD_GLOB))] if p.is_file()]


def _read_entries(path: Path) -> tuple[list[dict], int]:
    entries, bad = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:  # a torn line (kill mid-write), or not ours
            bad += 1
            continue
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            entries.append(entry)
        else:
            bad += 1
    return entries, bad


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """Every entry of ``manifest.jsonl`` and of the shards ``manifest.rank<r>.jsonl``, in file order; lines
    that are not JSON (a torn last line) are skipped."""
    entries = []
    for path in _manifest_files(Path(out_dir)):
        entries.extend(_read_entries(path)[0])
    return entries


def latest_entries(entries: list[dict]) -> dict[str, dict]:
    """Job id -> its latest entry (by ``finished`` time; the later in file order on a tie)."""
    latest: dict[str, tuple] = {}
    for order, e in enumerate(entries):
        key = (str(e.get("finished") or ""), order)
        if e["id"] not in latest or key > latest[e["id"]][0]:
            latest[e["id"]] = (key, e)
    return {k: v[1] for k, v in latest.items()}


def job_is_done(job: Job, entry: dict | None, out_dir: str | os.PathLike) -> bool:
    """Whether ``job`` needs no rendering: its latest entry is done with the same job hash, and its output
    exists with the recorded sha256."""
    if entry is None or entry.get("status") != "done" or entry.get("hash") != job.hash:
        return False
    output = entry.get("output")
    if not isinstance(output, str) or _check_name(Path(output).stem) is not None:
        return False
    path = Path(out_dir) / output
    return path.exists() and output_sha256(path) == entry.get("sha256")


def merge_manifests(out_dir: str | os.PathLike) -> Path:
    """Merge the shards into ``manifest.jsonl`` (its entries first, then the shards' by finishing time, exact
    duplicates dropped) through a temporary file, then delete the shards. Returns the manifest's path."""
    out_dir = Path(out_dir)
    main_path = out_dir / MANIFEST
    shards = sorted(out_dir.glob(_SHARD_GLOB))
    if not shards:
        return main_path
    base = _read_entries(main_path)[0] if main_path.is_file() else []
    new = [e for s in shards for e in _read_entries(s)[0]]
    new.sort(key=lambda e: str(e.get("finished") or ""))
    seen, lines = set(), []
    for e in [*base, *new]:
        line = json.dumps(e, ensure_ascii=False)
        key = _canonical(e)
        if key not in seen:
            seen.add(key)
            lines.append(line)
    tmp = out_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(f"{line}\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, main_path)
    _fsync_dir(out_dir)
    for s in shards:
        s.unlink()
    return main_path


# ------------------------------------------------------------------------------------------ rendering


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _versions() -> dict:
    import platform

    import dit_accel

    out = {"dit_accel": dit_accel.__version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed (triton on some platforms)
            out[name] = None
    return out


class _StepClock:
    """A ``callback_on_step_end`` recording when each denoising step ends (the last render's, when a call
    renders twice)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.ends: list[float] = []

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        if step == 0:
            self.ends = []
        self.ends.append(time.perf_counter())
        return callback_kwargs

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


class _Renderer:
    """Renders jobs on one loaded pipeline; re-applies dit_accel only when a job's settings change."""

    def __init__(self, pipe, device, compare: bool, step_bars: bool, position: int):
        from dit_accel.pipelines import wrapped

        self.pipe = pipe
        self.family = wrapped.family_of(pipe)
        self.kind = wrapped.FAMILIES[self.family]
        self.device = device
        self.compare = compare
        self._accel = None
        self._key = None
        self._clock = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(
                disable=not step_bars, leave=False, position=position + 1, desc="steps"
            )

    def reset(self) -> None:
        """Drop the installation, so that the next accelerated job starts from a fresh one."""
        accel, self._accel, self._key = self._accel, None, None
        if accel is not None:
            try:
                accel.remove()
            except Exception:  # the failure being recovered from may have left it half installed
                dit_accel.remove(self.pipe)

    def _target(self, job: Job):
        from dit_accel.pipelines import wrapped

        if not job.accelerated:
            if self._accel is not None:
                self._accel.remove()
                self._accel, self._key = None, None
            return self.pipe
        key = _canonical([job.preset, job.knobs])
        if key != self._key or self._accel is None:
            self._accel, self._key = None, None
            self._accel = wrapped.wrap(self.pipe, job.preset, **job.knobs)
            self._key = key
        return self._accel

    def render(self, job: Job):
        """(the pipeline's np output, what to record of the render)."""
        from dit_accel.pipelines import quality

        target = self._target(job)
        call = dict(job.call)
        clock = _StepClock(self.device.type == "cuda") if self._clock else None
        if clock is not None:
            call["callback_on_step_end"] = clock
        info: dict = {}
        if self.compare and job.accelerated:
            result = target.compare(seed=job.seed, **call)
            output, seconds, records = result.accelerated, result.seconds, result.stats.records
            finite = [p for p in result.psnr if math.isfinite(p)]
            info["compare"] = {
                "psnr": sum(finite) / len(finite) if finite else None,
                "psnr_worst_frame": min(finite) if finite else None,
                "identical_frames": len(result.psnr) - len(finite),
                "ssim": result.ssim_mean,
                "seconds_dense": result.seconds_dense,
                "speedup": result.speedup,
            }
        else:
            output, seconds = quality.timed(quality.render_output, target, seed=job.seed, **call)
            records = target.stats().records if job.accelerated else None
        timings = {"render_s": seconds}
        if clock is not None:
            steps = clock.intervals()
            timings["step_s"] = steps
            timings["per_step_s"] = sum(steps) / len(steps) if steps else None
        if records is not None:
            density = quality.attention_density(records)
            info.update(
                density=density["density"],
                plan_density=density["plan_density"],
                overall_density=density["overall_density"],
                sparse_calls=density["sparse_calls"],
                attention_calls=density["calls"],
            )
            timed = [r["time_ms"] for r in records if r["time_ms"] is not None]
            if timed:
                timings["attention_s"] = sum(timed) / 1e3
                timings["attention_share"] = timings["attention_s"] / seconds if seconds > 0 else None
            info["settings"] = target.settings.describe()
        info["timings"] = timings
        return output, info


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _run_job(renderer: _Renderer, job: Job, out_dir: Path, fps: int, context: dict) -> dict:
    """Render and write one job; the manifest entry, status "done" or "failed" (never raises for the job's
    own errors)."""
    import torch

    entry = {
        "id": job.id,
        "hash": job.hash,
        "status": None,
        "error": None,
        "line": job.line,
        "index": job.index,
        "job": job.spec,
        "output": None,
        "sha256": None,
        "bytes": None,
        **context,
        "started": _now(),
    }
    t0 = time.perf_counter()
    out_of_memory = False
    try:
        fmt = job.format or {"video": "mp4", "image": "png"}[renderer.kind]
        if FORMATS[fmt] != renderer.kind:
            raise ValueError(f"{renderer.family} is an {renderer.kind} family; it cannot write {fmt}")
        output, info = renderer.render(job)
        t1 = time.perf_counter()
        rel, digest, nbytes = _write_atomic(output, out_dir, job, fmt, renderer.kind, fps)
        info["timings"]["write_s"] = time.perf_counter() - t1
        entry.update(status="done", output=rel, sha256=digest, bytes=nbytes, **info)
    except Exception as exc:
        entry.update(status="failed", error=_error_text(exc), traceback=traceback.format_exc()[-4000:])
        out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError)
    if entry["status"] == "failed":  # out of the except block, the traceback's tensors can be freed
        renderer.reset()
        gc.collect()
        if out_of_memory:
            torch.cuda.empty_cache()
    entry.setdefault("timings", {})
    entry["timings"]["total_s"] = time.perf_counter() - t0
    entry["finished"] = _now()
    return entry


# ------------------------------------------------------------------------------------------ the run


def _take_lock(out_dir: Path):
    """An exclusive lock on the output folder for this run (released when the process ends), or a
    UsageError naming the process that holds it."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: one run per folder is the user's to keep
        return None
    f = open(out_dir / _LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UsageError(
            "--out-dir", f"another dit-accel batch (pid {holder}) is writing to {out_dir}"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch_command(args, port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command that ``--processes N`` runs: this command on N processes."""
    parser = build_parser()
    argv = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest == "processes":
            continue
        value = getattr(args, action.dest, action.default)
        if not action.option_strings:
            argv.append(str(value))
        elif value == action.default or value is None:
            continue
        elif isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            for v in value:
                argv += [action.option_strings[0], str(v)]
        else:
            argv += [action.option_strings[0], str(value)]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(args.processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port if port is not None else _free_port()),
        "-m",
        "dit_accel.batch",
        *argv,
    ]


def _load(plan: Plan, args, device):
    from dit_accel.pipelines import wrapped

    load = {"weights_dir": args.weights} if args.weights else {}
    dtype = None if plan.embedded and args.dtype == "auto" else cli._dtype(args, device.type)
    return wrapped.load_pipeline(args.model, torch_dtype=dtype, device=device, **load)


def _summary(
    jobs: list[Job], skipped: int, results: list[dict], wall: float, world: int, manifest: Path
) -> str:
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    lines = [
        f"batch: {len(jobs)} jobs; {skipped} already done, {len(done)} rendered, {len(failed)} failed"
        + (f"; {world} processes" if world > 1 else "")
    ]
    if results:
        per_min = len(done) / wall * 60 if wall > 0 else float("nan")
        lines.append(f"time {wall:.1f} s, {per_min:.1f} clips/min")
    dens = [r["density"] for r in done if r.get("density") is not None]
    if dens:
        lines.append(f"accelerated: mean density {sum(dens) / len(dens):.3f} over {len(dens)} jobs")
    comp = [r["compare"] for r in done if r.get("compare")]
    if comp:

        def mean(key):
            vals = [c[key] for c in comp if c.get(key) is not None and math.isfinite(c[key])]
            return sum(vals) / len(vals) if vals else float("nan")

        lines.append(
            f"vs dense: mean speedup {mean('speedup'):.2f}x, PSNR {mean('psnr'):.2f} dB, "
            f"SSIM {mean('ssim'):.4f} ({len(comp)} jobs)"
        )
    lines.append(f"manifest: {manifest}")
    if failed:
        lines.append("failed:")
        lines += [f"  {r['id']} (line {r['line']}): {r['error']}" for r in failed]
    return "\n".join(lines)


def run(args) -> int:
    """Run a batch from parsed arguments (:func:`build_parser`; ``dit-accel batch`` delegates here).

    Returns:
        0 when every job is done, 1 when any job failed, 2 for bad job lines.

    Raises:
        UsageError: a command-line argument that cannot work (checked before a model is loaded).
    """
    if args.processes is not None and args.processes < 1:
        raise UsageError("--processes", f"must be at least 1, got {args.processes}")
    if args.processes is not None and args.processes > 1 and _world_from_env() == 1:
        try:  # argument and job errors before starting N processes
            load_jobs(args.jobs, args, make_plan(args))
        except JobFileError as exc:
            print(
                f"dit-accel batch: {len(exc.errors)} bad job line(s), nothing rendered:\n{exc}",
                file=sys.stderr,
            )
            return 2
        return subprocess.call(relaunch_command(args))

    import torch
    from accelerate import PartialState

    plan = make_plan(args)
    # The processes wait for each other at the end: one whose share of the jobs is done may wait for as long
    # as one clip takes elsewhere, far past torch.distributed's default timeout of 30 minutes.
    state = PartialState(cpu=plan.device == "cpu", timeout=_WAIT_TIMEOUT)
    try:
        return _run_ranks(args, plan, state)
    finally:
        # Gloo's worker threads outlive a process group nobody destroyed, and the interpreter's teardown can
        # then abort the process (SIGABRT, "terminate called without an active exception") after its work
        # is done, failing the launch.
        if state.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_ranks(args, plan: Plan, state) -> int:
    """This process's part of the batch (every process runs it; the jobs are split by rank)."""
    import torch
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    rank, world = state.process_index, state.num_processes
    if args.processes is not None and args.processes != world and rank == 0:
        print(f"dit-accel batch: --processes {args.processes}, but launched as {world}", file=sys.stderr)
    try:
        jobs = load_jobs(args.jobs, args, plan)
    except JobFileError as exc:
        if rank == 0:
            print(
                f"dit-accel batch: {len(exc.errors)} bad job line(s), nothing rendered:\n{exc}",
                file=sys.stderr,
            )
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    lock_error = None
    if rank == 0:
        try:
            lock = _take_lock(out_dir)  # noqa: F841 (held until the process ends)
        except UsageError as exc:
            lock_error = str(exc)
    if world > 1:
        lock_error = next((e for e in gather_object([lock_error]) if e), None)
    if lock_error:
        if rank == 0:
            print(f"dit-accel batch: {lock_error}", file=sys.stderr)
        return 2
    if rank == 0:
        clean_stale(out_dir)

    latest = latest_entries(read_manifest(out_dir))
    pending = [j for j in jobs if not job_is_done(j, latest.get(j.id), out_dir)]
    skipped = len(jobs) - len(pending)
    state.wait_for_everyone()  # every process has read the manifests before any appends to them
    mine = pending[rank::world]

    if args.dry_run:
        if rank == 0:
            for j in pending:
                print(f"render {j.id}{_suffix(j.format) if j.format else ''} (line {j.line})")
            print(f"batch: {len(jobs)} jobs; {skipped} already done, {len(pending)} to render")
        return 0

    progress = not args.no_progress
    t_start = time.perf_counter()
    results: list[dict] = []
    if mine:
        device = state.device if plan.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        from dit_accel.pipelines.tiny_video.model import WeightsNotFoundError

        try:
            pipe = _load(plan, args, device)
        except WeightsNotFoundError as exc:
            print(f"dit-accel batch: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # not found locally or on the hub, no network, ...: diffusers says which
            print(f"dit-accel batch: cannot load {args.model}: {exc}", file=sys.stderr)
            return 1
        if args.compile:
            cli.compile_loaded(args, pipe, "dit-accel batch" + (f" [rank {rank}]" if world > 1 else ""))
        try:
            renderer = _Renderer(pipe, device, args.compare_dense, progress and world == 1, rank)
        except ValueError as exc:
            raise UsageError("--model", str(exc)) from None
        context = {
            "device": str(device)
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "rank": rank,
            "world_size": world,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "compiled": args.compile,
            "cuda_graphs": args.cuda_graphs,
            "fuse_blocks": args.fuse_blocks,
            "versions": _versions(),
            "jobs_file": str(Path(args.jobs).resolve()),
        }
        writer = ManifestWriter(out_dir / (MANIFEST if world == 1 else _SHARD.format(rank=rank)))
        bar = tqdm(
            total=len(mine),
            desc=f"rank {rank}/{world}" if world > 1 else "jobs",
            unit="clip",
            position=rank if world > 1 else 0,
            disable=not progress,
            dynamic_ncols=True,
        )
        try:
            for job in mine:
                entry = _run_job(renderer, job, out_dir, args.fps, context)
                writer.append(entry)
                results.append(
                    {k: entry.get(k) for k in ("id", "line", "status", "error", "density", "compare")}
                )
                if entry["status"] != "done":
                    tqdm.write(f"failed {job.id} (line {job.line}): {entry['error']}", file=sys.stderr)
                elif not progress:
                    print(
                        f"done {job.id}: {entry['output']} in {entry['timings']['total_s']:.1f}s", flush=True
                    )
                bar.update(1)
        finally:
            bar.close()
            writer.close()
    state.wait_for_everyone()
    every = gather_object(results) if world > 1 else results
    wall = time.perf_counter() - t_start
    if rank == 0:
        manifest = merge_manifests(out_dir)
        print(_summary(jobs, skipped, every, wall, world, manifest), flush=True)
    return 1 if any(r["status"] != "done" for r in every) else 0


# ------------------------------------------------------------------------------------------ arguments


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``dit-accel batch``'s arguments to ``parser`` (its own, or ``dit-accel``'s subcommand)."""
    from dit_accel.methods import method_names
    from dit_accel.pipelines.presets import all_preset_names

    parser.add_argument("jobs", metavar="JOBS", help="job file: .jsonl, .csv, or text with one prompt a line")
    parser.add_argument("--out-dir", required=True, help="folder of the outputs and manifest.jsonl")
    parser.add_argument(
        "--model",
        default="embedded",
        metavar="PATH_OR_ID",
        help="a pipeline folder (save_pretrained), a hub id, or 'embedded' (the default: the tiny model)",
    )
    parser.add_argument("--weights", help="weights folder of the embedded model (default: the package's)")
    parser.add_argument(
        "--preset", choices=all_preset_names(), help="dit_accel preset for jobs that set none; default: stock"
    )
    parser.add_argument("--method", choices=method_names(), help="dit_accel method instead of a preset")
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method knob or config field, repeatable; a job's knobs override these",
    )
    parser.add_argument(
        "--dense-steps", type=float, help="dense warm-up: a count (>= 1) or a fraction in [0, 1)"
    )
    parser.add_argument(
        "--compare-dense",
        action="store_true",
        help="also render each job with stock attention and record speedup and PSNR/SSIM against it",
    )
    parser.add_argument("--negative-prompt", help="negative prompt of jobs that set none")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="seed of jobs that set none (default 0)")
    seeds.add_argument("--seeds", help="render every job that sets no seed once per seed: 0,1,2 or 0-7")
    parser.add_argument("--steps", type=int, help="denoising steps (embedded model: 10 on CPU, 30 on GPU)")
    parser.add_argument("--frames", type=int, help="frames (embedded model: 4k + 1; 17 on CPU, 49 on GPU)")
    parser.add_argument("--height", type=int, help="embedded model: multiple of 16 (96 on CPU, 192 on GPU)")
    parser.add_argument("--width", type=int, help="embedded model: multiple of 16 (128 on CPU, 256 on GPU)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (embedded model: 5.0)")
    parser.add_argument(
        "--format",
        choices=list(FORMATS),
        help="output of jobs that set none: video mp4 (default), webm, mkv, mov, gif, frames (a folder of "
        "PNG frames); image png (default)",
    )
    parser.add_argument("--fps", type=int, default=16, help="frames per second of video files")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="run on N processes (one per GPU) through accelerate launch; or launch this module yourself",
    )
    cli.add_compile_argument(parser)
    cli.add_graphs_argument(parser)
    parser.add_argument("--dry-run", action="store_true", help="check the jobs, list what would render, stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars; a line per job instead")
    parser.set_defaults(_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog="python -m dit_accel.batch",
            description="Render every job of a job file: resumable, crash-safe, with a manifest "
            "(docs/batch.md).",
        )
    )


def main(argv=None) -> int:
    """Entry point of ``python -m dit_accel.batch``."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        args._parser.error(str(exc))
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
