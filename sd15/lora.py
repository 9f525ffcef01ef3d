"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in kohya-ss and diffusers files.

A LoRA adds a low-rank update to some Linear and Conv2d layers of the UNet and the text encoder:

    W' = W + scale · (alpha / rank) · up · down        down (r, in[, kh, kw]), up (out, r[, 1, 1])
    y' = y + scale · (alpha / rank) · up(down(x))      (the same, applied to the layer's output)

`scale` is the user's weight (`<lora:name:0.8>`), `alpha` a number stored in the file (missing: alpha = rank).

Two families of files are read; which one a file is comes from its keys, not its name.

kohya-ss (sd-scripts, read by the AUTOMATIC1111 web UI and diffusers): one entry per adapted layer, named
after the layer's diffusers module path with every dot written as `_`, under `lora_unet_` or `lora_te_`
(transformers' CLIP path, `text_model.…`); each has `.lora_down.weight`, `.lora_up.weight` and, in most
files, `.alpha`:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, 320)
      -> diffusers down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
      -> sd15 (original) input_blocks.1.1.transformer_blocks.0.attn1.to_q
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight                      (768, r)
      -> sd15 text_encoder.encoder.layers.0.self_attn.q_proj

diffusers (`save_lora_weights`, its training scripts, `unet.save_lora_adapter`): the module path with its
dots, under `unet.` or `text_encoder.` (a file of the UNet alone may have no prefix), then the matrices in
one of the forms diffusers has written over the years (down is PEFT's `lora_A`, up its `lora_B`):

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight       PEFT's names
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight    the training
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight   scripts' names
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight   attention
      processors, the oldest (to_q/k/v/out_lora: the projection to_q…, to_out.0; in CLIP q_proj…, out_proj)

The text encoder's path may lack `text_model.` (transformers 5 saves it so). alpha, as diffusers 0.42 reads
it: the safetensors metadata `lora_adapter_metadata` holds each component's PEFT LoraConfig as JSON
(`unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`…): a layer's alpha is the first `alpha_pattern`
entry whose pattern matches the end of its module path, else `lora_alpha`; with `use_rslora` the factor is
alpha / sqrt(rank). Without metadata alpha = rank (factor 1). A `<module>.alpha` key, as kohya writes it,
overrides both (diffusers 0.42 refuses such files; sd15 reads the alpha as kohya means it).

Since dots and underscores cannot be told apart in kohya names, names are not parsed: every Linear and
Conv2d of the model is given its kohya name (its original path -> diffusers path by the index rules of
`sd15.keymap`, dots -> `_`), a diffusers entry is given the same by writing its path's dots as `_`, and the
entries are looked up by name. Entries that name no layer are reported (`AppliedLoRA.unmatched`, and a
warning); entries whose shapes do not fit their layer are an error. Conv layers (LoCon: ResBlock convs,
down/upsamplers, 3×3 kernels) are adapted like linear ones. On an inpainting model, whose conv_in takes 9
channels (latent, mask, masked image), a LoRA's 4-channel conv_in adapts the latent channels only, as the
web UI does it. LyCORIS's LoHa and LoKr layers (`hada_w1_a`…, `lokr_w1`…, under kohya's names) are read as
well, by sd15.lycoris, alone or mixed with plain LoRA layers in one file, and LoCon's Tucker cores (`lora_mid`).
Files sd15 cannot apply as they are meant are refused, naming what they hold: DoRA (`lora_magnitude_vector`,
`dora_scale`), LoRA with bias terms, SDXL LoRAs, full checkpoints.

Two ways to apply, for any number of LoRAs at once:
- merged (default): the layer's weight becomes W', computed in float32. The original weight is kept, so
  removing the LoRA restores it bit for bit; with several LoRAs on a layer, W' is recomputed from it.
- on the fly (`merge=False`): a forward hook adds scale · up(down(x)) to the layer's output; the weights
  are never touched. Slower per step, instant to add and remove.
