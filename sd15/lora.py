"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in kohya-ss files.

A LoRA adds a low-rank update to some Linear and Conv2d layers of the UNet and the text encoder:

    W' = W + scale · (alpha / rank) · up · down        down (r, in[, kh, kw]), up (out, r[, 1, 1])
    y' = y + scale · (alpha / rank) · up(down(x))      (the same, applied to the layer's output)

`scale` is the user's weight (`<lora:name:0.8>`), `alpha` a number stored in the file (missing: alpha = rank).

File format (kohya-ss sd-scripts, read by the AUTOMATIC1111 web UI and diffusers): one entry per adapted
layer, named after the layer's diffusers module path with every dot written as `_`, under `lora_unet_` or
`lora_te_` (transformers' CLIP path, `text_model.…`); each has `.lora_down.weight`, `.lora_up.weight` and,
in most files, `.alpha`:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, 320)
      -> diffusers down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
      -> sd15 (original) input_blocks.1.1.transformer_blocks.0.attn1.to_q
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight                      (768, r)
      -> sd15 text_encoder.encoder.layers.0.self_attn.q_proj

Since dots and underscores cannot be told apart in those names, the names are not parsed: every Linear and
Conv2d of the model is given its kohya name (its original path -> diffusers path by the index rules of
`sd15.keymap`, dots -> `_`), and a file's entries are looked up by name. Entries that name no layer are
reported (`AppliedLoRA.unmatched`, and a warning); entries whose shapes do not fit their layer are an error.
Conv layers (LoCon: ResBlock convs, down/upsamplers, 3×3 kernels) are adapted like linear ones.

Two ways to apply, for any number of LoRAs at once:
- merged (default): the layer's weight becomes W', computed in float32. The original weight is kept, so
  removing the LoRA restores it bit for bit; with several LoRAs on a layer, W' is recomputed from it.
- on the fly (`merge=False`): a forward hook adds scale · up(down(x)) to the layer's output; the weights
  are never touched. Slower per step, instant to add and remove.
