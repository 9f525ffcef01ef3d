"""The diffusers layout of an SD1.x model: how its keys map to the original checkpoint's, and its config files.

A diffusers folder holds the same tensors as an original single-file checkpoint, under other names:

    original file key                                    diffusers folder, file, key
    model.diffusion_model.input_blocks.1.0.in_layers.0.  unet/diffusion_pytorch_model.safetensors  down_blocks.0.resnets.0.norm1.
    first_stage_model.decoder.up.3.block.0.              vae/diffusion_pytorch_model.safetensors   decoder.up_blocks.0.resnets.0.
    cond_stage_model.transformer.text_model.             text_encoder/model.safetensors            text_model.

Rather than a table of every key, the mapping is a short list of module-prefix pairs generated from the
model's structure (number of levels, ResBlocks per level, which levels have attention) by the index rules
below, plus the renames of the few modules whose inner names differ. The same pairs are read in both
directions, so the two conversions cannot disagree; tests check that the round trip is exact.

Only one tensor changes shape: the VAE's mid-block attention projections are 1×1 convolutions in the
original ([C, C, 1, 1]) and linear layers in diffusers ([C, C]); the bytes are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checkpoint import CLIP_PREFIX_OLD, UNET_PREFIX, VAE_PREFIX, CheckpointError, printable

COMPONENTS = ("unet", "vae", "text_encoder")
# Text-encoder keys are taken relative to `cond_stage_model.transformer.`, so that both the usual
# `text_model.embeddings…` and the older `embeddings…` (no `text_model.`) fit.
ORIGINAL_PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX_OLD}
WEIGHTS_NAME = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

# Inner names of modules that differ between the layouts: {original: diffusers}.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers before 0.14 named the VAE attention's layers differently; accepted when reading.
VAE_ATTENTION_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class Structure:
    """What the key rules need to know of a UNet or VAE: its levels, blocks per level, attention levels."""

    levels: int  # resolutions (4 in SD1.x)
    layers: int  # ResBlocks per level on the way down (2 in SD1.x); the way up has one more
    attention: tuple[bool, ...] = ()  # per level, from the highest resolution: has a SpatialTransformer


def _indices(keys, pattern: str) -> list[int]:
    found = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def unet_structure_original(keys) -> Structure:
    """The UNet's structure from original-layout keys (relative to `model.diffusion_model.`)."""
    downsamples = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight$")
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    layers = downsamples[0] - 1 if downsamples else len(blocks) - 1
    levels = len(downsamples) + 1
    attention = tuple(any(k.startswith(f"input_blocks.{1 + lv * (layers + 1)}.1.") for k in keys) for lv in range(levels))
    return Structure(levels, layers, attention)


def unet_structure_diffusers(keys) -> Structure:
    """The UNet's structure from diffusers keys."""
    levels = len(_indices(keys, r"down_blocks\.(\d+)\."))
    layers = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    attention = tuple(any(k.startswith(f"down_blocks.{lv}.attentions.") for k in keys) for lv in range(levels))
    return Structure(levels, layers, attention)


