"""What a checkpoint holds (`sd15 inspect`) and how two checkpoints differ (`sd15 diff`).

`inspect` reads only the file's header (key names, shapes, dtypes), plus the whole file once for its short
hash (cached). `diff` reads both checkpoints tensor by tensor, in the original layout whatever their form
(single file or diffusers folder), so a converted model can be compared with its source.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import torch

from . import keymap
from .checkpoint import (
    CLIP_PREFIX,
    CLIP_PREFIX_OLD,
    EMA_PREFIX,
    SCHEDULE_BUFFERS,
    UNET_PREFIX,
    VAE_PREFIX,
    identify,
    printable,
)
from .streaming import DiffusersFolder, MappedSafetensors, ShardedSafetensors, open_source, torch_dtype

GROUPS = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", CLIP_PREFIX_OLD), ("ema", EMA_PREFIX))


def group_of(key: str) -> str:
    """The part of an original-layout checkpoint a key belongs to."""
    for name, prefix in GROUPS:
        if key.startswith(prefix):
            return name
    return "schedule" if key in SCHEDULE_BUFFERS else "other"


def _alone(keys: set[str]) -> tuple[str, str] | None:
    """Single components written without their prefix (as `sd15 convert --component` does)."""
    if "input_blocks.0.0.weight" in keys and "out.2.weight" in keys:
        return "unet", "a UNet alone (original layout, keys without model.diffusion_model.)"
    if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
        return "unet", "a UNet alone (diffusers layout)"
    if {"text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"} & keys:
        return "text_encoder", "a CLIP text encoder alone"
    return None


def lone_component(info, keys) -> str | None:
    """The component a file holds alone ("unet", "vae", "text_encoder"), keys without its prefix as `sd15 convert
    --component` writes them (or a VAE file, prefixed or not), given `identify`'s info; None for any other file."""
    if info.kind == "vae":
        return "vae"
    alone = _alone(set(keys)) if info.kind == "unknown" else None
    return alone[0] if alone else None


