"""`sd15 batch PROMPTS.jsonl --out DIR`: many prompts, resumable, on one process or many (torchrun).

Each line of the JSON-lines file is one job: a prompt string, or an object with "prompt" and any of
"negative_prompt", "steps", "guidance_scale" (or "cfg"), "sampler", "seed", "width", "height", "karras",
"schedule_type" (one of sd15.samplers.SCHEDULES), "num_images". Settings a line leaves out come from the command line's defaults. A line may add ControlNets
(sd15.controlnet), named as the command line's flags: "controlnet" (a file, or a list of files), "control_image"
(one per ControlNet), "controlnet_scale", "control_start", "control_end" (each one number, or one per ControlNet)
and "guess_mode". Relative paths are read from the prompts file's folder.

Exactly once, across kills and reruns:
- every image has an id: a hash of the model's short hash and all the settings its PNG records (seed, LoRAs
  and textual inversions included, and each ControlNet's file hash, weight, start and end), with what a PNG
  cannot record: the SHA-256 of each control image's bytes, and guess mode. A line without a seed gets one
  derived from what the line says, not how it is written, so a rerun picks the same. Its file is
  `DIR/<id>.png`. Lines asking for the same image (the same id) make one job.
- the PNG is written to a temporary file and renamed into place, so it either exists whole or not at all;
  a rerun skips every id whose PNG exists and ends with PNG's IEND chunk (a machine crash, unlike a kill, can
  leave a renamed file short). A kill at any moment loses at most the image being made.
- `DIR/manifest.json` maps ids to their settings and file; it is rewritten (temporary file, rename) under
  a lock after each image, and rebuilt from the PNGs at the start of every run, so it is never behind.
  One that is not a JSON object is renamed to `manifest.json.damaged-<time>` and rebuilt.

Many processes: launched by `torchrun`, rank 0 lists the jobs not done yet and sends the list to every rank
(the gloo backend: one list of ids, on the CPU, whatever device the model is on); rank r makes the pending
jobs at positions r, r + world_size, … on `cuda:LOCAL_RANK` when CUDA is present (else the CPU). A rank that
finishes does not wait for the others (a collective that waits longer than its timeout would end the run).
Works for one GPU, many GPUs and several nodes sharing DIR.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .pipeline import GenerationSettings, _finite, check_prompts, check_settings, schedule_fields

if TYPE_CHECKING:
    from PIL import Image

FIELDS = ("negative_prompt", "steps", "guidance_scale", "sampler", "seed", "width", "height", "karras", "schedule_type")
CONTROL_FIELDS = ("controlnet", "control_image", "controlnet_scale", "control_start", "control_end", "guess_mode")
# The JSON type each key takes. Whole numbers are JSON integers (30, not 30.0), as the API takes ints, not floats.
TEXT, FLAG, NUMBER = ("prompt", "negative_prompt", "sampler", "schedule_type"), ("karras",), ("guidance_scale",)
WHOLE = ("steps", "seed", "width", "height", "num_images")
KINDS = {**dict.fromkeys(TEXT, "a string"), **dict.fromkeys(FLAG, "true or false (a JSON boolean)"),
         **dict.fromkeys(NUMBER, "a finite number"), **dict.fromkeys(WHOLE, "a whole number (a JSON integer such as 30)")}  # fmt: skip


IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the chunk every whole PNG ends with
MAX_CONTROL_BYTES = 256 << 20  # a control image file's limit: 4096² pixels of 16-bit RGBA, uncompressed, are 128 MiB


@dataclass(frozen=True)
class LineControl:
    """A line's ControlNets as files: what a job needs beyond its settings to make its image."""

    nets: tuple[Path, ...]  # the ControlNet files (their hashes, weights, starts and ends are in settings.controlnets)
    images: tuple[Path, ...]  # the control image of each
    image_hashes: tuple[str, ...]  # SHA-256 of each control image's bytes (16 hex digits): part of the image's id
    guess_mode: bool = False


@dataclass(frozen=True)
class Job:
    id: str
    line: int  # line number in the prompts file (1-based)
    settings: GenerationSettings  # what the PNG records (the id hashes these)
    prompt: str  # the line's prompt, as given to the model (settings.prompt adds tags for --lora LoRAs)
    control: LineControl | None = None  # the line's ControlNets, if any


