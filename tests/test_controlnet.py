"""ControlNet (sd15.controlnet): layout, loading, refusals, and parity with diffusers on shared random weights.

The random ControlNet is written in ControlNet 1.1's layout (`control_model.` keys) by sd15.random_weights; the
oracle is diffusers' ControlNetModel loaded through diffusers' own `convert_controlnet_checkpoint`.

Tolerances. The ControlNet's residuals are compared in float32 with 1e-5 relative to their scale: the two
implementations run the same convolutions and attention, and differ at most by the order of a few sums.
The pipelines' images (in [0, 1]) agree within 1e-4 as tests/test_pipeline.py explains: each UNet call
differs by ~1e-6 relative, amplified by guidance and the VAE decoder; a residual left out, added at the wrong
skip, scaled twice or applied on the wrong steps moves pixels by 1e-2 or more (checked below too).
"""

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sd15
from reference_models import diffusers_controlnet, diffusers_pipeline, diffusers_scheduler, max_relative_error
from sd15.checkpoint import CheckpointError
from sd15.cli import main
from sd15.controlnet import ControlNet, control_image, load_controlnet
from sd15.pnginfo import format_parameters, parse_parameters, read_parameters
from sd15.random_weights import random_controlnet, save_checkpoint
from sd15.unet import UNetConfig

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"  # read off real checkpoints (see its README)
TOL = 1e-4
PROMPT = "a photo of an astronaut riding a horse on mars"


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    lines = (line.split() for line in (KEYS / name).read_text().splitlines() if line.strip())
    return {k: tuple(int(v) for v in shape.strip("[]").split(",")) for k, shape in lines}


def picture(seed: int, height: int = 64, width: int = 64) -> Image.Image:
    """A control image with structure at every scale (random blocks), as an edge or depth map has."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)))


@pytest.fixture(scope="module")
def reference_controlnet(controlnet_state_dict, tiny_model):
    return diffusers_controlnet(controlnet_state_dict, tiny_model.unet.config)


@pytest.fixture(scope="module")
def reference(tiny_state_dict, tiny_model, reference_controlnet, tmp_path_factory):
    return diffusers_pipeline(tiny_state_dict, tiny_model, tmp_path_factory.mktemp("tok"), "StableDiffusionControlNetPipeline",
                              controlnet=reference_controlnet)  # fmt: skip


# ------------------------------------------------------------------------------------------ layout and loading


def test_full_size_layout_equals_the_real_controlnet_file():
    with torch.device("meta"):
        net = ControlNet(UNetConfig())
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == reference_shapes("ControlNet-v1-SD.txt")  # names and shapes, all 340 of them


def test_random_controlnet_has_the_files_prefix_and_loads_with_or_without_it(controlnet_state_dict, controlnet, tmp_path):
    assert all(k.startswith("control_model.") for k in controlnet_state_dict)
    bare = {k.removeprefix("control_model."): v for k, v in controlnet_state_dict.items()}
    pickled = save_checkpoint(bare, tmp_path / "bare.pth")  # a pickle, read with weights_only=True
    other = load_controlnet(pickled)
    for k, v in controlnet.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert other.name == "bare" and other.hash == hashlib.sha256(pickled.read_bytes()).hexdigest()[:10]  # "Model hash"


def test_controlnet_1_0_file_with_the_whole_model_beside_it(tiny_state_dict, controlnet_state_dict, controlnet, tmp_path):
    """ControlNet 1.0's .pth files hold SD1.5 and the ControlNet together: the ControlNet is taken from it."""
    path = save_checkpoint({**tiny_state_dict, **controlnet_state_dict}, tmp_path / "control_sd15_tiny.safetensors")
    net = load_controlnet(path)
    assert all(torch.equal(v, controlnet.state_dict()[k]) for k, v in net.state_dict().items())


def test_residuals_match_diffusers(controlnet, reference_controlnet):
    g = torch.Generator().manual_seed(0)
    x, hint, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 77, 48, generator=g)
    t = torch.tensor([981.0, 321.0])
    for guess_mode in (False, True):
        with torch.no_grad():
            down, mid = controlnet(x, hint, t, ctx, conditioning_scale=0.7, guess_mode=guess_mode)
            ref_down, ref_mid = reference_controlnet(x, t, ctx, hint, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False)
        assert len(down) == len(ref_down) == 9  # one per input block of the tiny UNet (12 for SD1.5)
        for ours, theirs in zip([*down, mid], [*ref_down, ref_mid]):
            assert ours.shape == theirs.shape
            assert max_relative_error(ours, theirs) < 1e-5
            assert theirs.abs().max() > 0.1  # random zero convs: the residuals are not zero


