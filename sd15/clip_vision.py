"""The CLIP ViT-L/14 image tower: 224×224 pixels in, one pooled 1024-wide embedding out.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"; the vision
transformer of Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"). The safety checker SD1.x ships with
runs this tower; its module names follow the HuggingFace `CLIPVisionModel` that its weights were saved from
(`embeddings.patch_embedding`, `pre_layrnorm` — sic — `encoder.layers.N.self_attn.q_proj`, `post_layernorm`).

    pixels (B, 3, 224, 224), CLIP-normalised
      patch_embedding: 14×14 conv, stride 14, no bias -> (B, 1024, 16, 16) -> (B, 256, 1024) patches
      [class_embedding; patches] + position_embedding (257 positions) -> (B, 257, 1024)
      pre_layrnorm, then 24 × [x + attn(LN1(x)) ; x + mlp(LN2(x))], 16 heads, no mask, quick-GELU MLP 4096
      post_layernorm of the class token -> pooled (B, 1024)

The text tower in sd15.clip is the same transformer with a causal mask; the MLP is shared with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from .attention import attention
from .clip import CLIPMLP

# The normalisation CLIP's image preprocessing applies after scaling pixels to [0, 1] (per RGB channel).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """`vision_config` of a CLIP `config.json`; the defaults are ViT-L/14's."""

    hidden_size: int = 1024  # width D
    intermediate_size: int = 4096  # MLP width
    num_hidden_layers: int = 24
    num_attention_heads: int = 16  # cannot be read off tensor shapes
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides) -> "CLIPVisionConfig":
        """Infer the configuration from tensor shapes of a tower's state dict (keys relative to the tower);
        `overrides` (e.g. from config.json) supply what shapes do not tell: heads, LayerNorm eps."""
        width, channels, patch, _ = sd["embeddings.patch_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        values = dict(
            hidden_size=width,
            intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")),
            num_attention_heads=max(1, width // 64),  # ViT-B/L/H all use 64-wide heads
            image_size=round((positions - 1) ** 0.5) * patch,
            patch_size=patch,
            num_channels=channels,
        )
        known = {f.name for f in fields(cls)}
        values.update({k: v for k, v in overrides.items() if k in known})
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> dict:
        """The vision settings of a CLIP (or safety checker) config.json, as overrides for from_state_dict."""
        config = json.loads(Path(path).read_text())
        vision = config.get("vision_config", config)
        if vision.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"{path}: hidden_act {vision['hidden_act']!r} is not supported (CLIP uses quick_gelu)")
        return {k: vision[k] for k in ("num_attention_heads", "layer_norm_eps") if k in vision}


class CLIPVisionEmbeddings(nn.Module):
    """Pixels (B, 3, S, S) -> [class token; one token per patch] + positions: (B, 1 + (S/p)², D)."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, T-1, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, T, D)


class CLIPVisionAttention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), with biased q/k/v/out projections."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        D = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPVisionEncoderLayer(nn.Module):
    """x = x + attn(LN(x)); x = x + mlp(LN(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPVisionAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)  # fc1 -> quick_gelu -> fc2, as in the text tower
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionEncoder(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPVisionEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPVisionModel(nn.Module):
    """Pixels (B, 3, S, S), CLIP-normalised -> (last hidden state (B, T, D), pooled (B, D))."""

    def __init__(self, config: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # the checkpoint's spelling
        self.encoder = CLIPVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pre_layrnorm(self.embeddings(pixels))  # (B, T, D)
        for layer in self.encoder.layers:
            h = layer(h)
        return h, self.post_layernorm(h[:, 0])  # pooled: the class token, normalised (B, D)


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> CLIP's input (B, 3, size, size), as CLIP's image processor makes it.

    Each image is rounded to 8-bit RGB (the PIL image a pipeline returns), its shorter side resized to `size`
    with PIL's bicubic filter, centre-cropped to size × size, scaled to [0, 1] and normalised by CLIP_MEAN
    and CLIP_STD.
    """
    import numpy as np
    from PIL import Image

    out = []
    for image in images:
        array = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(array)
        W, H = pil.size
        short, long = (W, H) if W <= H else (H, W)
        new_long = int(size * long / short)  # as transformers' get_resize_output_image_size: floor
        pil = pil.resize((size, new_long) if W <= H else (new_long, size), Image.BICUBIC)
        W, H = pil.size
        top, left = (H - size) // 2, (W - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, size, size)
        out.append((x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])
    return torch.stack(out)
