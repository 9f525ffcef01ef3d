"""`sd15.load()`: a checkpoint file in, the four models of Stable Diffusion v1.x out.

Each component is built on the `meta` device (shapes only, no memory), its expected keys and shapes
are checked against the file, and then every tensor is read from the file, converted to the target
dtype and device, and assigned in place. Peak memory stays near one copy of the model plus one tensor.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import embeddings as embeddings_io
from . import fast as fast_path
from . import lora, pipeline
from . import hires as hires_io
from . import inpaint as inpaint_io
from .checkpoint import (
    CLIP_PREFIX_OLD,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    CheckpointInfo,
    check_state_dict,
    component_keys,
    ema_key,
    identify,
    open_checkpoint,
    printable,
    unexplained_keys,
)
from .clip import CLIPTextConfig, CLIPTextModel
from .controlnet import ControlNet, load_controlnet
from .embeddings import EmbeddingSet
from .streaming import ItemView, vae_items
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .safety_checker import SafetyChecker
from .vae import AutoencoderKL, VAEConfig


@dataclass
class StableDiffusion:
    """The models of one SD1.x checkpoint, on one device in one dtype."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: AutoencoderKL
    info: CheckpointInfo
    path: str | None = None
    vae_path: str | None = None  # the VAE file used instead of the checkpoint's (load's `vae`), if any
    embeddings: EmbeddingSet = field(default_factory=EmbeddingSet)  # textual inversions, by trigger word
    loras: list[lora.AppliedLoRA] = field(default_factory=list)  # LoRAs kept applied by load_lora
    lora_dirs: list[Path] = field(default_factory=lambda: [lora.DEFAULT_LORA_DIR])  # where <lora:name:…> is found
    safety_checker: SafetyChecker | None = None  # sd15.safety_checker: blanks flagged images when set
    fast: fast_path.FastPath | None = None  # what sd15.fast turned on; None: the reference path

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    generate = pipeline.generate
    img2img = pipeline.img2img
    load_embedding = embeddings_io.load_embedding
    load_embeddings_folder = embeddings_io.load_embeddings_folder
    enable_fast_path = fast_path.enable
    disable_fast_path = fast_path.disable
    load_lora = lora.load_lora
    unload_loras = lora.unload_loras
    inpaint = inpaint_io.inpaint
    hires_fix = hires_io.hires_fix

    def load_controlnet(self, path: str | os.PathLike, name: str | None = None) -> ControlNet:
        """A ControlNet file (sd15.controlnet) on this model's device and dtype, for `controlnet=` of
        generate, img2img and inpaint."""
        return load_controlnet(path, self.device, self.dtype, name)


