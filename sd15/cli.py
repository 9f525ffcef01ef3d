"""The `sd15` command line: generate, img2img, download (and the checkpoint tools in sd15.tools_cli).

    sd15 generate "a photo of an astronaut riding a horse on mars" -o astronaut.png
    sd15 generate --from-png astronaut.png -o again.png          # rerun from a PNG's parameters
    sd15 img2img sketch.png "a watercolour of a lighthouse" --strength 0.6 -o lighthouse.png
    sd15 generate "a (red:1.2) fox <lora:ink:0.8>" --clip-skip 2 --embedding easynegative.safetensors   # docs/prompting.md
    sd15 inpaint photo.png mask.png "a red door" --mask-blur 4 -o door.png    # white in the mask = repaint
    sd15 generate "a castle" --hires-scale 2 --preview live.png                # 1024×1024 via 512×512
    sd15 generate "a house" --controlnet control_v11p_sd15_canny.pth:0.8 --control-image edges.png   # docs/controlnet.md

A user error (a bad argument, a missing or unusable checkpoint) exits with status 2 and one line on stderr
saying what was wrong, and writes nothing; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from .hires import UPSCALERS as HIRES_UPSCALERS
from .pnginfo import TIMESTEP_SAMPLERS, made_by_web_ui
from .samplers import SAMPLERS, SCHEDULES
from .schedule import BETA_SCHEDULE_AB

DEFAULT_MODEL_NAMES = ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-5-pruned.safetensors")
HUB_REPO, HUB_FILE = "stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def find_model(explicit: str | None) -> Path:
    """The checkpoint to use: --model, then $SD15_MODEL, then weights/ in the current folder."""
    for source, value in (("--model", explicit), ("SD15_MODEL", os.environ.get("SD15_MODEL"))):
        if value:
            path = Path(value)
            if not path.exists():
                raise UserError(f"the model given by {source} does not exist: {path}")
            return path
    weights = Path("weights")
    for name in DEFAULT_MODEL_NAMES:
        if (weights / name).is_file():
            return weights / name
    found = sorted(p for p in weights.glob("*") if p.suffix in (".safetensors", ".ckpt"))
    if found:
        return found[0]
    raise UserError(
        "no checkpoint found: pass --model FILE, set SD15_MODEL, or put v1-5-pruned-emaonly.safetensors in "
        "weights/ (`sd15 download` fetches it; weights/README.md says where else to get it)"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 pixels, got {value}")
    return value


def _pixel_size(text: str) -> tuple[int, int]:
    """WxH -> (W, H), each a whole number of pixels from 8 to 16384."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or not all(8 <= int(v) <= 16384 for v in match.groups()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, each from 8 to 16384, got {text!r}")
    return int(match[1]), int(match[2])


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_sampling_arguments(p: argparse.ArgumentParser, steps_default: int = 50) -> None:
    p.add_argument("--negative", default=None, help='negative prompt (default: "", as SD1.5 was trained)')
    p.add_argument("--steps", type=_positive_int, default=None, help=f"sampling steps (default {steps_default})")
    p.add_argument("--cfg", type=_finite_float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default pndm, i.e. PLMS)")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (sigma-space samplers); --schedule-type karras")
    p.add_argument("--schedule-type", choices=SCHEDULES, default=None,
                   help="noise levels for the sigma-space samplers: the sampler's own (default), or one of the web UI's "
                   "schedule types (docs/samplers.md)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i")
    p.add_argument("-n", "--num-images", type=_positive_int, default=1)
    p.add_argument("--variation-seed", type=int, default=None, metavar="N",
                   help="steer the noise toward this seed's (image i: N + i, all images the same --seed; random if "
                        "only --variation-strength is given)")
    p.add_argument("--variation-strength", type=_finite_float, default=None, metavar="S",
                   help="how far toward the variation seed's noise: 0 (the seed's) to 1 (the variation seed's)")
    p.add_argument("--seed-resize-from", type=_pixel_size, default=None, metavar="WxH",
                   help="centre the seed's noise as it is for a WxH image, to keep much of that image's layout")
    p.add_argument("--seamless", action="store_true", default=None,
                   help="an image that tiles: circular padding in the UNet and the VAE (the web UI's Tiling)")
    p.add_argument("--rng", choices=("cpu", "nv"), default=None,
                   help="where noise comes from: torch's CPU generator (default), or nv: CUDA's, computed on the CPU, "
                        "what a seed gives on an NVIDIA GPU (the web UI's default, 'GPU', and its 'NV')")
    p.add_argument("--discard-penultimate-sigma", action="store_true", default=None,
                   help="the grid of steps + 1 steps without its next-to-last noise level, as the web UI runs DPM2 "
                        "(sigma-space samplers)")
    p.add_argument("--ensd", "--eta-noise-seed-delta", dest="ensd", type=int, default=None, metavar="N",
                   help="draw an ancestral or SDE sampler's noise from seed + N (the web UI's ENSD, e.g. 31337)")
    p.add_argument("--model", default=None, help="checkpoint file (default: $SD15_MODEL, then weights/)")
    p.add_argument("--vae", default=None, metavar="FILE",
                   help="a VAE to use instead of the checkpoint's (e.g. vae-ft-mse-840000-ema-pruned.safetensors, or a diffusers vae/ folder)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if present)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp16 on CUDA, else fp32")
    p.add_argument("-o", "--output", default=None, help="output PNG (several images: NAME-0.png, NAME-1.png, …)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--safety-checker", metavar="PATH", default=None,
                   help="safety checker weights, a folder or file (default: $SD15_SAFETY_CHECKER, then weights/safety_checker/)")
    p.add_argument("--no-safety-checker", action="store_true", help="do not check the images (the run says so)")
    p.add_argument("--preview", metavar="FILE", default=None, help="write a preview PNG of the image in progress to FILE")
    p.add_argument("--preview-every", type=_positive_int, default=5, metavar="N", help="preview every N steps (default 5)")
    p.add_argument("--taesd", metavar="PATH", default=None,
                   help="TAESD decoder for full-resolution previews (default: weights/taesd_decoder.safetensors if present)")
    p.add_argument("--deterministic", action="store_true", help="reproducible CUDA kernels (slower; docs/reliability.md)")
    p.add_argument("--reference-path", action="store_true",
                   help="run the plain reference modules (default on CUDA in fp16/bf16: the fast path, docs/performance.md)")
    p.add_argument("--clip-skip", type=_positive_int, default=None, help="2: condition on CLIP's penultimate layer (default 1)")
    p.add_argument("--pad-conds", action="store_true", default=None,
                   help="pad the shorter of prompt and negative prompt (in 77-token chunks) to the other's length with the "
                        "empty prompt, the web UI's 'Pad prompt/negative prompt' option (default: each keeps its own)")
    p.add_argument("--lora", action="append", type=_lora_spec, default=[], metavar="FILE[:SCALE]", help="apply a LoRA file (repeatable; scale 1 by default)")
    p.add_argument("--lora-dir", default=None, help="folder where <lora:name:scale> in a prompt is found (default weights/lora)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE", help="textual-inversion file (repeatable)")
    p.add_argument("--embeddings-dir", default=None, help="load every embedding in this folder (default weights/embeddings)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _preprocess_spec(text: str) -> dict:
    """--control-preprocess none | canny | canny:LOW:HIGH -> the record of what is done to the control image, as the
    PNG keeps it: {"module": "none"} or {"module": "canny", "threshold_a": LOW, "threshold_b": HIGH}."""
    from .control_preprocess import CANNY_HIGH, CANNY_LOW

    name, *values = text.split(":")
    if name == "none" and not values:
        return {"module": "none"}
    if name == "canny" and len(values) in (0, 2):
        try:
            low, high = (float(v) for v in values) if values else (CANNY_LOW, CANNY_HIGH)
        except ValueError:
            low = high = -1.0
        if all(math.isfinite(t) and t >= 0 for t in (low, high)):
            return {"module": "canny", "threshold_a": low, "threshold_b": high}
    raise argparse.ArgumentTypeError(f"expected none, canny or canny:LOW:HIGH (thresholds >= 0; canny alone is "
                                     f"{CANNY_LOW}:{CANNY_HIGH}), got {text!r}")  # fmt: skip


def _add_controlnet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlnet", action="append", type=_controlnet_spec, default=[], metavar="FILE[:SCALE]",
                   help="a ControlNet 1.x file for SD1.5 (repeatable, each with its --control-image; scale 1 by default)")
    p.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="the control image (an edge map, depth map, pose…) of each --controlnet, in order")
    p.add_argument("--control-start", type=_finite_float, default=None, metavar="F",
                   help="fraction of the steps after which the ControlNets start (default 0)")
    p.add_argument("--control-end", type=_finite_float, default=None, metavar="F",
                   help="fraction of the steps after which the ControlNets stop (default 1)")
    p.add_argument("--guess-mode", action="store_true", help="ControlNets on the conditional half only (diffusers' guess mode)")
    p.add_argument("--control-preprocess", action="append", type=_preprocess_spec, default=[], metavar="none|canny[:LOW:HIGH]",
                   help="make each --control-image from a photo first: canny is ControlNet's Canny annotator (100:200 by "
                        "default), none takes the image as it is; one per --control-image, in order, or none at all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd15", description="Stable Diffusion v1.5, from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("-W", "--width", type=_size, default=None, help="width in pixels, a multiple of 8 (default 512)")
    g.add_argument("-H", "--height", type=_size, default=None, help="height in pixels, a multiple of 8 (default 512)")
    g.add_argument("--from-png", default=None, help="take every setting from this PNG's parameters; flags override")
    g.add_argument("--attention-maps", metavar="DIR", default=None, help="write a cross-attention overlay per prompt token")
    g.add_argument("--save-steps", metavar="DIR", default=None, help="write the predicted image at each step (grid + GIF)")
    g.add_argument("--hires-scale", type=_finite_float, default=None, metavar="X",
                   help="high-resolution fix: generate at --width×--height, upscale by X (1-4), refine by img2img")
    g.add_argument("--hires-strength", type=_finite_float, default=None, help="the refining pass's strength (default 0.5)")
    g.add_argument("--hires-steps", type=_positive_int, default=None, help="steps the refining pass runs, as the web UI (default: --steps)")
    g.add_argument("--hires-upscaler", choices=HIRES_UPSCALERS, default=None, help="how to upscale (default lanczos)")
    g.add_argument("--hires-sampler", choices=SAMPLERS, default=None, help="the refining pass's sampler (default: --sampler)")
    g.add_argument("--hires-schedule-type", choices=SCHEDULES, default=None,
                   help="the refining pass's schedule type (default: the first pass's, where its sampler takes one)")
    g.add_argument("--hires-prompt", default=None, help="the refining pass's prompt (default: the prompt)")
    g.add_argument("--hires-negative", default=None, help="the refining pass's negative prompt (default: --negative)")
    g.add_argument("--hires-cfg", type=_finite_float, default=None, help="the refining pass's guidance scale (default: --cfg)")
    _add_controlnet_arguments(g)
    _add_sampling_arguments(g)

    i = sub.add_parser("img2img", help="image to image")
    i.add_argument("image")
    i.add_argument("prompt")
    i.add_argument("--strength", type=_finite_float, default=0.75, help="how much to change, in (0, 1] (default 0.75)")
    i.add_argument("--fit", choices=("resize", "crop"), default="resize", help="for sides not a multiple of 8")
    _add_controlnet_arguments(i)
    _add_sampling_arguments(i)

    n = sub.add_parser("inpaint", help="repaint the white part of a mask (inpainting or regular checkpoints)")
    n.add_argument("image")
    n.add_argument("mask", help="black and white, the image's size: white = repaint, black = keep")
    n.add_argument("prompt")
    n.add_argument("--strength", type=_finite_float, default=1.0, help="in (0, 1]; below 1 keeps some of the masked content")
    n.add_argument("--mask-blur", type=_finite_float, default=4.0, metavar="PX", help="feather the paste-back edge, as the web UI's Mask blur (default 4; 0 = hard)")
    n.add_argument("--padding", type=int, default=None, metavar="PX",
                   help="inpaint only around the mask: its box grown by PX, at --width×--height (default 512×512)")
    n.add_argument("--width", type=_size, default=None, help="working width of --padding mode")
    n.add_argument("--height", type=_size, default=None, help="working height of --padding mode")
    n.add_argument("--no-paste-back", action="store_true", help="return the model's pixels everywhere, not the original's outside the mask")
    n.add_argument("--fit", choices=("resize", "crop"), default="resize", help="for sides not a multiple of 8")
    _add_controlnet_arguments(n)
    _add_sampling_arguments(n)

    b = sub.add_parser("batch", help="many prompts from a JSON-lines file; resumable; torchrun for many GPUs")
    b.add_argument("prompts", help="a .jsonl file: one prompt string or settings object per line")
    b.add_argument("--out", required=True, help="output folder (images named by content, manifest.json)")
    b.add_argument("-W", "--width", type=_size, default=512)
    b.add_argument("-H", "--height", type=_size, default=512)
    _add_sampling_arguments(b)

    d = sub.add_parser("download", help=f"fetch {HUB_FILE} into weights/ (needs huggingface_hub and the network)")
    d.add_argument("--dir", default="weights")
    d.add_argument("--debug", action="store_true")

    from . import tools_cli

    tools_cli.add_commands(sub)
    return parser


def _load_model(args):
    import torch

    import sd15

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    path = find_model(args.model)
    if getattr(args, "deterministic", False):
        from . import determinism

        determinism.enable()
    if args.vae and not Path(args.vae).exists():
        raise UserError(f"no such VAE file: {args.vae}")
    m = sd15.load(path, device=args.device, dtype=dtypes.get(args.dtype), fast=False if getattr(args, "reference_path", False) else None,
                  vae=args.vae)  # fmt: skip
    _load_adapters(m, args)
    _load_safety_checker(m, args)
    return m, path


def _lora_spec(text: str, default: float | None = 1.0) -> tuple[Path, float | None]:
    """--lora FILE or FILE:SCALE (a trailing `:number` is the scale, so `C:\\x.safetensors` stays a path)."""
    path, sep, scale = text.rpartition(":")
    try:
        path, value = (Path(path), float(scale)) if sep and path else (Path(text), default)
    except ValueError:
        if Path(path).is_file() and not Path(text).exists():  # FILE:typo
            raise argparse.ArgumentTypeError(f"the scale after {path}: must be a number, got {scale!r}") from None
        return Path(text), default
    if value is not None and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the scale must be a finite number (usually 0 to 1), got {scale}")
    return path, value


def _controlnet_spec(text: str) -> tuple[Path, float | None]:
    """--controlnet FILE or FILE:SCALE; no scale is None (then the --from-png PNG's, else 1)."""
    return _lora_spec(text, default=None)


def _load_adapters(m, args) -> None:
    """Textual inversions (--embedding, --embeddings-dir or weights/embeddings/) and LoRAs (--lora, and
    --lora-dir for the <lora:name:scale> tags of prompts) onto a loaded model."""
    import warnings

    folder = Path(args.embeddings_dir or Path("weights") / "embeddings")
    if args.embeddings_dir and not folder.is_dir():
        raise UserError(f"--embeddings-dir is not a folder: {folder}")
    if folder.is_dir():
        for line in m.load_embeddings_folder(folder):
            print(f"warning: {line}", file=sys.stderr)
    for path in args.embedding:
        if not Path(path).is_file():
            raise UserError(f"no such embedding file: {path}")
        m.load_embedding(path)
    if args.lora_dir:
        if not Path(args.lora_dir).is_dir():
            raise UserError(f"--lora-dir is not a folder: {args.lora_dir}")
        m.lora_dirs = [Path(args.lora_dir)]
    for path, scale in args.lora:  # parsed by _lora_spec
        if not path.is_file():
            raise UserError(f"no such LoRA file: {path}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.load_lora(path, scale)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)


def _control_inputs(args, recorded: list[dict] = ()) -> tuple[list, dict, list[dict]]:
    """The --control-image files, read and preprocessed, the ControlNets' settings, and what was done to each image
    (for the PNG): the flags, else what a --from-png PNG `recorded` for as many ControlNets, else the defaults.
    All checked before any model loads."""
    from .checkpoint import printable
    from .controlnet import control_rgb

    if len(args.controlnet) != len(args.control_image):
        raise UserError(f"give one --control-image per --controlnet: {len(args.controlnet)} ControlNets, "
                        f"{len(args.control_image)} control images")  # fmt: skip
    if not args.controlnet:
        flags = [f for f, v in (("--control-start", args.control_start), ("--control-end", args.control_end),
                                ("--guess-mode", args.guess_mode), ("--control-preprocess", args.control_preprocess or None))
                 if v not in (None, False)]  # fmt: skip
        if flags:
            raise UserError(f"{' and '.join(flags)} apply to ControlNets: give --controlnet FILE --control-image IMG, or leave them out")
        return [], {}, []
    if args.control_preprocess and len(args.control_preprocess) != len(args.control_image):
        raise UserError(f"give one --control-preprocess per --control-image (none for one taken as it is): "
                        f"{len(args.control_image)} control images, {len(args.control_preprocess)} --control-preprocess")  # fmt: skip
    for path, _ in args.controlnet:
        if not path.is_file():
            raise UserError(f"no such ControlNet file: {printable(path)}")
    if recorded and len(recorded) != len(args.controlnet):
        print(f"warning: {printable(args.from_png)} records {len(recorded)} ControlNets, {len(args.controlnet)} given: "
              "their weights, starts and ends are not taken from it", file=sys.stderr)  # fmt: skip
    recorded = list(recorded) if len(recorded) == len(args.controlnet) else [{}] * len(args.controlnet)
    scales = [scale if scale is not None else r.get("weight", 1.0) for (_, scale), r in zip(args.controlnet, recorded)]
    starts = [args.control_start if args.control_start is not None else r.get("guidance_start", 0.0) for r in recorded]
    ends = [args.control_end if args.control_end is not None else r.get("guidance_end", 1.0) for r in recorded]
    for scale, start, end in zip(scales, starts, ends):
        if not math.isfinite(scale):  # only a PNG's can be NaN: the flag's is checked by _lora_spec
            raise UserError(f"the ControlNet weight must be a finite number, got {scale}; give it as --controlnet FILE:SCALE")
        if not 0 <= start < end <= 1:
            raise UserError(f"--control-start and --control-end must satisfy 0 <= start < end <= 1, got {start:g} and {end:g}")
    preprocessing = args.control_preprocess or [_recorded_preprocessing(r, i, args) for i, r in enumerate(recorded)]
    images = [_preprocessed(control_rgb(_open_image(path, "control image")), step)  # refuses mode F now
              for path, step in zip(args.control_image, preprocessing)]  # fmt: skip
    settings = dict(controlnet_conditioning_scale=scales, control_guidance_start=starts, control_guidance_end=ends,
                    guess_mode=args.guess_mode or any(r.get("guess_mode", False) for r in recorded))  # fmt: skip
    return images, settings, preprocessing


def _recorded_preprocessing(record: dict, i: int, args) -> dict:
    """What a --from-png PNG says was done to ControlNet i's control image, if sd15 can do it again; else none."""
    from .checkpoint import printable

    module = record.get("module", "none")
    if module in ("none", "canny"):
        return {k: v for k, v in record.items() if k in ("module", "threshold_a", "threshold_b")} or {"module": "none"}
    print(f"warning: {printable(args.from_png)} says ControlNet {i}'s control image was made by the preprocessor "
          f"{printable(module)}, which sd15 does not have: the control image is used as it is", file=sys.stderr)  # fmt: skip
    return {"module": "none"}


def _preprocessed(image, step: dict):
    """A control image after its --control-preprocess step (sd15.control_preprocess)."""
    if step["module"] != "canny":
        return image
    from .control_preprocess import CANNY_HIGH, CANNY_LOW, canny

    return canny(image, step.get("threshold_a", CANNY_LOW), step.get("threshold_b", CANNY_HIGH))


def _model_device_and_dtype(args):
    """Where --device and --dtype will put the model (for what loads before it: the ControlNets)."""
    import torch

    from .model import default_device_and_dtype

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return default_device_and_dtype(args.device, dtypes.get(args.dtype))


def _load_controlnets(args) -> list:
    """The --controlnet files, loaded where the model will be (checked before the model itself loads)."""
    from .controlnet import load_controlnet

    return [load_controlnet(path, *_model_device_and_dtype(args)) for path, _ in args.controlnet]


def _controlnet_kwargs(nets: list, images: list, settings: dict) -> dict:
    """The ControlNet arguments of generate / img2img / inpaint (none when no --controlnet is given)."""
    return dict(controlnet=nets, control_image=images, **settings) if nets else {}


def _load_safety_checker(m, args) -> None:
    """On when its weights are found (--safety-checker, $SD15_SAFETY_CHECKER, weights/safety_checker/); its
    absence and --no-safety-checker are both reported on stderr."""
    from .safety_checker import find_safety_checker, load_safety_checker

    if getattr(args, "no_safety_checker", False):
        print("note: the safety checker is off (--no-safety-checker)", file=sys.stderr)
        return
    path = find_safety_checker(getattr(args, "safety_checker", None))
    if path is None:
        print("note: no safety checker weights found (weights/safety_checker/ or --safety-checker PATH); "
              "images are not checked", file=sys.stderr)  # fmt: skip
        return
    m.safety_checker = load_safety_checker(path, device=m.device, dtype=m.dtype)


def _preview_callback(m, args):
    """--preview FILE: a step callback writing the image in progress every --preview-every steps (TAESD when
    --taesd or weights/taesd_decoder.safetensors gives its weights, else the linear latent approximation)."""
    if not getattr(args, "preview", None):
        return None
    from .preview import Previewer, load_taesd_decoder

    if Path(args.preview).suffix.lower() != ".png":
        raise UserError(f"--preview must name a .png file, got {args.preview}")
    taesd_path = args.taesd or ("weights/taesd_decoder.safetensors" if Path("weights/taesd_decoder.safetensors").is_file() else None)
    if args.taesd and not Path(args.taesd).exists():
        raise UserError(f"no TAESD decoder at {args.taesd}")
    taesd = load_taesd_decoder(taesd_path, device=m.device, dtype=m.dtype) if taesd_path else None
    kind = f"TAESD ({taesd_path})" if taesd else "the linear latent approximation"
    print(f"previews: {args.preview} every {args.preview_every} steps, by {kind}", file=sys.stderr)
    return Previewer(args.preview, args.preview_every, taesd=taesd)


def _output_paths(args, seed: int, inputs: tuple = ()) -> list[Path]:
    """The PNGs this run will write (-o NAME, or NAME-0.png, NAME-1.png, …), checked before anything runs
    together with --preview: none may replace one of the run's `inputs` or be a folder, and each must
    lie below a folder (so that an hour of sampling does not end in a write error)."""
    base = Path(args.output) if args.output else Path("outputs") / f"{seed}.png"
    if base.suffix.lower() != ".png":
        raise UserError(f"the output must be a .png file, got {base}")
    paths = [base] if args.num_images == 1 else [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(args.num_images)]
    preview = [Path(args.preview)] if getattr(args, "preview", None) else []
    sources = [Path(p) for p in inputs if p] + [path for path, _ in getattr(args, "controlnet", [])]
    for path, what in [*((p, "output") for p in paths), *((p, "--preview file") for p in preview)]:
        if any(_same_file(path, source) for source in sources):
            raise UserError(f"the {what} {path} is also an input of this run; choose another name (sd15 never replaces its inputs)")
        if path.is_dir():
            raise UserError(f"the {what} {path} is a folder; give a .png file name")
        folder = next(a for a in (path.absolute().parent, *path.absolute().parents) if a.exists())
        if not folder.is_dir():
            raise UserError(f"cannot write the {what} {path}: {folder} is a file, not a folder")
    if preview and preview[0].absolute() in [p.absolute() for p in paths]:
        raise UserError(f"--preview {preview[0]} is also an output of this run; give the preview its own name")
    return paths


def _same_file(a: Path, b: Path) -> bool:
    if a.absolute() == b.absolute() or a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _settings_from_png(path: str) -> dict:
    from .pnginfo import parse_parameters, read_parameters

    try:
        return parse_parameters(read_parameters(path))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read generation parameters from {path}: {e}") from None


def _save(m, model_path: Path, images, paths: list[Path], preprocessing: list[dict] = ()) -> None:
    """Write the images with their parameters; `preprocessing`: what --control-preprocess did to each control
    image, added to the PNG's ControlNet records (the pipeline saw only the images it made)."""
    from .pnginfo import format_parameters, save_png, short_hash, vae_record

    model_hash = short_hash(model_path) if model_path.is_file() else None
    vae = vae_record(m.vae_path)
    for image, path in zip(images, paths):
        settings = image.info["sd15"]
        if preprocessing and len(preprocessing) == len(settings.controlnets):
            settings.controlnets = [{**record, **step} for record, step in zip(settings.controlnets, preprocessing)]
        save_png(image, path, format_parameters(image.info["sd15"], model_hash, model_path.stem, *vae))
        print(f"wrote {path}")
        if image.info.get("nsfw"):
            print(f"warning: {path} was flagged by the safety checker and replaced by a black image", file=sys.stderr)


def run_generate(args) -> None:
    import secrets

    settings = _settings_from_png(args.from_png) if args.from_png else {}
    hires_record = "hires_scale" in settings or "hires_resize" in settings
    made_from_an_image = not hires_record and any(k in settings for k in ("strength", "mask_blur"))
    if made_from_an_image:  # a hires fix's strength belongs to its second pass; any other came with an input image
        from .checkpoint import printable

        print(f"warning: {printable(args.from_png)} was made from an input image (img2img or inpainting), which a PNG "
              "does not hold: making a text-to-image from its prompt and settings, without its denoising strength",
              file=sys.stderr)  # fmt: skip
    prompt = args.prompt if args.prompt is not None else settings.get("prompt")
    if prompt is None:
        raise UserError("give a prompt (or --from-png FILE)")
    control_images, control, preprocessing = _control_inputs(args, settings.get("controlnets", []))
    if settings.get("controlnets") and not args.controlnet:
        from .checkpoint import printable

        names = ", ".join(printable(c["model"]) for c in settings["controlnets"])
        print(f"warning: {printable(args.from_png)} was made with ControlNet ({names}), whose control image a PNG does "
              "not hold: generating without it (give --controlnet FILE --control-image IMG to use one)", file=sys.stderr)  # fmt: skip
    if "unknown_sampler" in settings and args.sampler is None:
        from .checkpoint import printable

        raise UserError(f"the PNG's sampler {printable(settings['unknown_sampler'])} is not one sd15 has; "
                        "choose one with --sampler")  # fmt: skip
    _warn_about_unmatched_records(args, settings)
    # without -W/-H (or a PNG's size) the output takes the first control image's size, rounded down to a multiple of 8
    control_w, control_h = (max(8, control_images[0].width // 8 * 8), max(8, control_images[0].height // 8 * 8)) if control_images else (512, 512)

    def pick(flag, key, default):
        return flag if flag is not None else settings.get(key, default)

    # a schedule on the command line replaces the PNG's, whichever way either is named
    schedule = ((bool(args.karras), args.schedule_type) if args.karras or args.schedule_type
                else (settings.get("karras", False), settings.get("schedule_type")))  # fmt: skip

    kwargs = dict(
        negative_prompt=pick(args.negative, "negative_prompt", ""),
        steps=pick(args.steps, "steps", 50),
        guidance_scale=pick(args.cfg, "guidance_scale", 7.5),
        sampler=pick(args.sampler, "sampler", "pndm"),
        seed=pick(args.seed, "seed", None),
        width=pick(args.width, "width", control_w),
        height=pick(args.height, "height", control_h),
        karras=schedule[0],
        schedule_type=schedule[1],
        eta=settings.get("eta", 0.0),
        clip_skip=pick(args.clip_skip, "clip_skip", 1),
        pad_conds=pick(args.pad_conds, "pad_conds", False),
        seamless=pick(args.seamless, "seamless", False),
        discard_penultimate_sigma=pick(args.discard_penultimate_sigma, "discard_penultimate_sigma", False),
        rng=pick(args.rng, "rng", "cpu"),
        **_noise_kwargs(args, settings),
    )
    if kwargs["seed"] is None:
        kwargs["seed"] = secrets.randbelow(2**32)
    from .samplers import takes_schedule_types

    if not takes_schedule_types(kwargs["sampler"]):  # --sampler ddim over a PNG's Euler: its noise levels do not apply
        if not (args.karras or args.schedule_type):
            kwargs["karras"], kwargs["schedule_type"] = False, None
        if args.discard_penultimate_sigma is None:
            kwargs["discard_penultimate_sigma"] = False
    hires = _hires_settings(args, settings, kwargs["width"], kwargs["height"])
    from .hires import check_hires_settings, second_pass_settings
    from .pipeline import check_prompts, check_settings
    from .samplers import plan_sampling

    check_settings(kwargs["steps"], kwargs["guidance_scale"], kwargs["sampler"], kwargs["width"], kwargs["height"],
                   args.num_images, seed=kwargs["seed"], eta=kwargs["eta"])  # fmt: skip
    _check_noise_kwargs(kwargs, args.num_images)
    plan_sampling(kwargs["sampler"], kwargs["steps"], karras=kwargs["karras"], schedule_type=kwargs["schedule_type"],
                  discard_penultimate_sigma=kwargs["discard_penultimate_sigma"])  # --karras with ddim
    check_prompts(prompt, kwargs["negative_prompt"])
    if hires:
        second = second_pass_settings(kwargs["sampler"], kwargs["guidance_scale"], kwargs["karras"], kwargs["schedule_type"],
                                      kwargs["eta"], hires["hires_sampler"], hires["hires_schedule_type"],
                                      hires["hires_guidance_scale"], kwargs["discard_penultimate_sigma"])  # fmt: skip
        check_prompts(*(t for t in (hires["hires_prompt"], hires["hires_negative_prompt"]) if t is not None))
        check_hires_settings(kwargs["width"], kwargs["height"], hires["scale"], hires["strength"], kwargs["steps"],
                             hires["hires_steps"], hires["upscaler"], second["sampler"], second["guidance_scale"],
                             args.num_images, karras=second["karras"], schedule_type=second["schedule_type"],
                             discard_penultimate_sigma=second["discard_penultimate_sigma"])  # fmt: skip
    paths = _output_paths(args, kwargs["seed"], inputs=(args.from_png, *args.control_image))
    nets = _load_controlnets(args)
    m, model_path = _load_model(args)
    if args.from_png:
        _warn_about_other_adapters(m, args.from_png, settings, prompt, kwargs["negative_prompt"])
    with _inspection(m, args) as trace:
        preview = _preview_callback(m, args)
        run = m.hires_fix if hires else m.generate  # sd15.hires: native size first, then upscaled and refined
        images = run(prompt, num_images=args.num_images, progress=not args.no_progress, callback=preview, **(hires or {}),
                     **kwargs, **_controlnet_kwargs(nets, control_images, control))  # fmt: skip
    _save(m, model_path, images, paths, preprocessing)
    if trace is not None:
        _write_inspection(m, args, trace, images, prompt)


def _scale_for_resize(size: tuple[int, int], width: int, height: int) -> float:
    """The hires scale that makes width × height the PNG's "Hires resize" W × H (0: keep the aspect); a size of
    another aspect (the web UI crops to it) is refused, as sd15's hires fix only scales."""
    from .hires import upscaled_size

    target_w, target_h = size
    scale = target_w / width if target_w else target_h / height
    side = 0 if target_w else 1
    if upscaled_size(width, height, scale)[side] < size[side]:  # int(width · scale) one short in floating point
        scale = math.nextafter(scale, math.inf)
    expected = upscaled_size(width, height, scale)
    if any(want and want != got for want, got in zip(size, expected)):
        raise UserError(f"the PNG's hires fix resizes {width}x{height} to {target_w}x{target_h}, another aspect ratio "
                        "(the web UI crops to it); sd15 scales both sides alike: give --hires-scale")  # fmt: skip
    return scale


# web UI settings that change an image and that sd15 lacks, so that --from-png says so rather than differ silently
UNAPPLIED_FIELDS = ("Face restoration", "Refiner",
                    "Hires checkpoint", "Token merging ratio", "Token merging ratio hr", "NGMS", "Hypernet",
                    "Pad conds v0", "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise",
                    "Schedule rho", "Schedule max sigma", "Schedule min sigma", "Downcast alphas_cumprod",
                    "SGM noise multiplier", "Old prompt editing timelines", "Image CFG scale", "Conditional mask weight")  # fmt: skip


def _float_or_none(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _unapplied_fields(settings: dict) -> list[str]:
    """The names of the fields of a --from-png PNG that change its image and that this run does not apply."""
    fields = settings.get("fields", {})
    names = [name for name in UNAPPLIED_FIELDS if name in fields]
    if fields.get("Emphasis", "Original") != "Original":  # "No norm", "Ignore", …: sd15 has the web UI's default
        names.append("Emphasis")
    if "unknown_hires_sampler" in settings:  # a second-pass sampler sd15 lacks: the first pass's runs
        names.append("Hires sampler")
    hires_sampler = settings.get("hires_sampler", settings.get("sampler"))
    if "Hires schedule type" in fields and "hires_schedule_type" not in settings and not (
        hires_sampler in TIMESTEP_SAMPLERS and made_by_web_ui(fields)  # recorded by the web UI, not used by it
    ):
        names.append("Hires schedule type")
    if settings.get("schedule_type") == "beta":  # sd15's Beta schedule has the web UI's default distribution only
        names += [f"Beta schedule {k}" for k, v in zip(("alpha", "beta"), BETA_SCHEDULE_AB)
                  if _float_or_none(fields.get(f"Beta schedule {k}", v)) != v]  # fmt: skip
    try:  # the web UI's eta of the ancestral and SDE samplers, 1 unless set; sd15's are fixed at 1
        ancestral_eta = "Eta" in fields and "eta" not in settings and float(fields["Eta"]) != 1.0
    except ValueError:
        ancestral_eta = True
    if ancestral_eta:
        names.append("Eta")
    if "Eta DDIM" in fields and "eta" not in settings and settings.get("sampler") not in TIMESTEP_SAMPLERS:
        names.append("Eta DDIM")  # read as DDIM's eta; on a k-diffusion sampler it stands for nothing sd15 has
    return names


def _warn_about_unmatched_records(args, settings: dict) -> None:
    """Warn about what a --from-png PNG records that this run will not do alike: settings sd15 lacks, a schedule
    type other than Karras, the web UI's GPU noise, and a VAE other than this run's (its `VAE` and `VAE hash` fields)."""
    from .checkpoint import printable
    from .pnginfo import content_hash

    fields = settings.get("fields", {})
    png = printable(args.from_png)
    unapplied = _unapplied_fields(settings)
    if unapplied:
        print(f"warning: {png} records settings sd15 does not apply ({', '.join(unapplied)}): the image will differ "
              "from the one it was made with", file=sys.stderr)  # fmt: skip
    schedule_type = fields.get("Schedule type")
    recorded_only = settings.get("sampler") in TIMESTEP_SAMPLERS and made_by_web_ui(fields)
    given = args.karras or args.schedule_type
    applied = settings.get("karras") or settings.get("schedule_type")  # what parse_parameters read it as
    if schedule_type not in (None, "Uniform", "Automatic") and not applied and not given and not recorded_only:
        print(f"warning: {png} was sampled with the {printable(schedule_type)} schedule of noise levels, which sd15 "
              "lacks (it has the sampler's own and the others of --schedule-type): using the sampler's own, so the image will differ",
              file=sys.stderr)  # fmt: skip
    name, digest = fields.get("VAE"), fields.get("VAE hash")
    if not (name or digest):
        return
    recorded = " ".join(printable(v) for v in (name, digest and f"[{digest}]") if v)
    if args.vae is None:
        print(f"warning: {png} was decoded with the VAE {recorded}; this run uses the checkpoint's own (give --vae FILE "
              "to use that one)", file=sys.stderr)  # fmt: skip
    elif digest and Path(args.vae).exists():
        given = content_hash(args.vae)
        if given != digest:
            print(f"warning: {png} was decoded with the VAE {recorded}; --vae {printable(args.vae)} is another file "
                  f"(hash {given})", file=sys.stderr)  # fmt: skip


def _warn_about_other_adapters(m, png: str, settings: dict, prompt: str, negative_prompt: str) -> None:
    """Warn when a LoRA or an embedding that a --from-png PNG records with its hash (`Lora hashes`, `TI hashes`)
    is another file here, or an embedding is missing (its trigger word is then read as words)."""
    from .checkpoint import printable
    from .pnginfo import hash_list_name
    from .prompts import adapter_hashes

    try:
        here = adapter_hashes(m, prompt, negative_prompt)
    except (ValueError, OSError):
        return  # a LoRA the prompt names is not found: the run itself refuses it, saying why
    for key, kind in (("lora_hashes", "LoRA"), ("ti_hashes", "embedding")):
        ours = {hash_list_name(name): digest for name, digest in here[key].items()}
        for name, digest in settings.get(key, {}).items():
            if ours.get(name, digest) != digest:
                print(f"warning: {printable(png)} was made with the {kind} {printable(name)} [{digest}]; the one found "
                      f"here is another file [{ours[name]}], so the image will differ", file=sys.stderr)  # fmt: skip
            elif name not in ours and key == "ti_hashes":
                print(f"warning: {printable(png)} was made with the embedding {printable(name)} [{digest}], which this "
                      "run does not have (give --embedding FILE): its trigger word is read as words", file=sys.stderr)  # fmt: skip


def _hires_settings(args, settings: dict, width: int, height: int) -> dict | None:
    """The hires-fix arguments of sd15.hires_fix from the flags, else from the PNG (--from-png), or None. A web UI
    PNG may give the second pass's size instead of a scale ("Hires resize: WxH", one side 0 to keep the aspect)."""
    scale = args.hires_scale if args.hires_scale is not None else settings.get("hires_scale")
    if scale is None and settings.get("hires_resize"):
        scale = _scale_for_resize(settings["hires_resize"], width, height)
    if not scale:
        return None
    from_png = args.hires_scale is None
    # a web UI PNG names no upscaler when it used its default, "Latent"
    upscaler = args.hires_upscaler or settings.get("hires_upscaler", "latent" if from_png else "lanczos")
    if upscaler not in HIRES_UPSCALERS:
        raise UserError(f"the PNG's hires upscaler {upscaler!r} is not one sd15 has ({', '.join(HIRES_UPSCALERS)}); "
                        "choose one with --hires-upscaler")  # fmt: skip
    strength = args.hires_strength if args.hires_strength is not None else settings.get("strength", 0.5)
    second = {key: getattr(args, flag) if getattr(args, flag) is not None else settings.get(key)
              for key, flag in (("hires_sampler", "hires_sampler"), ("hires_schedule_type", "hires_schedule_type"),
                                ("hires_prompt", "hires_prompt"), ("hires_negative_prompt", "hires_negative"),
                                ("hires_guidance_scale", "hires_cfg"))}  # fmt: skip
    return dict(scale=scale, strength=strength, hires_steps=args.hires_steps or settings.get("hires_steps"), upscaler=upscaler,
                **second)  # fmt: skip


def _inspection(m, args):
    """A trace that records what --attention-maps and --save-steps need (or a no-op context)."""
    import contextlib

    from . import hooks, visualize

    capture = ([visualize.CROSS_ATTENTION] if args.attention_maps else []) + (["step.denoised"] if args.save_steps else [])
    if not capture:
        return contextlib.nullcontext()
    return hooks.trace(m, capture=capture, reduce=visualize.HEATMAP_REDUCE)


def _write_inspection(m, args, trace, images, prompt: str) -> None:
    from . import visualize

    for i, image in enumerate(images):
        sub = (lambda d: Path(d) / f"image-{i}") if len(images) > 1 else Path
        if args.attention_maps:
            f = m.vae.downscale_factor
            latent_hw = (image.height // f, image.width // f)
            heat = visualize.token_heatmaps(trace, latent_hw, (image.height, image.width), image=i)
            labels = visualize.prompt_token_labels(m, prompt, steps=args.steps)
            written = visualize.save_attention_maps(sub(args.attention_maps), image, heat, labels)
            print(f"wrote {len(written)} attention maps to {sub(args.attention_maps)}")
        if args.save_steps:
            sheet, anim = visualize.save_trajectory(visualize.decode_trajectory(m, trace, image=i), sub(args.save_steps))
            print(f"wrote {sheet} and {anim}")


def _open_image(path: str, what: str, max_pixels: int | None = None):
    """sd15.images.open_image, its refusal a UserError."""
    from .images import open_image

    try:
        return open_image(path, what, max_pixels=max_pixels)
    except ValueError as e:
        raise UserError(str(e)) from None


PADDING_MAX_PIXELS = 8192 * 8192  # a camera photo inpainted "only masked": the model sees only a crop of it


def run_inpaint(args) -> None:
    import secrets

    if not 0 < args.strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    if args.mask_blur < 0:
        raise UserError(f"--mask-blur must be >= 0 pixels, got {args.mask_blur}")
    if args.padding is not None and args.padding < 0:
        raise UserError(f"--padding must be >= 0 pixels, got {args.padding}")
    if args.padding is None and (args.width or args.height):
        raise UserError("--width and --height set the working size of --padding mode; without it the image keeps its size")
    limit = PADDING_MAX_PIXELS if args.padding is not None else None  # padding mode runs the model on a crop
    image, mask = _open_image(args.image, "image", limit), _open_image(args.mask, "mask", limit)
    if image.size != mask.size:
        raise UserError(f"the mask {args.mask} is {mask.width}×{mask.height} pixels but the image is "
                        f"{image.width}×{image.height}; they must be the same size")  # fmt: skip
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    _check_image_run(args, image, seed)
    control_images, control, preprocessing = _control_inputs(args)
    paths = _output_paths(args, seed, inputs=(args.image, args.mask, *args.control_image))
    nets = _load_controlnets(args)
    m, model_path = _load_model(args)
    if m.unet.config.in_channels == 4:
        print("note: a regular checkpoint inpaints by blending; an inpainting checkpoint (9-channel UNet) does better",
              file=sys.stderr)  # fmt: skip
    images = m.inpaint(
        image,
        mask,
        args.prompt,
        strength=args.strength,
        seed=seed,
        fit=args.fit,
        **_image_sampling_kwargs(args),
        mask_blur=args.mask_blur,
        padding=args.padding,
        paste_back=not args.no_paste_back,
        width=args.width,
        height=args.height,
        callback=_preview_callback(m, args),
        **_controlnet_kwargs(nets, control_images, control),
    )
    _save(m, model_path, images, paths, preprocessing)


def _noise_kwargs(args, settings: dict | None = None) -> dict:
    """The seed-steering arguments (sd15.seeds) from the command line, else from a --from-png PNG's `settings`."""
    settings = settings or {}

    def pick(flag, key, default):
        return flag if flag is not None else settings.get(key, default)

    return dict(
        variation_seed=pick(args.variation_seed, "variation_seed", None),
        variation_strength=pick(args.variation_strength, "variation_strength", 0.0),
        seed_resize_from=pick(args.seed_resize_from, "seed_resize_from", None),
        eta_noise_seed_delta=pick(args.ensd, "eta_noise_seed_delta", 0),
    )


def _check_noise_kwargs(kwargs: dict, num_images: int) -> None:
    from .seeds import check_noise_settings

    try:
        check_noise_settings(kwargs["seed"], num_images, kwargs["variation_seed"], kwargs["variation_strength"],
                             kwargs["seed_resize_from"], kwargs["eta_noise_seed_delta"])  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_image_run(args, image, seed: int) -> None:
    """img2img's and inpaint's settings, refused before the model loads (the library checks them again)."""
    from .pipeline import check_prompts, check_settings
    from .samplers import plan_sampling

    kw = _image_sampling_kwargs(args)
    width, height = (args.width or 512, args.height or 512) if getattr(args, "padding", None) is not None else (
        max(8, image.width // 8 * 8), max(8, image.height // 8 * 8))  # fmt: skip
    check_settings(kw["steps"], kw["guidance_scale"], kw["sampler"], width, height, args.num_images, seed=seed)
    _check_noise_kwargs({**kw, "seed": seed}, args.num_images)
    check_prompts(args.prompt, kw["negative_prompt"])
    plan_sampling(kw["sampler"], kw["steps"], strength=args.strength, karras=kw["karras"], schedule_type=kw["schedule_type"],
                  discard_penultimate_sigma=kw["discard_penultimate_sigma"])  # fmt: skip


def _image_sampling_kwargs(args) -> dict:
    """The sampling settings img2img and inpaint take from the command line, with the library's defaults."""
    return dict(
        negative_prompt=args.negative or "",
        steps=args.steps or 50,
        guidance_scale=args.cfg if args.cfg is not None else 7.5,
        sampler=args.sampler or "pndm",
        num_images=args.num_images,
        karras=bool(args.karras),
        schedule_type=args.schedule_type,
        progress=not args.no_progress,
        clip_skip=args.clip_skip or 1,
        pad_conds=bool(args.pad_conds),
        seamless=bool(args.seamless),
        discard_penultimate_sigma=bool(args.discard_penultimate_sigma),
        rng=args.rng or "cpu",
        **_noise_kwargs(args),
    )


def run_img2img(args) -> None:
    import secrets

    if not 0 < args.strength <= 1:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")
    image = _open_image(args.image, "image")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    _check_image_run(args, image, seed)
    control_images, control, preprocessing = _control_inputs(args)
    paths = _output_paths(args, seed, inputs=(args.image, *args.control_image))
    nets = _load_controlnets(args)
    m, model_path = _load_model(args)
    images = m.img2img(
        image,
        args.prompt,
        strength=args.strength,
        seed=seed,
        fit=args.fit,
        **_image_sampling_kwargs(args),
        callback=_preview_callback(m, args),
        **_controlnet_kwargs(nets, control_images, control),
    )
    _save(m, model_path, images, paths, preprocessing)


def run_download(args) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(
            "`sd15 download` needs huggingface_hub: pip install 'sd15[download]' (or fetch "
            f"{HUB_FILE} from the {HUB_REPO} repository on the Hugging Face Hub by hand into weights/)"
        ) from None
    try:
        path = hf_hub_download(HUB_REPO, HUB_FILE, local_dir=args.dir)
    except Exception as e:  # network errors come in many types
        raise UserError(f"download failed ({type(e).__name__}: {e}); check the network, or fetch it by hand") from None
    print(f"wrote {path}")


def run_batch(args) -> None:
    from .batch import _distributed, load_controlnets, read_jobs, run_batch as make_images
    from .pnginfo import short_hash

    if args.output or args.num_images != 1:
        raise UserError("batch takes --out DIR; set num_images per line in the prompts file")
    ignored = [flag for flag, value in (("--clip-skip", args.clip_skip), ("--pad-conds", args.pad_conds), ("--preview", args.preview),
                                        ("--variation-seed", args.variation_seed), ("--variation-strength", args.variation_strength),
                                        ("--seed-resize-from", args.seed_resize_from), ("--ensd", args.ensd),
                                        ("--seamless", args.seamless), ("--discard-penultimate-sigma", args.discard_penultimate_sigma),
                                        ("--rng", args.rng))
               if value is not None and value is not False]  # fmt: skip
    if ignored:
        raise UserError(f"batch does not take {' or '.join(ignored)}; run such images with sd15 generate")
    defaults = dict(negative_prompt=args.negative or "", steps=args.steps or 50, sampler=args.sampler or "pndm",
                    guidance_scale=args.cfg if args.cfg is not None else 7.5, seed=args.seed,
                    width=args.width, height=args.height, karras=bool(args.karras), schedule_type=args.schedule_type)  # fmt: skip
    if not Path(args.prompts).is_file():
        raise UserError(f"no such prompts file: {args.prompts}")
    out = Path(args.out)
    folder = next(a for a in (out.absolute(), *out.absolute().parents) if a.exists())
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):  # found now, not after the model has loaded
        raise UserError(f"--out {out}: {folder} is not writable; choose another --out")
    if (out / "manifest.json").is_dir():
        raise UserError(f"--out {out}: its manifest.json is a folder; move it away or choose another --out")
    model_path = find_model(args.model)
    jobs = read_jobs(args.prompts, defaults, short_hash(model_path))  # refuses a bad line before loading anything
    rank, world, local_rank = _distributed()
    if args.device is None and world > 1:
        import torch

        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    nets = load_controlnets(jobs, *_model_device_and_dtype(args))  # each distinct file once, checked before the model
    m, _ = _load_model(args)
    made = make_images(m, model_path, short_hash(model_path), jobs, Path(args.out), progress=not args.no_progress,
                       controlnets=nets)  # fmt: skip
    print(f"rank {rank}/{world}: made {len(made)} images; {len(jobs)} jobs in {args.out}/manifest.json")


COMMANDS = {"generate": run_generate, "img2img": run_img2img, "inpaint": run_inpaint, "batch": run_batch, "download": run_download}


def main(argv: list[str] | None = None) -> int:
    from . import tools_cli
    from .checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    run = COMMANDS.get(args.command) or tools_cli.COMMANDS[args.command]
    try:
        run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:  # the reader stopped early (`sd15 inspect … | head`): not an error
        try:  # stdout on /dev/null, so that Python's flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        return 0
    except (UserError, CheckpointError, ValueError, OSError) as e:  # OSError: a file that cannot be read or written
        if getattr(args, "debug", False):
            raise
        print(f"sd15 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
