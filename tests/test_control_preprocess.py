"""ControlNet preprocessors (sd15.control_preprocess): Canny against OpenCV itself, the inpaint condition against
diffusers' `make_inpaint_condition`, and the inpaint condition through the ControlNet pipeline against diffusers.

Canny must equal cv2.Canny bit for bit (OpenCV 4.14 from opencv-python-headless, a test-only oracle): it is the
ControlNet annotator, so an edge map one pixel off is a different control image. The images cover what moves
each stage: noise (every direction bin, ties between channels), smooth ramps (plateaus and the `>` / `>=`
asymmetry of the peak test), drawn shapes and text (long edges, hysteresis chains, corners), image borders, and
sizes down to 1×1.
"""

import time

import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image, ImageDraw, ImageFilter
from reference_models import diffusers_scheduler
from test_controlnet import PROMPT, TOL, reference, reference_controlnet  # noqa: F401 (fixtures)

from sd15.control_preprocess import TG22, _hysteresis, canny, canny_edges, inpaint_condition
from sd15.controlnet import control_image, control_rgb

THRESHOLDS = [(100, 200), (50, 150), (200, 100), (120, 120), (0, 0), (0, 255), (255, 255), (100.7, 200.2), (1, 2), (900, 3000)]


def noise(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def ramps(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth gradients in several directions, slightly noisy: long plateaus of equal magnitude."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    channels = [x * rng.uniform(-4, 4) + y * rng.uniform(-4, 4) + rng.integers(0, 3, (height, width)) for _ in range(3)]
    channels[2] = 128 + 100 * np.sin(np.hypot(y - height / 2, x - width / 2) / 6)  # rings: every direction
    return np.clip(np.stack(channels, axis=-1) + 128, 0, 255).astype(np.uint8)


def drawing(seed: int, height: int, width: int, blur: float = 0.0) -> np.ndarray:
    """A "photo" drawn with PIL: a colour ramp behind circles, rectangles, lines and text, optionally blurred, with
    sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    sky = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width)], axis=-1)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def colour():
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    for _ in range(25):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(1, width // 2 + 2)), y0 + int(rng.integers(1, height // 2 + 2)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour(), outline=colour())
        draw.line([tuple(int(v) for v in rng.integers(0, max(width, height), 2)) for _ in range(3)], fill=colour(), width=2)
        draw.text((int(rng.integers(0, width)), int(rng.integers(0, height))), "Canny 1986, sd15", fill=colour())
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-5, 6, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def spiral(size: int = 256) -> np.ndarray:
    """A faint one-pixel square spiral (weak edges only) with one dark spot (a strong edge) at its centre: the
    whole spiral is an edge only if hysteresis follows a chain of thousands of weak pixels."""
    image = Image.new("L", (size, size), 128)
    points, (x0, y0, x1, y1) = [], (2, 2, size - 3, size - 3)
    while x1 - x0 > 4:
        points += [(x0, y0), (x1, y0), (x1, y1), (x0 + 4, y1), (x0 + 4, y0 + 4)]
        x0, y0, x1, y1 = x0 + 4, y0 + 4, x1 - 4, y1 - 4
    ImageDraw.Draw(image).line(points, fill=110)
    pixels = np.array(image)
    pixels[size // 2, size // 2] = 0
    return pixels


def assert_equals_opencv(image: np.ndarray, low, high):
    ours, theirs = canny_edges(image, low, high), cv2.Canny(image, low, high)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == image.shape[:2]
    assert np.array_equal(ours, theirs), f"{image.shape} ({low}, {high}): {(ours != theirs).sum()} pixels differ"


# ------------------------------------------------------------------------------------------ Canny = cv2.Canny


@pytest.mark.parametrize("low, high", THRESHOLDS)
def test_canny_equals_opencv_on_noise_ramps_and_drawings(low, high):
    images = [noise(0, 48, 64), ramps(1, 61, 47), drawing(2, 96, 128), drawing(3, 77, 131, blur=1.2)]
    for image in images:
        for variant in (image, image[..., 0], np.ascontiguousarray(image[..., ::-1])):  # RGB, grey, BGR
            assert_equals_opencv(variant, low, high)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (3, 3), (4, 4), (2, 40), (37, 53)])
def test_canny_equals_opencv_on_tiny_and_odd_sizes(height, width):
    for seed in range(4):
        for image in (noise(seed, height, width), noise(seed, height, width, 1)[..., 0], (noise(seed, height, width) // 128) * 255):
            for low, high in ((100, 200), (0, 0), (10, 300)):
                assert_equals_opencv(image, low, high)


def test_canny_equals_opencv_on_a_512_photo_under_every_opencv_setting():
    """OpenCV picks different code paths by thread count (slices of rows, then a serial hysteresis across them)
    and may use Intel IPP: the result is the same, and equal to ours."""
    image = drawing(4, 512, 512, blur=1.0)
    threads, ipp = cv2.getNumThreads(), cv2.ipp.useIPP()
    try:
        for use_ipp in (True, False):
            for n in (1, 2, 8):
                cv2.ipp.setUseIPP(use_ipp)
                cv2.setNumThreads(n)
                assert_equals_opencv(image, 100, 200)
                assert_equals_opencv(image[..., 1], 100, 200)
    finally:
        cv2.setNumThreads(threads)
        cv2.ipp.setUseIPP(ipp)


def test_canny_follows_long_chains_of_weak_edges():
    image = spiral()
    ours = canny_edges(image, 40, 200)
    assert np.array_equal(ours, cv2.Canny(image, 40, 200))
    assert (ours > 0).sum() > 10_000  # the whole spiral, reached from its one strong pixel
    assert not canny_edges(np.where(image == 0, 128, image).astype(np.uint8), 40, 200).any()  # no strong spot: nothing


def test_fixed_point_direction_bins_equal_exact_angles():
    """OpenCV's integer tests against tan 22.5° and tan 67.5° put every Sobel gradient (|dx|, |dy| <= 1020) in the
    bin the exact angle gives (no ratio of such integers falls between tan 22.5° and 13573 / 2^15)."""
    x, y = np.arange(1, 1021)[:, None], np.arange(0, 1021)[None, :]
    assert np.array_equal((y << 15) < x * TG22, np.arctan2(y, x) < np.pi / 8)
    assert np.array_equal((y << 15) > x * TG22 + (x << 16), np.arctan2(y, x) > 3 * np.pi / 8)


def test_hysteresis_keeps_the_components_that_hold_a_strong_pixel():
    """The union-find against scipy's labelling of 8-connected components, on random fields dense enough to
    form long, branching components."""
    rng = np.random.default_rng(5)
    for density in (0.2, 0.45, 0.6, 0.9):
        candidate = rng.random((120, 140)) < density
        strong = candidate & (rng.random(candidate.shape) < 0.002)
        labels, _ = scipy.ndimage.label(candidate, structure=np.ones((3, 3)))
        expected = np.isin(labels, labels[strong]) & candidate
        assert np.array_equal(_hysteresis(candidate, strong), expected), density
    empty = np.zeros((4, 5), dtype=bool)
    assert not _hysteresis(empty, empty).any()


def test_canny_is_fast():
    image = drawing(6, 512, 512, blur=1.0)
    canny_edges(image)
    start = time.perf_counter()
    canny_edges(image)
    assert time.perf_counter() - start < 1.0  # about 0.05 s on a laptop core; docs/controlnet.md gives the numbers


# ------------------------------------------------------------------------------------------ canny(): inputs and refusals


def test_canny_gives_the_annotators_rgb_edge_map():
    photo = drawing(7, 64, 80, blur=0.8)
    edges = canny(Image.fromarray(photo))
    assert edges.mode == "RGB" and edges.size == (80, 64)
    expected = cv2.Canny(photo, 100, 200)  # the annotator: cv2.Canny on the RGB array, then HWC3
    assert np.array_equal(np.asarray(edges), np.stack([expected] * 3, axis=-1))
    assert set(np.unique(expected)) == {0, 255}
    assert canny(photo, 50, 150) == canny(Image.fromarray(photo), 50, 150)  # arrays and PIL images agree


def test_canny_reads_images_as_control_images_are_read():
    photo = Image.fromarray(drawing(8, 48, 64))
    grey = photo.convert("L")
    assert np.array_equal(np.asarray(canny(grey))[..., 0], cv2.Canny(np.asarray(grey), 100, 200))
    assert canny(np.asarray(grey)) == canny(grey)  # a grey array, one channel: the same as its RGB
    for mode in ("P", "1", "CMYK", "RGBA", "LA"):
        image = photo.convert(mode)
        assert canny(image) == Image.fromarray(cv2.Canny(np.asarray(control_rgb(image)), 100, 200)).convert("RGB"), mode
    rgba = np.dstack([np.asarray(photo), np.where(np.arange(64) < 32, 255, 0)[None].repeat(48, 0).astype(np.uint8)])
    assert canny(rgba) == canny(Image.fromarray(rgba)) == canny(control_rgb(Image.fromarray(rgba)))  # transparent: black
    deep = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # 16-bit: scaled to 8 bits
    assert deep.mode.startswith("I;16") and canny(deep) == canny(grey)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8, 3), np.float32), "a float32 array"),
        (np.zeros((8, 8, 2), np.uint8), "must be \\(H, W\\), \\(H, W, 3\\) or \\(H, W, 4\\)"),
        (torch.zeros(3, 8, 8), "got Tensor"),
        ("photo.png", "open files with PIL.Image.open"),
        (Image.fromarray(np.zeros((8, 8), np.float32)), "floating-point image"),
    ],
)
def test_canny_refuses_what_is_not_an_image(image, message):
    with pytest.raises(ValueError, match=message):
        canny(image)


@pytest.mark.parametrize("low, high", [(-1, 200), (100, float("nan")), (float("inf"), 200), ("100", 200), (None, 200), (True, 200)])
def test_canny_refuses_bad_thresholds(low, high):
    with pytest.raises(ValueError, match="threshold must be a number >= 0 .* annotator uses 100 and 200"):
        canny(noise(0, 8, 8), low, high)


def test_canny_takes_numpy_scalars_and_huge_thresholds():
    image = drawing(9, 40, 40)
    assert np.array_equal(canny_edges(image, np.float32(100), np.int64(200)), cv2.Canny(image, 100, 200))
    assert not canny_edges(image, 1e30, 1e30).any()  # above the largest magnitude, 2040: no edge


# ------------------------------------------------------------------------------------------ inpaint condition


def make_inpaint_condition(image, image_mask):
    """The oracle, as diffusers' ControlNet docs (control_v11p_sd15_inpaint) write it."""
    image = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    image_mask = np.array(image_mask.convert("L")).astype(np.float32) / 255.0
    image[image_mask > 0.5] = -1.0  # set as masked pixel
    image = np.expand_dims(image, 0).transpose(0, 3, 1, 2)
    return torch.from_numpy(image)


def mask_image(height: int = 64, width: int = 64) -> Image.Image:
    """White to be repainted; greys 127 and 128 side by side, the two sides of the 0.5 threshold."""
    mask = np.zeros((height, width), np.uint8)
    mask[16:48, 16:40] = 255
    mask[16:48, 40:44] = 128
    mask[16:48, 44:48] = 127
    return Image.fromarray(mask)


def test_inpaint_condition_equals_diffusers_make_inpaint_condition():
    image, mask = Image.fromarray(drawing(10, 64, 64)), mask_image()
    condition = inpaint_condition(image, mask)
    assert condition.shape == (1, 3, 64, 64) and condition.dtype == torch.float32
    assert torch.equal(condition, make_inpaint_condition(image, mask))
    assert (condition[0, :, 16:48, 16:44] == -1).all() and (condition[0, :, 16:48, 44:48] >= 0).all()
    for other in (np.asarray(mask), np.asarray(mask) > 127, torch.from_numpy(np.asarray(mask) / 255.0), mask.convert("RGB")):
        assert torch.equal(inpaint_condition(np.asarray(image), other), condition)  # the forms sd15's inpainting takes
    assert torch.equal(control_image(condition, 64, 64), condition)  # the pipeline takes it as it is


def test_inpaint_condition_refusals():
    image = Image.fromarray(drawing(11, 64, 48))
    with pytest.raises(ValueError, match="the mask is 64×64 but the image is 48×64; give a mask of the image's size"):
        inpaint_condition(image, mask_image())
    with pytest.raises(ValueError, match="colour image.*swapped"):
        inpaint_condition(image, image)
    with pytest.raises(ValueError, match="PIL image or a uint8 array"):
        inpaint_condition(torch.zeros(1, 3, 64, 48), mask_image(64, 48))


def test_control_image_takes_minus_one_and_refuses_other_negative_values():
    condition = inpaint_condition(Image.fromarray(drawing(12, 64, 64)), mask_image())
    assert torch.equal(control_image(condition[0], 64, 64), condition)
    assert torch.equal(control_image(condition[0].permute(1, 2, 0).numpy(), 64, 64), condition)  # (H, W, 3) floats
    img2img_style = condition.clamp(0, 1) * 2 - 1  # [-1, 1], as img2img's input: -0.5 and the like
    for bad in (img2img_style, torch.full((1, 3, 64, 64), -0.5), torch.full((1, 3, 64, 64), -1.0001)):
        with pytest.raises(ValueError, match="in \\[0, 1\\].*exactly -1 .*inpaint ControlNet"):
            control_image(bad, 64, 64)


def test_inpaint_condition_through_the_pipeline_matches_diffusers(tiny_model, controlnet, reference):
    """The -1 pixels reach the ControlNet unchanged, as in diffusers' StableDiffusionControlNetPipeline given the
    same tensor; had they been clamped to 0 (or the tensor refused) the image would differ."""
    condition = inpaint_condition(Image.fromarray(drawing(13, 64, 64, blur=1.0)), mask_image())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    reference.scheduler = diffusers_scheduler("ddim")
    kwargs = dict(width=64, height=64, output_type="np", latents=latents)
    ours = tiny_model.generate(PROMPT, steps=4, sampler="ddim", controlnet=controlnet, control_image=condition, **kwargs)
    theirs = reference(PROMPT, image=condition, num_inference_steps=4, **kwargs).images
    clamped = tiny_model.generate(PROMPT, steps=4, sampler="ddim", controlnet=controlnet, control_image=condition.clamp(0, 1), **kwargs)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - clamped).max() > 1e-3  # 0.005 here, 50 times the tolerance: a clamp is caught


def test_inpainting_takes_the_inpaint_condition(tiny_model, controlnet):
    image, mask = Image.fromarray(drawing(14, 64, 64)), mask_image()
    run = dict(steps=2, seed=3, output_type="np", sampler="ddim", controlnet=controlnet, control_image=inpaint_condition(image, mask))
    steered = tiny_model.inpaint(image, mask, "a door", **run)
    zero = tiny_model.inpaint(image, mask, "a door", controlnet_conditioning_scale=0.0, **run)
    assert steered.shape == (1, 64, 64, 3) and np.abs(steered - zero).max() > 1e-2
