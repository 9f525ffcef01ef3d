"""ControlNet for SD1.x: a trainable copy of the UNet's encoder that steers it with an image.

Reproduces `ControlNet` of lllyasviel's `cldm/cldm.py` (Zhang, Rao & Agrawala 2023, "Adding Conditional Control
to Text-to-Image Diffusion Models"), keeping its module names so that a ControlNet 1.0/1.1 file's keys
(`control_model.input_blocks.1.1.proj_in.weight`, `control_model.zero_convs.3.0.weight`, …) load as they are.

    control image (B, 3, H, W) in [0, 1] ── input_hint_block (8 convs, 3 of stride 2) ──> (B, 320, H/8, W/8)
    x (B, 4, H/8, W/8) ── input_blocks.0 ──> + hint ── input_blocks.1 … 11 ──> middle_block
                            │                           │                       │
                        zero_convs.0               zero_convs.1 … 11      middle_block_out
                            ▼                           ▼                       ▼
                      12 down residuals, one per skip connection of the UNet; 1 mid residual

The encoder and middle block are the UNet's own (sd15.unet.encoder_blocks / middle_block), initialised from
the base model when the ControlNet was trained; the zero convolutions (1×1, initialised to zero) make it
start as a no-op. The UNet adds the residuals to its skip connections and to its middle block's output
(`UNet.forward(..., down_residuals, mid_residual)`); the frozen base model is otherwise untouched.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .checkpoint import CheckpointError, identify, open_checkpoint, printable
from .images import _to_pil_rgb
from .unet import UNetConfig, encoder_blocks, middle_block, time_embedding, timestep_embedding

CONTROL_PREFIX = "control_model."  # how ControlNet 1.0/1.1 .pth files and their .safetensors copies name it
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # input_hint_block's widths; every second conv from the third has stride 2


def zero_conv(channels: int) -> nn.Sequential:
    """cldm's `make_zero_conv`: a 1×1 conv (zero-initialised in training), `.0` as the checkpoint names it."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1))


