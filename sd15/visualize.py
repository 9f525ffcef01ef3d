"""Pictures of what happened inside a run: cross-attention heatmaps per prompt token, and the trajectory of
the predicted clean image over the sampler's steps. Both read a `sd15.hooks.Trace`.

Cross-attention (`attn2`) probabilities say, for every latent pixel of a SpatialTransformer, how much it
attends to each of the 77 prompt tokens. Averaged over heads, layers (16×16 … 64×64 at 512², each upsampled
to the image) and steps, the column of one token is a heatmap of where that word is drawn (Hertz et al.
2022, "Prompt-to-Prompt", figure 4).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CROSS_ATTENTION = "unet.*.attn2.probs"
HEATMAP_REDUCE = {CROSS_ATTENTION: "cond+mean_heads"}  # what the heatmaps need from a trace: (B, HW, T)


def _grid_of(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of the feature map with `tokens` pixels: a UNet level of a latent of size latent_hw, else (a
    pass at another size: the first pass of a hires fix) the h × w = tokens closest to latent_hw's shape."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    pairs = [p for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0 for p in ((d, tokens // d), (tokens // d, d))]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(latent_hw[0] / latent_hw[1])))


def token_heatmaps(trace, latent_hw: tuple[int, int], image_hw: tuple[int, int], image: int = 0) -> torch.Tensor:
    """Mean cross-attention of image `image` over heads, layers and steps: (T, H, W) for the T = 77·k tokens.

    With prompt editing the context may be longer at some steps than at others (k chunks of 77 tokens each);
    each position is averaged over the steps whose context has it.
    """
    total, count = None, None  # (T, H, W) sums and (T,) numbers of maps, T the longest context so far
    for name in trace.names():
        if not re.fullmatch(r"unet\..*\.attn2\.probs", name):
            continue
        for record in trace.records[name]:
            if record.value is None or record.image > image:
                continue
            probs = record.value.float()
            if probs.ndim == 4:  # (B, h, HW, T) when the trace kept the heads
                probs = probs.mean(1)
            row = image - record.image
            if row >= probs.shape[0]:
                continue
            gh, gw = _grid_of(probs.shape[1], latent_hw)
            maps = probs[row].T.reshape(1, -1, gh, gw)  # (1, T, h_l, w_l)
            maps = F.interpolate(maps, size=image_hw, mode="bilinear", align_corners=False)[0]  # (T, H, W)
            if total is None:
                total, count = torch.zeros_like(maps), torch.zeros(maps.shape[0])
            if maps.shape[0] > total.shape[0]:  # a longer context than so far: more positions
                grow = maps.shape[0] - total.shape[0]
                total, count = F.pad(total, (0, 0, 0, 0, 0, grow)), F.pad(count, (0, grow))
            total[: maps.shape[0]] += maps
            count[: maps.shape[0]] += 1
    if total is None:
        raise ValueError(f"the trace holds no cross-attention probabilities; capture {CROSS_ATTENTION!r}")
    return total / count.to(total.device)[:, None, None]


def colorize(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB uint8 (H, W, 3) on a dark-blue → red → yellow ramp."""
    stops = np.array([[0, 0, 64], [0, 64, 255], [0, 220, 200], [255, 220, 0], [255, 32, 0]], dtype=np.float64)
    position = np.clip(heat, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return ((1 - frac) * stops[low] + frac * stops[low + 1]).round().astype(np.uint8)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The heatmap (H, W), normalised to [0, 1], blended over the image."""
    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min()).clamp(min=1e-12)
    colored = Image.fromarray(colorize(h.cpu().numpy()))
    return Image.blend(image.convert("RGB"), colored, alpha)


def prompt_token_labels(m, prompt: str, steps: int | None = None) -> list[tuple[int, str]]:
    """(position in the conditioning, word) for every content token of `prompt` as the model saw it:
    emphasis brackets and `<lora:…>` tags removed, 77-token chunks concatenated (position 77·k + j),
    textual-inversion vectors labelled by their trigger name. With prompt editing or alternation
    (sd15.prompt_schedule) the words of every text of a `steps`-step run are labelled, a position whose word
    changes as "cat/dog"; without `steps`, every text a run of up to 1000 steps could use."""
    from .prompt_schedule import schedule
    from .prompts import tokenize_prompts

    vocab = m.text_encoder.config.vocab_size
    words: dict[int, list[str]] = {}  # position -> its words, in the order the run meets them
    for _, text in schedule(prompt, steps or 1000):
        for k, chunk in enumerate(tokenize_prompts(m, [text])[0].chunks):
            for j, token_id in enumerate(chunk.ids[1:-1], start=1):  # between <|startoftext|> and the last slot
                if token_id == m.tokenizer.EOS:
                    break
                if token_id < vocab:
                    word = m.tokenizer.decode([token_id])
                else:  # a textual-inversion vector: label it by its embedding's name
                    word = next(e.name for e in m.embeddings if token_id - vocab in m.embeddings.vector_ids(e.name))
                at = words.setdefault(k * len(chunk.ids) + j, [])
                if word not in at:
                    at.append(word)
    return [(position, "/".join(at)) for position, at in sorted(words.items())]


def save_attention_maps(folder, image: Image.Image, heatmaps: torch.Tensor, labels: list[tuple[int, str]]) -> list[Path]:
    """One overlay per labelled token position (see `prompt_token_labels`), named by position and word."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    digits = max(2, len(str(len(labels))))  # names sort in prompt order past 99 tokens too
    for n, (position, word) in enumerate(labels, start=1):
        safe = re.sub(r"[^\w-]+", "_", word.strip()) or "token"
        path = folder / f"{n:0{digits}d}-{safe}.png"
        overlay(image, heatmaps[position]).save(path)
        written.append(path)
    return written


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, in rows of `columns` (about square by default)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def decode_trajectory(m, trace, image: int = 0) -> list[Image.Image]:
    """The predicted clean image x0 after each step of image `image`, decoded by the VAE as the pipeline decodes
    its images (in tiles when they would not fit, fp16 overflow retried in fp32)."""
    from .images import to_pil
    from .pipeline import decode_latents
    from .vae import LATENT_SCALE

    frames = []
    for record in trace.records.get("step.denoised", ()):
        if record.value is None or not record.image <= image < record.image + record.value.shape[0]:
            continue
        z = record.value[image - record.image][None].to(m.device, m.dtype) / LATENT_SCALE
        with torch.no_grad():
            frames.extend(to_pil(decode_latents(m, z)))
    if not frames:
        raise ValueError(f"the trace holds no x0 estimates of image {image}; capture 'step.denoised'")
    return frames


def save_trajectory(frames: list[Image.Image], folder) -> tuple[Path, Path]:
    """`trajectory.png` (a grid, step order left to right, top to bottom) and `trajectory.gif` (an animation).
    Frames of another size (the first pass of a hires fix) are resized to the last one's."""
    size = frames[-1].size
    frames = [f if f.size == size else f.resize(size, Image.Resampling.BICUBIC) for f in frames]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sheet, anim = folder / "trajectory.png", folder / "trajectory.gif"
    grid(frames).save(sheet)
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return sheet, anim