def test_unet_residuals_go_to_the_skips_and_middle_like_diffusers(tiny_state_dict, tiny_model, controlnet):
    from reference_models import diffusers_unet

    g = torch.Generator().manual_seed(1)
    x, hint, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g), torch.randn(1, 77, 48, generator=g), torch.tensor([500.0])
    ref = diffusers_unet(tiny_state_dict, tiny_model.unet.config)
    with torch.no_grad():
        down, mid = controlnet(x, hint, t, ctx)
        ours = tiny_model.unet(x, t, ctx, down_residuals=down, mid_residual=mid)
        theirs = ref(x, t, ctx, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid).sample
        plain = tiny_model.unet(x, t, ctx)
        assert torch.equal(tiny_model.unet(x, t, ctx, down_residuals=None, mid_residual=None), plain)
    assert max_relative_error(ours, theirs) < 1e-5
    assert max_relative_error(plain, theirs) > 1e-2  # the residuals matter


# ------------------------------------------------------------------------------------------ pipelines


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "dpmpp_2m"])
def test_txt2img_matches_diffusers(tiny_model, controlnet, reference, sampler):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    image = picture(0)
    reference.scheduler = diffusers_scheduler(sampler)
    kwargs = dict(width=64, height=64, output_type="np")
    ours = tiny_model.generate(PROMPT, negative_prompt="blurry", steps=5, latents=latents, seed=7, sampler=sampler, controlnet=controlnet,
                               control_image=image, controlnet_conditioning_scale=0.8, **kwargs)  # fmt: skip
    theirs = reference(PROMPT, image=image, negative_prompt="blurry", num_inference_steps=5, latents=latents,
                       generator=torch.Generator().manual_seed(7), controlnet_conditioning_scale=0.8, **kwargs).images  # fmt: skip
    plain = tiny_model.generate(PROMPT, negative_prompt="blurry", steps=5, latents=latents, seed=7, sampler=sampler, **kwargs)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - plain).max() > 1e-2


@pytest.mark.parametrize("sampler, start, end", [("ddim", 0.0, 0.5), ("ddim", 0.4, 1.0), ("ddim", 0.2, 0.6), ("pndm", 0.2, 0.6)])
def test_start_and_end_fractions_match_diffusers(tiny_model, controlnet, reference, sampler, start, end):
    """PLMS's fractions count its evaluations (one more than its steps), as diffusers' controlnet_keep does."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    reference.scheduler = diffusers_scheduler(sampler)
    kwargs = dict(width=64, height=64, output_type="np", latents=latents)
    ours = tiny_model.generate(PROMPT, steps=5, sampler=sampler, controlnet=controlnet, control_image=picture(1),
                               control_guidance_start=start, control_guidance_end=end, **kwargs)  # fmt: skip
    theirs = reference(PROMPT, image=picture(1), num_inference_steps=5, control_guidance_start=start,
                       control_guidance_end=end, **kwargs).images  # fmt: skip
    always = tiny_model.generate(PROMPT, steps=5, sampler=sampler, controlnet=controlnet, control_image=picture(1), **kwargs)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - always).max() > 1e-2  # the fraction did switch it off for some steps


def test_guidance_one_and_guess_mode_match_diffusers(tiny_model, controlnet, reference):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    reference.scheduler = diffusers_scheduler("euler")
    kwargs = dict(width=64, height=64, output_type="np", latents=latents)
    for extra in (dict(guidance_scale=1.0), dict(guess_mode=True)):
        ours = tiny_model.generate(PROMPT, steps=4, sampler="euler", controlnet=controlnet, control_image=picture(2), **extra, **kwargs)
        theirs = reference(PROMPT, image=picture(2), num_inference_steps=4, **extra, **kwargs).images
        assert np.abs(ours - theirs).max() < TOL, extra


def test_control_image_is_resized_like_diffusers(tiny_model, controlnet, reference):
    """A control image of another size is resized (Lanczos) to the output's, as diffusers does."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    image = picture(3, 96, 80)
    reference.scheduler = diffusers_scheduler("ddim")
    ours = tiny_model.generate(PROMPT, steps=3, sampler="ddim", latents=latents, width=64, height=64, controlnet=controlnet,
                               control_image=image, output_type="np")  # fmt: skip
    theirs = reference(PROMPT, image=image, num_inference_steps=3, latents=latents, width=64, height=64, output_type="np").images
    assert np.abs(ours - theirs).max() < TOL