def unet_pairs(s: Structure) -> list[tuple[str, str, dict | None]]:
    """(original prefix, diffusers prefix, inner renames or None when inner names agree) for a UNet.

    Index rules (L = s.layers): input block 1 + level·(L+1) + j is ResBlock j of down block `level`
    (its SpatialTransformer at `.1`), and block 1 + level·(L+1) + L its downsampler. Output block
    level'·(L+1) + j is ResBlock j of up block level', where up block 0 is the lowest resolution;
    its upsampler follows the ResBlock (`.1`), or the SpatialTransformer (`.2`) where there is one.
    """
    L = s.layers
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1.", None),
        ("time_embed.2.", "time_embedding.linear_2.", None),
        ("input_blocks.0.0.", "conv_in.", None),
        ("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
        ("middle_block.1.", "mid_block.attentions.0.", None),
        ("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET),
        ("out.0.", "conv_norm_out.", None),
        ("out.2.", "conv_out.", None),
    ]
    for level in range(s.levels):
        for j in range(L):
            i = 1 + level * (L + 1) + j
            pairs.append((f"input_blocks.{i}.0.", f"down_blocks.{level}.resnets.{j}.", UNET_RESNET))
            if s.attention[level]:
                pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{j}.", None))
        if level < s.levels - 1:
            pairs.append((f"input_blocks.{1 + level * (L + 1) + L}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", None))
    for up in range(s.levels):
        attention = s.attention[s.levels - 1 - up]
        for j in range(L + 1):
            i = up * (L + 1) + j
            pairs.append((f"output_blocks.{i}.0.", f"up_blocks.{up}.resnets.{j}.", UNET_RESNET))
            if attention:
                pairs.append((f"output_blocks.{i}.1.", f"up_blocks.{up}.attentions.{j}.", None))
        if up < s.levels - 1:
            pairs.append((f"output_blocks.{up * (L + 1) + L}.{1 + attention}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", None))
    return pairs


def vae_structure_original(keys) -> Structure:
    levels = len(_indices(keys, r"encoder\.down\.(\d+)\."))
    return Structure(levels, len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")))


def vae_structure_diffusers(keys) -> Structure:
    levels = len(_indices(keys, r"encoder\.down_blocks\.(\d+)\."))
    return Structure(levels, len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")))


def vae_pairs(s: Structure) -> list[tuple[str, str, dict | None]]:
    """Prefix pairs for the VAE. Encoder level i is `down_blocks.i`; decoder level i (`up.i`, indexed by
    resolution) is `up_blocks.{levels-1-i}`, since diffusers numbers the decoder in the order it runs.
    Encoder levels hold s.layers ResnetBlocks, decoder levels one more."""
    levels = s.levels
    pairs = [(p, p, None) for p in ("quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.", f"{part}.conv_in.", None),
            (f"{part}.conv_out.", f"{part}.conv_out.", None),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", None),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET),
        ]
    for i in range(levels):
        for j in range(s.layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET))
        for j in range(s.layers + 1):
            pairs.append((f"decoder.up.{i}.block.{j}.", f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}.", VAE_RESNET))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv.", None))
        if i > 0:
            pairs.append((f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv.", None))
    return pairs


def _rename(keys, pairs, reverse: bool, what: str) -> dict[str, str]:
    """{key: renamed key} by the longest matching prefix pair; any key that no rule explains is an error."""
    table = {}
    for original, diffusers, inner in pairs:
        if reverse:
            inv = None if inner is None else {v: k for k, v in inner.items()}
            if inner is VAE_ATTENTION:
                inv.update({v: inv[t] for v, t in VAE_ATTENTION_LEGACY.items()})
            table[diffusers] = (original, inv)
        else:
            table[original] = (diffusers, inner)
    out, unknown = {}, []
    for key in keys:
        cuts = [i + 1 for i, c in enumerate(key) if c == "."]
        match = next((key[:c] for c in reversed(cuts) if key[:c] in table), None)
        if match is None:
            unknown.append(key)
            continue
        target, inner = table[match]
        rest = key[len(match):]
        if inner is not None:
            module, _, param = rest.rpartition(".")
            if module not in inner:
                unknown.append(key)
                continue
            rest = f"{inner[module]}.{param}"
        out[key] = target + rest
    if unknown:
        shown = ", ".join(map(printable, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise CheckpointError(f"{len(unknown)} {what} key(s) fit no SD1.x layout rule: {shown}")
    _check_one_to_one(out, what)
    return out


def _check_one_to_one(names: dict[str, str], what: str, prefix: str = "") -> None:
    """Refuse two keys renamed to one name, of which one would be dropped without a word (a text encoder stored
    under both `transformer.text_model.X` and `transformer.X`; a VAE with both `to_q` and the older `query`)."""
    first = {}
    for key, name in names.items():
        if name in first:
            raise CheckpointError(f"the {what} holds {printable(name)} twice, as {printable(prefix + first[name])} "
                                  f"and {printable(prefix + key)}; keep one copy of the {what}")  # fmt: skip
        first[name] = key


def is_vae_attention_weight(key: str) -> bool:
    """The VAE tensors stored as [C, C, 1, 1] in the original layout and [C, C] in diffusers' (some original-layout
    files hold them as [C, C] too; the bytes are the same). `key` is a VAE key in either layout."""
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.weight$"
                          r"|mid\.attn_1\.(q|k|v|proj_out)\.weight$", key))  # fmt: skip


def to_diffusers(component: str, keys) -> dict[str, str]:
    """{component-relative original key: diffusers key} for one component.

    UNet and VAE keys are relative to their prefix; text-encoder keys to `cond_stage_model.transformer.`
    (both `text_model.embeddings…` and the older `embeddings…` become `text_model.embeddings…`).
    """
    keys = list(keys)
    if component == "unet":
        return _rename(keys, unet_pairs(unet_structure_original(keys)), False, "UNet")
    if component == "vae":
        return _rename(keys, vae_pairs(vae_structure_original(keys)), False, "VAE")
    return _text_model_keys(keys, ORIGINAL_PREFIX["text_encoder"])


def from_diffusers(component: str, keys) -> dict[str, str]:
    """{diffusers key: component-relative original key}: the inverse of `to_diffusers`.

    Text-encoder keys come out as `text_model.…`; transformers 5 saves them without that level, and both are read.
    """
    keys = list(keys)
    if component == "unet":
        return _rename(keys, unet_pairs(unet_structure_diffusers(keys)), True, "diffusers UNet")
    if component == "vae":
        return _rename(keys, vae_pairs(vae_structure_diffusers(keys)), True, "diffusers VAE")
    return _text_model_keys(keys, "")


def _text_model_keys(keys: list[str], prefix: str) -> dict[str, str]:
    """Text-encoder keys, the same in both layouts but for the `text_model.` level older files lack; `prefix`
    is what the file puts before them, for messages."""
    out = {k: k if k.startswith("text_model.") else "text_model." + k for k in keys}
    _check_one_to_one(out, "text encoder", prefix)
    return out


def split_original(keys) -> dict[str, dict[str, str]]:
    """{component: {component-relative key: file key}} for an original-layout file's UNet, VAE and CLIP keys."""
    parts = {c: {} for c in COMPONENTS}
    for k in keys:
        for component, prefix in ORIGINAL_PREFIX.items():
            if k.startswith(prefix):
                parts[component][k[len(prefix):]] = k
    return parts


# --------------------------------------------------------------------------------------------------
# Config files of a diffusers folder, as SD1.5's own (stable-diffusion-v1-5 on the Hub) with the values
# read off the weights' shapes.

DIFFUSERS_VERSION = "0.42.1"  # the version these files were checked against

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}  # fmt: skip

SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # fmt: skip
TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                    "errors": "replace", "add_prefix_space": False, **SPECIAL_TOKENS}  # fmt: skip


def model_index(inpainting: bool) -> dict:
    """model_index.json: which class loads each subfolder. No safety checker is shipped."""
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def unet_config(c) -> dict:
    """unet/config.json from an sd15 UNetConfig."""
    attention = [2**i in c.attention_resolutions for i in range(len(c.channel_mult))]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "attention_head_dim": c.num_heads,  # diffusers' legacy name: the number of heads in SD1
        "block_out_channels": [c.model_channels * m for m in c.channel_mult], "center_input_sample": False,
        "cross_attention_dim": c.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": c.in_channels,
        "layers_per_block": c.num_res_blocks, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": c.out_channels, "sample_size": 64, "transformer_layers_per_block": c.transformer_depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
    }  # fmt: skip


def vae_config(c) -> dict:
    """vae/config.json from an sd15 VAEConfig."""
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": [c.ch * m for m in c.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * len(c.ch_mult),
        "in_channels": c.in_channels, "latent_channels": c.z_channels, "layers_per_block": c.num_res_blocks,
        "norm_num_groups": 32, "out_channels": c.out_ch, "sample_size": 512, "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * len(c.ch_mult),
    }  # fmt: skip


def text_encoder_config(c) -> dict:
    """text_encoder/config.json (transformers' CLIPTextConfig) from an sd15 CLIPTextConfig.

    Its dtype is "float32" whatever the weights' dtype, as in SD1.5's own repositories beside fp16 weights:
    transformers loads a text encoder in the dtype its config names, while diffusers loads the UNet and VAE in
    float32, so "float16" here would give a pipeline of mixed dtypes that fails at its first matrix product."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
        "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.hidden_size, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407, "torch_dtype": "float32", "dtype": "float32",
    }  # fmt: skip