"""

from __future__ import annotations

import json
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

from . import cuda_graphs, keymap
from .checkpoint import CheckpointError, open_checkpoint, printable
from .embeddings import file_hash
from .lycoris import AlphaOverRank, HadamardLayer, KroneckerLayer, TuckerLoRALayer, lycoris_layer
from .prompts import LoraTag, lora_tags

if TYPE_CHECKING:
    from .model import StableDiffusion

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
DEFAULT_LORA_DIR = Path("weights") / "lora"
# kohya's LoRA matrices, and LyCORIS's LoHa/LoKr factors under the same layer names (sd15.lycoris); te1/te2: SDXL
_KOHYA_KEY = re.compile(r"(lora_(?:unet|te\d?)_\w+?)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t2))")
# diffusers: [unet.|text_encoder.]<module path>.<matrix>, and the attention processors' <attention>.to_q_lora.down…
_DIFFUSERS_KEY = re.compile(r"(?:(unet|text_encoder)\.)?(\w[\w.]*?)\.(lora_[AB]\.weight|lora\.(?:down|up)\.weight|lora_linear_layer\.(?:down|up)\.weight|alpha)")
_PROCESSOR_KEY = re.compile(r"(?:(unet|text_encoder)\.)?(\w[\w.]*?)\.(?:processor\.)?to_(q|k|v|out)_lora\.(down|up)\.weight")
_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha", "lora_A.weight": "down",
         "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
         "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up"}  # fmt: skip
_PROCESSOR_PROJECTION = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
                         "text_encoder": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}  # fmt: skip
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata: the LoraConfig of each component


@dataclass
class LoRALayer(AlphaOverRank):
    """One adapted layer: down (r, in) or (r, in, kh, kw), up (out, r) or (out, r, 1, 1), alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        """(alpha / rank) · up · down in float32, in the layer weight's shape, computed on `device`."""
        up, down = self.up.to(device, torch.float32).flatten(1), self.down.to(device, torch.float32).flatten(1)
        return (up @ down).reshape(shape) * self.multiplier  # (out, r) @ (r, in·kh·kw)


AnyLayer = LoRALayer | TuckerLoRALayer | HadamardLayer | KroneckerLayer  # what a file's entry adapts a layer with


@dataclass
class LoRA:
    """A LoRA file's layers by entry name (kohya's, or diffusers' module path); nothing is applied until `apply_lora`."""

    name: str  # the name prompts use: <lora:name:0.8>
    layers: dict[str, AnyLayer]
    path: Path | None = None
    hash: str | None = None  # 12 hex digits, as the web UI's "Lora hashes" shows it
    unsupported: list[str] = field(default_factory=list)  # file keys that are no LoRA entry sd15 reads
    metadata: dict = field(default_factory=dict)
    format: str = "kohya"  # or "diffusers"
    targets: dict[str, str] = field(default_factory=dict)  # {entry: kohya name of its layer}, where they differ


def lora_file_hash(path: str | os.PathLike) -> str:
    """The web UI's LoRA hash: SHA-256 of a .safetensors file's tensor data (its header skipped, the
    "addnet" hash), or of the whole file for other formats; first 12 hex digits."""
    path = Path(path)
    skip = 0
    if path.suffix.lower() == ".safetensors":  # as the web UI compares it: Style.SAFETENSORS too
        with open(path, "rb") as f:
            skip = 8 + struct.unpack("<Q", f.read(8))[0]
    return file_hash(path, skip)[:12]


def _file_entry(key: str) -> tuple[str, str, str, str] | None:
    """(format, entry name, kohya name of the layer, part: down/up/alpha) of a LoRA file key, or None.

    A diffusers entry is named by its component and module path (`unet.down_blocks.0….attn1.to_q`); keys
    without a component are the UNet's, unless their path is CLIP's (`text_model.…`, `encoder.layers.…`).
    """
    if m := _KOHYA_KEY.fullmatch(key):
        return "kohya", m[1], m[1], _PART.get(m[2], m[2])  # LyCORIS parts keep their names
    if m := _PROCESSOR_KEY.fullmatch(key):  # <attention>.processor.to_q_lora.down.weight: the projection is to_q
        prefix, attention, projection, part = m.groups()
        component = prefix or ("text_encoder" if attention.startswith(("text_model.", "encoder.layers.")) else "unet")
        module = f"{attention}.{_PROCESSOR_PROJECTION[component][projection]}"
    elif m := _DIFFUSERS_KEY.fullmatch(key):
        prefix, module, part = m[1], m[2], _PART[m[3]]
        component = prefix or ("text_encoder" if module.startswith(("text_model.", "encoder.layers.")) else "unet")
    else:
        return None
    if component == "unet":
        target = PREFIXES["unet"] + module.replace(".", "_")
    else:  # transformers 5 saves CLIP without its `text_model.` level
        target = PREFIXES["text_encoder"] + ("" if module.startswith("text_model.") else "text_model_") + module.replace(".", "_")
    return "diffusers", (f"{prefix}." if prefix else "") + module, target, part