def test_two_controlnets_match_diffusers_multicontrolnet(tiny_state_dict, tiny_model, controlnet, controlnet_state_dict, tmp_path):
    from diffusers import MultiControlNetModel

    second_sd = random_controlnet("tiny", seed=1)
    second = tiny_model.load_controlnet(save_checkpoint(second_sd, tmp_path / "depth.safetensors"))
    nets = MultiControlNetModel([diffusers_controlnet(controlnet_state_dict, tiny_model.unet.config),
                                 diffusers_controlnet(second_sd, tiny_model.unet.config)])  # fmt: skip
    reference = diffusers_pipeline(tiny_state_dict, tiny_model, tmp_path, "StableDiffusionControlNetPipeline", "ddim", controlnet=nets)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    settings = dict(controlnet_conditioning_scale=[0.6, 0.9], control_guidance_start=[0.0, 0.2], control_guidance_end=[0.8, 1.0])
    kwargs = dict(width=64, height=64, output_type="np", latents=latents)
    ours = tiny_model.generate(PROMPT, steps=5, sampler="ddim", controlnet=[controlnet, second], control_image=[picture(4), picture(5)],
                               **settings, **kwargs)  # fmt: skip
    theirs = reference(PROMPT, image=[picture(4), picture(5)], num_inference_steps=5, **settings, **kwargs).images
    assert np.abs(ours - theirs).max() < TOL


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), ("euler_a", 0.8)])
def test_img2img_matches_diffusers(tiny_state_dict, tiny_model, controlnet, reference_controlnet, tmp_path, sampler, strength):
    reference = diffusers_pipeline(tiny_state_dict, tiny_model, tmp_path, "StableDiffusionControlNetImg2ImgPipeline", sampler,
                                   controlnet=reference_controlnet)  # fmt: skip
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    control = picture(6, 64, 96)
    settings = dict(strength=strength, controlnet_conditioning_scale=0.7, control_guidance_end=0.7)
    ours = tiny_model.img2img(image, PROMPT, steps=10, seed=11, sampler=sampler, controlnet=controlnet, control_image=control,
                              output_type="np", **settings)  # fmt: skip
    theirs = reference(PROMPT, image=image, control_image=control, num_inference_steps=10, output_type="np",
                       generator=torch.Generator().manual_seed(11), **settings).images  # fmt: skip
    assert ours.shape == (1, 64, 96, 3)
    assert np.abs(ours - theirs).max() < TOL


def test_inpaint_takes_a_controlnet(tiny_model, controlnet):
    image, mask = picture(7), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    run = dict(steps=3, seed=2, output_type="np", sampler="ddim")
    plain = tiny_model.inpaint(image, mask, "a door", **run)
    zero = tiny_model.inpaint(image, mask, "a door", controlnet=controlnet, control_image=picture(8), controlnet_conditioning_scale=0.0, **run)
    steered = tiny_model.inpaint(image, mask, "a door", controlnet=controlnet, control_image=picture(8), **run)
    assert np.array_equal(plain, zero)  # scale 0: residuals of zero change nothing
    assert np.abs(steered - plain).max() > 1e-2


# ------------------------------------------------------------------------------------------ PNG parameters


