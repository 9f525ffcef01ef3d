"""`sd15 batch PROMPTS.jsonl --out DIR`: many prompts, resumable, on one process or many (torchrun).

Each line of the JSON-lines file is one job: a prompt string, or an object with "prompt" and any of
"negative_prompt", "steps", "guidance_scale" (or "cfg"), "sampler", "seed", "width", "height", "karras",
"num_images". Settings a line leaves out come from the command line's defaults.

Exactly once, across kills and reruns:
- every image has an id: a hash of the model's short hash and all its settings (seed included; a line
  without a seed gets one derived from its content, so a rerun picks the same). Its file is `DIR/<id>.png`.
- the PNG is written to a temporary file and renamed into place, so it either exists whole or not at all;
  a rerun skips every id whose PNG exists. A kill at any moment loses at most the image being made.
- `DIR/manifest.json` maps ids to their settings and file; it is rewritten (temporary file, rename) under
  a lock after each image, and rebuilt from the PNGs at the start of every run, so it is never behind.

Many processes: launched by `torchrun`, each rank takes the jobs whose position i satisfies
i % world_size == rank, uses `cuda:LOCAL_RANK` when CUDA is present (else the CPU, with the gloo backend),
and waits for the others at the end. Works for one GPU, many GPUs and several nodes sharing DIR.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .pipeline import GenerationSettings, check_prompts, check_settings

FIELDS = ("negative_prompt", "steps", "guidance_scale", "sampler", "seed", "width", "height", "karras")
# The JSON type each key takes. Whole numbers are JSON integers (30, not 30.0), as the API takes ints, not floats.
TEXT, FLAG, NUMBER = ("prompt", "negative_prompt", "sampler"), ("karras",), ("guidance_scale",)
WHOLE = ("steps", "seed", "width", "height", "num_images")
KINDS = {**dict.fromkeys(TEXT, "a string"), **dict.fromkeys(FLAG, "true or false (a JSON boolean)"),
         **dict.fromkeys(NUMBER, "a finite number"), **dict.fromkeys(WHOLE, "a whole number (a JSON integer such as 30)")}  # fmt: skip


@dataclass(frozen=True)
class Job:
    id: str
    line: int  # line number in the prompts file (1-based)
    settings: GenerationSettings


def _content_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _shown(value) -> str:
    """A JSON value for a message: short, and never the whole of a (possibly deeply nested) array or object."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = json.dumps(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"the string {text}" if isinstance(value, str) else text


def _typed(key: str, value):
    """One setting as sd15 takes it (a guidance scale as a float), or ValueError naming the JSON type it needs."""
    if key == "seed" and value is None:
        return None  # as if left out: derived from the line's content
    if (key in TEXT and isinstance(value, str) or key in FLAG and isinstance(value, bool)
            or key in WHOLE and isinstance(value, int) and not isinstance(value, bool)):  # fmt: skip
        return value
    if key in NUMBER and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)  # JSON allows integers of any size; NaN and infinities never get here
        except OverflowError:
            pass
    raise ValueError(f'"{key}" must be {KINDS[key]}, got {_shown(value)}')


def _checked(settings: dict, num_images: int) -> dict:
    """The prompt and FIELDS of `settings`, typed, and refused by the rules the API applies
    (sd15.pipeline.check_prompts and check_settings, which takes image i's seed + i into account)."""
    s = {key: _typed(key, settings[key]) for key in ("prompt", *FIELDS)}
    check_prompts(s["prompt"], s["negative_prompt"])
    check_settings(s["steps"], s["guidance_scale"], s["sampler"], s["width"], s["height"], num_images, seed=s["seed"])
    return s