def _refusal(keys: list[str], configs: dict[str, dict]) -> str | None:
    """Why a file's LoRA layers cannot be applied as they are meant, naming what it holds; None if they can."""
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "an SDXL LoRA (two text encoders: lora_te1_/lora_te2_ or text_encoder_2.), not one for SD1.x"
    if any("lora_magnitude_vector" in k for k in keys) or any(c.get("use_dora") for c in configs.values()):
        return "a DoRA (lora_magnitude_vector), which sd15 does not apply"
    if any(k.endswith(".dora_scale") for k in keys):  # kohya's and LyCORIS' name for DoRA's magnitudes
        return "a DoRA (dora_scale), which sd15 does not apply"
    if any(k.endswith(".lora_B.bias") for k in keys):
        return "LoRA bias terms (lora_B.bias), which sd15 does not apply"
    return None


def _contents(keys: list[str]) -> str:
    """What a file that holds no LoRA layers holds instead, for the error message."""
    if any(re.search(r"(^|\.)(hada|lokr)_", k) and not k.startswith("lora_") for k in keys):
        return "LyCORIS LoHa/LoKr layers under other names than kohya's (lora_unet_…/lora_te_…), the only ones sd15 reads them in"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "a full model checkpoint (model.diffusion_model.…), not a LoRA"
    if any(re.fullmatch(r"(unet\.)?(down_blocks|mid_block|up_blocks|conv_in)\..*weight|(text_model\.)?encoder\.layers\..*weight", k) for k in keys):
        return "a diffusers model's weights (down_blocks.…weight), not a LoRA"
    shown = ", ".join(printable(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"keys such as {shown or '(none)'}"


def read_lora(path: str | os.PathLike, name: str | None = None) -> LoRA:
    """Read a LoRA file in kohya's or diffusers' names (.safetensors, or a pickle read with weights_only=True)."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    keys, metadata = list(ckpt.keys()), dict(ckpt.metadata)
    configs = _peft_config(path, metadata)
    if why := _refusal(keys, configs):
        raise CheckpointError(f"{path} holds {why}")
    entries: dict[str, tuple[str, dict[str, str]]] = {}  # {entry: (kohya name of its layer, {part: key})}
    formats, unsupported = set(), []
    for key in keys:
        found = _file_entry(key)
        if found is None:
            unsupported.append(key)
            continue
        fmt, entry, target, part = found
        parts = entries.setdefault(entry, (target, {}))[1]
        if part in parts:
            raise CheckpointError(f"{path}: {printable(key)} and {printable(parts[part])} are the same matrix of one layer")
        formats.add(fmt)
        parts[part] = key
    if not entries:
        raise CheckpointError(f"{path} holds no LoRA layers (kohya's lora_unet_…/lora_te_… or diffusers' unet.…/text_encoder.… "
                              f".lora_A/.lora_B): it holds {_contents(keys)}")  # fmt: skip
    if len(formats) > 1:
        raise CheckpointError(f"{path} mixes kohya names (lora_unet_…) and diffusers names (unet.…); it is not one LoRA")
    layers, targets = {}, {}
    for entry, (target, found) in entries.items():
        tensors = {part: ckpt.get(key) for part, key in found.items() if part != "alpha"}
        for part, tensor in tensors.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path}: {found[part]} is not finite floating-point numbers ({tensor.dtype}); the file is damaged")
        alpha = _alpha(path, found["alpha"], ckpt.get(found["alpha"])) if "alpha" in found else None
        if "down" in tensors and "up" in tensors and "mid" in tensors:  # LoCon's Tucker core
            layer = TuckerLoRALayer(tensors["down"], tensors["mid"], tensors["up"], alpha)
        elif "down" in tensors and "up" in tensors:
            if alpha is None:
                alpha = _peft_alpha(configs, entry, tensors["down"].shape[0])
            layer = LoRALayer(tensors["down"], tensors["up"], alpha)
        else:
            layer = lycoris_layer(tensors, alpha)  # LoHa, LoKr, or None: an incomplete entry
        if layer is None:
            unsupported += found.values()  # an entry without all its matrices cannot be applied
            continue
        kind = {LoRALayer: ("down", "up"), TuckerLoRALayer: ("down", "up", "mid"), HadamardLayer: ("hada_",),
                KroneckerLayer: ("lokr_",)}[type(layer)]  # fmt: skip
        unsupported += [key for part, key in found.items() if part != "alpha" and not part.startswith(kind)]  # another kind's
        layers[entry] = layer
        if target != entry:
            targets[entry] = target
    if not layers:
        raise CheckpointError(f"{path} holds no complete adapter layer (a LoRA's down and up matrices, a LoHa's hada_w1_a, "
                              f"hada_w1_b, hada_w2_a and hada_w2_b, or a LoKr's lokr_w1 and lokr_w2, each whole or as _a "
                              f"and _b): it holds {_contents(keys)}")  # fmt: skip
    fmt = formats.pop()
    return LoRA(name or path.stem, layers, path, lora_file_hash(path), sorted(unsupported), metadata, fmt, targets)


def _alpha(path: Path, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise CheckpointError(f"{path}: {key} must hold one number, it has shape {tuple(tensor.shape)}")
    alpha = float(tensor.item())
    if not math.isfinite(alpha):
        raise CheckpointError(f"{path}: {key} is {alpha}, not a finite number; the file is damaged")
    return alpha


def _peft_config(path: Path, metadata: dict) -> dict[str, dict]:
    """{component prefix ("unet.", "text_encoder.", or "" for unprefixed keys): its PEFT LoraConfig} from
    diffusers' metadata, which writes each component's config entries under its prefix."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw is None:
        return {}
    try:
        entries = json.loads(raw)
    except ValueError:
        entries = None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: its metadata {PEFT_METADATA_KEY} is not a JSON object; the file is damaged")
    configs: dict[str, dict] = {}
    for key, value in entries.items():
        component, dot, setting = key.partition(".")
        if dot and component in PREFIXES:
            configs.setdefault(component + ".", {})[setting] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def _peft_alpha(configs: dict[str, dict], entry: str, rank: int) -> float | None:
    """A diffusers layer's alpha, as PEFT sets it from the LoraConfig: the first `alpha_pattern` whose
    pattern matches the end of the module path (peft.utils.other.get_pattern_key), else `lora_alpha`
    (PEFT's default 8); None (alpha = rank) when the file has no config for the component. With
    `use_rslora` PEFT scales by alpha / sqrt(rank): returned as the alpha that gives that over rank."""
    prefix = next((p for p in ("unet.", "text_encoder.") if entry.startswith(p)), "")
    config, module = configs.get(prefix), entry.removeprefix(prefix)
    if not config:
        return None
    alpha, patterns = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"alpha_pattern in the file's {PEFT_METADATA_KEY} is {type(patterns).__name__}, not a map of patterns to numbers")
    for pattern, value in patterns.items():
        # diffusers writes module paths here (peft reads them as regular expressions); anything more is refused
        # rather than run, since a crafted expression can take exponential time to match
        if not isinstance(pattern, str) or not re.fullmatch(r"\^?[\w.]{1,300}", pattern):
            raise CheckpointError(f"alpha_pattern {printable(pattern)} of the file's {PEFT_METADATA_KEY} is not a module "
                                  "path (letters, digits, _ and ., optionally after ^); sd15 reads no other patterns")  # fmt: skip
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"the alpha of {entry} in the file's {PEFT_METADATA_KEY} is {printable(alpha)}, not a finite number")
    return float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)


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