def test_img2img_fit_crop_cuts_a_control_image_of_the_images_size_as_it_cuts_the_image(tiny_model, controlnet):
    """As inpainting's (tests/test_inpaint.py): fit="crop" keeps the centre 72×64 of a 76×64 image, and a control image
    of the image's size is cut the same way, not squeezed, so its hint stays on the pixels it was made from."""
    rng = np.random.default_rng(8)
    image = Image.fromarray(rng.integers(0, 256, (64, 76, 3), dtype=np.uint8))
    control = rng.integers(0, 256, (64, 76, 3), dtype=np.uint8)
    run = dict(strength=0.8, steps=3, seed=1, sampler="ddim", fit="crop", output_type="np", controlnet=controlnet)
    whole = tiny_model.img2img(image, PROMPT, control_image=Image.fromarray(control), **run)
    cut = tiny_model.img2img(image, PROMPT, control_image=control[:, 2:74], **run)
    squeezed = tiny_model.img2img(image, PROMPT, control_image=Image.fromarray(control).resize((72, 64), Image.LANCZOS), **run)
    assert whole.shape == (1, 64, 72, 3) and np.array_equal(whole, cut) and not np.array_equal(whole, squeezed)


def test_png_records_the_controlnet_and_parses_back(tiny_model, controlnet):
    image = tiny_model.generate("a cat", steps=2, seed=1, width=64, height=64, controlnet=controlnet, control_image=picture(0),
                                controlnet_conditioning_scale=0.75, control_guidance_end=0.5)[0]  # fmt: skip
    text = format_parameters(image.info["sd15"], "0123456789", "tiny")
    line = text.splitlines()[-1]
    assert f'ControlNet 0: "Module: none, Model: {controlnet.name} [{controlnet.hash}], Weight: 0.75' in line
    parsed = parse_parameters(text)
    assert parsed["controlnets"] == [dict(model=controlnet.name, hash=controlnet.hash, weight=0.75, guidance_start=0.0, guidance_end=0.5)]
    assert parsed["seed"] == 1 and parsed["steps"] == 2 and parsed["prompt"] == "a cat"


# ------------------------------------------------------------------------------------------ refusals


def _write(tmp_path, name, sd):
    return save_checkpoint(sd, tmp_path / name)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda cn, sd1: sd1, "is a Stable Diffusion 1.x checkpoint, not an SD1.x ControlNet; give it as the model"),
        (lambda cn, sd1: {**cn, "control_model.label_emb.0.0.weight": torch.zeros(4, 4)}, "SDXL ControlNet"),
        (lambda cn, sd1: {"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, "diffusers' layout"),
        (lambda cn, sd1: {"adapter.body.0.resnets.0.block1.weight": torch.zeros(4, 4, 3, 3)}, "T2I-Adapter"),
        (lambda cn, sd1: {k: torch.zeros(2, 3) if k.endswith("zero_convs.1.0.weight") else v for k, v in cn.items()},
         "zero_convs.1.0.weight: file \\[2, 3\\]"),
        (lambda cn, sd1: {k: v for k, v in cn.items() if "middle_block_out" not in k}, "no middle_block_out"),
        (lambda cn, sd1: {k: v for k, v in cn.items() if "input_blocks.4.0" not in k}, "incomplete ControlNet"),
        (lambda cn, sd1: {k: v for k, v in cn.items() if "input_blocks.1.1.norm.bias" not in k}, "1 missing:\\n    input_blocks.1.1.norm.bias"),
        (lambda cn, sd1: {k: v * float("nan") if k.endswith("zero_convs.2.0.bias") else v for k, v in cn.items()},
         "zero_convs.2.0.bias holds NaN or infinite numbers \\(in torch.float32\\)"),
    ],
)
def test_bad_files_are_refused(controlnet_state_dict, tiny_state_dict, tmp_path, make, message):
    path = _write(tmp_path, "bad.safetensors", make(controlnet_state_dict, tiny_state_dict))
    with pytest.raises(CheckpointError, match=message):
        load_controlnet(path)


def test_fp16_files_load_in_the_models_dtype_and_fp16_overflow_is_refused(controlnet_state_dict, controlnet, tmp_path):
    half = load_controlnet(_write(tmp_path, "half.safetensors", {k: v.half() for k, v in controlnet_state_dict.items()}))
    assert all(v.dtype == torch.float32 for v in half.state_dict().values())  # the CPU's default, as the model's
    assert all(torch.equal(v, controlnet.state_dict()[k].half().float()) for k, v in half.state_dict().items())
    big = {k: v * 1e6 if k.endswith("zero_convs.0.0.weight") else v for k, v in controlnet_state_dict.items()}
    with pytest.raises(CheckpointError, match="zero_convs.0.0.weight holds NaN or infinite numbers \\(in torch.float16\\)"):
        load_controlnet(_write(tmp_path, "big.safetensors", big), dtype=torch.float16)  # finite in float32, not in float16


