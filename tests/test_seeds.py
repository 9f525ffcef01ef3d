"""Variation seeds, seed resize and the eta noise seed delta (sd15.seeds) against the web UI's noise.

The oracle is the web UI's `ImageRNG.first` with its "RNG: CPU" setting (modules/rng.py), written out here on
torch's global generator as it draws: `torch.manual_seed(seed)` then `torch.randn(shape)`. sd15 draws from a
generator per image instead; both are torch's CPU generator (a Mersenne Twister) seeded alike, so the noise must
agree to the bit.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sd15.cli import main
from sd15.pnginfo import parse_parameters, read_parameters
from sd15.seeds import NoiseSeeds, slerp

SHAPE = (4, 8, 8)  # a 64×64 image's latent


def web_ui_randn(seed: int, shape) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(shape)


def web_ui_slerp(val, low, high):
    """Its `slerp`: each (channel, x) column normalised over y; the columns' angle sets the weights."""
    low_n, high_n = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def web_ui_first_noise(seed, shape, subseed=None, strength=0.0, resize_from=None) -> torch.Tensor:
    """One image's initial noise as the web UI's ImageRNG.first makes it (resize_from: (W, H) pixels)."""
    with torch.random.fork_rng(devices=[]):
        small = shape if resize_from is None else (shape[0], resize_from[1] // 8, resize_from[0] // 8)
        sub = web_ui_randn(subseed, small) if strength else None
        noise = web_ui_randn(seed, small)
        if sub is not None:
            noise = web_ui_slerp(strength, noise, sub)
        if small != shape:
            x = web_ui_randn(seed, shape)
            dx, dy = (shape[2] - small[2]) // 2, (shape[1] - small[1]) // 2
            w = small[2] if dx >= 0 else small[2] + 2 * dx
            h = small[1] if dy >= 0 else small[1] + 2 * dy
            tx, ty = max(dx, 0), max(dy, 0)
            sx, sy = max(-dx, 0), max(-dy, 0)
            x[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
            noise = x
    return noise


def sd15_first_noise(seed, shape, n=1, **steering) -> list[torch.Tensor]:
    seeds = NoiseSeeds.make(seed, n, **steering)
    return [seeds.steer(i, torch.randn(shape, generator=g)) for i, g in enumerate(seeds.generators())]


@pytest.mark.parametrize(
    "strength, resize_from",
    [(0.3, None), (1.0, None), (0.0, (96, 80)), (0.0, (40, 56)), (0.0, (72, 40)), (0.25, (88, 48))],
)
def test_the_noise_is_the_web_uis(strength, resize_from):
    """Variations, seeds resized from larger and smaller images (odd differences leave the web UI's row or
    column as this size's draw), and both at once."""
    ours = sd15_first_noise(123, SHAPE, variation_seed=456, variation_strength=strength, resize_from=resize_from)[0]
    theirs = web_ui_first_noise(123, SHAPE, 456, strength, resize_from)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, web_ui_randn(123, SHAPE))  # steered: not the seed's own draw


def test_slerp_goes_from_one_noise_to_the_other_on_the_sphere():
    a, b = web_ui_randn(1, SHAPE), web_ui_randn(2, SHAPE)
    torch.testing.assert_close(slerp(0.0, a, b), a, rtol=0, atol=1e-5)
    torch.testing.assert_close(slerp(1.0, a, b), b, rtol=0, atol=1e-5)
    half = slerp(0.5, a, b)  # on the great circle: a column's norm stays between its ends' (a straight line dips)
    norms = [t.norm(dim=1) for t in (a, b, half)]
    assert (norms[2] >= torch.minimum(norms[0], norms[1]) * 0.999).all()
    assert (((a + b) / 2).norm(dim=1) < norms[2]).all()


def test_a_variation_keeps_the_seed_and_counts_up_the_variation_seed():
    """The web UI's all_seeds / all_subseeds: with a variation every image has the seed, image i variation seed + i;
    without, image i has seed + i. Image i of a batch is the image made alone with its own seeds."""
    varied = NoiseSeeds.make(10, 3, variation_seed=20, variation_strength=0.5)
    assert varied.seeds == (10, 10, 10) and varied.variation_seeds == (20, 21, 22)
    assert NoiseSeeds.make(10, 3).seeds == (10, 11, 12) and NoiseSeeds.make(10, 3).variation_seeds is None
    batch = sd15_first_noise(10, SHAPE, 3, variation_seed=20, variation_strength=0.5)
    assert torch.equal(batch[2], sd15_first_noise(10, SHAPE, variation_seed=22, variation_strength=0.5)[0])
    assert NoiseSeeds.make(10, 1, variation_strength=0.5).variation_seeds[0] is not None  # none given: a random one


def test_generate_starts_from_the_steered_noise_and_records_it(tiny_model):
    """Euler draws no noise after the first, so the run is the run from the web UI's noise given as latents."""
    run = dict(steps=3, sampler="euler", width=64, height=64, output_type="latent")
    steered = tiny_model.generate("a cat", seed=5, variation_seed=7, variation_strength=0.4, seed_resize_from=(48, 72), **run)
    given = tiny_model.generate("a cat", seed=5, latents=web_ui_first_noise(5, SHAPE, 7, 0.4, (48, 72))[None], **run)
    assert torch.equal(steered, given)
    assert not torch.equal(steered, tiny_model.generate("a cat", seed=5, **run))
    images = tiny_model.generate("a cat", seed=5, variation_seed=7, variation_strength=0.4, num_images=2,
                                 **{**run, "output_type": "pil"})  # fmt: skip
    records = [im.info["sd15"] for im in images]
    assert [(r.seed, r.variation_seed, r.variation_strength) for r in records] == [(5, 7, 0.4), (5, 8, 0.4)]


def test_eta_noise_seed_delta_draws_the_samplers_noise_from_seed_plus_delta(tiny_model):
    """With ENSD the initial noise is still the seed's; Euler a's later noise comes from seed + delta: the run
    given the seed's noise as latents with seed + delta (whose generator then draws only the sampler's noise)."""
    run = dict(steps=3, sampler="euler_a", width=64, height=64, output_type="latent")
    ensd = tiny_model.generate("a cat", seed=5, eta_noise_seed_delta=31337, **run)
    given = tiny_model.generate("a cat", seed=5 + 31337, latents=web_ui_randn(5, SHAPE)[None], **run)
    assert torch.equal(ensd, given)
    assert not torch.equal(ensd, tiny_model.generate("a cat", seed=5, **run))
    euler = {**run, "sampler": "euler"}  # no noise after the first: nothing to change
    assert torch.equal(tiny_model.generate("a cat", seed=5, eta_noise_seed_delta=31337, **euler),
                       tiny_model.generate("a cat", seed=5, **euler))  # fmt: skip


def test_img2img_inpaint_and_hires_take_the_steering(tiny_model):
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    calls = {
        "img2img": lambda **kw: tiny_model.img2img(image, "a cat", strength=0.8, **kw),
        "inpaint": lambda **kw: tiny_model.inpaint(image, mask, "a cat", **kw),
        "hires_fix": lambda **kw: tiny_model.hires_fix("a cat", width=64, height=64, scale=1.5, **kw),
    }
    for name, call in calls.items():
        run = dict(steps=4, sampler="euler_a", seed=3, output_type="np")  # img2img: 3 steps, 2 of them drawing noise
        plain = call(**run)
        assert np.array_equal(call(**run, variation_seed=4, variation_strength=0.0), plain), name
        varied = call(**run, variation_seed=4, variation_strength=0.6)
        assert not np.array_equal(varied, plain) and np.array_equal(call(**run, variation_seed=4, variation_strength=0.6), varied), name
        assert not np.array_equal(call(**run, eta_noise_seed_delta=9), plain), name
        record = call(**{**run, "output_type": "pil"}, variation_seed=4, variation_strength=0.6, eta_noise_seed_delta=9)[0].info["sd15"]
        assert (record.variation_seed, record.variation_strength, record.eta_noise_seed_delta) == (4, 0.6, 9), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variation_seed=1, variation_strength=1.5), "variation strength must be a number from 0"),
        (dict(variation_seed=1, variation_strength=float("nan")), "variation strength must be a number from 0"),
        (dict(variation_seed=2**64, variation_strength=0.5), "variation seed must be a whole number"),
        (dict(seed_resize_from=(0, 64)), "seed_resize_from must be"),
        (dict(seed_resize_from=(64,)), "seed_resize_from must be"),
        (dict(eta_noise_seed_delta=-1), "eta noise seed delta must be a whole number"),
        (dict(variation_seed=1, variation_strength=0.5, latents=torch.zeros(1, *SHAPE)), "latents replace the seeded noise"),
    ],
)
def test_bad_steering_is_refused(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate("a cat", steps=1, width=64, height=64, **kwargs)


def test_the_png_records_the_steering_and_from_png_makes_the_image_again(workdir, tiny_checkpoint, capsys):
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5",
           "--sampler", "euler_a"]  # fmt: skip
    assert main(["generate", "a cat", "-n", "2", "--variation-seed", "9", "--variation-strength", "0.3",
                 "--seed-resize-from", "48x80", "--ensd", "31337", "-o", "v.png", *run]) == 0  # fmt: skip
    text = read_parameters(workdir / "v-1.png")
    for field in ("Seed: 5,", "Variation seed: 10,", "Variation seed strength: 0.3,", "Seed resize from: 48x80,", "ENSD: 31337,"):
        assert field in text
    assert main(["generate", "--from-png", "v-1.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert "does not apply" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(workdir / "again.png")), np.asarray(Image.open(workdir / "v-1.png")))
    # a web UI PNG's fields read as the web UI writes them
    webui = "a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, Variation seed: 9, " \
            "Variation seed strength: 0.25, Seed resize from: 512x768, ENSD: 31337, Version: v1.10.1"
    parsed = parse_parameters(webui)
    assert (parsed["variation_seed"], parsed["variation_strength"], parsed["seed_resize_from"], parsed["eta_noise_seed_delta"]) == (
        9, 0.25, (512, 768), 31337)  # fmt: skip


def test_the_command_line_refuses_bad_steering_before_loading(workdir, tiny_checkpoint, capsys):
    run = ["generate", "a cat", "--model", str(tiny_checkpoint), "--no-progress", "-o", "x.png"]
    assert main([*run, "--variation-strength", "1.5"]) == 2
    assert "variation strength must be a number from 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([*run, "--seed-resize-from", "0x64"])
    assert stop.value.code == 2 and "expected WIDTHxHEIGHT" in capsys.readouterr().err
    assert not (workdir / "x.png").exists()
    (workdir / "jobs.jsonl").write_text('"a cat"\n')
    assert main(["batch", "jobs.jsonl", "--out", "out", "--model", str(tiny_checkpoint), "--variation-seed", "3"]) == 2
    assert "batch does not take --variation-seed" in capsys.readouterr().err