"""

from __future__ import annotations

import math
import os
import re
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import keymap
from .checkpoint import CheckpointError, open_checkpoint
from .embeddings import file_hash
from .prompts import LoraTag, lora_tags

if TYPE_CHECKING:
    from .model import StableDiffusion

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
DEFAULT_LORA_DIR = Path("weights") / "lora"
_KOHYA_KEY = re.compile(r"(lora_(?:unet|te\d?)_\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)")  # te1/te2: SDXL


@dataclass
class LoRALayer:
    """One adapted layer: down (r, in) or (r, in, kh, kw), up (out, r) or (out, r, 1, 1), alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def multiplier(self) -> float:
        """alpha / rank; 1 when the file has no alpha (or alpha 0, which kohya's trainer reads as the rank)."""
        return self.alpha / self.rank if self.alpha else 1.0

    def delta(self, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        """(alpha / rank) · up · down in float32, in the layer weight's shape, computed on `device`."""
        up, down = self.up.to(device, torch.float32).flatten(1), self.down.to(device, torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.multiplier  # (out, r) @ (r, in·kh·kw)


@dataclass
class LoRA:
    """A LoRA file's layers by kohya name; nothing is applied until `apply_lora`."""

    name: str  # the name prompts use: <lora:name:0.8>
    layers: dict[str, LoRALayer]
    path: Path | None = None
    hash: str | None = None  # 12 hex digits, as the web UI's "Lora hashes" shows it
    unsupported: list[str] = field(default_factory=list)  # file keys that are no kohya LoRA entry
    metadata: dict = field(default_factory=dict)


def lora_file_hash(path: str | os.PathLike) -> str:
    """The web UI's LoRA hash: SHA-256 of a .safetensors file's tensor data (its header skipped, the
    "addnet" hash), or of the whole file for other formats; first 12 hex digits."""
    path = Path(path)
    skip = 0
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            skip = 8 + struct.unpack("<Q", f.read(8))[0]
    return file_hash(path, skip)[:12]


def read_lora(path: str | os.PathLike, name: str | None = None) -> LoRA:
    """Read a kohya-style LoRA file (.safetensors, or a pickle read with weights_only=True)."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    parts: dict[str, dict[str, str]] = {}
    unsupported = []
    for key in ckpt.keys():
        if m := _KOHYA_KEY.fullmatch(key):
            parts.setdefault(m[1], {})[m[2]] = key
        else:
            unsupported.append(key)
    layers = {}
    for layer_name, found in parts.items():
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            unsupported += found.values()  # an entry without both matrices cannot be applied
            continue
        alpha = _alpha(path, found["alpha"], ckpt.get(found["alpha"])) if "alpha" in found else None
        down, up = ckpt.get(found["lora_down.weight"]), ckpt.get(found["lora_up.weight"])
        for key, tensor in ((found["lora_down.weight"], down), (found["lora_up.weight"], up)):
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path}: {key} is not finite floating-point numbers ({tensor.dtype}); the file is damaged")
        layers[layer_name] = LoRALayer(down, up, alpha)
    if not layers:
        kind = " (LyCORIS LoHa/LoKr layers, which sd15 does not apply)" if any(re.search(r"hada_|lokr_", k) for k in unsupported) else ""
        raise CheckpointError(f"{path} holds no kohya-style LoRA layers (lora_unet_…/lora_te_… .lora_down/.lora_up){kind}")
    return LoRA(name or path.stem, layers, path, lora_file_hash(path), sorted(unsupported), dict(ckpt.metadata))


def _alpha(path: Path, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise CheckpointError(f"{path}: {key} must hold one number, it has shape {tuple(tensor.shape)}")
    alpha = float(tensor.item())
    if not math.isfinite(alpha):
        raise CheckpointError(f"{path}: {key} is {alpha}, not a finite number; the file is damaged")
    return alpha


def check_scale(scale, what: str = "LoRA scale") -> float:
    """A LoRA weight the user gave: a finite number (with NaN or infinity every image would be NaN)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the {what} must be a finite number (usually 0 to 1), got {scale!r}")
    return float(scale)


# --------------------------------------------------------------------------------------------------
# Layer names


def lora_targets(unet: nn.Module, text_encoder: nn.Module) -> dict[str, tuple[str, str, nn.Module]]:
    """{kohya name: (component, module path, module)} for every Linear and Conv2d a LoRA may adapt."""
    to_diffusers = keymap.to_diffusers("unet", unet.state_dict().keys())  # original key -> diffusers key
    targets = {}
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            diffusers_path = to_diffusers[path + ".weight"].removesuffix(".weight")
            targets[PREFIXES["unet"] + diffusers_path.replace(".", "_")] = ("unet", path, module)
    for path, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear):  # transformers' CLIPTextModel has a `text_model.` level sd15 lacks
            targets[PREFIXES["text_encoder"] + "text_model_" + path.replace(".", "_")] = ("text_encoder", path, module)
    return targets


def _shape_problem(module: nn.Module, layer: LoRALayer) -> str | None:
    """Why `layer` cannot adapt `module`, or None."""
    out_features, in_features = module.weight.shape[:2]
    kernel = tuple(module.weight.shape[2:]) or (1, 1)
    down, up = layer.down, layer.up
    fits = (
        down.dim() in (2, 4) and up.dim() in (2, 4)
        and up.shape[0] == out_features and down.shape[1] == in_features and up.shape[1] == down.shape[0]
        and (tuple(down.shape[2:]) or (1, 1)) == kernel and (tuple(up.shape[2:]) or (1, 1)) == (1, 1)
    )  # fmt: skip
    if fits:
        return None
    return f"down {list(down.shape)}, up {list(up.shape)} do not fit a layer of weight {list(module.weight.shape)}"


def match_lora(m: "StableDiffusion", lora: LoRA) -> tuple[list[tuple[str, nn.Module, LoRALayer]], list[str]]:
    """([(component, module, layer)], names of the file's entries that match no layer of the model)."""
    targets = lora_targets(m.unet, m.text_encoder)
    matched, unmatched, misfits = [], list(lora.unsupported), []
    for name, layer in lora.layers.items():
        if name not in targets:
            unmatched.append(name)
            continue
        component, path, module = targets[name]
        problem = _shape_problem(module, layer)
        if problem:
            misfits.append(f"{name}: {problem}")
        else:
            matched.append((component, module, layer))
    if misfits:
        hint = " It looks made for another model family (SD2 has 1024-wide cross-attention, SDXL other blocks)."
        shown = "\n    ".join(misfits[:10]) + (f"\n    … and {len(misfits) - 10} more" if len(misfits) > 10 else "")
        raise CheckpointError(f"LoRA {lora.name!r} does not fit this model:\n    {shown}\n{hint}")
    if not matched:
        raise CheckpointError(
            f"no entry of LoRA {lora.name!r} names a layer of this SD1.x model (e.g. {unmatched[0]}); "
            "is it an SDXL LoRA (lora_te1_/lora_te2_) or another format?"
        )
    return matched, unmatched


# --------------------------------------------------------------------------------------------------
# Applying


class _LayerPatch:
    """The LoRAs on one Linear or Conv2d: merged ones, with the weight's original value kept so that it
    can be restored exactly, and on-the-fly ones, added to the output by a forward hook."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.original: torch.Tensor | None = None
        self.merged: dict[int, tuple[str, LoRALayer, float]] = {}  # {handle id: (LoRA name, layer, scale)}
        self.live: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.handle = None

    def graph_state(self) -> tuple:
        """What the forward hook computes with, for sd15.cuda_graphs: a captured graph holds the live LoRAs'
        tensors and scales, so it is captured again when they change (and the hook counts as graph-safe)."""
        return tuple((key, down.data_ptr(), up.data_ptr(), scale) for key, (down, up, scale) in self.live.items())

    @staticmethod
    def of(module: nn.Module) -> "_LayerPatch":
        if getattr(module, "_sd15_lora", None) is None:
            module._sd15_lora = _LayerPatch(module)
        return module._sd15_lora

    def add(self, key: int, name: str, layer: LoRALayer, scale: float, merge: bool) -> None:
        if merge:
            self.merged[key] = (name, layer, scale)
            self._write_weight()
            return
        w = self.module.weight
        down, up = layer.down.to(w.device, w.dtype), layer.up.to(w.device, w.dtype)
        if isinstance(self.module, nn.Conv2d):
            down = down.reshape(down.shape[0], down.shape[1], *self.module.kernel_size)  # (r, in, kh, kw)
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)  # (out, r, 1, 1)
        else:
            down, up = down.flatten(1), up.flatten(1)  # (r, in), (out, r)
        self.live[key] = (down, up, scale * layer.multiplier)
        if self.handle is None:
            self.handle = self.module.register_forward_hook(self._hook)

    def remove(self, key: int) -> None:
        if self.merged.pop(key, None) is not None:
            self._write_weight()
        if self.live.pop(key, None) is not None and not self.live:
            self.handle.remove()
            self.handle = None
        if not self.merged and not self.live:
            self.module._sd15_lora = None

    @torch.no_grad()
    def _write_weight(self) -> None:
        w = self.module.weight
        if not self.merged:  # the last merged LoRA is gone: the original weight, bit for bit
            w.copy_(self.original)
            self.original = None
            return
        if self.original is None:
            self.original = w.detach().clone()
        total = self.original.float()
        # summed in a fixed order (by name), so that the weight does not depend on the order of loading
        for _, layer, scale in sorted(self.merged.values(), key=lambda item: (item[0], item[2])):
            total = total + scale * layer.delta(w.shape, w.device)
        w.copy_(total.to(w.dtype))

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for down, up, scale in self.live.values():
            if isinstance(module, nn.Conv2d):
                h = F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
            else:
                h = F.linear(F.linear(x, down), up)  # (…, r) -> (…, out)
            output = output + scale * h
        return output


@dataclass(eq=False)
class AppliedLoRA:
    """A LoRA in effect on a model; `remove()` (or leaving a `with` block) takes it off again."""

    lora: LoRA
    unet_scale: float
    te_scale: float
    merge: bool
    unmatched: list[str]
    _patches: list[_LayerPatch] = field(default_factory=list, repr=False)
    _model: "StableDiffusion | None" = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.lora.name

    @property
    def tag(self) -> str:
        """The prompt tag that asks for this LoRA at these scales: <lora:name:0.8> or <lora:name:te:unet>."""
        scales = f"{self.te_scale:g}" + (f":{self.unet_scale:g}" if self.unet_scale != self.te_scale else "")
        return f"<lora:{self.name}:{scales}>"

    def remove(self) -> None:
        for patch in self._patches:
            patch.remove(id(self))
        self._patches = []
        if self._model is not None and self in self._model.loras:
            self._model.loras.remove(self)

    def __enter__(self) -> "AppliedLoRA":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_lora(
    m: "StableDiffusion",
    lora: LoRA | str | os.PathLike,
    scale: float = 1.0,
    text_encoder_scale: float | None = None,
    merge: bool = True,
) -> AppliedLoRA:
    """Apply a LoRA (or a LoRA file) at `scale` (the text encoder at `text_encoder_scale`, default the same).

    Returns a handle whose `remove()` undoes it; several may be applied at once, and removed in any order.
    Entries of the file that match no layer are listed in `.unmatched` and reported with a warning.
    """
    if not isinstance(lora, LoRA):
        lora = read_lora(lora)
    scale = check_scale(scale)
    te_scale = scale if text_encoder_scale is None else check_scale(text_encoder_scale, "text encoder's LoRA scale")
    matched, unmatched = match_lora(m, lora)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        warnings.warn(f"LoRA {lora.name!r}: {len(unmatched)} entries match no layer of the model and were not applied: {shown}", stacklevel=2)
    applied = AppliedLoRA(lora, float(scale), float(te_scale), merge, unmatched)
    for component, module, layer in matched:
        patch = _LayerPatch.of(module)
        patch.add(id(applied), lora.name, layer, applied.te_scale if component == "text_encoder" else applied.unet_scale, merge)
        applied._patches.append(patch)
    return applied


def load_lora(
    m: "StableDiffusion",
    path: str | os.PathLike,
    scale: float = 1.0,
    text_encoder_scale: float | None = None,
    merge: bool = True,
    name: str | None = None,
) -> AppliedLoRA:
    """Read a LoRA file and keep it applied to the model (listed in `m.loras`, recorded in the PNG as a
    `<lora:name:scale>` tag) until its `remove()` or `unload_loras(m)`."""
    lora = read_lora(path, name)
    if any(a.name == lora.name for a in m.loras):
        raise ValueError(f"a LoRA named {lora.name!r} is already loaded; remove it first")
    applied = apply_lora(m, lora, scale, text_encoder_scale, merge)
    applied._model = m
    m.loras.append(applied)
    return applied


def unload_loras(m: "StableDiffusion") -> None:
    """Remove every LoRA loaded with `load_lora`; the weights are restored exactly."""
    for applied in list(reversed(m.loras)):
        applied.remove()


# --------------------------------------------------------------------------------------------------
# LoRAs named in prompts


def find_lora(name: str, folders) -> Path:
    """The file `<lora:name:…>` refers to: `name` + a LoRA suffix in one of `folders` or their subfolders."""
    folders = [Path(f) for f in folders]
    for folder in folders:
        candidates = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
        for same in (lambda p: p.stem == name, lambda p: p.stem.lower() == name.lower()):
            found = [p for p in candidates if same(p)]
            if found:
                return found[0]
    where = ", ".join(str(f) for f in folders) or "no folder"
    raise ValueError(f"LoRA {name!r} named in the prompt is not in {where}; put {name}.safetensors there or pass --lora-dir")


def _tags_of(prompts: list[str]) -> list[LoraTag]:
    per_prompt = [lora_tags(p) for p in prompts]
    if any({t.name for t in tags} != {t.name for t in per_prompt[0]} for tags in per_prompt):
        raise ValueError("the prompts of one call name different LoRAs; generate them in separate calls")
    tags: dict[str, LoraTag] = {}
    for tag in (t for tags in per_prompt for t in tags):
        if tags.setdefault(tag.name, tag) != tag:
            raise ValueError(f"LoRA {tag.name!r} is named twice with different scales")
    return list(tags.values())


@contextmanager
def prompt_loras(m: "StableDiffusion", prompts: list[str]):
    """Apply the LoRAs that the prompts name with `<lora:name:scale>` (found in `m.lora_dirs`), merged,
    for the duration of the block; on leaving it the weights are restored exactly.

    A LoRA already loaded on the model under the same name (`load_lora`) is not applied twice.
    """
    applied = []
    try:
        for tag in _tags_of(prompts):
            loaded = next((a for a in m.loras if a.name == tag.name), None)
            if loaded is not None:
                if (loaded.te_scale, loaded.unet_scale) != (tag.te_scale, tag.unet_scale):
                    raise ValueError(f"LoRA {tag.name!r} is loaded at {loaded.tag} but the prompt asks for it at a different scale")
                continue
            lora = read_lora(find_lora(tag.name, m.lora_dirs), tag.name)
            applied.append(apply_lora(m, lora, tag.unet_scale, tag.te_scale, merge=True))
        yield applied
    finally:
        for a in reversed(applied):
            a.remove()


def recorded_prompt(m: "StableDiffusion", prompt: str) -> str:
    """The prompt as the PNG records it: with a `<lora:name:scale>` tag for each LoRA loaded on the model
    that the prompt does not already name (so that the web UI, or `sd15 generate --from-png`, applies it)."""
    named = {t.name for t in lora_tags(prompt)}
    tags = [a.tag for a in m.loras if a.name not in named]
    return " ".join([prompt.rstrip(), *tags]) if tags else prompt


_hash_cache: dict[tuple, str] = {}


def lora_hashes(m: "StableDiffusion", prompt: str) -> dict[str, str]:
    """{name: hash} of the LoRAs in effect for `prompt`: those loaded on the model and those it names."""
    hashes = {a.name: a.lora.hash for a in m.loras if a.lora.hash}
    for tag in lora_tags(prompt):
        if tag.name not in hashes:
            path = find_lora(tag.name, m.lora_dirs)
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            hashes[tag.name] = _hash_cache.get(key) or _hash_cache.setdefault(key, lora_file_hash(path))
    return hashes