def test_sd2_controlnet_and_mismatched_base_are_refused(tiny_model, controlnet_state_dict, tmp_path):
    sd2 = {k: (torch.zeros(v.shape[0], 1024) if k.endswith("attn2.to_k.weight") else v) for k, v in controlnet_state_dict.items()}
    with pytest.raises(CheckpointError, match="SD2.x ControlNet"):
        load_controlnet(_write(tmp_path, "sd2.safetensors", sd2))
    with torch.device("meta"):
        full = ControlNet(UNetConfig())
    with pytest.raises(ValueError, match="does not fit this model's UNet: model_channels 320 \\(model: 32\\)"):
        tiny_model.generate("a cat", steps=1, width=64, height=64, controlnet=full, control_image=picture(0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(control_image=picture(0)), "without a ControlNet"),
        (dict(controlnet="NET"), "one control image per ControlNet"),
        (dict(controlnet="NET", control_image="edges.png"), "must be a PIL image, an array or a tensor"),
        (dict(controlnet="NET", control_image=torch.rand(1, 3, 32, 32)), "is 32×32 but the output is 64×64"),
        (dict(controlnet="NET", control_image=torch.rand(1, 3, 64, 64) * 2 - 1), "in \\[0, 1\\]"),
        (dict(controlnet="NET", control_image=np.zeros((64, 64, 2), np.float32)), "must be \\(H, W, 3\\)"),
        (dict(controlnet="NET", control_image=torch.rand(2, 3, 64, 64)), "\\(3, H, W\\) or \\(1, 3, H, W\\)"),
        (dict(controlnet="NET", control_image=picture(0), control_guidance_start=0.6, control_guidance_end=0.5), "start < end"),
        (dict(controlnet="NET", control_image=picture(0), controlnet_conditioning_scale=float("nan")), "finite"),
        (dict(controlnet="NET", control_image=picture(0), controlnet_conditioning_scale=[1.0, 0.5]), "one per ControlNet \\(1\\)"),
        (dict(controlnet=torch.nn.Linear(2, 2), control_image=picture(0)), "must be a ControlNet"),
        (dict(controlnet=[], control_image=[]), "controlnet is an empty list"),
        (dict(controlnet_conditioning_scale=0.5), "controlnet_conditioning_scale given without a ControlNet"),
        (dict(control_guidance_end=0.5), "control_guidance_end given without a ControlNet"),
        (dict(controlnet="NET", control_image=picture(0), controlnet_conditioning_scale=torch.tensor(0.5)), "finite numbers \\(floats\\)"),
        (dict(controlnet="NET", control_image=picture(0), control_guidance_start=-0.1), "0 <= start < end <= 1"),
        (dict(controlnet="NET", control_image=picture(0), control_guidance_end=1.5), "0 <= start < end <= 1"),
        (dict(controlnet=["NET", "NET"], control_image=picture(0)), "2 ControlNets, 1 images"),
        (dict(controlnet="NET", control_image=np.zeros((3, 64, 64), np.uint8)), "uint8 control image array must be \\(H, W\\)"),
        (dict(controlnet="NET", control_image=np.full((64, 64, 3), 200, np.uint16)), "must be uint8 \\(0 to 255\\) or floats"),
        (dict(controlnet="NET", control_image=np.full((64, 64, 3), "x", object)), "got object"),
        (dict(controlnet="NET", control_image=torch.full((3, 64, 64), 200, dtype=torch.uint8)), "divide it by 255"),
        (dict(controlnet="NET", control_image=torch.ones(3, 64, 64, dtype=torch.complex64)), "got torch.complex64"),
        (dict(controlnet="NET", control_image=np.full((64, 64, 3), np.nan, np.float32)), "holds NaN or infinite values"),
        (dict(controlnet="NET", control_image=Image.fromarray(np.full((64, 64), 0.5, np.float32))), "floating-point image \\(PIL mode F\\)"),
        (dict(controlnet="NET", control_image=picture(0), guess_mode="no"), "guess_mode must be True or False"),
        (dict(guess_mode=True), "guess_mode=True given without a ControlNet"),
    ],
)
def test_bad_pipeline_inputs_are_refused(tiny_model, controlnet, kwargs, message):
    if isinstance(kwargs.get("controlnet"), (str, list)) and kwargs["controlnet"]:
        kwargs = {**kwargs, "controlnet": controlnet if kwargs["controlnet"] == "NET" else [controlnet] * len(kwargs["controlnet"])}
    with pytest.raises(ValueError, match=message):
        tiny_model.generate("a cat", steps=1, width=64, height=64, **kwargs)