class ControlNet(nn.Module):
    """(x_t, hint, t, c) -> 12 down residuals and 1 mid residual for the UNet.

    x (B, 4, h, w) latents as the UNet sees them, hint (B, 3, 8h, 8w) in [0, 1], t (B,), context (B, T, D)
    -> ([down_0 … down_11], mid), down_i shaped like the UNet's input block i output, each times
    `conditioning_scale`.
    """

    def __init__(self, config: UNetConfig = UNetConfig(), hint_channels: int = 3):
        super().__init__()
        self.config = c = config
        self.time_embed = time_embedding(c)
        self.input_blocks, skip_channels = encoder_blocks(c)
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in skip_channels)
        layers, width = [], hint_channels
        for i, out in enumerate(HINT_CHANNELS):
            layers += [nn.Conv2d(width, out, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
            width = out
        layers.append(nn.Conv2d(width, c.model_channels, 3, padding=1))  # `input_hint_block.14`, zero-initialised
        self.input_hint_block = nn.Sequential(*layers)
        self.middle_block = middle_block(c)
        self.middle_block_out = zero_conv(skip_channels[-1])
        self.name, self.path, self.hash = "controlnet", None, None  # set by load_controlnet, for the PNG

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                conditioning_scale: float = 1.0, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """`guess_mode` scales residual i by 10^(i/12 - 1) (0.1 for the first, 1 for the mid), as diffusers'
        ControlNetModel does when the pipeline runs the ControlNet on the conditional half alone."""
        if hint.shape[-2:] != (8 * x.shape[-2], 8 * x.shape[-1]):
            raise ValueError(f"the control image is {hint.shape[-1]}×{hint.shape[-2]} pixels; for latents of "
                             f"{x.shape[-1]}×{x.shape[-2]} it must be {8 * x.shape[-1]}×{8 * x.shape[-2]}")  # fmt: skip
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 4·C)
        guided_hint = self.input_hint_block(hint.to(x.dtype))  # (B, C, h, w)
        h = self.input_blocks[0](x, emb, context) + guided_hint  # the hint enters after the first conv
        down = [self.zero_convs[0](h)]
        for block, zero in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            down.append(zero(h))  # (B, C_i, h_i, w_i), the shape of the UNet's skip connection i
        mid = self.middle_block_out(self.middle_block(h, emb, context))  # (B, C_mid, h/8, w/8)
        if guess_mode:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * conditioning_scale
            return [d * s for d, s in zip(down, scales)], mid * scales[-1]
        return [d * conditioning_scale for d in down], mid * conditioning_scale


# --------------------------------------------------------------------------------------------------
# Loading


def _refuse(path, what: str, todo: str):
    raise CheckpointError(f"{path} is {what}, not an SD1.x ControlNet; {todo}")


def controlnet_keys(ckpt, path) -> dict[str, str]:
    """{ControlNet module key: file key} of a ControlNet 1.0/1.1 file, with or without the `control_model.`
    prefix. ControlNet 1.0's own .pth files also hold the whole SD1.5 model beside it: those keys are ignored.
    Anything else (a diffusers-layout or SDXL ControlNet, a T2I-Adapter, a plain checkpoint) is refused."""
    keys = list(ckpt.keys())
    if any(k.startswith(CONTROL_PREFIX) for k in keys):
        return {k[len(CONTROL_PREFIX):]: k for k in keys if k.startswith(CONTROL_PREFIX)}
    if "input_hint_block.0.weight" in keys or "zero_convs.0.0.weight" in keys:
        return {k: k for k in keys}
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        kind = "an SDXL ControlNet" if "add_embedding.linear_1.weight" in keys else "a ControlNet in diffusers' layout"
        _refuse(path, kind, "sd15 reads ControlNets in the original layout (control_v11p_sd15_*.pth or their "
                            ".safetensors copies, keys `control_model.*`): use such a file")  # fmt: skip
    if any(k.startswith(("adapter.", "body.")) for k in keys) or "lora_controlnet" in keys:
        kind = "a Control-LoRA" if "lora_controlnet" in keys else "a T2I-Adapter"
        _refuse(path, kind, "sd15 runs ControlNets only; use an SD1.5 ControlNet (control_v11p_sd15_*)")
    info = identify(ckpt)
    todo = "give it as the model (--model)" if info.kind in ("sd1", "sd1-inpainting") else "use an SD1.5 ControlNet (control_v11p_sd15_*)"
    _refuse(path, info.description, todo)


def _check_family(path, shapes: dict[str, tuple]) -> None:
    """Refuse ControlNets of other families by what distinguishes them: SDXL's label embedding and
    2048-wide context, SD2's 1024-wide context."""
    if any(k.startswith("label_emb.") for k in shapes):
        _refuse(path, "an SDXL ControlNet (it has a label embedding)", "use an SD1.5 ControlNet (control_v11p_sd15_*)")
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2), 768)
    if context in (1024, 2048):  # other widths (sd15's tiny test models) meet the base model's in _check_fits
        family = {1024: "an SD2.x ControlNet", 2048: "an SDXL ControlNet"}[context]
        _refuse(path, f"{family} (its cross-attention reads a {context}-wide text context; SD1.x's is 768)",
                "use an SD1.5 ControlNet (control_v11p_sd15_*)")  # fmt: skip
    for needed in ("input_blocks.0.0.weight", "input_hint_block.0.weight", "middle_block_out.0.weight"):
        if needed not in shapes:
            _refuse(path, f"an incomplete ControlNet (it has no {needed})", "the file is damaged; download it again")


def load_controlnet(path: str | os.PathLike, device=None, dtype=None, name: str | None = None) -> ControlNet:
    """Load a ControlNet 1.0/1.1 file for SD1.x (.safetensors, or a .pth/.ckpt pickle read with
    torch.load(weights_only=True) by sd15.checkpoint). Keys and shapes are checked strictly; by default it
    goes where sd15.load puts a model (CUDA in fp16 when present, else the CPU in fp32)."""
    from .model import _build, _meta_shapes, default_device_and_dtype
    from .pnginfo import short_hash

    ckpt = open_checkpoint(path)
    keymap = controlnet_keys(ckpt, path)
    shapes = {k: tuple(ckpt.shape(fk)) for k, fk in keymap.items()}
    _check_family(path, shapes)
    try:
        config = UNetConfig.from_state_dict(_meta_shapes(ckpt, keymap))
    except (KeyError, IndexError, ValueError) as e:  # a block the layout needs is absent or mis-shaped
        _refuse(path, f"an incomplete ControlNet (its encoder lacks {printable(e)})", "the file is damaged; download it again")
    hint_channels = shapes["input_hint_block.0.weight"][1]
    if hint_channels != 3:
        _refuse(path, f"a ControlNet whose hint has {hint_channels} channels", "sd15 feeds it RGB control images (3 channels)")
    device, dtype = default_device_and_dtype(device, dtype)
    net = _build("ControlNet", ControlNet, config, ckpt, keymap, device, dtype)
    damaged = next((k for k, v in net.state_dict().items() if not torch.isfinite(v).all()), None)
    if damaged is not None:  # else every image would end in NaN latents, after the whole run
        raise CheckpointError(f"{path}: the ControlNet's {damaged} holds NaN or infinite numbers (in {dtype}); the file "
                              "is damaged: download it again")  # fmt: skip
    net.name, net.path = name or Path(path).stem, Path(path)
    net.hash = short_hash(path) if Path(path).is_file() else None  # as the PNG's "Model hash" of a checkpoint (cached)
    return net


