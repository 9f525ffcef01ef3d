"""The safety checker the Stable Diffusion v1.5 model card describes, and how sd15 uses it.

SD1.x was released with an image classifier that blanks images close to a list of NSFW concepts (diffusers'
`StableDiffusionSafetyChecker`, CompVis' `scripts/txt2img.py`). It is CLIP ViT-L/14's image tower
(sd15.clip_vision), its projection into CLIP's joint 768-wide space, and two sets of concept embeddings whose
texts were not published, each with a threshold:

    e = visual_projection(pooled(vision_model(clip_preprocess(image))))          (B, 768)
    cos_c = cos(e, concept_embeds) (B, 17);   cos_s = cos(e, special_care_embeds) (B, 3)
    special scores, in order j = 0, 1, 2:  s_j = round3(cos_s[j] - special_care_embeds_weights[j] + a),
        where a starts at 0 and becomes 0.01 once some s_j > 0 (it then applies to the later ones too)
    concept scores:  c_k = round3(cos_c[k] - concept_embeds_weights[k] + a)
    flagged = any(c_k > 0)

(the rounding to 3 decimals and the order of the special-care loop are the reference's, kept so that the flags
agree exactly). A flagged image is replaced by a black one.

Weights: diffusers' `safety_checker/` folder (config.json + model.safetensors or pytorch_model.bin) or a single
such file. Older files nest the tower one level deeper (`vision_model.vision_model.…`); both load.
`find_safety_checker` is where the command line looks for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_state_dict, open_checkpoint
from .clip_vision import CLIPVisionConfig, CLIPVisionModel, clip_preprocess

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_LOCATIONS = ("weights/safety_checker", "weights/safety_checker.safetensors")
ENV_VAR = "SD15_SAFETY_CHECKER"


class SafetyChecker(nn.Module):
    """Images -> NSFW flags. See the module docstring for the computation."""

    def __init__(self, config: CLIPVisionConfig = CLIPVisionConfig(), projection_dim: int = 768,
                 num_concepts: int = 17, num_special: int = 3):  # fmt: skip
        super().__init__()
        self.vision_model = CLIPVisionModel(config)
        self.visual_projection = nn.Linear(config.hidden_size, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.zeros(num_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.zeros(num_special, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.zeros(num_concepts), requires_grad=False)  # thresholds
        self.special_care_embeds_weights = nn.Parameter(torch.zeros(num_special), requires_grad=False)

    @torch.no_grad()
    def scores(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-preprocessed pixels (B, 3, 224, 224) -> (concept scores (B, 17), special-care scores (B, 3)),
        in float32, before rounding; an image is flagged when a concept score rounds to more than 0."""
        p = next(self.parameters())
        _, pooled = self.vision_model(pixels.to(p.device, p.dtype))
        e = F.normalize(self.visual_projection(pooled).float(), dim=-1)  # (B, P)
        cos_c = e @ F.normalize(self.concept_embeds.float(), dim=-1).T  # (B, 17)
        cos_s = e @ F.normalize(self.special_care_embeds.float(), dim=-1).T  # (B, 3)
        adjustment = torch.zeros(e.shape[0], device=e.device)
        special = torch.empty_like(cos_s)
        for j in range(cos_s.shape[1]):  # in order: a special-care hit raises the later scores too
            special[:, j] = cos_s[:, j] - self.special_care_embeds_weights[j].float() + adjustment
            adjustment = torch.where(_round3(special[:, j]) > 0, torch.full_like(adjustment, 0.01), adjustment)
        concept = cos_c - self.concept_embeds_weights.float() + adjustment[:, None]
        return concept.cpu(), special.cpu()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> flags (B,) bool, True where an image is to be blanked."""
        concept, _ = self.scores(clip_preprocess(images))
        return (_round3(concept) > 0).any(dim=1)


def _round3(x: torch.Tensor) -> torch.Tensor:
    """Round to 3 decimals (half to even), as the reference's round(score, 3) on float32 values."""
    return torch.round(x * 1000) / 1000


def censor(checker: SafetyChecker | None, images: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
    """Images (B, 3, H, W) in [-1, 1] -> (the images with flagged ones black, the flags); (images, None)
    when there is no checker."""
    if checker is None:
        return images, None
    flags = checker(images)
    if flags.any():
        images = images.clone()
        images[flags.to(images.device)] = -1.0  # black
    return images, flags.tolist()


# --------------------------------------------------------------------------- loading


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no safety checker weights (expected one of {', '.join(WEIGHT_NAMES)})")
    if not path.is_file():
        raise CheckpointError(f"no safety checker weights at {path}")
    return path


def load_safety_checker(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> SafetyChecker:
    """Load diffusers' `safety_checker` weights: a folder (config.json + model.safetensors/pytorch_model.bin)
    or one such file (a config.json beside it is read if present). Strict: every tensor must be used."""
    path = Path(path)
    file = _weights_file(path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    overrides = CLIPVisionConfig.from_json(config_file) if config_file.is_file() else {}
    ckpt = open_checkpoint(file)
    keys = {}
    for key in ckpt.keys():
        ours = key.replace("vision_model.vision_model.", "vision_model.", 1)  # older files nest the tower
        if ours.endswith("position_ids"):
            continue  # a buffer of arange(T), rebuilt here
        keys[ours] = key
    tower = {k.removeprefix("vision_model."): torch.empty(ckpt.shape(fk), device="meta")
             for k, fk in keys.items() if k.startswith("vision_model.")}  # fmt: skip
    if "embeddings.patch_embedding.weight" not in tower or "visual_projection.weight" not in keys:
        raise CheckpointError(f"{file} is not a safety checker (no CLIP vision tower and visual_projection)")
    config = CLIPVisionConfig.from_state_dict(tower, **overrides)
    projection_dim = ckpt.shape(keys["visual_projection.weight"])[0]
    n_concepts, n_special = (ckpt.shape(keys[k])[0] if k in keys else 0 for k in ("concept_embeds", "special_care_embeds"))
    with torch.device("meta"):
        checker = SafetyChecker(config, projection_dim, n_concepts, n_special)
    expected = {k: tuple(v.shape) for k, v in checker.state_dict().items()}
    check_state_dict("safety checker", expected, {k: ckpt.shape(fk) for k, fk in keys.items()})
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or torch.float32
    state = {k: ckpt.get(fk).to(device=device, dtype=dtype) for k, fk in keys.items()}
    checker.load_state_dict(state, strict=True, assign=True)
    return checker.eval().requires_grad_(False)


def find_safety_checker(explicit: str | os.PathLike | None = None) -> Path | None:
    """Where the command line finds the weights: `explicit` (--safety-checker), then $SD15_SAFETY_CHECKER,
    then weights/safety_checker/ or weights/safety_checker.safetensors; None when there are none."""
    for value in (explicit, os.environ.get(ENV_VAR)):
        if value:
            path = Path(value)
            if not path.exists():
                raise CheckpointError(f"no safety checker weights at {path}")
            return path
    for location in DEFAULT_LOCATIONS:
        path = Path(location)
        if path.is_file() or (path.is_dir() and any((path / n).is_file() for n in WEIGHT_NAMES)):
            return path
    return None