def test_control_images_are_read_as_they_are_shown():
    """Any PIL mode gives RGB as shown: EXIF rotation applied, 16-bit scaled (not clipped at 255), transparency
    black (ControlNets' "nothing here", whatever colour the transparent pixels store)."""
    rgb = picture(11)
    for mode in ("P", "L", "1", "CMYK", "RGBA"):
        assert torch.equal(control_image(rgb.convert(mode), 64, 64), control_image(rgb.convert(mode).convert("RGB"), 64, 64)), mode
    depth = Image.fromarray(np.full((64, 64), 128 * 257, np.uint16))  # a 16-bit depth map, mid-grey
    assert depth.mode.startswith("I;16") and torch.allclose(control_image(depth, 64, 64), torch.full((1, 3, 64, 64), 128 / 255))
    clear = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # transparent, stored as white
    assert control_image(clear, 64, 64).max() == 0
    stored = picture(12, 48, 64)  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    shown = control_image(Image.open(buffer), 48, 64)
    assert torch.equal(shown, control_image(stored.transpose(Image.Transpose.ROTATE_270), 48, 64))
    frames = [picture(13), picture(14)]  # an animated GIF: its first frame
    frames[0].save(buffer := io.BytesIO(), format="GIF", save_all=True, append_images=frames[1:])
    assert torch.equal(control_image(Image.open(buffer), 64, 64), control_image(Image.open(buffer).convert("RGB"), 64, 64))
    assert control_image(Image.new("RGB", (1, 1), "white"), 64, 64).min() == 1  # tiny: resized like any other


def test_numpy_scalars_are_taken_as_scales(tiny_model, controlnet):
    run = dict(steps=2, seed=1, width=64, height=64, output_type="np", controlnet=controlnet, control_image=picture(0))
    a = tiny_model.generate("a cat", controlnet_conditioning_scale=np.float32(0.5), control_guidance_end=np.float64(0.5), **run)
    b = tiny_model.generate("a cat", controlnet_conditioning_scale=0.5, control_guidance_end=0.5, **run)
    assert np.array_equal(a, b)


def test_control_image_forms_agree():
    image = picture(10)
    from_pil = control_image(image, 64, 64)
    array = np.asarray(image)
    assert torch.equal(control_image(array, 64, 64), from_pil)
    assert torch.equal(control_image(array.astype(np.float32) / 255, 64, 64), from_pil)
    assert torch.equal(control_image(from_pil[0], 64, 64), from_pil)
    assert from_pil.shape == (1, 3, 64, 64) and 0 <= from_pil.min() and from_pil.max() <= 1


# ------------------------------------------------------------------------------------------ command line and script


def test_cli_generate_with_controlnet(workdir, tiny_checkpoint, controlnet_file):
    picture(11, 48, 64).save("edges.png")
    code = main(["generate", "a cat", "--model", str(tiny_checkpoint), "--steps", "2", "--seed", "4", "--no-progress",
                 "--no-safety-checker", "--controlnet", f"{controlnet_file}:0.5", "--control-image", "edges.png",
                 "--control-end", "0.8", "-o", "out.png"])  # fmt: skip
    assert code == 0
    with Image.open("out.png") as im:
        assert im.size == (64, 48)  # the control image's size, when -W/-H are not given
    parsed = parse_parameters(read_parameters("out.png"))
    assert parsed["controlnets"][0]["model"] == "canny-tiny" and parsed["controlnets"][0]["weight"] == 0.5
    assert parsed["controlnets"][0]["guidance_end"] == 0.8


