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

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .pipeline import GenerationSettings, check_settings

FIELDS = ("negative_prompt", "steps", "guidance_scale", "sampler", "seed", "width", "height", "karras")


@dataclass(frozen=True)
class Job:
    id: str
    line: int  # line number in the prompts file (1-based)
    settings: GenerationSettings


def _content_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def read_jobs(path: str | os.PathLike, defaults: dict, model_hash: str) -> list[Job]:
    """Parse the prompts file into jobs (one per image), refusing bad lines with their line number."""
    jobs = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        entry = {"prompt": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        if "cfg" in entry:
            entry["guidance_scale"] = entry.pop("cfg")
        unknown = set(entry) - {"prompt", "num_images", *FIELDS}
        if unknown:
            raise ValueError(f"{path}:{number}: unknown settings {sorted(unknown)}; known: prompt, num_images, {', '.join(FIELDS)}")
        values = {**defaults, **{k: entry[k] for k in FIELDS if k in entry}}
        if values.get("seed") is None:
            values["seed"] = _content_seed(raw)
        try:
            check_settings(values["steps"], float(values["guidance_scale"]), values["sampler"], values["width"], values["height"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        for i in range(int(entry.get("num_images", 1))):
            s = GenerationSettings(
                prompt=entry["prompt"],
                negative_prompt=values["negative_prompt"],
                steps=values["steps"],
                guidance_scale=float(values["guidance_scale"]),
                sampler=values["sampler"],
                seed=int(values["seed"]) + i,
                width=values["width"],
                height=values["height"],
                karras=bool(values["karras"]),
            )
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
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False))
        os.replace(tmp, path)
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