def _content_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _job(model_hash: str, line: int, s: GenerationSettings, prompt: str, checked: bool = False,
         control: LineControl | None = None, vae_hash: str | None = None) -> Job:  # fmt: skip
    """The job making image `s`. Its id hashes the model (and the VAE used instead of its own), every setting
    the PNG records, and what changes the image but is not in the PNG: the control images' bytes and guess mode
    (`control`), and `checked`, by the safety checker, which may black an image out (so that a rerun with it off
    makes such images anew).

    What earlier versions had no field for is left out while it is absent (no ControlNet, VAE or safety checker),
    so the ids of such images stay those of earlier versions, and a rerun still finds their files."""
    key = {"model": model_hash, **asdict(s)}
    if not s.controlnets:
        del key["controlnets"]
    for name in ("pad_conds", "schedule_type", "variation_seed", "variation_strength", "seed_resize_from",
                 "eta_noise_seed_delta", "seamless", "hires_sampler", "hires_schedule_type", "hires_prompt",
                 "hires_negative_prompt", "hires_guidance_scale", "discard_penultimate_sigma"):  # GenerationSettings fields added since the first version: left out unset
        if not key[name]:
            del key[name]
    if key["rng"] == "cpu":  # likewise, at its default
        del key["rng"]
    if control is not None:
        key.update(control_images=list(control.image_hashes), guess_mode=control.guess_mode)
    if checked:
        key["safety_checker"] = True
    if vae_hash is not None:
        key["vae"] = vae_hash
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Job(digest, line, s, prompt, control)


def _unique(jobs: list[Job]) -> list[Job]:
    """One job per id, the first: lines asking for the same image share its file, so it is made once."""
    unique = {}
    for job in jobs:
        unique.setdefault(job.id, job)
    return list(unique.values())


def _shown(value) -> str:
    """A JSON value for a message: short, and never the whole of a (possibly deeply nested) array or object."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = json.dumps(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"the string {text}" if isinstance(value, str) else text


def _typed(key: str, value):
    """One setting as sd15 takes it (a guidance scale as a float), or ValueError naming the JSON type it needs."""
    if key in ("seed", "schedule_type") and value is None:
        return None  # as if left out: a seed derived from the line's content, the sampler's own schedule
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
    check_settings(s["steps"], s["guidance_scale"], s["sampler"], s["width"], s["height"], num_images, seed=s["seed"],
                   karras=s["karras"], schedule_type=s["schedule_type"])  # fmt: skip
    return {**s, **schedule_fields(s["karras"], s["schedule_type"])}


def _paths(key: str, value) -> list[str]:
    """A line's "controlnet" or "control_image": a file name, or a list of them."""
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f'"{key}" must be a file name or a list of file names, got {_shown(value)}')
    return names


def _per_net(key: str, value, n: int) -> list[float]:
    """A ControlNet's number ("controlnet_scale", "control_start", "control_end"): one for all, or one each."""
    values = value if isinstance(value, list) else [value] * n
    if not all(_finite(v) for v in values):  # JSON numbers, not true/false, and not 1e400
        raise ValueError(f'"{key}" must be a finite number, or a list of one per ControlNet, got {_shown(value)}')
    if len(values) != n:
        raise ValueError(f'"{key}" must be one number, or a list of one per ControlNet ({n}), got {len(values)}')
    return [float(v) for v in values]