def test_cli_img2img_with_controlnet(workdir, tiny_checkpoint, controlnet_file):
    picture(12).save("photo.png")
    picture(13).save("edges.png")
    code = main(["img2img", "photo.png", "a cat", "--model", str(tiny_checkpoint), "--steps", "2", "--seed", "4", "--no-progress",
                 "--no-safety-checker", "--controlnet", str(controlnet_file), "--control-image", "edges.png", "-o", "out.png"])  # fmt: skip
    assert code == 0 and parse_parameters(read_parameters("out.png"))["controlnets"][0]["weight"] == 1.0


def test_cli_control_preprocess_canny_is_recorded_and_made_again_from_png(workdir, tiny_checkpoint, controlnet_file):
    """--control-preprocess canny:LOW:HIGH runs sd15.canny on the control image: the same pixels as giving its edge map
    directly. The PNG records it as the web UI's extension does (Module: canny, Threshold A/B), and --from-png with
    the same photo runs it again, so the same image is made."""
    photo = picture(15, 48, 64)
    photo.save("photo.png")
    sd15.canny(photo, 50, 120).save("edges.png")
    run = ["--model", str(tiny_checkpoint), "--steps", "2", "--seed", "4", "--no-progress", "--no-safety-checker",
           "--controlnet", str(controlnet_file)]  # fmt: skip
    assert main(["generate", "a cat", *run, "--control-image", "photo.png", "--control-preprocess", "canny:50:120", "-o", "a.png"]) == 0
    assert main(["generate", "a cat", *run, "--control-image", "edges.png", "-o", "b.png"]) == 0
    assert main(["generate", "a cat", *run, "--control-image", "photo.png", "-o", "c.png"]) == 0  # the photo itself
    assert main(["generate", "--from-png", "a.png", *run, "--control-image", "photo.png", "-o", "d.png"]) == 0
    pixels = {name: np.asarray(Image.open(f"{name}.png")) for name in "abcd"}
    assert np.array_equal(pixels["a"], pixels["b"]) and np.array_equal(pixels["a"], pixels["d"])
    assert not np.array_equal(pixels["a"], pixels["c"])
    text = read_parameters("a.png")
    assert "Module: canny, Model: canny-tiny" in text and "Threshold A: 50, Threshold B: 120" in text
    assert "Module: none" in read_parameters("b.png") and read_parameters("d.png") == text
    record = parse_parameters(text)["controlnets"][0]
    assert (record["module"], record["threshold_a"], record["threshold_b"]) == ("canny", 50.0, 120.0)


def test_cli_guess_mode_is_recorded_and_from_png_keeps_it(workdir, tiny_checkpoint, controlnet_file):
    picture(18).save("edges.png")
    run = ["--model", str(tiny_checkpoint), "--steps", "2", "--seed", "4", "--no-progress", "--no-safety-checker",
           "--controlnet", str(controlnet_file), "--control-image", "edges.png"]  # fmt: skip
    assert main(["generate", "a cat", *run, "--guess-mode", "-o", "guess.png"]) == 0
    assert main(["generate", "a cat", *run, "-o", "plain.png"]) == 0
    assert main(["generate", "--from-png", "guess.png", *run, "-o", "again.png"]) == 0
    pixels = {name: np.asarray(Image.open(f"{name}.png")) for name in ("guess", "plain", "again")}
    assert np.array_equal(pixels["guess"], pixels["again"]) and not np.array_equal(pixels["guess"], pixels["plain"])
    assert "Guess Mode: True" in read_parameters("guess.png") and "Guess Mode" not in read_parameters("plain.png")
    assert parse_parameters(read_parameters("again.png"))["controlnets"][0]["guess_mode"] is True
    assert "guess_mode" not in parse_parameters(read_parameters("plain.png"))["controlnets"][0]


