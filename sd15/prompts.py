"""Prompts as the AUTOMATIC1111 web UI reads them: emphasis, BREAK, 75-token chunks, `<lora:…>` tags.

    "a (red:1.3) car, [blurry] BREAK night <lora:film:0.8>"
      extract tags    -> "a (red:1.3) car, [blurry] BREAK night "           + LoraTag("film", 0.8, 0.8)
      parse emphasis  -> [("a ", 1), ("red", 1.3), (" car, ", 1), ("blurry", 1/1.1), BREAK, ("night ", 1)]
      tokenize pieces -> chunks of 75 tokens (a new one at BREAK), each as BOS + 75 + EOS with a weight per token
      encode          -> each chunk through CLIP on its own, z · weight per token, mean restored, chunks
                         concatenated: context (B, 77·k, D)

Emphasis: `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3;
groups nest and multiply; `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters; a bracket left open runs to
the end of the prompt; a closing bracket with no opening one is text. The weights are applied the way that UI
does ("Original" emphasis, `modules/sd_emphasis.py`): the text encoder's output z (T, D) is multiplied by each
token's weight, then rescaled so that its mean is the unweighted mean. With every weight 1 nothing is done, so
a prompt without emphasis gives exactly the conditioning it would without this module.

Chunks (`modules/sd_hijack_clip.py`): when a chunk is full and a comma came within its last 20 tokens, the
tokens after that comma move to the next chunk; a textual-inversion embedding is never split across chunks.

Lengths, as the web UI makes them agree (`encode_schedule`, `stack_contexts`, `pad_pair`):
- the texts one prompt takes over the steps (prompt editing `[a:b:0.5]`, alternation `[a|b]`: sd15.prompt_schedule)
  are encoded as one batch: the shorter padded with empty chunks, emphasis's mean restored over all of them;
- prompts of a batch of images are padded to the longest by repeating their last vector;
- the prompt and the negative prompt keep their own lengths (the UNet is then called once for each); with
  `pad_conds` the shorter is padded with the encoding of "" instead, the web UI's "Pad prompt/negative prompt".
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .embeddings import EmbeddingSet
    from .model import StableDiffusion
    from .tokenizer import CLIPTokenizer

ROUND_MULTIPLIER = 1.1  # (x)
SQUARE_MULTIPLIER = 1 / 1.1  # [x]
CHUNK_LENGTH = 75  # content tokens per chunk; with BOS and EOS, T = 77
COMMA_BACKTRACK = 20  # the web UI's default for "prompt word wrap length limit"
BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # how parse_emphasis marks a BREAK (the web UI's convention)

# One match per syntactic element, tried in this order.
_EMPHASIS_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                  # an escaped bracket or backslash: the character itself
    | \\                            # a lone backslash: dropped
    | [(\[]                         # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)        # ":1.3)": closes a round bracket with an explicit weight
    | [)\]]                         # closing bracket
    | [^\\()\[\]:]+                 # plain text
    | :                             # a colon that is not a weight
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # <lora:name:0.8>, <hypernet:name:1>, …


# --------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class LoraTag:
    """`<lora:name>`, `<lora:name:w>` (text encoder and UNet at w) or `<lora:name:w_te:w_unet>`;
    `te=` and `unet=` may also be given by name: `<lora:name:unet=0.5>`."""

    name: str
    te_scale: float = 1.0
    unet_scale: float = 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """Remove every `<kind:arg:arg…>` tag from the prompt: (text without the tags, [(kind, args)])."""
    found: list[tuple[str, list[str]]] = []

    def take(match: re.Match) -> str:
        found.append((match[1], match[2].split(":")))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def _scale(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag} in the prompt: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{tag} in the prompt: the scale must be finite, got {text!r}")
    return value


def lora_tags(prompt: str) -> list[LoraTag]:
    """The `<lora:…>` tags of a prompt, in order. A scale that is not a number is a ValueError."""
    tags = []
    for kind, args in extract_extra_networks(prompt)[1]:
        if kind != "lora":
            continue
        tag = f"<lora:{':'.join(args)}>"
        positional = [a for a in args[1:] if "=" not in a]
        named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        te = _scale(named.get("te", positional[0] if positional else "1"), tag)
        unet = _scale(named.get("unet", positional[1] if len(positional) > 1 else str(te)), tag)
        tags.append(LoraTag(args[0].strip(), te, unet))
    return tags


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Text -> [(piece, weight)], adjacent pieces of equal weight merged; BREAK is (BREAK, BREAK_WEIGHT).

    As in the web UI, the BREAK marker is scaled by the brackets around it like any piece: inside `(…)` or `[…]`
    (an unclosed one too) its weight is no longer BREAK_WEIGHT and the word is text, not a break.
    Never raises: anything that is not valid emphasis syntax is taken as text. Examples from the web UI:
    "an (important) word" -> [("an ", 1.0), ("important", 1.1), (" word", 1.0)];
    "(unbalanced" -> [("unbalanced", 1.1)]; "\\(literal\\]" -> [("(literal]", 1.0)].
    """
    pieces: list[list] = []  # [text, weight]; a BREAK is [BREAK, BREAK_WEIGHT]
    round_open: list[int] = []  # where each open bracket's span starts in `pieces`
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(s: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(s)):
            if i:
                pieces.append([BREAK, BREAK_WEIGHT])
            pieces.append([part, 1.0])

    for m in _EMPHASIS_TOKEN.finditer(text):
        token, weight = m[0], m[1]
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([":
            (round_open if token == "(" else square_open).append(len(pieces))
        elif weight is not None:
            try:
                value = float(weight)
            except ValueError:
                value = math.nan
            if round_open and math.isfinite(value):
                scale_from(round_open.pop(), value)
            elif round_open:  # "(a:1.2.3)": the weight is text, the bracket an ordinary one
                add_text(token[:-1])
                scale_from(round_open.pop(), ROUND_MULTIPLIER)
            else:
                add_text(token)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(token)
    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, w) for t, w in merged]