def _parse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _parse_float(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise ValueError(f"the number {text:.40} is too large")
    return value


def _object(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"{sorted({k for k in keys if keys.count(k) > 1})} given more than once")
    return dict(pairs)


def _lines(path: str | os.PathLike) -> list[str]:
    """The file's lines, as UTF-8 text (a leading byte-order mark allowed), or ValueError saying where it is not."""
    try:
        data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise ValueError(f"cannot read the prompts file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte {column} of the line); "
                         f"save the file as UTF-8") from None  # fmt: skip
    return re.split(r"\r\n?|\n", text)  # not str.splitlines, which also splits at U+2028 inside a JSON string


def read_jobs(path: str | os.PathLike, defaults: dict, model_hash: str) -> list[Job]:
    """Parse the prompts file into jobs (one per image), refusing a bad line with the file name and line number.

    Every line is checked before any job is returned, by the rules the API applies, so a bad line stops the run
    before the model loads and before anything is written. `defaults` (the command line's settings) are checked
    first, and refused as such."""
    try:
        _checked({"prompt": "", **defaults}, 1)
    except ValueError as e:
        raise ValueError(f"{e} (a default for every line, from the command line)") from None
    jobs = []
    for number, raw in enumerate(_lines(path), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(raw, parse_constant=_parse_constant, parse_float=_parse_float, object_pairs_hook=_object)
        except RecursionError:
            raise ValueError(f"{path}:{number}: JSON nested too deeply to read") from None
        except ValueError as e:  # json.JSONDecodeError, or a refusal above: a number too large, NaN, a repeated key
            raise ValueError(f"{path}:{number}: not valid JSON ({getattr(e, 'msg', e)})") from None
        entry = {"prompt": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        if "cfg" in entry:
            if "guidance_scale" in entry:
                raise ValueError(f'{path}:{number}: give "guidance_scale" or its short name "cfg", not both')
            entry["guidance_scale"] = entry.pop("cfg")
        unknown = set(entry) - {"prompt", "num_images", *FIELDS}
        if unknown:
            raise ValueError(f"{path}:{number}: unknown settings {sorted(unknown)}; known: prompt, num_images, {', '.join(FIELDS)}")
        num_images = entry.pop("num_images", 1)
        try:
            num_images = _typed("num_images", num_images)
            values = _checked({**defaults, **entry}, num_images)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if values["seed"] is None:
            values["seed"] = _content_seed(raw)
        for i in range(num_images):
            s = GenerationSettings(**{**values, "seed": values["seed"] + i})
            key = json.dumps({"model": model_hash, **asdict(s)}, sort_keys=True)
            jobs.append(Job(hashlib.sha256(key.encode()).hexdigest()[:16], number, s))
    return jobs


@contextmanager
def _locked(folder: Path):
    with open(folder / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_manifest(folder: Path, jobs: list[Job]) -> dict:
    """Add every job whose PNG exists to manifest.json (atomically, under a lock); returns the manifest."""
    path = folder / "manifest.json"
    with _locked(folder):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            manifest = {}
        for job in jobs:
            if job.id not in manifest and (folder / f"{job.id}.png").exists():
                manifest[job.id] = {"file": f"{job.id}.png", "line": job.line, **asdict(job.settings)}
        tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return manifest


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def run_batch(m, model_path: Path, model_hash: str, jobs: list[Job], out: Path, progress: bool = True) -> list[Job]:
    """Make every job's image that does not exist yet; returns the jobs this process made."""
    from .pnginfo import format_parameters, save_png

    rank, world, _ = _distributed()
    out.mkdir(parents=True, exist_ok=True)
    update_manifest(out, jobs)  # a previous run may have been killed between a PNG and its manifest entry
    mine = [job for i, job in enumerate(jobs) if i % world == rank and not (out / f"{job.id}.png").exists()]
    made = []
    for job in mine:
        s = job.settings
        image = m.generate(
            s.prompt, s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale, sampler=s.sampler,
            seed=s.seed, width=s.width, height=s.height, karras=s.karras, progress=progress,
        )[0]  # fmt: skip
        save_png(image, out / f"{job.id}.png", format_parameters(s, model_hash, model_path.stem))
        update_manifest(out, [job])
        made.append(job)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            update_manifest(out, jobs)
    return made
