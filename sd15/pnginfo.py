"""Generation parameters in PNG files, in the text format people paste between tools.

The AUTOMATIC1111 web UI stores a `parameters` tEXt chunk that most SD tools read and write:

    a photo of an astronaut riding a horse on mars
    Negative prompt: blurry, lowres
    Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly

A ControlNet is recorded as the web UI's ControlNet extension records one, a quoted list of its own settings:

    ControlNet 0: "Module: none, Model: control_v11p_sd15_canny [a8f3a7d0e5], Weight: 1, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1"

(Module: the preprocessor that made the control image: none when it is taken as it is, or canny, followed by
"Threshold A: 100, Threshold B: 200", when `sd15 … --control-preprocess canny` made it; the hash is the file's, as
the model's.) The prompt may span several lines; the negative prompt line is present only when it is not empty; the last
line is comma-separated `Key: value` pairs (a value with a comma or colon is double-quoted). The model hash
is the first 10 hex digits of the file's SHA-256, as that UI shows it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from .pipeline import GenerationSettings
from .schedule import BETA_SCHEDULE_AB

# sd15 sampler name <-> the name that UI gives the same algorithm.
SAMPLER_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "unipc": "UniPC",
    "lcm": "LCM",
}
SAMPLERS_BY_NAME = {v: k for k, v in SAMPLER_NAMES.items()}


HIRES_UPSCALER_NAMES = {"lanczos": "Lanczos", "latent": "Latent"}  # the web UI's names

# The web UI's noise schedules ("Schedule type"; before 1.9 appended to the sampler's name: "DPM++ 2M Karras").
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                  "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")  # fmt: skip
# sd15's schedule types by their web UI names; "Uniform" and "Automatic" (a sampler's own noise levels) are "default"
SCHEDULE_TYPE_NAMES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", "normal": "Normal",
                       "sgm_uniform": "SGM Uniform", "simple": "Simple", "ddim_uniform": "DDIM",
                       "kl_optimal": "KL Optimal", "align_your_steps": "Align Your Steps"}  # fmt: skip
SCHEDULE_TYPES_BY_NAME = {v: k for k, v in SCHEDULE_TYPE_NAMES.items()}
# Samplers the web UI runs on its timestep grid: it records its schedule type for them too, but does not use it.
TIMESTEP_SAMPLERS = ("ddim", "pndm", "unipc", "lcm")
RNG_NAMES = {"cpu": "CPU", "nv": "NV"}  # sd15's noise sources by the web UI's names of its RNG setting


def made_by_web_ui(fields: dict) -> bool:
    """Whether a PNG's fields are the web UI's ("Version: v1.10.1"), whose conventions then apply, rather than
    sd15's ("Version: sd15") or an older writer's (no Version)."""
    return fields.get("Version", "sd15") != "sd15"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def _unquote(value: str) -> str:
    """A value as written: decoded when it is one quoted string, else kept as it is (the web UI quotes only
    values with a comma, colon or newline, so `"masterpiece" style` is plain text)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def _number(x: float) -> str:
    """A number as short as it reads back exactly: 7.5, 0.75, 7.123456789 (`:g` alone keeps 6 digits)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def hash_list_name(name: str) -> str:
    """A name as `TI hashes` / `Lora hashes` hold it: without ':' and ',', as the web UI writes them, so that
    the list reads back."""
    return name.replace(":", "").replace(",", "")


def _hash_list(hashes: dict[str, str]) -> str | None:
    """{name: hash} -> "name: hash, name: hash" (the web UI's `TI hashes` / `Lora hashes` value)."""
    return ", ".join(f"{hash_list_name(name)}: {h}" for name, h in hashes.items()) or None


def _parse_hash_list(value: str) -> dict[str, str]:
    pairs = (part.rpartition(":") for part in value.split(","))
    return {name.strip(): h.strip() for name, _, h in pairs if name.strip() and h.strip()}


def format_parameters(s: GenerationSettings, model_hash: str | None = None, model_name: str | None = None,
                      vae_hash: str | None = None, vae_name: str | None = None) -> str:
    """The `parameters` text of image `s`; `vae_hash`/`vae_name` for a VAE used instead of the checkpoint's
    (the web UI's "VAE hash" and "VAE": the file's short_hash and its name with the extension)."""
    lines = [s.prompt]
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    fields = {
        "Steps": s.steps,
        "Sampler": SAMPLER_NAMES[s.sampler],
        # said for the others too: the web UI takes a missing one as its sampler's default, Karras for DPM++ 2M
        "Schedule type": SCHEDULE_TYPE_NAMES["karras" if s.karras else s.schedule_type] if s.karras or s.schedule_type
        else None if s.sampler in TIMESTEP_SAMPLERS else "Uniform",
        "CFG scale": _number(s.guidance_scale),
        "Seed": s.seed,
        "Size": f"{s.width}x{s.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Variation seed": s.variation_seed if s.variation_strength else None,
        "Variation seed strength": _number(s.variation_strength) if s.variation_strength else None,
        "Seed resize from": "{}x{}".format(*s.seed_resize_from) if s.seed_resize_from else None,
        "Denoising strength": _number(s.strength) if s.strength is not None else None,
        "Clip skip": s.clip_skip if s.clip_skip != 1 else None,
        "ENSD": s.eta_noise_seed_delta or None,
        "Tiling": "True" if s.seamless else None,
        "Discard penultimate sigma": "True" if s.discard_penultimate_sigma else None,
        "RNG": RNG_NAMES[s.rng],  # said also for the CPU: the web UI would otherwise draw on its GPU, its default
        "Hires upscale": _number(s.hires_scale) if s.hires_scale else None,
        "Hires steps": s.hires_steps if s.hires_scale else None,
        "Hires upscaler": HIRES_UPSCALER_NAMES[s.hires_upscaler] if s.hires_scale else None,
        "Hires sampler": SAMPLER_NAMES[s.hires_sampler] if s.hires_sampler else None,
        "Hires schedule type": {"default": "Uniform", **SCHEDULE_TYPE_NAMES}[s.hires_schedule_type] if s.hires_schedule_type else None,
        "Hires prompt": s.hires_prompt,
        "Hires negative prompt": s.hires_negative_prompt,
        "Hires CFG Scale": _number(s.hires_guidance_scale) if s.hires_guidance_scale is not None else None,
        "Mask blur": _number(s.mask_blur) if s.mask_blur is not None else None,
        "Inpaint area": "Only masked" if s.inpaint_padding is not None else None,
        "Masked area padding": s.inpaint_padding,
        "Eta DDIM": _number(s.eta) if s.eta else None,  # the web UI's key for DDIM's eta ("Eta" is its ancestral one)
        # the Beta distribution's parameters, written as the web UI writes them beside its Beta schedule
        "Beta schedule alpha": _number(BETA_SCHEDULE_AB[0]) if s.schedule_type == "beta" else None,
        "Beta schedule beta": _number(BETA_SCHEDULE_AB[1]) if s.schedule_type == "beta" else None,
        "TI hashes": _hash_list(s.ti_hashes),
        "Lora hashes": _hash_list(s.lora_hashes),
        "Pad conds": "True" if s.pad_conds else None,
        **{f"ControlNet {i}": _controlnet_text(c) for i, c in enumerate(s.controlnets)},
        "Version": "sd15",
    }
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _controlnet_text(c: dict) -> str:
    model = f"{c['model']} [{c['hash']}]" if c.get("hash") else c["model"]
    thresholds = f"Threshold A: {c['threshold_a']:g}, Threshold B: {c['threshold_b']:g}, " if "threshold_a" in c else ""
    guess = ", Guess Mode: True" if c.get("guess_mode") else ""  # sd15's (diffusers'): the extension has no such field
    return (f"Module: {c.get('module', 'none')}, Model: {model}, Weight: {_number(c['weight'])}, Resize Mode: Just Resize, "
            f"{thresholds}Guidance Start: {_number(c['guidance_start'])}, Guidance End: {_number(c['guidance_end'])}{guess}")  # fmt: skip


def _parse_controlnet(value: str) -> dict:
    """One `ControlNet N` value -> {"model", "hash", "weight", "guidance_start", "guidance_end"} (the defaults
    of the extension where a field is absent), "guess_mode" when it was on, and "module" (with "threshold_a",
    "threshold_b" where given) when a preprocessor made the control image."""
    fields = {k.strip(): v.strip() for k, v in _FIELD.findall(value)}
    model, _, digest = re.fullmatch(r"(.*?)(?: \[(\w+)\])?", fields.get("Model", "")).group(1, 0, 2)
    record = dict(model=model, hash=digest, weight=float(fields.get("Weight", 1)),
                  guidance_start=float(fields.get("Guidance Start", 0)), guidance_end=float(fields.get("Guidance End", 1)))  # fmt: skip
    if fields.get("Guess Mode") == "True":
        record["guess_mode"] = True
    module = fields.get("Module", "none")
    if module != "none":  # the preprocessor that made the control image (sd15: --control-preprocess)
        record["module"] = module
        if "Threshold A" in fields and "Threshold B" in fields:
            record["threshold_a"], record["threshold_b"] = float(fields["Threshold A"]), float(fields["Threshold B"])
    return record


_FIELD = re.compile(r'\s*([\w \-+/()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _schedule_label(fields: dict, key: str) -> str | None:
    """The schedule type a PNG records under `key`; the web UI's Polyexponential at its default rho (1, no
    "Schedule rho" recorded) is the Exponential it equals."""
    label = fields.get(key)
    return "Exponential" if label == "Polyexponential" and "Schedule rho" not in fields else label


def parse_parameters(text: str) -> dict:
    """The `parameters` text -> {"prompt", "negative_prompt", and the last line's fields by name}.

    `GenerationSettings` fields are filled where present: "steps", "guidance_scale", "sampler" (sd15's
    name; a name sd15 lacks is "unknown_sampler" instead), "seed", "width", "height", "karras", "schedule_type"
    (sd15's name of any other schedule type it has), "eta" (DDIM's: `Eta DDIM`),
    "strength", "clip_skip", "pad_conds", "variation_seed" and "variation_strength", "seed_resize_from" ((W, H)),
    "eta_noise_seed_delta", "seamless" (`Tiling`), "discard_penultimate_sigma", "rng" (`RNG`), "ti_hashes", "lora_hashes"
    ({name: hash}), for a hires fix "hires_scale" (or "hires_resize", (W, H)), "hires_steps", "hires_upscaler" and
    the second pass's own "hires_sampler", "hires_schedule_type", "hires_prompt", "hires_negative_prompt",
    "hires_guidance_scale", and for inpainting
    "mask_blur" and "inpaint_padding", and "controlnets" (a list of {"model", "hash", "weight", "guidance_start",
    "guidance_end"}, one per `ControlNet N` field). LoRAs are named in the prompt itself, as `<lora:name:scale>`.
    """
    lines = text.strip("\n").split("\n")
    last = lines[-1] if re.match(r"(.*, )?Steps: ", lines[-1]) else ""  # the settings line always has Steps
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    fields = {}
    for key, value in _FIELD.findall(last):
        fields[key.strip()] = _unquote(value.strip())
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines), "fields": fields}
    if "Steps" in fields:
        result["steps"] = int(fields["Steps"])
    for key, schedule_key, name_key in (("Sampler", "Schedule type", "sampler"),
                                        ("Hires sampler", "Hires schedule type", "hires_sampler")):  # fmt: skip
        if key not in fields:
            continue
        name = fields[key]
        labels = sorted(SCHEDULE_TYPES, key=len, reverse=True)  # "SGM Uniform" before "Uniform"
        label = next((t for t in labels if name.endswith(" " + t) and name not in SAMPLERS_BY_NAME), None)
        if label:  # older files put the schedule in the sampler's name
            name, fields[schedule_key] = name[: -len(label) - 1], label
        if name in SAMPLERS_BY_NAME:
            result[name_key] = SAMPLERS_BY_NAME[name]
        else:
            result[f"unknown_{name_key}"] = name
    web_ui = made_by_web_ui(fields)
    sampler = result.get("sampler")
    # a schedule type the web UI records for a timestep sampler is a setting it did not use (sd15 gives UniPC Karras sigmas)
    applied = sampler not in TIMESTEP_SAMPLERS or not web_ui
    label = _schedule_label(fields, "Schedule type")
    result["karras"] = label == "Karras" and applied
    if label in SCHEDULE_TYPES_BY_NAME and label != "Karras" and applied:
        result["schedule_type"] = SCHEDULE_TYPES_BY_NAME[label]
    if web_ui and sampler is not None and sampler not in TIMESTEP_SAMPLERS and label in (None, "Uniform", "Automatic"):
        # the web UI's own noise levels for a k-diffusion sampler: k-diffusion's get_sigmas, sd15's "normal" (for
        # DPM++ 2M and the other multistep solvers not diffusers' grid, which ends at t = 50 for 20 steps, not 0)
        result["schedule_type"] = "normal"
    hires_label = _schedule_label(fields, "Hires schedule type")
    hires_sampler = result.get("hires_sampler", sampler)
    if hires_label is not None and (hires_sampler not in TIMESTEP_SAMPLERS or not web_ui):
        names = {"Uniform": "default", "Automatic": "default", **SCHEDULE_TYPES_BY_NAME}
        if hires_label in names:
            result["hires_schedule_type"] = names[hires_label]
    for key, name in (("Hires prompt", "hires_prompt"), ("Hires negative prompt", "hires_negative_prompt")):
        if key in fields:
            result[name] = fields[key]
    # DDIM's eta: the web UI's `Eta DDIM`; `Eta` is its ancestral samplers' (sd15 and older files wrote DDIM's as Eta)
    if sampler == "ddim" and ("Eta DDIM" in fields or (not web_ui and "Eta" in fields)):
        result["eta"] = float(fields.get("Eta DDIM", fields.get("Eta")))
    result["pad_conds"] = fields.get("Pad conds") == "True"
    result["seamless"] = fields.get("Tiling") == "True"
    # the web UI's noise: "GPU" (its default, not written) and "NV" are CUDA's generator, sd15's "nv"
    result["rng"] = "nv" if fields.get("RNG", "GPU" if web_ui else "CPU") in ("GPU", "NV") else "cpu"
    # the web UI always runs DPM2 and DPM2 a so, and any sampler so with its option on, which it then records
    result["discard_penultimate_sigma"] = fields.get("Discard penultimate sigma") == "True" or (
        web_ui and sampler in ("dpm_2", "dpm_2_a"))  # fmt: skip
    if "Variation seed strength" in fields and "Variation seed" in fields:
        result["variation_seed"] = int(fields["Variation seed"])
        result["variation_strength"] = float(fields["Variation seed strength"])
    resize = re.fullmatch(r"(\d+)x(\d+)", fields.get("Seed resize from", ""))
    if resize and all(int(v) > 0 for v in resize.groups()):
        result["seed_resize_from"] = (int(resize[1]), int(resize[2]))
    if "ENSD" in fields or "Eta noise seed delta" in fields:  # the web UI's key, and its setting's name
        result["eta_noise_seed_delta"] = int(fields.get("ENSD", fields.get("Eta noise seed delta")))
    for key, name, kind in (("CFG scale", "guidance_scale", float), ("Seed", "seed", int),
                            ("Denoising strength", "strength", float),
                            ("Clip skip", "clip_skip", int), ("Hires upscale", "hires_scale", float),
                            ("Hires steps", "hires_steps", int), ("Hires CFG Scale", "hires_guidance_scale", float),
                            ("Mask blur", "mask_blur", float),
                            ("Masked area padding", "inpaint_padding", int)):  # fmt: skip
        if key in fields:
            result[name] = kind(fields[key])
    if "Hires upscaler" in fields:  # names sd15 lacks (e.g. "R-ESRGAN 4x+") are kept as they are
        upscalers = {v: k for k, v in HIRES_UPSCALER_NAMES.items()}
        result["hires_upscaler"] = upscalers.get(fields["Hires upscaler"], fields["Hires upscaler"])
    for key, name in (("TI hashes", "ti_hashes"), ("Lora hashes", "lora_hashes")):
        if key in fields:
            result[name] = _parse_hash_list(fields[key])
    controlnets = sorted((int(k.split()[1]), v) for k, v in fields.items() if re.fullmatch(r"ControlNet \d+", k))
    if controlnets:
        result["controlnets"] = [_parse_controlnet(v) for _, v in controlnets]
    if "Size" in fields:
        result["width"], result["height"] = (int(v) for v in fields["Size"].split("x"))
    if "Hires resize" in fields:  # the web UI's hires fix to a size, "WxH" (one side 0: by the other's scale)
        size = tuple(int(v) for v in fields["Hires resize"].split("x"))
        if len(size) != 2 or min(size) < 0:
            raise ValueError(f"Hires resize must be WIDTHxHEIGHT, got {fields['Hires resize']!r}")
        result["hires_resize"] = size
    if "First pass size" in fields and "width" in result:  # the web UI's hires fix before 1.0: Size is the final one
        first = tuple(int(v) for v in fields["First pass size"].split("x"))
        if len(first) != 2 or min(first) < 0:
            raise ValueError(f"First pass size must be WIDTHxHEIGHT, got {fields['First pass size']!r}")
        result["hires_resize"] = (result["width"], result["height"])
        result["width"], result["height"] = first if min(first) else _old_first_pass_size(result["width"], result["height"])
    return result