def read_control_image(path: Path) -> tuple[str, Image.Image]:
    """A control image file -> (the SHA-256 of its bytes, 16 hex digits; the RGB image `sd15 generate` would make
    of it: sizes checked, EXIF rotation applied, transparency black). The picture is decoded from the bytes that
    were hashed, so an image's id and the control image it was made with always agree. Only a regular file of at
    most MAX_CONTROL_BYTES is read: a line naming a device, a FIFO or a huge file is refused before its bytes."""
    from .checkpoint import printable
    from .controlnet import control_rgb
    from .images import open_image

    shown = printable(path)
    try:
        # O_NONBLOCK: opening a FIFO cannot hang (POSIX; Windows has neither the flag nor FIFOs in its file system)
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"cannot read the control image {shown}: not a regular file (a folder, device or FIFO); give an image file")
            if info.st_size > MAX_CONTROL_BYTES:
                raise ValueError(f"the control image {shown} is {info.st_size} bytes, more than sd15 reads of a control "
                                 f"image ({MAX_CONTROL_BYTES}); give a smaller file")  # fmt: skip
            data = f.read(MAX_CONTROL_BYTES + 1)  # bounded, should it grow meanwhile
    except OSError as e:
        raise ValueError(f"cannot read the control image {shown}: {e.strerror}") from None
    if len(data) > MAX_CONTROL_BYTES:
        raise ValueError(f"the control image {shown} grew past {MAX_CONTROL_BYTES} bytes while it was read; give a smaller file")
    image = control_rgb(open_image(shown, "control image", data=data))
    return hashlib.sha256(data).hexdigest()[:16], image


def _line_control(given: dict, folder: Path) -> tuple[list[dict], LineControl | None]:
    """A line's ControlNet fields -> what its PNG records of each ControlNet (sd15.controlnet.settings_record's
    fields: the file's name and pnginfo.short_hash, weight, start, end) and its LineControl; ([], None) without.
    Files are found (relative paths from `folder`) and control images read now, before any model loads."""
    from .checkpoint import printable
    from .pnginfo import short_hash

    if "controlnet" not in given:
        if given:
            raise ValueError(f"{', '.join(sorted(given))} given without a \"controlnet\": add \"controlnet\": FILE and "
                             "\"control_image\": IMG, or leave them out")  # fmt: skip
        return [], None
    nets = [folder / name for name in _paths("controlnet", given["controlnet"])]
    images = [folder / name for name in _paths("control_image", given["control_image"])] if "control_image" in given else []
    if len(images) != len(nets):
        raise ValueError(f'give one "control_image" per "controlnet": {len(nets)} ControlNets, {len(images)} control images')
    scales, starts, ends = (_per_net(key, given.get(key, default), len(nets))
                            for key, default in (("controlnet_scale", 1.0), ("control_start", 0.0), ("control_end", 1.0)))  # fmt: skip
    guess_mode = given.get("guess_mode", False)
    if not isinstance(guess_mode, bool):
        raise ValueError(f'"guess_mode" must be true or false (a JSON boolean), got {_shown(guess_mode)}')
    for start, end in zip(starts, ends):
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f'"control_start" and "control_end" must satisfy 0 <= start < end <= 1, got {start:g} and {end:g}')
    records = []
    for net, scale, start, end in zip(nets, scales, starts, ends):
        if not net.is_file():
            hint = ' (a scale goes in "controlnet_scale", not after a colon)' if re.search(r":[\d.]+$", net.name) else ""
            raise ValueError(f"no such ControlNet file: {printable(net)}{hint}")
        try:
            digest = short_hash(net)
        except OSError as e:
            raise ValueError(f"cannot read the ControlNet file {printable(net)}: {e.strerror}") from None
        records.append(dict(model=net.stem, hash=digest, weight=scale, guidance_start=start, guidance_end=end,
                            **({"guess_mode": True} if guess_mode else {})))  # as settings_record: only when on
    hashes = tuple(read_control_image(image)[0] for image in images)
    return records, LineControl(tuple(nets), tuple(images), hashes, guess_mode)


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
    defaults = {"schedule_type": None, **defaults}  # the sampler's own noise levels unless said
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
        unknown = set(entry) - {"prompt", "num_images", *FIELDS, *CONTROL_FIELDS}
        if unknown:
            raise ValueError(f"{path}:{number}: unknown settings {sorted(unknown)}; known: prompt, num_images, "
                             f"{', '.join(FIELDS)}, {', '.join(CONTROL_FIELDS)}")  # fmt: skip
        num_images = entry.pop("num_images", 1)
        control_fields = {key: entry.pop(key) for key in CONTROL_FIELDS if key in entry}
        try:
            num_images = _typed("num_images", num_images)
            values = _checked({**defaults, **entry}, num_images)
            controlnets, control = _line_control(control_fields, Path(path).parent)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if values["seed"] is None:  # from the settings the line gives, typed: not its spacing, key order or num_images
            values["seed"] = _content_seed(json.dumps({k: values[k] for k in entry if k != "seed"}, sort_keys=True))
            # (not from its ControlNets: adding one to a line keeps its seed, so the same picture is steered)
        for i in range(num_images):
            s = GenerationSettings(**{**values, "seed": values["seed"] + i}, controlnets=[dict(c) for c in controlnets])
            jobs.append(_job(model_hash, number, s, values["prompt"], control=control))
    if not jobs:
        raise ValueError(f"{path}: no prompts (every line is blank or a # comment)")
    return _unique(jobs)


