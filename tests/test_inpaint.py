"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same random weights, for a 9-channel
inpainting UNet and for a regular one; paste-back, masks, and padding (crop) mode.

Tolerance: images in [0, 1] within 1e-4, as tests/test_pipeline.py argues for text-to-image. A wrong mask
layout, channel order, masked-image convention or blending level moves pixels by 1e-2 or more.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from reference_models import diffusers_pipeline, diffusers_scheduler

import sd15
from sd15.inpaint import crop_region, feather, mask_tensor
from sd15.random_weights import random_checkpoint, save_checkpoint

TOL = 1e-4
PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def inpainting_state_dict():
    return random_checkpoint("tiny", seed=3, inpainting=True)


@pytest.fixture(scope="module")
def inpainting_model(inpainting_state_dict, tmp_path_factory):
    return sd15.load(save_checkpoint(inpainting_state_dict, tmp_path_factory.mktemp("inp") / "inpainting.safetensors"))


@pytest.fixture(scope="module")
def reference_9ch(inpainting_state_dict, inpainting_model, tmp_path_factory):
    return diffusers_pipeline(inpainting_state_dict, inpainting_model, tmp_path_factory.mktemp("tok9"), "StableDiffusionInpaintPipeline")


@pytest.fixture(scope="module")
def reference_4ch(tiny_state_dict, tiny_model, tmp_path_factory):
    return diffusers_pipeline(tiny_state_dict, tiny_model, tmp_path_factory.mktemp("tok4"), "StableDiffusionInpaintPipeline")