def inspect(path: str | os.PathLike, with_hash: bool = True) -> dict:
    """A description of a checkpoint file or diffusers folder, as plain data (what `--json` prints)."""
    from .pnginfo import short_hash

    path = Path(path)
    view = open_source(path)
    info = identify(view)
    keys = list(view.keys())
    kind, description = info.kind, info.description
    alone = _alone(set(keys)) if kind == "unknown" else None
    if alone:
        kind, description = f"{alone[0]}-only", alone[1]
    if isinstance(view, DiffusersFolder):
        form = "diffusers folder"
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        if isinstance(view, ShardedSafetensors):
            form = f"safetensors in {len(view.shards)} shard{'s' * (len(view.shards) != 1)}"
        else:
            form = "safetensors" if isinstance(view, MappedSafetensors) else "pickle (read with weights_only=True)"
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    whole = alone[0] if alone else kind if kind in ("vae", "lora", "embedding", "controlnet") else None
    synthesized = getattr(view, "synthesized", set())  # a diffusers folder's rebuilt schedule buffers and position_ids
    groups: dict[str, dict] = {}
    for key in keys:
        if key in synthesized:
            continue
        g = groups.setdefault(whole or group_of(key), {"tensors": 0, "parameters": 0, "bytes": 0, "dtypes": Counter()})
        dtype = torch_dtype(view.dtype_name(key))
        numel = math.prod(view.shape(key))
        g["tensors"] += 1
        g["parameters"] += numel
        g["bytes"] += numel * dtype.itemsize
        g["dtypes"][str(dtype).removeprefix("torch.")] += 1
    for g in groups.values():
        g["dtypes"] = dict(g["dtypes"])
    extras = [] if whole else [k for k in keys if group_of(k) in ("schedule", "other") and k not in synthesized]
    result = {
        "path": str(path),
        "format": form,
        "kind": kind,
        "description": description,
        "size_bytes": size,
        "short_hash": short_hash(path) if with_hash and path.is_file() else None,
        "tensors": len(keys) - len(synthesized),
        "parameters": sum(g["parameters"] for g in groups.values()),
        "components": info.components or [n for n in groups if n in ("unet", "vae", "text_encoder")],
        "groups": groups,
        "has_ema": info.has_ema,
        "extra_tensors": extras,
        "metadata": dict(getattr(view, "metadata", {}) or {}),
    }
    if kind == "sd1" or kind == "sd1-inpainting":
        result["clip_keys"] = "text_model." if info.clip_prefix == CLIP_PREFIX else "older form (no text_model.)"
    if kind == "lora":
        ranks = Counter(view.shape(k)[0] for k in keys if k.endswith("lora_down.weight"))
        result["lora"] = {"modules": sum(ranks.values()), "ranks": dict(ranks)}
    return result


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def format_inspection(r: dict) -> str:
    lines = [
        f"{r['path']}",
        f"  what:        {r['description']} [{r['kind']}]",
        f"  format:      {r['format']}, {_size(r['size_bytes'])}" + (f", hash {r['short_hash']}" if r["short_hash"] else ""),
        f"  tensors:     {r['tensors']} ({r['parameters'] / 1e6:.1f} M parameters)",
    ]
    if r["components"]:
        lines.append(f"  components:  {', '.join(r['components'])}")
    lines.append("  parts:")
    for name, g in r["groups"].items():
        dtypes = ", ".join(f"{d} ×{n}" for d, n in g["dtypes"].items())
        lines.append(f"    {name:<13} {g['tensors']:>5} tensors {g['parameters'] / 1e6:>9.2f} M params {_size(g['bytes']):>11}  {dtypes}")
    if "clip_keys" in r:
        lines.append(f"  CLIP keys:   {r['clip_keys']}")
    lines.append(f"  EMA:         {'yes (model_ema.*; use --ema to load or extract it)' if r['has_ema'] else 'no'}")
    if r["extra_tensors"]:
        shown = ", ".join(map(printable, r["extra_tensors"][:6])) + (" …" if len(r["extra_tensors"]) > 6 else "")
        lines.append(f"  extras:      {len(r['extra_tensors'])} ({shown})")
    if "lora" in r:
        lines.append(f"  LoRA:        {r['lora']['modules']} modules, ranks {r['lora']['ranks']}")
    if r["metadata"]:
        shown = ", ".join(f"{printable(k)}={printable(str(v)[:40])}" for k, v in list(r["metadata"].items())[:6])
        lines.append(f"  metadata:    {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# diff


def _canonical(key: str) -> str:
    """Older text-encoder keys (`cond_stage_model.transformer.embeddings…`) named as the newer ones."""
    if key.startswith(CLIP_PREFIX_OLD) and not key.startswith(CLIP_PREFIX):
        return CLIP_PREFIX + key[len(CLIP_PREFIX_OLD):]
    return key


def _differences(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> tuple[float, float, float]:
    """max |a - b|, sum (a - b)², sum a², in float64, a few million elements at a time (bounded memory)."""
    a, b = a.reshape(-1), b.reshape(-1)
    max_abs = sq = ref = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i : i + chunk].double(), b[i : i + chunk].double()
        d = (x - y).abs()
        max_abs = max(max_abs, d.max().item())
        sq += d.square().sum().item()
        ref += x.square().sum().item()
    return max_abs, sq, ref


def _same_vae_attention(key: str, shape_a: tuple, shape_b: tuple) -> bool:
    """A VAE attention weight stored as [C, C] on one side and [C, C, 1, 1] on the other: the same numbers."""
    return keymap.is_vae_attention_weight(key) and {shape_a, shape_b} == {shape_a[:2], shape_a[:2] + (1, 1)}


def diff(a: str | os.PathLike, b: str | os.PathLike, top: int = 10, progress: bool = False) -> dict:
    """Per-part and worst per-tensor differences between two checkpoints, read tensor by tensor.

    For each part (unet, vae, text_encoder, ema, schedule, other): tensors compared, how many are identical,
    the largest absolute difference, and the relative difference ||A - B|| / ||A|| over the whole part;
    keys found in only one file and shape mismatches are listed, not compared. The tensors a diffusers folder
    does not hold but rebuilds when read (schedule buffers, position_ids) are not compared, on either side.
    """
    from tqdm import tqdm

    va, vb = open_source(a), open_source(b)
    rebuilt = {_canonical(k) for v in (va, vb) for k in getattr(v, "synthesized", ())}
    ka = {_canonical(k): k for k in va.keys() if _canonical(k) not in rebuilt}
    kb = {_canonical(k): k for k in vb.keys() if _canonical(k) not in rebuilt}
    parts: dict[str, dict] = {}
    per_tensor = []

    def part(key):
        return parts.setdefault(group_of(key), {"compared": 0, "identical": 0, "max_abs": 0.0, "_sq": 0.0,
                                                "_ref": 0.0, "only_in_a": 0, "only_in_b": 0, "shape_mismatch": 0,
                                                "dtype_mismatch": 0})  # fmt: skip

    for key in ka.keys() - kb.keys():
        part(key)["only_in_a"] += 1
    for key in kb.keys() - ka.keys():
        part(key)["only_in_b"] += 1
    common = [k for k in ka if k in kb]
    for key in tqdm(common, desc="diff", disable=not progress, leave=False):
        p = part(key)
        shape_a, shape_b = tuple(va.shape(ka[key])), tuple(vb.shape(kb[key]))
        if shape_a != shape_b and not _same_vae_attention(key, shape_a, shape_b):
            p["shape_mismatch"] += 1
            per_tensor.append({"key": key, "shape_a": list(shape_a), "shape_b": list(shape_b)})
            continue
        ta, tb = va.get(ka[key]), vb.get(kb[key])
        tb = tb.reshape(ta.shape)  # a VAE attention weight as [C, C] in one and [C, C, 1, 1] in the other
        p["dtype_mismatch"] += ta.dtype != tb.dtype
        max_abs, sq, ref = _differences(ta, tb)
        p["compared"] += 1
        p["identical"] += bool(ta.dtype == tb.dtype and torch.equal(ta, tb))
        p["max_abs"] = max(p["max_abs"], max_abs)
        p["_sq"] += sq
        p["_ref"] += ref
        per_tensor.append({"key": key, "max_abs": max_abs, "relative": math.sqrt(sq / ref) if ref else math.sqrt(sq)})
        del ta, tb
    for p in parts.values():
        sq, ref = p.pop("_sq"), p.pop("_ref")
        p["relative"] = math.sqrt(sq / ref) if ref else math.sqrt(sq)
    differing = [t for t in per_tensor if t.get("max_abs", 1) > 0]  # shape mismatches first, then the largest
    worst = sorted(differing, key=lambda t: (-t.get("max_abs", float("inf")), t["key"]))
    return {"a": str(a), "b": str(b), "parts": parts, "worst": worst[:top], "not_compared": sorted(rebuilt),
            "identical": all(p["compared"] == p["identical"] and not (p["only_in_a"] or p["only_in_b"] or p["shape_mismatch"])
                             for p in parts.values())}  # fmt: skip


def format_diff(r: dict) -> str:
    lines = [f"A: {r['a']}", f"B: {r['b']}", f"{'part':<13} {'compared':>8} {'identical':>9} {'max |A-B|':>11} {'||A-B||/||A||':>14}  notes"]
    for name, p in r["parts"].items():
        notes = [f"{p[k]} {k.replace('_', ' ')}" for k in ("only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch") if p[k]]
        lines.append(f"{name:<13} {p['compared']:>8} {p['identical']:>9} {p['max_abs']:>11.3g} {p['relative']:>14.3g}  {', '.join(notes)}")
    if r["worst"]:
        lines.append("largest differences:")
        for t in r["worst"]:
            if "max_abs" in t:
                lines.append(f"  {t['max_abs']:>11.3g} {t['relative']:>10.3g}  {printable(t['key'])}")
            else:
                lines.append(f"  shape {t['shape_a']} vs {t['shape_b']}  {printable(t['key'])}")
    if r["not_compared"]:
        shown = ", ".join(r["not_compared"][:3]) + (" …" if len(r["not_compared"]) > 3 else "")
        lines.append(f"not compared: {len(r['not_compared'])} tensors a diffusers folder rebuilds rather than holds ({shown})")
    lines.append("the checkpoints are identical" if r["identical"] else "the checkpoints differ")
    return "\n".join(lines)