# --------------------------------------------------------------------------------------------------
# Using it in a generation


@dataclass
class Control:
    """One ControlNet applied to a generation: its control image at the output size, and when and how much."""

    net: ControlNet
    hint: torch.Tensor  # (1, 3, H, W) in [0, 1], on the net's device and dtype
    scale: float = 1.0  # controlnet_conditioning_scale: multiplies every residual
    start: float = 0.0  # control_guidance_start: the fraction of steps before which it is off
    end: float = 1.0  # control_guidance_end: the fraction of steps after which it is off

    def active(self, step: int, steps: int) -> bool:
        """On for sampler step `step` of `steps` (those run: img2img's count from its first), as diffusers'
        `controlnet_keep`: off while step/steps < start or (step + 1)/steps > end."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def control_rgb(image: Image.Image) -> Image.Image:
    """A PIL control image as RGB, as it is shown (EXIF rotation applied), transparency as black: the "nothing
    here" of edge, depth, pose and scribble maps (diffusers drops the alpha instead, the same where it is opaque)."""
    return _to_pil_rgb(image, background=(0, 0, 0))


def control_image(image, width: int, height: int) -> torch.Tensor:
    """A control image -> (1, 3, height, width) float32 in [0, 1] (or -1: see below).

    PIL images (any mode, by `control_rgb`) and uint8 arrays (H, W), (H, W, 3) or (H, W, 4) are converted to RGB and, if their size is not the
    output's, resized with Lanczos as diffusers' control image processor does. Float arrays (H, W, 3) and
    tensors (3, H, W) or (1, 3, H, W) are taken as values in [0, 1] and must have the output's size already
    (a resize would have to guess their range): others are refused. The one value outside [0, 1] they may hold is
    exactly -1, with which the inpaint ControlNet (control_v11p_sd15_inpaint) marks masked pixels
    (`sd15.control_preprocess.inpaint_condition`); other negative values, like the [-1, 1] of img2img's input, are refused.
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"a uint8 control image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        rgb = control_rgb(image)
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.LANCZOS)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"a control image array must be (H, W, 3), got shape {image.shape}")
        if image.dtype.kind not in "fb":
            raise ValueError(f"a control image array must be uint8 (0 to 255) or floats in [0, 1], got {image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"a control image must be a PIL image, an array or a tensor, got {type(image).__name__}"
                         " (open files with PIL.Image.open)")  # fmt: skip
    if not (image.is_floating_point() or image.dtype == torch.bool):
        raise ValueError(f"a control image tensor must hold floats in [0, 1], got {image.dtype}"
                         + (" (divide it by 255)" if image.dtype == torch.uint8 else ""))  # fmt: skip
    t = image.detach().float().cpu()
    t = t[None] if t.ndim == 3 else t
    if t.ndim != 4 or t.shape[:2] != (1, 3):
        raise ValueError(f"a control image tensor must be (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
    if tuple(t.shape[-2:]) != (height, width):
        raise ValueError(f"the control image is {t.shape[-1]}×{t.shape[-2]} but the output is {width}×{height}; "
                         "resize it, or pass it as a PIL image (resized with Lanczos)")  # fmt: skip
    if not torch.isfinite(t).all():
        raise ValueError("the control image holds NaN or infinite values")
    if (((t < 0) | (t > 1)) & (t != -1)).any():  # -1: a masked pixel of the inpaint ControlNet's control image
        raise ValueError("a control image given as floats must hold values in [0, 1] (ControlNets read [0, 1], "
                         "not the [-1, 1] of img2img's input), or exactly -1 where the inpaint ControlNet "
                         "(control_v11p_sd15_inpaint) is to see masked pixels (sd15.control_preprocess.inpaint_condition)")  # fmt: skip
    return t


def _per_net(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what}: give one value, or one per ControlNet ({n}), got {len(values)}")
    return values


def prepare_controls(m, controlnet, image, scale, start, end, width: int, height: int, guess_mode=False) -> list[Control]:
    """The pipeline's ControlNet arguments (one of each, or lists with one per ControlNet) as checked Controls."""
    if not isinstance(guess_mode, bool):  # "no" would be true
        raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
    if controlnet is None and guess_mode:
        raise ValueError("guess_mode=True given without a ControlNet: pass controlnet=… (sd15.load_controlnet), or leave it out")
    if controlnet is None:
        given = [name for name, value, default in (("a control image", image, None), ("controlnet_conditioning_scale", scale, 1.0),
                                                   ("control_guidance_start", start, 0.0), ("control_guidance_end", end, 1.0))
                 if not (value is default or (isinstance(value, (int, float)) and value == default))]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} given without a ControlNet: pass controlnet=… (sd15.load_controlnet), or leave them out")
        return []
    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not nets:
        raise ValueError("controlnet is an empty list: give a ControlNet, a list of them, or None")
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not nets or len(images) != len(nets) or any(i is None for i in images):
        raise ValueError(f"give one control image per ControlNet: {len(nets)} ControlNets, "
                         f"{sum(i is not None for i in images)} images")  # fmt: skip
    controls = []
    scales, starts, ends = (_per_net(v, len(nets), w) for v, w in ((scale, "controlnet_conditioning_scale"),
                                                                    (start, "control_guidance_start"), (end, "control_guidance_end")))  # fmt: skip
    for net, img, s, a, b in zip(nets, images, scales, starts, ends):
        if not isinstance(net, ControlNet):
            raise ValueError(f"controlnet must be a ControlNet (sd15.controlnet.load_controlnet), got {type(net).__name__}")
        _check_fits(net, m)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in (s, a, b)):
            raise ValueError(f"a ControlNet's scale, start and end must be finite numbers (floats), got {s!r}, {a!r}, {b!r}")
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"control guidance start and end must satisfy 0 <= start < end <= 1, got {a} and {b}")
        param = next(net.parameters())
        controls.append(Control(net, control_image(img, width, height).to(param.device, param.dtype), float(s), float(a), float(b)))
    return controls