def image_and_mask(h=64, w=80, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[12:44, 20:57] = 255  # not aligned to the 8-pixel latent grid
    return image, Image.fromarray(mask)


def run_both(ours_model, reference, sampler, strength, steps=6, seed=5, latents=None, **kwargs):
    image, mask = image_and_mask()
    reference.scheduler = diffusers_scheduler(sampler)
    ours = ours_model.inpaint(image, mask, PROMPT, strength=strength, steps=steps, seed=seed, sampler=sampler,
                              latents=latents, paste_back=False, output_type="np", **kwargs)  # fmt: skip
    theirs = reference(PROMPT, image=image, mask_image=mask, height=64, width=80, strength=strength, num_inference_steps=steps,
                       latents=latents, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize("sampler, strength", [("pndm", 1.0), ("euler_a", 1.0), ("ddim", 0.7), ("dpmpp_2m", 0.5)])
def test_inpainting_unet_matches_diffusers(inpainting_model, reference_9ch, sampler, strength):
    ours, theirs = run_both(inpainting_model, reference_9ch, sampler, strength)
    assert ours.shape == theirs.shape == (1, 64, 80, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert ours.std() > 0.01


def test_inpainting_unet_with_given_latents_and_guidance_matches_diffusers(inpainting_model, reference_9ch):
    latents = torch.randn(1, 4, 8, 10, generator=torch.Generator().manual_seed(9))
    ours, theirs = run_both(inpainting_model, reference_9ch, "euler", 1.0, latents=latents, guidance_scale=4.0,
                            negative_prompt="blurry")  # fmt: skip
    assert np.abs(ours - theirs).max() < TOL


@pytest.mark.parametrize(
    "sampler, strength", [("pndm", 1.0), ("ddim", 0.75), ("euler_a", 1.0), ("dpmpp_2m", 0.6), ("unipc", 1.0), ("heun", 1.0), ("heun", 0.7), ("dpm_2", 0.7), ("lcm", 0.8)]
)
def test_regular_unet_blending_matches_diffusers(tiny_model, reference_4ch, sampler, strength):
    ours, theirs = run_both(tiny_model, reference_4ch, sampler, strength)
    assert np.abs(ours - theirs).max() < TOL


def test_unet_input_layout_is_latents_mask_masked_image(inpainting_model):
    """The UNet sees [x, mask, masked-image latents]: record its first input and check each part."""
    image, mask = image_and_mask()
    seen = []
    hook = inpainting_model.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        inpainting_model.inpaint(image, mask, PROMPT, steps=1, seed=0, guidance_scale=1.0, output_type="latent")
    finally:
        hook.remove()
    x = seen[0]
    assert x.shape == (1, 9, 8, 10)
    g = torch.Generator().manual_seed(0)  # image 0's generator: the noise, then the masked image's VAE sample
    noise = torch.randn(1, 4, 8, 10, generator=g)
    assert torch.equal(x[:, :4], noise)  # PNDM starts from unit-variance noise
    rows, cols = torch.arange(8) * 8, torch.arange(10) * 8  # nearest from 64×80 samples pixel (8i, 8j)
    expected_mask = ((rows[:, None] >= 12) & (rows[:, None] < 44) & (cols >= 20) & (cols < 57)).float()
    assert torch.equal(x[0, 4], expected_mask)
    keep = (sd15.inpaint.mask_tensor(mask) < 0.5).float()
    with torch.no_grad():
        posterior = inpainting_model.vae.encode(sd15.inpaint.image_tensor(image) * keep)
    assert torch.allclose(x[:, 5:], posterior.sample(g) * 0.18215, atol=1e-5)


def test_paste_back_keeps_unmasked_pixels_exactly(tiny_model):
    """Every kept pixel without blur; with it, every one beyond the blur's reach (about 3 · blur outside the mask)."""
    image, mask = image_and_mask(seed=1)
    original = np.asarray(image)
    keep = np.asarray(mask) < 128
    hard = torch.from_numpy(~keep).float()[None, None]
    for blur in (0.0, 3.0):
        out = np.asarray(tiny_model.inpaint(image, mask, PROMPT, steps=3, seed=2, mask_blur=blur)[0])
        untouched = (feather(hard, blur)[0, 0] == 0).numpy()
        assert untouched.sum() > 0.4 * untouched.size
        assert np.array_equal(out[untouched], original[untouched])
        assert np.abs(out[~keep].astype(int) - original[~keep]).mean() > 10  # the masked part was repainted
    without = tiny_model.inpaint(image, mask, PROMPT, steps=3, seed=2, paste_back=False, output_type="np")[0]
    assert np.abs(without[keep] - original[keep] / 255).max() > 1e-2  # the VAE alone does not keep them


def test_mask_blur_is_the_web_uis():
    """The web UI's mask_for_overlay: the blurred mask doubled and clipped (whole image), so the whole mask is
    repainted and the new pixels fade out beyond it; in padding mode the blurred mask itself."""
    hard = torch.zeros(1, 1, 40, 40)
    hard[..., 10:30, 10:30] = 1
    soft = feather(hard, 2.0)
    assert torch.equal(soft[0, 0, 20, 10:30], torch.ones(20))  # the mask's whole width, edges included
    row = soft[0, 0, 20, :11]
    assert torch.all(row[1:] >= row[:-1]) and 0.05 < soft[0, 0, 20, 8] < 0.95 and soft[0, 0, 20, 0] < 1e-4  # fades outward
    only_masked = feather(hard, 2.0, whole_image=False)
    assert abs(float(only_masked[0, 0, 20, 10]) - 0.5) < 0.1 and only_masked[0, 0, 20, 20] > 0.999
    assert torch.equal(feather(hard, 0.0), hard)
    small = torch.zeros(1, 1, 40, 40)
    small[..., 17:23, 17:23] = 1  # a 6 × 6 blemish at the default blur: repainted, not left as it was
    assert feather(small, 4.0)[0, 0, 20, 20] > 0.5
    huge = feather(hard, 1e308)  # no OverflowError; a blur wider than the image spreads the mask evenly
    assert torch.isfinite(huge).all() and float(huge.max() - huge.min()) < 1e-6


def test_masks_lost_in_fitting_and_image_arrays_of_unknown_range_are_refused(tiny_model):
    image, _ = image_and_mask(h=67, w=85)
    corner = np.zeros((67, 85), np.uint8)
    corner[66, 84] = 255  # only in the edge that fit="crop" cuts away
    with pytest.raises(ValueError, match="mask's white pixels are lost when the image is brought to multiples of 8"):
        tiny_model.inpaint(image, corner, PROMPT, steps=1, fit="crop")
    pixels = np.asarray(image)
    for array, message in ((pixels.astype(np.float32), r"values must lie in \[0, 1\].*got 0 … 255"),
                           (pixels.astype(np.int64), "array of int64 has no known range"),
                           (pixels.astype(np.uint16), "array of uint16 has no known range")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            tiny_model.inpaint(array, corner, PROMPT, steps=1)
        with pytest.raises(ValueError, match=message):
            tiny_model.img2img(array, PROMPT, steps=1)
    ok = tiny_model.img2img(pixels[:64, :80].astype(np.float32) / 255, PROMPT, steps=2, strength=0.5, seed=0, output_type="np")
    assert ok.shape == (1, 64, 80, 3)


def test_an_odd_sized_speckled_mask_is_resized_as_diffusers_resizes_it(inpainting_model, reference_9ch):
    """In 8-bit, as diffusers' mask processor does: a float resize lets Lanczos' overshoot move pixels across 0.5."""
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (67, 85, 3), dtype=np.uint8))
    mask = Image.fromarray(((rng.random((67, 85)) > 0.6) * 255).astype(np.uint8))
    reference_9ch.scheduler = diffusers_scheduler("ddim")
    ours = inpainting_model.inpaint(image, mask, PROMPT, steps=3, seed=1, sampler="ddim", paste_back=False, output_type="np")
    theirs = reference_9ch(PROMPT, image=image, mask_image=mask, height=64, width=80, num_inference_steps=3,
                           generator=torch.Generator().manual_seed(1), output_type="np").images  # fmt: skip
    assert np.abs(ours - theirs).max() < TOL


def test_padding_mode_inpaints_a_crop_and_keeps_the_rest(tiny_model):
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))  # not multiples of 8
    mask = np.zeros((100, 150), np.uint8)
    mask[40:52, 90:110] = 255
    out = tiny_model.inpaint(image, Image.fromarray(mask), PROMPT, steps=2, seed=0, padding=6, width=64, height=64)[0]
    assert out.size == (150, 100)
    assert out.info["sd15"].width == 64
    diff = np.abs(np.asarray(out).astype(int) - np.asarray(image)).sum(-1)
    assert diff[mask == 0].max() == 0
    assert diff[mask > 0].mean() > 10
    assert crop_region(torch.from_numpy(mask > 0), 6, 64, 64) == (84, 30, 116, 62)  # 20×12 box, +6 each side: 32×24, grown to 32×32
    assert crop_region(torch.from_numpy(mask > 0), 200, 64, 64) == (0, 0, 150, 100)  # clamped to the image