# --------------------------------------------------------------------------------------------------
# Tokens and chunks


@dataclass
class PromptChunk:
    """One pass of the text encoder: 77 token ids (BOS, 75, EOS) and a weight for each."""

    ids: list[int]
    weights: list[float]


@dataclass
class TokenizedPrompt:
    chunks: list[PromptChunk]
    num_tokens: int  # content tokens (embedding vectors counted one each), padding excluded
    embeddings: list[str] = field(default_factory=list)  # textual-inversion names used, in order of use


def empty_chunk(tokenizer: "CLIPTokenizer") -> PromptChunk:
    """The chunk of the empty prompt: BOS then EOS padding, all weights 1."""
    return PromptChunk([tokenizer.BOS] + [tokenizer.EOS] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def tokenize_prompt(
    tokenizer: "CLIPTokenizer",
    prompt: str,
    embeddings: "EmbeddingSet | None" = None,
    first_extra_id: int = 49408,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> TokenizedPrompt:
    """A prompt -> chunks of token ids and weights (web UI `tokenize_line`).

    `<…>` tags are dropped; each emphasis piece is tokenized on its own; a textual-inversion trigger word
    (its token ids, found by `embeddings.match`) becomes its vectors' ids, numbered from `first_extra_id`
    (the text encoder's vocabulary size) up.
    """
    text, _ = extract_extra_networks(prompt)
    comma = tokenizer.tokenize(",")[0]  # ",</w>"
    chunks: list[PromptChunk] = []
    used: list[str] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    num_tokens = 0

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK_LENGTH - len(ids)
        chunks.append(PromptChunk(
            [tokenizer.BOS] + ids + [tokenizer.EOS] * (pad + 1), [1.0] + weights + [1.0] * (pad + 1)
        ))  # fmt: skip
        ids, weights, last_comma = [], [], -1

    for piece, weight in parse_emphasis(text):
        if weight == BREAK_WEIGHT and piece == BREAK:
            close_chunk()
            continue
        tokens = tokenizer.tokenize(piece)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == CHUNK_LENGTH and last_comma != -1 and len(ids) - last_comma <= comma_backtrack:
                # a full chunk with a comma near its end: what follows the comma moves to the next chunk
                moved_ids, moved_weights = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_LENGTH:
                close_chunk()
            found = embeddings.match(tokens, pos) if embeddings else None
            if found is None:
                ids.append(token)
                weights.append(weight)
                num_tokens += 1
                pos += 1
                continue
            emb, trigger_length = found
            vector_ids = [first_extra_id + i for i in embeddings.vector_ids(emb.name)]
            if len(ids) + len(vector_ids) > CHUNK_LENGTH:
                close_chunk()
            ids += vector_ids
            weights += [weight] * len(vector_ids)
            num_tokens += len(vector_ids)
            used += [emb.name] if emb.name not in used else []
            pos += trigger_length
    if ids or not chunks:
        close_chunk()
    return TokenizedPrompt(chunks, num_tokens, used)


# --------------------------------------------------------------------------------------------------
# Encoding


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """z (B, T, D) · weights (B, T), rescaled so that the mean is the unweighted mean: each row's own mean, or
    with `counts` the mean over the whole batch, row i counted counts[i] times, as the web UI takes it over the
    texts it encodes together (some of them more than once)."""
    weighted = z.float() * weights[..., None].float()  # (B, T, D)
    if counts is None or z.shape[0] == 1:  # per row (one row: the same mean, taken the same way)
        return (weighted * (z.float().mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))).to(z.dtype)
    n = torch.tensor(counts, dtype=torch.float32, device=z.device)[:, None, None]  # (B, 1, 1)

    def mean(x: torch.Tensor) -> torch.Tensor:  # over the batch with its rows repeated n times: (1, 1, 1)
        return (x.mean(dim=(1, 2), keepdim=True) * n).sum(dim=0, keepdim=True) / n.sum()

    return (weighted * (mean(z.float()) / mean(weighted))).to(z.dtype)


def encode_tokenized(m: "StableDiffusion", prompts: list[TokenizedPrompt], clip_skip: int = 1, num_chunks: int = 1,
                     counts: list[int] | None = None) -> torch.Tensor:  # fmt: skip
    """Tokenized prompts -> context (B, 77·k, D), k = max(num_chunks, the longest prompt's chunks).

    Chunk i of every prompt goes through the text encoder as one batch (B, 77); shorter prompts are padded
    with the empty prompt's chunk. Emphasis is normalised per prompt, or with `counts` over the batch (prompt i
    counted counts[i] times).
    """
    k = max([num_chunks] + [len(p.chunks) for p in prompts])
    empty = empty_chunk(m.tokenizer)
    extra = m.embeddings.vectors if len(m.embeddings) else None
    if extra is not None:
        extra = extra.to(m.device, m.dtype)
    parts = []
    for i in range(k):
        batch = [p.chunks[i] if i < len(p.chunks) else empty for p in prompts]
        ids = torch.tensor([c.ids for c in batch], device=m.device)  # (B, 77)
        z = m.text_encoder(ids, clip_skip=clip_skip, extra_tokens=extra)  # (B, 77, D)
        if any(w != 1 for c in batch for w in c.weights):  # decided on the host: no read back from the device
            z = apply_emphasis(z, torch.tensor([c.weights for c in batch], device=m.device), counts)  # weights (B, 77)
        parts.append(z)
    return torch.cat(parts, dim=1)  # (B, 77·k, D)


def tokenize_prompts(m: "StableDiffusion", prompts: list[str]) -> list[TokenizedPrompt]:
    vocab = m.text_encoder.config.vocab_size
    return [tokenize_prompt(m.tokenizer, p, m.embeddings, vocab) for p in prompts]


def encode_prompts(m: "StableDiffusion", prompts: list[str], clip_skip: int = 1, num_chunks: int = 1) -> torch.Tensor:
    """Prompts -> context (B, 77·k, D) on the model's device and dtype: each prompt's own emphasis, the
    shorter padded with empty chunks (k chunks; see the module docstring)."""
    _warn_unsupported_tags(prompts)
    return encode_tokenized(m, tokenize_prompts(m, prompts), clip_skip, num_chunks)


def encode_schedule(m: "StableDiffusion", texts: list[str], clip_skip: int = 1, counts: list[int] | None = None) -> torch.Tensor:
    """The texts one prompt takes over the steps (its prompt-editing stretches) -> (S, 77·k, D), encoded as
    one batch as the web UI's get_learned_conditioning does: as many chunks each (the shorter padded with
    empty chunks), and emphasis's mean restored over all S texts together, text i counted `counts[i]` times
    (sd15.prompt_schedule.encoding_counts: the web UI encodes some texts more than once). For one text,
    encode_prompts'."""
    _warn_unsupported_tags(texts)
    return encode_tokenized(m, tokenize_prompts(m, texts), clip_skip, counts=counts or [1] * len(texts))


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """One context (T_i, D) per image -> (B, T, D), T the longest: a shorter one is padded by repeating its
    last vector (the web UI's `stack_conds`, for a batch of prompts of different lengths)."""
    length = max(c.shape[0] for c in contexts)
    return torch.stack([torch.cat([c, c[-1:].expand(length - c.shape[0], -1)]) for c in contexts])


def pad_pair(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cond (B, 77·a, D) and uncond (B, 77·b, D) -> both 77·max(a, b) tokens long, the shorter padded with
    copies of `empty` (1, 77, D), the encoding of "" (the web UI's "Pad prompt/negative prompt" option)."""

    def padded(x: torch.Tensor, length: int) -> torch.Tensor:
        repeats = (length - x.shape[1]) // empty.shape[1]
        return torch.cat([x, empty.to(x).expand(x.shape[0], -1, -1).repeat(1, repeats, 1)], dim=1) if repeats else x

    length = max(cond.shape[1], uncond.shape[1])
    return padded(cond, length), padded(uncond, length)


def _warn_unsupported_tags(prompts: list[str]) -> None:
    kinds = sorted({kind for p in prompts for kind, _ in extract_extra_networks(p)[1] if kind != "lora"})
    if kinds:
        warnings.warn(f"sd15 has no {', '.join(kinds)} networks; their <…> tags were removed from the prompt", stacklevel=3)


def adapter_hashes(m: "StableDiffusion", prompt: str, negative_prompt: str) -> dict[str, dict[str, str]]:
    """What the PNG records of one image's adapters, as GenerationSettings fields: `ti_hashes` (embeddings
    whose trigger words the prompts use) and `lora_hashes` (LoRAs loaded on the model or named in the prompt)."""
    from .lora import lora_hashes

    used = [name for p in (prompt, negative_prompt) for name in tokenize_prompts(m, [p])[0].embeddings]
    ti = {name: m.embeddings[name].hash for name in dict.fromkeys(used) if m.embeddings[name].hash}
    return {"ti_hashes": ti, "lora_hashes": lora_hashes(m, prompt)}