def _shape_problem(module: nn.Module, layer: AnyLayer) -> str | None:
    """Why `layer` cannot adapt `module`, or None."""
    if not isinstance(layer, LoRALayer):
        return layer.problem(module.weight.shape)
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


def _inpainting_conv_in(target: str, module: nn.Module, layer: LoRALayer) -> LoRALayer:
    """A LoRA's conv_in made for the 4 latent channels, on an inpainting model's conv_in, which takes 9
    (latent, mask, masked image): its down matrix padded with zeros for the other 5, so that it adapts the
    latent channels and leaves the rest as they are, as the web UI does. Any other layer as it is."""
    if not isinstance(layer, LoRALayer):
        return layer
    down = layer.down
    if target == PREFIXES["unet"] + "conv_in" and module.weight.shape[1] == 9 and down.dim() == 4 and down.shape[1] == 4:
        return LoRALayer(F.pad(down, (0, 0, 0, 0, 0, 5)), layer.up, layer.alpha)  # (r, 4, kh, kw) -> (r, 9, kh, kw)
    return layer


def match_lora(m: "StableDiffusion", lora: LoRA) -> tuple[list[tuple[str, nn.Module, LoRALayer]], list[str]]:
    """([(component, module, layer)], names of the file's entries that match no layer of the model)."""
    targets = lora_targets(m.unet, m.text_encoder)
    matched, unmatched, misfits = [], list(lora.unsupported), []
    for name, layer in lora.layers.items():
        target = lora.targets.get(name, name)
        if target not in targets:
            unmatched.append(name)
            continue
        component, path, module = targets[target]
        layer = _inpainting_conv_in(target, module, layer)
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
        return tuple((key, None if down is None else down.data_ptr(), up.data_ptr(), scale) for key, (down, up, scale) in self.live.items())

    @staticmethod
    def of(module: nn.Module) -> "_LayerPatch":
        if getattr(module, "_sd15_lora", None) is None:
            module._sd15_lora = _LayerPatch(module)
        return module._sd15_lora

    def add(self, key: int, name: str, layer: LoRALayer, scale: float, merge: bool) -> None:
        """Put a LoRA's layer on; the entry is kept only once it is in effect, so that an error part-way
        (out of memory, Ctrl-C) leaves nothing that `remove` would not find."""
        if merge:
            merged = {**self.merged, key: (name, layer, scale)}
            self._write_weight(merged)
            self.merged = merged
        else:
            w = self.module.weight
            if not isinstance(layer, LoRALayer):  # LoHa, LoKr: not low-rank, so their whole ΔW (scaled), once
                down, up, factor = None, layer.delta(w.shape, w.device).to(w.dtype), scale
            else:
                down, up, factor = layer.down.to(w.device, w.dtype), layer.up.to(w.device, w.dtype), scale * layer.multiplier
                if isinstance(self.module, nn.Conv2d):
                    down = down.reshape(down.shape[0], down.shape[1], *self.module.kernel_size)  # (r, in, kh, kw)
                    up = up.reshape(up.shape[0], up.shape[1], 1, 1)  # (out, r, 1, 1)
                else:
                    down, up = down.flatten(1), up.flatten(1)  # (r, in), (out, r)
            if self.handle is None:
                self.handle = self.module.register_forward_hook(self._hook)
            self.live[key] = (down, up, factor)
        cuda_graphs.state_changed()

    def remove(self, key: int) -> None:
        if key in self.merged:
            merged = {k: v for k, v in self.merged.items() if k != key}
            self._write_weight(merged)
            self.merged = merged
        if self.live.pop(key, None) is not None and not self.live:
            self.handle.remove()
            self.handle = None
        if not self.merged and not self.live and getattr(self.module, "_sd15_lora", None) is self:
            self.module._sd15_lora = None
        cuda_graphs.state_changed()

    @torch.no_grad()
    def _write_weight(self, merged: dict[int, tuple[str, LoRALayer, float]]) -> None:
        """Make the weight its original plus the `merged` LoRAs. The weight is written last, in one copy:
        if anything before it fails, the weight and the kept original are as they were."""
        w = self.module.weight
        if not merged:  # the last merged LoRA is gone: the original weight, bit for bit
            w.copy_(self.original)
            self.original = None
            return
        original = w.detach().clone() if self.original is None else self.original
        total = original.float()
        # summed in a fixed order (by name), so that the weight does not depend on the order of loading
        for _, layer, scale in sorted(merged.values(), key=lambda item: (item[0], item[2])):
            total = total + scale * layer.delta(w.shape, w.device)
        w.copy_(total.to(w.dtype))
        self.original = original

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for down, up, scale in self.live.values():
            conv = isinstance(module, nn.Conv2d)  # its own padding (circular too: sd15.seamless), stride, dilation
            if down is None:  # a whole ΔW
                h = module._conv_forward(x, up, None) if conv else F.linear(x, up)
            elif conv:
                h = F.conv2d(module._conv_forward(x, down, None), up)
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
    try:
        for component, module, layer in matched:
            patch = _LayerPatch.of(module)
            applied._patches.append(patch)
            patch.add(id(applied), lora.name, layer, applied.te_scale if component == "text_encoder" else applied.unet_scale, merge)
    except BaseException:  # out of memory, Ctrl-C…: the layers done so far are restored, as if never applied
        applied.remove()
        raise
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
    `<lora:name:scale>` tag) until its `remove()` or `unload_loras(m)`. `name` (default: the file's stem)
    must be one that such a tag can hold, and neither it nor the file may be loaded already."""
    name = name or Path(path).stem
    if name != name.strip() or any(c in name for c in ":<>"):
        # the web UI reads <lora:v2:final:0.5> as the LoRA "v2" at scale "final": no tag can name this one
        usable = re.sub(r"[:<>]", "_", name).strip()
        raise ValueError(f"the LoRA name {name!r} has ':', '<', '>' or spaces at its ends, which the <lora:name:scale> tag "
                         f"recorded in the image's prompt cannot hold; rename the file, say to {usable}{Path(path).suffix}")  # fmt: skip
    for a in m.loras:
        if a.name == name:
            raise ValueError(f"a LoRA named {name!r} is already loaded; remove it first")
        if a.lora.path is not None and _same_file(a.lora.path, path):
            raise ValueError(f"{path} is already loaded, as the LoRA {a.name!r}; remove it first")
    lora = read_lora(path, name)
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


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is gone
        return False


def _loaded_lora(m: "StableDiffusion", name: str) -> AppliedLoRA | None:
    """The LoRA loaded on the model that `<lora:name:…>` refers to, if any: the one of that name, else the
    one whose file `find_lora` finds for the name (so `Ink.safetensors` is one LoRA for `<lora:ink:…>`
    too), else, when no file is found, the one whose name differs only in case, as find_lora matches."""
    exact = next((a for a in m.loras if a.name == name), None)
    if exact is not None or not m.loras:
        return exact
    try:
        path = find_lora(name, m.lora_dirs)
    except ValueError:
        return next((a for a in m.loras if a.name.lower() == name.lower()), None)
    return next((a for a in m.loras if a.lora.path is not None and _same_file(a.lora.path, path)), None)


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

    No file is applied twice: not a LoRA already loaded on the model (`load_lora`) under that name or from
    that file, nor one the prompt names twice (`<lora:Ink:0.5> <lora:ink:0.5>` find one file).
    """
    applied = []
    try:
        for tag in _tags_of(prompts):
            loaded = _loaded_lora(m, tag.name)
            if loaded is not None:
                if (loaded.te_scale, loaded.unet_scale) != (tag.te_scale, tag.unet_scale):
                    raise ValueError(f"LoRA {tag.name!r} is loaded at {loaded.tag} but the prompt asks for it at a different scale")
                continue
            path = find_lora(tag.name, m.lora_dirs)
            twin = next((a for a in applied if _same_file(a.lora.path, path)), None)
            if twin is not None:
                if (twin.te_scale, twin.unet_scale) != (tag.te_scale, tag.unet_scale):
                    raise ValueError(f"LoRA {tag.name!r} is named twice with different scales (also as {twin.name!r}: both are {path})")
                continue
            applied.append(apply_lora(m, read_lora(path, tag.name), tag.unet_scale, tag.te_scale, merge=True))
        yield applied
    finally:
        for a in reversed(applied):
            a.remove()


def recorded_prompt(m: "StableDiffusion", prompt: str) -> str:
    """The prompt as the PNG records it: with a `<lora:name:scale>` tag for each LoRA loaded on the model
    that the prompt does not already name (so that the web UI, or `sd15 generate --from-png`, applies it)."""
    named = [_loaded_lora(m, t.name) for t in lora_tags(prompt)]
    tags = [a.tag for a in m.loras if all(a is not b for b in named)]
    return " ".join([prompt.rstrip(), *tags]) if tags else prompt


_hash_cache: dict[tuple, str] = {}


def lora_hashes(m: "StableDiffusion", prompt: str) -> dict[str, str]:
    """{name: hash} of the LoRAs in effect for `prompt`: those loaded on the model and those it names (a
    loaded LoRA that the prompt names, under the prompt's name, as the recorded prompt has it)."""
    named = {tag.name: _loaded_lora(m, tag.name) for tag in lora_tags(prompt)}  # {name: the loaded LoRA it means, or None}
    hashes = {a.name: a.lora.hash for a in m.loras if a.lora.hash and all(a is not b for b in named.values())}
    for name, loaded in named.items():
        if loaded is not None:
            if loaded.lora.hash:
                hashes[name] = loaded.lora.hash
            continue
        path = find_lora(name, m.lora_dirs)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        hashes[name] = _hash_cache.get(key) or _hash_cache.setdefault(key, lora_file_hash(path))
    return hashes
