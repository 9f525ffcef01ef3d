"""Checkpoint tools on the command line: `sd15 convert`, `merge`, `inspect`, `diff` (registered by add_commands).

    sd15 convert v1-5.safetensors sd15-diffusers/             # original single file -> diffusers folder
    sd15 convert sd15-diffusers/ v1-5.safetensors             # diffusers folder -> original single file
    sd15 convert model.ckpt model.safetensors --dtype fp16    # pickle -> safetensors, in half precision
    sd15 convert train.ckpt model.safetensors --ema --prune   # the EMA UNet, without training extras
    sd15 convert model.safetensors fixed.safetensors --vae vae-ft-mse-840000-ema-pruned.safetensors
    sd15 convert model.safetensors vae.safetensors --component vae
    sd15 merge a.safetensors b.safetensors -o ab.safetensors --alpha 0.3          # 0.7·A + 0.3·B
    sd15 merge inpaint.safetensors custom.safetensors base.safetensors -o out.safetensors --alpha 1
    sd15 inspect model.safetensors [--json]
    sd15 diff model.safetensors sd15-diffusers/ [--json]

Every output is written under a temporary name, re-read and checked, then renamed into place; an existing
output is replaced only with --force. docs/checkpoints.md describes the layouts and the rules.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import _finite_float, _positive_int  # the same argument checks as the other commands


def _common(p: argparse.ArgumentParser, writes: bool = True) -> None:
    if writes:
        p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                       help="cast floating-point tensors (default: keep each tensor's dtype)")  # fmt: skip
        p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_commands(sub) -> None:
    """Add the checkpoint tools' subcommands to the `sd15` parser."""
    c = sub.add_parser("convert", help="convert a checkpoint (layout, format, dtype, EMA, pruning, VAE, component)",
                       description="Convert a checkpoint. An OUTPUT ending in .safetensors is a single file in the "
                       "original layout; any other OUTPUT is a diffusers folder.")  # fmt: skip
    c.add_argument("input", help=".safetensors, .ckpt, or a diffusers folder")
    c.add_argument("output", help="NAME.safetensors (original layout) or a folder name (diffusers layout)")
    c.add_argument("--ema", action="store_true", help="use the EMA weights (model_ema.*) as the UNet")
    c.add_argument("--prune", action="store_true", help="keep only the UNet, VAE and text encoder")
    c.add_argument("--vae", default=None, metavar="FILE", help="replace the VAE with this VAE file or folder")
    c.add_argument("--component", choices=("unet", "vae", "text_encoder"), default=None,
                   help="write only this component (keys without its prefix, or a diffusers component folder); "
                   "also converts an input that holds this component alone (a VAE file, a component folder)")  # fmt: skip
    _common(c)

    m = sub.add_parser("merge", help="weighted merge of two models, or add-difference merge of three",
                       description="Two models: (1 - alpha)·A + alpha·B. Three: A + alpha·(B - C).")  # fmt: skip
    m.add_argument("models", nargs="+", metavar="MODEL", help="A B (weighted sum) or A B C (add difference)")
    m.add_argument("-o", "--output", required=True, help="NAME.safetensors or a folder name (diffusers layout)")
    m.add_argument("--alpha", type=_finite_float, default=0.5, help="weight of B (default 0.5)")
    _common(m)

    i = sub.add_parser("inspect", help="what a checkpoint holds")
    i.add_argument("file", help="a checkpoint file or diffusers folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--no-hash", action="store_true", help="skip the short hash (it reads the whole file once)")
    i.add_argument("--debug", action="store_true", help="show tracebacks")

    d = sub.add_parser("diff", help="per-component and per-tensor differences between two checkpoints")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.add_argument("--top", type=_positive_int, default=10, help="how many of the most different tensors to list")
    _common(d, writes=False)


def _dtype(name):
    from .streaming import DTYPES

    return DTYPES[name] if name else None


def _print_report(report, verb: str) -> None:
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{verb} {report.output}: {report.tensors} tensors, {report.bytes / 2**30:.2f} GiB, "
          f"re-read and verified, {report.seconds:.1f} s")  # fmt: skip


def run_convert(args) -> None:
    from .convert import convert

    report = convert(args.input, args.output, dtype=_dtype(args.dtype), ema=args.ema, prune=args.prune, vae=args.vae,
                     component=args.component, force=args.force, progress=not args.no_progress)  # fmt: skip
    _print_report(report, "wrote")


def run_merge(args) -> None:
    from .convert import merge

    report = merge(args.models, args.output, alpha=args.alpha, dtype=_dtype(args.dtype), force=args.force,
                   progress=not args.no_progress)  # fmt: skip
    _print_report(report, "wrote")


def run_inspect(args) -> None:
    from .inspect_checkpoint import format_inspection, inspect

    result = inspect(args.file, with_hash=not args.no_hash)
    print(json.dumps(result, indent=2) if args.json else format_inspection(result))


def run_diff(args) -> None:
    from .inspect_checkpoint import diff, format_diff

    result = diff(args.a, args.b, top=args.top, progress=not args.no_progress)
    print(json.dumps(result, indent=2) if args.json else format_diff(result))


COMMANDS = {"convert": run_convert, "merge": run_merge, "inspect": run_inspect, "diff": run_diff}