def default_device_and_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when a GPU is present, else the CPU in fp32 (half precision is slow or missing there)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def _meta_shapes(ckpt, keymap: dict[str, str]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for a component's tensors, for config inference without reading data."""
    return {k: torch.empty(ckpt.shape(fk), device="meta") for k, fk in keymap.items()}


# The VAE attention's q, k, v and proj_out are 1×1 convolutions, [C, C, 1, 1]; some converters store them as
# linear [C, C], the same numbers. They are read either way.
VAE_ATTENTION = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def _build(name: str, module_cls, config, ckpt, keymap: dict[str, str], device, dtype) -> nn.Module:
    with torch.device("meta"):
        module = module_cls(config)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(ckpt.shape(fk)) for k, fk in keymap.items()}
    linear = {k for k, shape in found.items() if VAE_ATTENTION.fullmatch(k) and expected.get(k) == shape + (1, 1)}
    check_state_dict(name, expected, {**found, **{k: found[k] + (1, 1) for k in linear}})
    state = {}
    for key, file_key in keymap.items():
        if key.endswith("position_ids"):
            # Merged checkpoints often store float position ids such as 75.9975; they are always arange(T).
            state[key] = torch.arange(expected[key][-1], device=device)[None]
            continue
        tensor = ckpt.get(file_key)
        if key in linear:
            tensor = tensor.reshape(expected[key])  # [C, C] -> [C, C, 1, 1]
        if not tensor.is_floating_point():  # every other weight of the three models is a float
            raise CheckpointError(f"The {name} weight {printable(file_key)} is stored as {tensor.dtype}, not as floating "
                                  "point numbers; the file is corrupt or not a model checkpoint.")  # fmt: skip
        state[key] = tensor.to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _vae_config(name: str, shapes: dict[str, torch.Tensor]) -> VAEConfig:
    """The VAE's configuration from its shapes; one SD1.x's UNet cannot work with is refused."""
    try:
        config = VAEConfig.from_state_dict(shapes)
    except (KeyError, ValueError):  # no encoder.conv_in.weight, no levels, …: `_build` names what is missing
        return VAEConfig()
    if (config.embed_dim, len(config.ch_mult)) != (4, 4):
        raise CheckpointError(f"The {name} has {config.embed_dim} latent channels and {len(config.ch_mult)} levels; SD1.x's "
                              "UNet works on 4-channel latents at 1/8 of the image size (a VAE of 4 levels)")  # fmt: skip
    return config


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ema: bool = False,
    fast: bool | None = None,
    vae: str | os.PathLike | None = None,
) -> StableDiffusion:
    """Load an SD1.x single-file checkpoint (.safetensors, or .ckpt read with weights_only=True), or a
    diffusers folder (model_index.json, unet/, vae/, text_encoder/), read through sd15.keymap's key rules.

    By default the model goes to CUDA in fp16 when a GPU is present, else to the CPU in fp32.
    `ema=True` takes the UNet from the file's EMA copy (`model_ema.*`), as training checkpoints hold it.
    `fast`: the fast path of sd15.fast (fused kernels, CUDA graphs); by default on for CUDA in fp16/bf16,
    off otherwise. `fast=False` keeps the plain reference modules.
    `vae`: a VAE to decode (and encode) with instead of the checkpoint's own, as the web UI's "SD VAE"
    setting: a VAE file such as vae-ft-mse-840000-ema-pruned.safetensors (.safetensors or .ckpt, original or
    diffusers layout), a diffusers vae/ folder, or another SD1.x checkpoint (its VAE). A checkpoint
    published without a VAE loads only with one.
    Files of other families (SD2, SDXL, LoRA, a VAE alone, …) are refused with a message naming them.
    """
    ckpt = open_checkpoint(path)
    info = identify(ckpt)
    if info.kind not in ("sd1", "sd1-inpainting"):
        raise CheckpointError(f"{path} is {info.description}. sd15 loads Stable Diffusion 1.x checkpoints.")
    for needed in ("vae", "text_encoder") if vae is None else ("text_encoder",):
        if needed not in info.components:
            also = " or pass a VAE file (vae=, --vae)" if needed == "vae" else ""
            raise CheckpointError(f"{path} has a UNet but no {needed} weights; use a full SD1.x checkpoint{also}.")
    extra = unexplained_keys(ckpt, info)
    if extra:
        check_state_dict("checkpoint", {}, {k: ckpt.shape(k) for k in extra})

    unet_keys = component_keys(ckpt, UNET_PREFIX)
    if ema:
        if not info.has_ema:
            raise CheckpointError(f"{path} has no EMA weights (no model_ema.* keys); load it without ema=True.")
        missing = [ema_key(k) for k in unet_keys if ema_key(k) not in ckpt.keys()]
        if missing:
            raise CheckpointError(f"{path}'s EMA weights are incomplete: {len(missing)} missing, e.g. {printable(missing[0])}")
        unet_keys = {k: ema_key(k) for k in unet_keys}
    vae_view, vae_keys, vae_name = ckpt, component_keys(ckpt, VAE_PREFIX), "VAE"
    if vae is not None:
        vae_view = ItemView(vae_items(vae, notes=[]))  # notes: only about left-out training tensors
        vae_keys, vae_name = {k: k for k in vae_view.keys()}, f"VAE ({vae})"
    vae_config = _vae_config(vae_name, _meta_shapes(vae_view, vae_keys))
    clip_keys = component_keys(ckpt, info.clip_prefix)
    if info.clip_prefix == CLIP_PREFIX_OLD:  # older files: cond_stage_model.transformer.{embeddings,encoder,…}
        clip_keys = {k.removeprefix("text_model."): fk for k, fk in clip_keys.items()}

    device, dtype = default_device_and_dtype(device, dtype)
    unet = _build("UNet", UNet, UNetConfig.from_state_dict(_meta_shapes(ckpt, unet_keys)), ckpt, unet_keys, device, dtype)
    autoencoder = _build(vae_name, AutoencoderKL, vae_config, vae_view, vae_keys, device, dtype)
    clip_config = CLIPTextConfig.from_state_dict(_meta_shapes(ckpt, clip_keys))
    text_encoder = _build("text encoder", CLIPTextModel, clip_config, ckpt, clip_keys, device, dtype)
    if device.type == "cpu":  # oneDNN's convolutions run ~15% faster on the VAE's large maps in NHWC (performance.md)
        autoencoder.to(memory_format=torch.channels_last)
    m = StableDiffusion(CLIPTokenizer(), text_encoder, unet, autoencoder, info, str(path), None if vae is None else str(vae))
    if fast_path.wanted(device, dtype, fast):
        fast_path.enable(m)
    return m