def test_from_png_of_a_preprocessor_sd15_lacks_warns_and_uses_the_image(workdir, tiny_checkpoint, controlnet_file, capsys):
    picture(16).save("depth.png")
    text = ('a cat\nSteps: 2, Sampler: PLMS, CFG scale: 7, Seed: 4, Size: 64x64, ControlNet 0: "Module: depth_midas, '
            'Model: canny-tiny, Weight: 1, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1"')  # fmt: skip
    from sd15.pnginfo import save_png

    save_png(picture(17), Path("made.png"), text)
    code = main(["generate", "--from-png", "made.png", "--model", str(tiny_checkpoint), "--no-progress", "--no-safety-checker",
                 "--controlnet", str(controlnet_file), "--control-image", "depth.png", "-o", "out.png"])  # fmt: skip
    assert code == 0 and "preprocessor depth_midas, which sd15 does not have" in capsys.readouterr().err
    assert "Module: none" in read_parameters("out.png")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--controlnet", "CN"], "one --control-image per --controlnet"),
        (["--controlnet", "CN", "--control-image", "edges.png", "--control-preprocess", "canny", "--control-preprocess", "none"],
         "one --control-preprocess per --control-image"),
        (["--control-preprocess", "canny"], "--control-preprocess apply to ControlNets"),

        (["--control-image", "edges.png"], "one --control-image per --controlnet"),
        (["--controlnet", "missing.safetensors", "--control-image", "edges.png"], "no such ControlNet file"),
        (["--controlnet", "CN", "--control-image", "missing.png"], "cannot read the control image"),
        (["--controlnet", "MODEL", "--control-image", "edges.png"], "not an SD1.x ControlNet; give it as the model"),
        (["--controlnet", "CN", "--control-image", "edges.png", "--control-start", "0.9", "--control-end", "0.2"], "start < end"),
    ],
)
def test_cli_refusals(workdir, tiny_checkpoint, controlnet_file, capsys, extra, message):
    picture(14).save("edges.png")
    names = {"CN": str(controlnet_file), "MODEL": str(tiny_checkpoint)}
    argv = ["generate", "a cat", "--model", str(tiny_checkpoint), "--steps", "1", "--no-safety-checker", "-o", "out.png"]
    code = main(argv + [names.get(a, a) for a in extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not Path("out.png").exists()


def test_from_png_with_bad_canny_thresholds_is_refused_before_the_model_loads(workdir, tiny_checkpoint, controlnet_file, capsys,
                                                                               monkeypatch):  # fmt: skip
    import sd15.cli
    from sd15.pnginfo import save_png

    picture(19).save("photo.png")
    text = ('a cat\nSteps: 2, Sampler: PLMS, CFG scale: 7, Seed: 4, Size: 64x64, ControlNet 0: "Module: canny, '
            'Model: canny-tiny, Weight: 1, Resize Mode: Just Resize, Threshold A: nan, Threshold B: 200, Guidance Start: 0, '
            'Guidance End: 1"')  # fmt: skip
    save_png(picture(20), Path("made.png"), text)
    monkeypatch.setattr(sd15.cli, "_load_model", lambda args: pytest.fail("the model was loaded before the PNG was checked"))
    code = main(["generate", "--from-png", "made.png", "--model", str(tiny_checkpoint), "--no-progress", "--no-safety-checker",
                 "--controlnet", str(controlnet_file), "--control-image", "photo.png", "-o", "out.png"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Canny low threshold must be a number >= 0" in err and len(err.splitlines()) == 1, err
    assert not Path("out.png").exists()


@pytest.mark.parametrize("spec", ["sobel", "canny:100", "canny:-1:5", "canny:nan:5", "canny:a:b", "none:1"])
def test_cli_refuses_a_bad_control_preprocess(workdir, tiny_checkpoint, controlnet_file, capsys, spec):
    picture(14).save("edges.png")
    with pytest.raises(SystemExit) as refusal:  # argparse's refusal: its usage, then one error line
        main(["generate", "a cat", "--model", str(tiny_checkpoint), "--controlnet", str(controlnet_file),
              "--control-image", "edges.png", "--control-preprocess", spec, "-o", "out.png"])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert refusal.value.code == 2 and len(errors) == 1
    assert "expected none, canny or canny:LOW:HIGH (thresholds >= 0" in errors[0] and not Path("out.png").exists()


def test_script_writes_a_controlnet(tmp_path):
    out = tmp_path / "cn.safetensors"
    script = Path(__file__).parents[1] / "scripts" / "make_random_checkpoint.py"
    subprocess.run([sys.executable, str(script), str(out), "--controlnet", "--seed", "3"], check=True, capture_output=True)
    net = load_controlnet(out)
    expected = random_controlnet("tiny", seed=3)
    assert all(torch.equal(v, expected["control_model." + k]) for k, v in net.state_dict().items())