@pytest.mark.parametrize("size, box, padding", [((128, 160), (40, 72, 50, 90), 8), ((64, 256), (16, 48, 16, 240), 0)])
def test_padding_mode_matches_diffusers_padding_mask_crop(inpainting_model, reference_9ch, size, box, padding):
    """Against StableDiffusionInpaintPipeline(padding_mask_crop=): a crop grown to the working aspect ratio, and one
    the image's border keeps from it (a strip of a panorama), which is resized to fit and filled, not squeezed.
    sd15 resizes tensors (bicubic, antialiased) where diffusers resizes PIL images (Lanczos), so the pixels differ by
    that filter (a few 1e-3 on average); a squeezed crop differed by 0.1."""
    rng = np.random.default_rng(0)
    H, W = size
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((H, W), np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 255
    mask = Image.fromarray(mask)
    reference_9ch.scheduler = diffusers_scheduler("pndm")
    ours = inpainting_model.inpaint(image, mask, PROMPT, steps=4, seed=5, padding=padding, width=64, height=64)[0]
    theirs = reference_9ch(PROMPT, image=image, mask_image=mask, height=64, width=64, num_inference_steps=4,
                           padding_mask_crop=padding, generator=torch.Generator().manual_seed(5)).images[0]  # fmt: skip
    difference = np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32)) / 255
    assert difference.mean() < 0.01, difference.mean()