def _old_first_pass_size(width: int, height: int) -> tuple[int, int]:
    """The first pass the web UI's hires fix chose before 1.0 for "First pass size: 0x0": about 512² pixels, each
    side rounded up to a multiple of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write `image` with a `parameters` text chunk, atomically (a temporary file renamed into place). The data
    reaches the disk before the rename, so that after a machine crash the file is whole or absent, not short."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_parameters(path: str | os.PathLike) -> str:
    with Image.open(path) as image:
        text = image.info.get("parameters") or getattr(image, "text", {}).get("parameters")
    if text is None:
        raise ValueError(f"{path} has no `parameters` text chunk")
    return text


def short_hash(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """First 10 hex digits of the file's SHA-256 (the "Model hash" other tools display), cached by path,
    size and modification time in ~/.cache/sd15/hashes.json so a 4 GB file is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    cache_file = Path(cache_dir or Path.home() / ".cache" / "sd15") / "hashes.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()[:10]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs rehashing next time
    return cache[key]


def content_hash(path: str | os.PathLike) -> str:
    """short_hash of a file; of a folder (a diffusers model or VAE), the first 10 hex digits of a SHA-256 over
    its files' relative paths and short hashes, so that changing any file changes it."""
    path = Path(path)
    if not path.is_dir():
        return short_hash(path)
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}:{short_hash(file)}\n".encode())
    return digest.hexdigest()[:10]


def vae_record(vae_path: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """(VAE hash, VAE) as the PNG records a VAE used instead of the checkpoint's, or (None, None)."""
    return (content_hash(vae_path), Path(vae_path).name) if vae_path else (None, None)