def _check_fits(net: ControlNet, m) -> None:
    """The ControlNet's encoder must be the base UNet's (same widths, levels, attention, context)."""
    names = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "transformer_depth", "context_dim")
    ours, theirs = net.config, m.unet.config
    differ = [f"{n} {getattr(ours, n)} (model: {getattr(theirs, n)})" for n in names if getattr(ours, n) != getattr(theirs, n)]
    if differ:
        raise ValueError(f"the ControlNet {printable(net.name)} does not fit this model's UNet: {', '.join(differ)}")
    if next(net.parameters()).device != m.device:
        raise ValueError(f"the ControlNet is on {next(net.parameters()).device} but the model on {m.device}; "
                         "load it with device=m.device")  # fmt: skip


def residuals(controls: list[Control], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, part: str,
              step: int, steps: int, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor] | None:  # fmt: skip
    """The summed residuals of the ControlNets active at sampler evaluation `step` of `steps` (PLMS: its steps
    and one more), for one UNet call on x (B', 4, h, w), or None.

    `part` is what the call holds: "both" (classifier-free guidance's [uncond; cond]), "cond" or "uncond"
    (a branch on its own). Each ControlNet runs on every branch, with that branch's text, as diffusers'
    StableDiffusionControlNetPipeline does; in `guess_mode` on the conditional branch alone, the
    unconditional one getting no residual.
    """
    if guess_mode and part == "uncond":
        return None
    total = None
    for c in controls:
        if not c.active(step, steps):
            continue
        dtype = next(c.net.parameters()).dtype
        xs, ts, ctx = x.to(dtype), t, context.to(dtype)
        if guess_mode and part == "both":
            half = x.shape[0] // 2
            xs, ts, ctx = xs[half:], t[half:], ctx[half:]
        down, mid = c.net(xs, c.hint.expand(xs.shape[0], -1, -1, -1), ts, ctx, c.scale, guess_mode=guess_mode)
        if guess_mode and part == "both":
            down, mid = [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
        total = (down, mid) if total is None else ([a + b for a, b in zip(total[0], down)], total[1] + mid)
    return total


def settings_record(controls: list[Control], guess_mode: bool = False) -> list[dict]:
    """What the PNG's parameters record of each ControlNet (sd15.pnginfo writes it as the web UI's extension does);
    "guess_mode" only when it is on, so that records (and sd15 batch's ids made from them) are otherwise unchanged."""
    guess = {"guess_mode": True} if guess_mode else {}
    return [dict(model=c.net.name, hash=c.net.hash, weight=c.scale, guidance_start=c.start, guidance_end=c.end, **guess)
            for c in controls]  # fmt: skip