def with_adapters(m, model_hash: str, jobs: list[Job]) -> list[Job]:
    """The jobs as model `m` makes them: their settings as its PNGs record them (sd15.pipeline.record_settings),
    with the LoRAs in effect (--lora, <lora:name:scale> in the prompt) and the textual inversions the prompts
    use, which change the image and so its id, as does a safety checker (it blacks out what it flags). With none,
    the jobs are unchanged. A missing LoRA is refused here, before any image is made."""
    from .lora import recorded_prompt
    from .pnginfo import vae_record
    from .prompts import adapter_hashes

    vae_hash, _ = vae_record(m.vae_path)
    out = []
    for job in jobs:
        s = job.settings
        try:
            adapters = adapter_hashes(m, s.prompt, s.negative_prompt)
        except ValueError as e:
            raise ValueError(f"line {job.line} of the prompts file: {e}") from None
        recorded = replace(s, prompt=recorded_prompt(m, s.prompt), **adapters)
        checked = getattr(m, "safety_checker", None) is not None
        out.append(_job(model_hash, job.line, recorded, job.prompt, checked=checked, control=job.control, vae_hash=vae_hash))
    return _unique(out)


def load_controlnets(jobs: list[Job], device=None, dtype=None) -> dict:
    """Every distinct ControlNet file the jobs use, loaded once ({path: ControlNet}), and so checked: a file that
    is no usable ControlNet is refused here, with the first line that names it, as is one whose hash is no longer
    the one the jobs' ids were made with (the file changed since the prompts file was read)."""
    from .checkpoint import printable
    from .controlnet import load_controlnet

    nets = {}
    for job in jobs:
        for path, record in zip(job.control.nets, job.settings.controlnets) if job.control is not None else ():
            if path not in nets:
                try:
                    nets[path] = load_controlnet(path, device, dtype)
                except ValueError as e:  # a CheckpointError: not a ControlNet, damaged, of another family
                    raise ValueError(f"line {job.line} of the prompts file: {e}") from None
            if nets[path].hash != record["hash"]:
                raise ValueError(f"the ControlNet file {printable(path)} (line {job.line}) changed since the prompts file "
                                 "was read; run the batch again to use it as it is now")  # fmt: skip
    return nets


def _control_arguments(job: Job, nets: dict) -> dict:
    """generate's ControlNet arguments for `job` (none without). Each control image is read again, and refused if
    its bytes are not those the job's id hashed (the file changed since the prompts file was read)."""
    from .checkpoint import printable

    c = job.control
    if c is None:
        return {}
    images = []
    for path, expected in zip(c.images, c.image_hashes):
        digest, image = read_control_image(path)
        if digest != expected:
            raise ValueError(f"the control image {printable(path)} (line {job.line}) changed during the run; run the batch again "
                             "to make it as it is now")  # fmt: skip
        images.append(image)
    records = job.settings.controlnets
    return dict(controlnet=[nets[path] for path in c.nets], control_image=images, guess_mode=c.guess_mode,
                controlnet_conditioning_scale=[r["weight"] for r in records],
                control_guidance_start=[r["guidance_start"] for r in records],
                control_guidance_end=[r["guidance_end"] for r in records])  # fmt: skip


