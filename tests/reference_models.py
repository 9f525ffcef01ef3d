"""The reference implementations (diffusers 0.42.1, transformers 5.17.0) built from an original-layout
state dict by their own converters, so that a parity test does not depend on sd15's key handling.

Test-only: sd15 itself never imports diffusers or transformers.
"""

from __future__ import annotations

import torch

from sd15.clip import CLIPTextConfig
from sd15.unet import UNetConfig
from sd15.vae import VAEConfig


# scheduler/scheduler_config.json as SD1.5 ships it (FACTS.md); diffusers users swap samplers with
# OtherScheduler.from_config(this), so keys it lacks take the other scheduler's defaults.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def diffusers_unet_config(c: UNetConfig) -> dict:
    levels = len(c.channel_mult)
    has_attention = [2**i in c.attention_resolutions for i in range(levels)]
    return dict(
        sample_size=64,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=tuple(c.model_channels * m for m in c.channel_mult),
        layers_per_block=c.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        cross_attention_dim=c.context_dim,
        attention_head_dim=c.num_heads,  # diffusers' legacy name: for SD1 this is the number of heads
        transformer_layers_per_block=c.transformer_depth,
    )


def diffusers_vae_config(c: VAEConfig) -> dict:
    levels = len(c.ch_mult)
    return dict(
        in_channels=c.in_channels,
        out_channels=c.out_ch,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=c.num_res_blocks,
        latent_channels=c.z_channels,
        scaling_factor=0.18215,
    )


def diffusers_unet(checkpoint: dict[str, torch.Tensor], c: UNetConfig, extract_ema: bool = False):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_unet_config(c)
    model = UNet2DConditionModel(**config)
    sd = convert_ldm_unet_checkpoint(checkpoint, config, extract_ema=extract_ema)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def diffusers_controlnet(checkpoint: dict[str, torch.Tensor], c: UNetConfig):
    """diffusers' ControlNetModel from an original-layout ControlNet state dict (with or without the
    `control_model.` prefix), converted by diffusers' own `convert_controlnet_checkpoint`."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    unet = diffusers_unet_config(c)
    config = {k: unet[k] for k in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                                   "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block")}  # fmt: skip
    model = ControlNetModel(**config, conditioning_channels=3)
    model.load_state_dict(convert_controlnet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def diffusers_vae(checkpoint: dict[str, torch.Tensor], c: VAEConfig):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = diffusers_vae_config(c)
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def transformers_clip_config(c: CLIPTextConfig):
    from transformers import CLIPTextConfig as HFConfig

    return HFConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act="quick_gelu",
        layer_norm_eps=c.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def transformers_clip(checkpoint: dict[str, torch.Tensor], c: CLIPTextConfig):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    model = CLIPTextModel(transformers_clip_config(c))
    sd = convert_ldm_clip_checkpoint(checkpoint)
    own_keys = model.state_dict().keys()
    if not any(k.startswith("text_model.") for k in own_keys):  # transformers 5 drops the `text_model.` level
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    # transformers may keep position_ids as a non-persistent buffer; nothing else may be left out.
    assert not result.unexpected_keys or all(k.endswith("position_ids") for k in result.unexpected_keys), result
    assert not result.missing_keys, result.missing_keys
    return model.eval()


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error relative to the output's scale."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def transformers_tokenizer(folder):
    """transformers' CLIPTokenizer built from sd15's shipped vocabulary and merges files."""
    import shutil
    from importlib import resources

    from transformers import CLIPTokenizer

    data = resources.files("sd15") / "data"
    shutil.copyfile(data / "clip_vocab.json", folder / "vocab.json")
    shutil.copyfile(data / "clip_merges.txt", folder / "merges.txt")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


DIFFUSERS_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_heun": "DPMSolverMultistepScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}


def diffusers_scheduler(sampler: str, karras: bool = False):
    """The diffusers scheduler a diffusers user swaps in for `sampler`: X.from_config(SD1.5's config)."""
    import diffusers

    overrides = {"algorithm_type": "sde-dpmsolver++"} if sampler.startswith("dpmpp_2m_sde") else {}
    if sampler == "dpmpp_2m_sde_heun":
        overrides["solver_type"] = "heun"
    if karras:
        overrides["use_karras_sigmas"] = True
    return getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(SD15_SCHEDULER_CONFIG, **overrides)


def diffusers_pipeline(checkpoint, m, folder, pipeline_class="StableDiffusionPipeline", sampler="pndm", **components):
    """A diffusers pipeline over the same random weights as the sd15 model `m` (configs taken from it);
    `components` adds others (`controlnet=` for the ControlNet pipelines)."""
    import diffusers

    return getattr(diffusers, pipeline_class)(
        vae=diffusers_vae(checkpoint, m.vae.config),
        text_encoder=transformers_clip(checkpoint, m.text_encoder.config),
        tokenizer=transformers_tokenizer(folder),
        unet=diffusers_unet(checkpoint, m.unet.config),
        scheduler=diffusers_scheduler(sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **components,
    )
