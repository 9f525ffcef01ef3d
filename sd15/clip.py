"""The CLIP ViT-L/14 text transformer that turns a prompt's token ids into the UNet's context.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision": a
GPT-2-style pre-norm transformer with a causal mask and quick-GELU. SD1.x uses the last hidden state
after `final_layer_norm` (not the pooled, projected embedding CLIP itself is trained on). Module names
follow the checkpoint's `cond_stage_model.transformer.text_model.*` keys (the HuggingFace layout that
CompVis' `FrozenCLIPEmbedder` wrapped).

    ids (B, 77) -> token_embedding + position_embedding -> (B, 77, 768)
    12 × [x + attn(LN1(x)) ; x + mlp(LN2(x))], causal 12-head attention, MLP 768 -> 3072 -> 768
    final_layer_norm -> (B, 77, 768)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import attention


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14's text tower, under the names of the `config.json` that ships with it."""

    vocab_size: int = 49408
    hidden_size: int = 768  # width D
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # cannot be read off tensor shapes; 12 in ViT-L/14
    max_position_embeddings: int = 77  # T
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "CLIPTextConfig":
        """Infer the configuration of a `text_model.`-relative state dict from its tensor shapes."""
        vocab, width = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        if positions != cls.max_position_embeddings:  # the tokenizer always gives 77 tokens
            raise ValueError(f"the text encoder's position embedding has {positions} positions, SD1.x's CLIP has "
                             f"{cls.max_position_embeddings}; the file is corrupt or not an SD1.x checkpoint")  # fmt: skip
        return cls(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")),
            max_position_embeddings=positions,
        )


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · σ(1.702 x): the sigmoid approximation of GELU that CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        # Stored in the checkpoint; the loader rebuilds it as arange(T) whatever the file holds.
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings)[None], persistent=True)

    def forward(self, ids: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> (B, T, D). Ids from vocab_size up pick rows of `extra_tokens` (N, D) instead of the
        table: the textual-inversion vectors of sd15.embeddings, which leave the table itself untouched."""
        T = ids.shape[1]
        vocab = self.token_embedding.num_embeddings
        if extra_tokens is None:
            tokens = self.token_embedding(ids)
        else:
            tokens = self.token_embedding(ids.clamp(max=vocab - 1))  # (B, T, D)
            extra = ids >= vocab
            tokens[extra] = extra_tokens[ids[extra] - vocab].to(tokens.dtype)
        return tokens + self.position_embedding(self.position_ids[:, :T])  # (B, T, D)


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        D = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)
        self.probs_hook = None  # set by sd15.hooks to see or edit the attention probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, D)
        hook = self.probs_hook if self.probs_hook is not None and self.probs_hook.wanted() else None
        return self.out_proj(attention(q, k, v, self.heads, causal=True, probs_hook=hook))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """x = x + attn(LN(x)); x = x + mlp(LN(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> hidden state (B, T, D) after `final_layer_norm`.

    `clip_skip=1` (the default) uses the last layer, as SD1.x was trained; `clip_skip=2` uses the
    penultimate layer's output, still passed through `final_layer_norm` (the convention of the tools
    that introduced "CLIP skip").
    """

    def __init__(self, config: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(
        self, ids: torch.Tensor, num_layers: int | None = None, extra_tokens: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The embeddings and the output of each of the first `num_layers` layers (all by default),
        before `final_layer_norm`: a list of 1 + num_layers tensors (B, T, D)."""
        h = self.embeddings(ids, extra_tokens)
        states = [h]
        for layer in self.encoder.layers[:num_layers]:
            h = layer(h)
            states.append(h)
        return states

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        layers = self.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be between 1 and {layers}, got {clip_skip}")
        h = self.hidden_states(ids, num_layers=layers - (clip_skip - 1), extra_tokens=extra_tokens)[-1]
        return self.final_layer_norm(h)  # (B, T, D)