def test_padding_mode_cuts_the_control_image_with_the_image(tiny_model, controlnet):
    """With padding, the control image is a picture of the whole image: the ControlNet sees its part in the crop
    box, resized as the image's is. What lies outside the box changes nothing, what lies inside does; a box that
    is the whole image at its own size is inpainting without padding, ControlNet and all."""
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = np.zeros((96, 128), np.uint8)
    mask[40:52, 70:90] = 255
    x0, y0, x1, y1 = crop_region(torch.from_numpy(mask > 0), 6, 64, 64)
    assert (x1 - x0, y1 - y0) == (32, 32)  # enlarged twice to the working 64×64
    control = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    outside, inside = 255 - control, control.copy()  # changed outside the box only, inside it only
    outside[y0:y1, x0:x1] = control[y0:y1, x0:x1]
    inside[y0:y1, x0:x1] = 255 - control[y0:y1, x0:x1]
    run = dict(steps=3, seed=1, sampler="ddim", padding=6, width=64, height=64, output_type="np", controlnet=controlnet)
    steered = tiny_model.inpaint(image, Image.fromarray(mask), PROMPT, control_image=control, **run)
    assert np.array_equal(tiny_model.inpaint(image, Image.fromarray(mask), PROMPT, control_image=outside, **run), steered)
    changed = tiny_model.inpaint(image, Image.fromarray(mask), PROMPT, control_image=inside, **run)
    assert np.abs(changed - steered).max() > 1e-3  # (a random ControlNet's hint encoder is weak: 5e-3 here)

    whole = dict(steps=3, seed=1, sampler="ddim", output_type="np", controlnet=controlnet, control_image=control[:64, :64])
    small, small_mask = image.crop((0, 0, 64, 64)), Image.fromarray(mask[:64, :64] | mask[32:96, 64:128])
    padded = tiny_model.inpaint(small, small_mask, PROMPT, padding=64, width=64, height=64, **whole)  # the box: all of it
    assert np.array_equal(padded, tiny_model.inpaint(small, small_mask, PROMPT, **whole))


def test_fit_crop_cuts_a_control_image_of_the_images_size_as_it_cuts_the_image(tiny_model, controlnet):
    """fit="crop" keeps the centre 72×64 of a 76×64 image; a control image of the image's size (an edge map made
    from it) is cut the same way, not squeezed to 72 wide, so its hint stays on the pixels it was made from."""
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (64, 76, 3), dtype=np.uint8))
    mask = np.zeros((64, 76), np.uint8)
    mask[20:40, 20:50] = 255
    control = rng.integers(0, 256, (64, 76, 3), dtype=np.uint8)
    run = dict(steps=2, seed=1, sampler="ddim", fit="crop", output_type="np", controlnet=controlnet)
    whole = tiny_model.inpaint(image, Image.fromarray(mask), PROMPT, control_image=Image.fromarray(control), **run)
    cut = tiny_model.inpaint(image, Image.fromarray(mask), PROMPT, control_image=control[:, 2:74], **run)
    assert whole.shape == (1, 64, 72, 3) and np.array_equal(whole, cut)


def test_padding_mode_puts_the_inpaint_controlnets_marks_where_the_mask_goes(tiny_model, controlnet):
    """The inpaint ControlNet's control image marks the hole with -1 (sd15.control_preprocess.inpaint_condition): cut
    and resized in padding mode, the marks land where the mask does (resized and thresholded as it is), the pixels
    around them stay colours in [0, 1], and away from the hole they are the image's, resized as it is."""
    from sd15.inpaint import _resize, crop_control_images

    mask = torch.zeros(1, 1, 96, 128)
    mask[..., 40:52, 70:90] = 1
    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    condition = torch.where(mask > 0, -1.0, image)
    x0, y0, x1, y1 = region = crop_region(mask[0, 0] > 0, 6, 64, 64)
    cut = crop_control_images(condition, (128, 96), region, 64, 64)
    hole = _resize(mask[..., y0:y1, x0:x1], 64, 64) >= 0.5  # the working-size mask, as inpaint makes it
    assert torch.equal((cut == -1).all(dim=1, keepdim=True), hole) and torch.equal((cut == -1).any(dim=1, keepdim=True), hole)
    around = cut[(~hole).expand_as(cut)]
    assert 0 <= around.min() and around.max() <= 1
    plain = _resize(image[..., y0:y1, x0:x1], 64, 64).clamp(0, 1)
    assert torch.allclose(cut[..., :6, :6], plain[..., :6, :6], atol=1e-6)  # the corner: no hole within reach
    pixels, mask_image = image * 2 - 1, Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8))
    out = tiny_model.inpaint(pixels, mask_image, PROMPT, steps=1, padding=6, width=64, height=64, controlnet=controlnet,
                             control_image=condition, output_type="np")  # fmt: skip
    assert out.shape == (1, 96, 128, 3)  # the cut condition, -1 and all, is a control image the ControlNet takes