def _done(path: Path) -> bool:
    """Whether `path` is a whole PNG: one that ends with the IEND chunk. A kill cannot leave a partial file (each
    is renamed into place whole), but a machine crash can, when the rename reached the disk and the data did not."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(IEND), os.SEEK_END)
            return f.read() == IEND
    except OSError:  # no such file, or shorter than IEND
        return False


@contextmanager
def _locked(folder: Path):
    with open(folder / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_manifest(folder: Path, jobs: list[Job], prune: bool = False) -> dict:
    """Add every job whose PNG is done to manifest.json (atomically, under a lock), and with `prune` drop the
    entries whose PNG is not (deleted, or cut short); returns the manifest. Entries of other prompts files stay.
    A manifest that is not a JSON object is kept aside as manifest.json.damaged-<time>, and rebuilt."""
    path = folder / "manifest.json"
    with _locked(folder):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            manifest = {}
        except ValueError:  # not UTF-8, or not JSON
            manifest = None
        if not isinstance(manifest, dict):
            aside = path.with_name(f"manifest.json.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(path, aside)
            print(f"warning: {path} is not a JSON object; kept as {aside.name}, rebuilt from the images", file=sys.stderr)
            manifest = {}
        if prune:
            manifest = {key: entry for key, entry in manifest.items() if _done(folder / f"{key}.png")}
        for job in jobs:
            if job.id not in manifest and _done(folder / f"{job.id}.png"):
                manifest[job.id] = {"file": f"{job.id}.png", "line": job.line, **asdict(job.settings)}
                if job.control is not None:  # which files, as the PNG records only the ControlNets' names and hashes
                    manifest[job.id].update(control_images=[str(p) for p in job.control.images], guess_mode=job.control.guess_mode)
        tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return manifest


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), initialising torch.distributed when launched by torchrun.

    The backend is gloo even on GPUs: the ranks exchange one list of ids, on the CPU, so no GPU is bound to a
    rank for it (nccl would need torch.cuda.set_device first) and the path tested on CPUs is the one used on
    GPUs. Its timeout bounds how long the ranks wait for each other to load the model."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def run_batch(m, model_path: Path, model_hash: str, jobs: list[Job], out: Path, progress: bool = True,
              controlnets: dict | None = None) -> list[Job]:  # fmt: skip
    """Make every job's image that does not exist yet; returns the jobs this process made. `controlnets`: the
    jobs' ControlNets as load_controlnets gives them (the command line loads them before the model, to refuse a
    bad file early); by default those of this process's jobs are loaded here, each once."""
    from .pnginfo import format_parameters, save_png, vae_record

    rank, world, _ = _distributed()
    jobs = with_adapters(m, model_hash, jobs)
    out.mkdir(parents=True, exist_ok=True)
    pending = None
    if rank == 0:  # a previous run may have been killed between a PNG and its manifest entry
        update_manifest(out, jobs, prune=True)
        pending = [job.id for job in jobs if not _done(out / f"{job.id}.png")]
    if world > 1:  # one view of what is done, rank 0's, so every pending job has one owner and shares are even
        import torch.distributed as dist

        box = [pending]
        dist.broadcast_object_list(box, src=0)
        pending = box[0]
    by_id = {job.id: job for job in jobs}
    if not set(pending) <= set(by_id):
        raise ValueError(f"rank {rank} has other jobs than rank 0: start every rank with the same prompts file, model and flags")
    mine = [by_id[i] for i in pending[rank::world]]
    nets = controlnets if controlnets is not None else load_controlnets(mine, m.device, m.dtype)
    vae = vae_record(m.vae_path)  # once: a folder's hash reads every file
    made = []
    for job in mine:
        if _done(out / f"{job.id}.png"):  # made meanwhile by another run on the same folder
            continue
        s = job.settings
        image = m.generate(
            job.prompt, s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale, sampler=s.sampler,
            seed=s.seed, width=s.width, height=s.height, karras=s.karras, schedule_type=s.schedule_type, progress=progress,
            **_control_arguments(job, nets),
        )[0]  # fmt: skip
        save_png(image, out / f"{job.id}.png", format_parameters(s, model_hash, model_path.stem, *vae))
        update_manifest(out, [job])
        made.append(job)
    update_manifest(out, jobs)  # the last rank to finish lists everything, without waiting for the others
    return made