def test_mask_forms_and_conversions():
    grey = np.zeros((16, 24), np.uint8)
    grey[4:8, 4:12] = 255
    reference = mask_tensor(Image.fromarray(grey))
    assert reference.shape == (1, 1, 16, 24) and reference.max() == 1 and reference.sum() == 32
    assert torch.equal(mask_tensor(Image.fromarray(grey).convert("RGB")), reference)  # grey RGB: its luma
    assert torch.equal(mask_tensor(Image.fromarray(grey).convert("1")), reference)
    assert torch.equal(mask_tensor(grey), reference)
    assert torch.equal(mask_tensor(grey > 0), reference)
    assert torch.equal(mask_tensor(torch.from_numpy(grey / 255.0)), reference)
    assert torch.equal(mask_tensor(reference), reference)
    as16 = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16
    assert torch.allclose(mask_tensor(as16), reference)


@pytest.mark.parametrize(
    "make_mask, message",
    [
        (lambda: Image.new("L", (40, 64), 255), "the mask is 40×64 pixels but the image is 80×64"),
        (lambda: Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)), "colour image"),
        (lambda: Image.new("RGBA", (80, 64), (255, 255, 255, 0)), "transparent"),
        (lambda: Image.new("L", (80, 64), 0), "black everywhere"),
        (lambda: torch.ones(3, 64, 80), "one channel"),
        (lambda: np.full((64, 80), 2.0), r"\[0, 1\]"),
    ],
)
def test_bad_masks_are_refused_clearly(tiny_model, make_mask, message):
    image, _ = image_and_mask()
    with pytest.raises(ValueError, match=message):
        tiny_model.inpaint(image, make_mask(), PROMPT, steps=1)


def test_other_refusals(tiny_model):
    image, mask = image_and_mask()
    with pytest.raises(ValueError, match="strength"):
        tiny_model.inpaint(image, mask, PROMPT, strength=0)
    with pytest.raises(ValueError, match="padding mode"):
        tiny_model.inpaint(image, mask, PROMPT, width=64)
    with pytest.raises(ValueError, match="mask_blur"):
        tiny_model.inpaint(image, mask, PROMPT, mask_blur=-1)


# --------------------------------------------------------------------------- command line


@pytest.fixture
def workdir(workdir):
    """conftest's CLI folder, holding photo.png and mask.png."""
    image, mask = image_and_mask(seed=2)
    image.save(workdir / "photo.png")
    mask.save(workdir / "mask.png")
    return workdir


def test_cli_inpaints_a_photo_larger_than_the_model_takes_only_in_padding_mode(workdir, tiny_checkpoint, capsys):
    """Padding mode runs the model on a crop, so a camera photo over sd15.pipeline.MAX_PIXELS is fine there."""
    from sd15.cli import main

    Image.new("RGB", (4200, 4100), (90, 120, 150)).save(workdir / "big.png")  # 17.2 M pixels, over 4096²
    mask = Image.new("L", (4200, 4100))
    mask.paste(255, (2000, 2000, 2040, 2030))
    mask.save(workdir / "bigmask.png")
    run = ["inpaint", "big.png", "bigmask.png", "a bird", "--steps", "1", "--model", str(tiny_checkpoint), "--no-progress"]
    assert main([*run, "-o", "whole.png"]) == 2
    assert "larger than sd15 allows" in capsys.readouterr().err and not (workdir / "whole.png").exists()
    assert main([*run, "--padding", "8", "--width", "64", "--height", "64", "-o", "crop.png"]) == 0
    assert Image.open(workdir / "crop.png").size == (4200, 4100)


def test_cli_inpaint_regular_checkpoint(workdir, tiny_checkpoint, capsys):
    from sd15.cli import main
    from sd15.pnginfo import parse_parameters, read_parameters

    assert main(["inpaint", "photo.png", "mask.png", "a red door", "--steps", "3", "--seed", "5", "--model",
                 str(tiny_checkpoint), "-o", "out.png", "--no-progress"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "regular checkpoint inpaints by blending" in err and "no safety checker weights found" in err
    out, original = np.asarray(Image.open(workdir / "out.png")), np.asarray(Image.open(workdir / "photo.png"))
    keep = np.asarray(Image.open(workdir / "mask.png")) < 128
    assert out.shape == original.shape
    far = (feather(torch.from_numpy(~keep).float()[None, None], 4.0)[0, 0] == 0).numpy()
    assert np.array_equal(out[far], original[far])  # paste-back: kept pixels beyond --mask-blur 4's reach are exact
    assert not np.array_equal(out[~keep], original[~keep])
    settings = parse_parameters(read_parameters(workdir / "out.png"))
    assert settings["prompt"] == "a red door" and settings["strength"] == 1.0 and settings["seed"] == 5
    assert settings["mask_blur"] == 4.0 and "inpaint_padding" not in settings  # recorded as the web UI does


def test_cli_inpaint_inpainting_checkpoint_with_padding(workdir, inpainting_model, capsys):
    from sd15.cli import main

    assert main(["inpaint", "photo.png", "mask.png", "a red door", "--steps", "2", "--padding", "4", "--width", "64",
                 "--height", "64", "--model", inpainting_model.path, "-o", "crop.png", "--no-progress"]) == 0  # fmt: skip
    assert "regular checkpoint" not in capsys.readouterr().err
    assert Image.open(workdir / "crop.png").size == (80, 64)
    from sd15.pnginfo import read_parameters

    assert "Inpaint area: Only masked, Masked area padding: 4" in read_parameters(workdir / "crop.png")


def test_cli_inpaint_with_padding_and_a_controlnet(workdir, tiny_checkpoint, controlnet):
    """--padding with --controlnet: the PNG records the masked-only inpainting and the ControlNet."""
    from sd15.cli import main
    from sd15.pnginfo import parse_parameters, read_parameters

    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(workdir / "edges.png")
    assert main(["inpaint", "photo.png", "mask.png", "a red door", "--steps", "2", "--padding", "4", "--width", "64",
                 "--height", "64", "--controlnet", f"{controlnet.path}:0.5", "--control-image", "edges.png",
                 "--model", str(tiny_checkpoint), "-o", "crop.png", "--no-progress"]) == 0  # fmt: skip
    assert Image.open(workdir / "crop.png").size == (80, 64)
    text = read_parameters(workdir / "crop.png")
    assert "Inpaint area: Only masked, Masked area padding: 4" in text
    assert parse_parameters(text)["controlnets"][0]["weight"] == 0.5


@pytest.mark.parametrize(
    "mask_file, extra, message",
    [
        ("small.png", [], "the mask small.png is 40×32 pixels but the image is 80×64"),
        ("photo.png", [], "colour image"),
        ("mask.png", ["--width", "64"], "--padding mode"),
        ("nothere.png", [], "cannot read the mask nothere.png"),
        ("mask.png", ["--mask-blur", "-1"], "--mask-blur"),
    ],
)
def test_cli_inpaint_refusals(workdir, tiny_checkpoint, capsys, mask_file, extra, message):
    from sd15.cli import main

    Image.new("L", (40, 32)).save(workdir / "small.png")
    code = main(["inpaint", "photo.png", mask_file, "a door", "--model", str(tiny_checkpoint), "-o", "x.png", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (workdir / "x.png").exists()
