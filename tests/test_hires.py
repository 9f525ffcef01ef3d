"""High-resolution fix: native-size first pass, upscale, image-to-image refinement."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd15.cli import main
from sd15.hires import upscaled_size

KW = dict(steps=3, sampler="euler", seed=4, width=64, height=48)
TOL = 1e-4  # images in [0, 1] against diffusers, as tests/test_controlnet.py argues


def test_first_pass_is_generate_and_output_is_upscaled(tiny_model):
    first = []
    out = tiny_model.hires_fix("a castle", scale=2.0, strength=0.6, callback=lambda info: first.append(info) if info["pass"] == 1 else None, **KW)
    assert out[0].size == (128, 96)
    assert out[0].info["sd15_hires"] == {"scale": 2.0, "steps": 3, "upscaler": "lanczos", "width": 128, "height": 96}
    assert out[0].info["sd15"].width == 64 and out[0].info["sd15"].strength == 0.6
    plain = tiny_model.generate("a castle", output_type="latent", **KW)
    assert torch.allclose(first[-1]["x"], plain)  # pass 1 is exactly text-to-image at the native size
    again = tiny_model.hires_fix("a castle", scale=2.0, strength=0.6, **KW)
    assert np.array_equal(np.asarray(out[0]), np.asarray(again[0]))


@pytest.mark.parametrize("upscaler", ["lanczos", "latent"])
def test_second_pass_refines_the_upscaled_first(tiny_model, upscaler, monkeypatch):
    """Pass 2 is image-to-image from the first pass's latents upscaled: `hires_steps` steps at the new size."""
    import sd15.hires as hires

    recorded = {}
    real = hires.upscale_latents

    def spy(m, latents, width, height, how, generators):
        recorded["in"], recorded["out"] = latents.clone(), real(m, latents, width, height, how, generators)
        return recorded["out"]

    monkeypatch.setattr(hires, "upscale_latents", spy)
    second = []
    callback = lambda info: second.append(info["x"].shape) if info["pass"] == 2 else None
    out = tiny_model.hires_fix("a castle", scale=2.0, strength=0.5, hires_steps=4, upscaler=upscaler, output_type="np",
                               callback=callback, **KW)[0]  # fmt: skip
    assert out.shape == (96, 128, 3)
    assert torch.equal(recorded["in"], tiny_model.generate("a castle", output_type="latent", **KW))
    assert recorded["out"].shape == (1, 4, 12, 16)
    if upscaler == "latent":
        expected = torch.nn.functional.interpolate(recorded["in"], size=(12, 16), mode="bilinear")
        assert torch.allclose(recorded["out"], expected)
    else:  # decoded, Lanczos-enlarged, encoded (random weights: the VAE round trip keeps little)
        assert not torch.allclose(recorded["out"], torch.nn.functional.interpolate(recorded["in"], size=(12, 16), mode="bilinear"))
    assert second == [(1, 4, 12, 16)] * 4  # exactly hires_steps, as the web UI runs it


def test_sizes_and_refusals(tiny_model):
    assert upscaled_size(512, 512, 1.5) == (768, 768)
    assert upscaled_size(512, 768, 1.3) == (664, 992)  # rounded down, as the web UI: int(768 · 1.3) // 8 · 8
    assert upscaled_size(512, 512, 1.15) == (584, 584)
    with pytest.raises(ValueError, match="between 1 and 4"):
        tiny_model.hires_fix("a", scale=5, **KW)
    with pytest.raises(ValueError, match="upscaler"):
        tiny_model.hires_fix("a", upscaler="esrgan", **KW)
    with pytest.raises(ValueError, match="strength"):
        tiny_model.hires_fix("a", strength=0, **KW)
    with pytest.raises(ValueError, match="600 hires steps at strength 0.5 need a 1200-step schedule, more than the model's 1000"):
        tiny_model.hires_fix("a", hires_steps=600, strength=0.5, **KW)


@pytest.mark.parametrize("hires_steps, strength", [(5, 0.15), (1, 0.5), (3, 0.3), (4, 1.0), (0, 0.5)])
def test_second_pass_runs_exactly_its_steps_from_the_strengths_noise_level(tiny_model, hires_steps, strength):
    """As the web UI's second pass: the last `hires_steps` of an int(hires_steps / strength)-step schedule (0:
    as many as the first pass), settings a plain img2img count (int(steps · strength) of steps) would refuse."""
    from sd15.samplers import plan_sampling

    sigmas = []
    out = tiny_model.hires_fix("a castle", scale=1.5, strength=strength, hires_steps=hires_steps, upscaler="latent",
                               callback=lambda info: sigmas.append(info["sigma"]) if info["pass"] == 2 else None, **KW)  # fmt: skip
    run = hires_steps or KW["steps"]
    total = int(run / min(strength, 0.999))
    assert sigmas == plan_sampling("euler", total).sigmas[total - run : total].tolist()
    assert out[0].info["sd15_hires"]["steps"] == run


def test_prompt_editing_goes_on_into_the_second_pass(tiny_model, monkeypatch):
    """The web UI's timeline since 1.6: fractions 1 … 2 and step numbers after the first pass's fall in the second."""
    import sd15.prompts as prompt_io

    def conditioning(prompt):
        encoded, seen = [], []
        real, real_forward = prompt_io.encode_schedule, type(tiny_model.unet).forward

        def spy(m, texts, clip_skip=1, counts=None):
            contexts = real(m, texts, clip_skip, counts)
            encoded.extend((text, contexts[i : i + 1]) for i, text in enumerate(texts))
            return contexts

        with monkeypatch.context() as patch:
            patch.setattr(prompt_io, "encode_schedule", spy)
            patch.setattr(tiny_model.unet, "forward", lambda x, t, ctx: (seen.append(ctx[1:]), real_forward(tiny_model.unet, x, t, ctx))[1])
            tiny_model.hires_fix(prompt, scale=1.5, strength=0.5, hires_steps=4, upscaler="latent", output_type="np",
                                 **{**KW, "steps": 2})  # fmt: skip
        return [next(text[2:] for text, c in encoded if c.equal(ctx)) for ctx in seen]  # euler: one call per step

    assert conditioning("a [cat:dog:1.5]") == ["cat", "cat"] + ["cat", "cat", "dog", "dog"]  # (1.5 - 1) · 4
    assert conditioning("a [cat:dog:3]") == ["cat", "cat"] + ["cat", "dog", "dog", "dog"]  # step 3 - 2 of pass 2
    assert conditioning("a [cat:dog:0.5]") == ["cat", "dog"] + ["dog"] * 4  # ended in pass 1: stays ended
    assert conditioning("a [cat|dog]") == ["cat", "dog"] + ["cat", "dog", "cat", "dog"]


def test_cli_hires(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SD15_SAFETY_CHECKER", raising=False)
    assert main(["generate", "a castle", "--steps", "2", "--width", "64", "--height", "64", "--hires-scale", "1.5",
                 "--hires-steps", "2", "--model", str(tiny_checkpoint), "-o", "big.png", "--no-progress"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "big.png").size == (96, 96)


def test_hires_settings_are_recorded_and_reproduced_from_the_png(workdir, tiny_checkpoint):
    from sd15.pnginfo import parse_parameters, read_parameters

    args = ["--steps", "2", "--width", "64", "--height", "64", "--model", str(tiny_checkpoint), "--no-progress", "--seed", "5"]
    assert main(["generate", "a castle", "--hires-scale", "1.5", "--hires-steps", "3", "--hires-strength", "0.4",
                 "--hires-upscaler", "latent", "-o", "big.png", *args]) == 0  # fmt: skip
    text = read_parameters(workdir / "big.png")
    assert "Size: 64x64" in text and "Denoising strength: 0.4" in text  # the web UI's convention: the first pass's size
    assert "Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent" in text
    parsed = parse_parameters(text)
    assert (parsed["hires_scale"], parsed["hires_steps"], parsed["hires_upscaler"], parsed["strength"]) == (1.5, 3, "latent", 0.4)
    assert main(["generate", "--from-png", "big.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    again = Image.open(workdir / "again.png")
    assert again.size == (96, 96)
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(workdir / "big.png")))


def test_a_png_asking_for_an_upscaler_sd15_lacks_is_refused(workdir, tiny_checkpoint, capsys):
    from sd15.pnginfo import save_png

    text = "a castle\nSteps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 1, Size: 64x64, Denoising strength: 0.5, " \
           "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+"
    save_png(Image.new("RGB", (8, 8)), workdir / "a1111.png", text)
    assert main(["generate", "--from-png", "a1111.png", "--model", str(tiny_checkpoint), "-o", "x.png"]) == 2
    assert "R-ESRGAN 4x+" in capsys.readouterr().err and not (workdir / "x.png").exists()


def test_a_web_ui_png_with_a_hires_size_or_no_upscaler_is_made_as_the_web_ui_made_it(workdir, tiny_model, tiny_checkpoint, capsys):
    """"Hires resize: WxH" (one side 0: by the other's scale) instead of a scale, and no "Hires upscaler" when the web
    UI used its default, Latent; a size of another aspect ratio, which the web UI crops to, is refused."""
    from sd15.pnginfo import save_png

    expected = tiny_model.hires_fix("a castle", steps=2, sampler="euler", seed=1, width=64, height=48, scale=2.0,
                                    strength=0.5, upscaler="latent", output_type="np")[0]  # fmt: skip
    base = "a castle\nSteps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x48, Denoising strength: 0.5"
    for i, hires in enumerate(("Hires resize: 128x96", "Hires resize: 128x0", "Hires resize: 0x96", "Hires upscale: 2")):
        save_png(Image.new("RGB", (8, 8)), workdir / f"webui{i}.png", f"{base}, {hires}")
        assert main(["generate", "--from-png", f"webui{i}.png", "--model", str(tiny_checkpoint), "-o", f"out{i}.png", "--no-progress"]) == 0
        assert "input image" not in capsys.readouterr().err  # read as a hires fix, not as an img2img
        out = np.asarray(Image.open(workdir / f"out{i}.png"))
        assert np.array_equal(out, (expected * 255).round().astype(np.uint8)), hires
    save_png(Image.new("RGB", (8, 8)), workdir / "crop.png", f"{base}, Hires resize: 128x128")
    assert main(["generate", "--from-png", "crop.png", "--model", str(tiny_checkpoint), "-o", "x.png"]) == 2
    assert "resizes 64x48 to 128x128, another aspect ratio" in capsys.readouterr().err and not (workdir / "x.png").exists()


# ------------------------------------------------------------------------------------------ with a ControlNet


@pytest.fixture(scope="module")
def reference(tiny_state_dict, tiny_model, controlnet_state_dict, tmp_path_factory):
    """diffusers' ControlNet img2img pipeline over the same random weights (DDIM), the second pass's oracle."""
    from reference_models import diffusers_controlnet, diffusers_pipeline

    return diffusers_pipeline(tiny_state_dict, tiny_model, tmp_path_factory.mktemp("tok"), "StableDiffusionControlNetImg2ImgPipeline",
                              "ddim", controlnet=diffusers_controlnet(controlnet_state_dict, tiny_model.unet.config))  # fmt: skip


def edges(seed: int, height: int, width: int) -> Image.Image:
    """A control image with detail at the 8-pixel scale (random blocks), which a smaller copy loses."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)))


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_with_a_controlnet_is_two_controlled_passes(tiny_model, controlnet, reference, monkeypatch, upscaler):
    """Pass 1 is text-to-image with the control image at the first size; pass 2 is diffusers' ControlNet img2img
    pipeline from the upscaled latents, its noise drawn anew from the seed (as the web UI's second pass), with the
    same control image brought to the final size, as the web UI's extension prepares it: not the first pass's hint
    enlarged."""
    import sd15.controlnet as controlnet_io
    import sd15.hires as hires

    hints = []  # the hint of every ControlNet call, to see which image each pass was given
    real_residuals = controlnet_io.residuals
    monkeypatch.setattr(controlnet_io, "residuals", lambda controls, *args: hints.append(controls[0].hint) or real_residuals(controls, *args))
    control = edges(0, 96, 128)  # at the final size: detail that the first pass's 64×48 cannot hold
    run = dict(steps=5, sampler="ddim", seed=4, width=64, height=48, controlnet=controlnet, control_image=control,
               controlnet_conditioning_scale=0.8, control_guidance_end=0.8)  # fmt: skip
    first = []
    out = tiny_model.hires_fix("a castle", scale=2.0, strength=0.6, upscaler=upscaler, output_type="np",
                               callback=lambda info: first.append(info["x"].clone()) if info["pass"] == 1 else None, **run)  # fmt: skip
    small, big = controlnet_io.control_image(control, 64, 48), controlnet_io.control_image(control, 128, 96)
    assert torch.equal(hints[0], small) and torch.equal(hints[-1], big)
    assert [h.shape[-1] for h in hints] == [64] * 5 + [128] * 5  # one UNet call per step: 5, then hires_steps = 5
    enlarged = controlnet_io.control_image(control.resize((64, 48), Image.LANCZOS), 128, 96)
    assert (big - enlarged).abs().max() > 0.2  # so the second pass's hint was made from the control image itself

    by_hand = tiny_model.generate("a castle", output_type="latent", **run)
    assert torch.equal(first[-1], by_hand)  # pass 1: text-to-image, the control image resized to 64×48
    g = torch.Generator().manual_seed(4)
    torch.randn(4, 6, 8, generator=g)  # pass 1's noise (DDIM draws nothing more)
    init = hires.upscale_latents(tiny_model, by_hand, 128, 96, upscaler, [g])  # "lanczos" draws its VAE sample from g
    # the second pass: the last 5 steps of an int(5 / 0.6) = 8-step schedule, i.e. diffusers at strength 5/8 of 8 steps
    anew = torch.Generator().manual_seed(4)  # the second pass's noise: the seed's first draw at the final size
    theirs = reference("a castle", image=init, control_image=control, height=96, width=128, strength=5 / 8, num_inference_steps=8,
                       generator=anew, output_type="np", controlnet_conditioning_scale=0.8, control_guidance_end=0.8).images  # fmt: skip
    assert out.shape == theirs.shape == (1, 96, 128, 3)  # diffusers takes a 4-channel `image` as latents
    assert np.abs(out - theirs).max() < TOL


def test_hires_refuses_a_control_image_that_cannot_fit_both_passes_before_the_first(tiny_model, controlnet):
    """A float control image is never resized (its range would be a guess), so it fits one pass at most: refused
    before the first pass runs, saying what to give instead."""
    steps = []
    with pytest.raises(ValueError, match="is 64×48 but the output is 128×96; resize it, or pass it as a PIL image"):
        tiny_model.hires_fix("a", controlnet=controlnet, control_image=torch.rand(1, 3, 48, 64), scale=2.0,
                             callback=steps.append, **KW)  # fmt: skip
    assert steps == []


def test_cli_hires_with_a_controlnet_records_both_and_from_png_makes_it_again(workdir, tiny_checkpoint, tiny_model, controlnet_file):
    """The PNG records the hires fix and the ControlNet; it is the Python API's image; --from-png with the same
    ControlNet and control image makes it again, bit for bit."""
    from sd15.pnginfo import parse_parameters, read_parameters

    edges(1, 64, 64).save("edges.png")
    run = ["--steps", "3", "--sampler", "ddim", "--seed", "5", "--model", str(tiny_checkpoint), "--no-progress", "--no-safety-checker"]
    assert main(["generate", "a castle", "--hires-scale", "1.5", "--hires-steps", "2", "--hires-strength", "0.6",
                 "--controlnet", f"{controlnet_file}:0.7", "--control-image", "edges.png", "--control-end", "0.9",
                 "-o", "big.png", *run]) == 0  # fmt: skip
    text = read_parameters("big.png")
    assert "Size: 64x64" in text and "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in text
    assert 'ControlNet 0: "Module: none, Model: canny-tiny [' in text and "Weight: 0.7" in text and "Guidance End: 0.9" in text
    parsed = parse_parameters(text)
    assert parsed["hires_scale"] == 1.5 and parsed["controlnets"][0]["weight"] == 0.7
    big = np.asarray(Image.open("big.png"))
    assert big.shape == (96, 96, 3)

    api = tiny_model.hires_fix("a castle", steps=3, sampler="ddim", seed=5, width=64, height=64, scale=1.5, hires_steps=2,
                               strength=0.6, controlnet=tiny_model.load_controlnet(controlnet_file),
                               control_image=Image.open("edges.png"), controlnet_conditioning_scale=0.7,
                               control_guidance_end=0.9)[0]  # fmt: skip
    assert np.array_equal(np.asarray(api), big)

    assert main(["generate", "--from-png", "big.png", "--controlnet", str(controlnet_file), "--control-image", "edges.png",
                 "-o", "again.png", *run[6:]]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open("again.png")), big)
    assert read_parameters("again.png") == text


def test_the_second_pass_may_have_its_own_sampler_prompt_and_guidance(tiny_model, monkeypatch):
    """The web UI's Hires sampler, Hires prompt, Hires negative prompt, Hires CFG Scale: the second pass runs them
    (seen in the calls it makes), the first pass is untouched, and the first pass's own values change nothing."""
    from sd15 import pipeline
    from sd15.hires import second_pass_plan

    calls, real_run = [], pipeline._run

    def spy(m, plan, prompts, negatives, start, generators, guidance_scale, *args, **kwargs):
        calls.append((plan.sampler, list(prompts), list(negatives), guidance_scale, plan.timesteps[plan.start :].tolist()))
        return real_run(m, plan, prompts, negatives, start, generators, guidance_scale, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_run", spy)
    run = dict(KW, scale=1.5, strength=0.6, output_type="np", negative_prompt="blurry", guidance_scale=7.5)
    plain = tiny_model.hires_fix("a castle", **run)
    same = tiny_model.hires_fix("a castle", hires_sampler="euler", hires_prompt="a castle", hires_negative_prompt="blurry",
                                hires_guidance_scale=7.5, **run)  # fmt: skip
    assert np.array_equal(plain, same)
    calls.clear()
    own = tiny_model.hires_fix("a castle", hires_sampler="dpmpp_2m", hires_prompt="a castle, detailed stone",
                               hires_negative_prompt="", hires_guidance_scale=3.0, **run)  # fmt: skip
    first, second = calls
    assert first[:4] == ("euler", ["a castle"], ["blurry"], 7.5)
    plan = second_pass_plan("dpmpp_2m", 3, 0.6)
    assert second[:4] == ("dpmpp_2m", ["a castle, detailed stone"], [""], 3.0) and second[4] == plan.timesteps[plan.start :].tolist()
    assert not np.array_equal(own, plain)


def test_a_hires_sampler_without_schedule_types_drops_the_first_passs(tiny_model):
    run = dict(KW, scale=1.5, output_type="np")
    image = tiny_model.hires_fix("a castle", karras=True, hires_sampler="ddim", **run)  # the web UI applies none to DDIM
    assert image.shape == (1, 72, 96, 3)
    with pytest.raises(ValueError, match="karras sigmas apply to the sigma-space samplers, not 'ddim'"):
        tiny_model.hires_fix("a castle", hires_sampler="ddim", hires_schedule_type="karras", **run)
    with pytest.raises(ValueError, match="a hires prompt is one text or one per prompt"):
        tiny_model.hires_fix(["a", "b"], hires_prompt=["c"], **run)


def test_the_second_passs_settings_are_recorded_and_read_back(workdir, tiny_checkpoint, capsys):
    from sd15.pnginfo import parse_parameters, read_parameters

    args = ["--steps", "2", "--width", "64", "--height", "64", "--model", str(tiny_checkpoint), "--no-progress", "--seed", "5"]
    assert main(["generate", "a castle", "--sampler", "euler", "--hires-scale", "1.5", "--hires-sampler", "dpmpp_2m",
                 "--hires-schedule-type", "karras", "--hires-prompt", "a castle, detailed: stone", "--hires-cfg", "4",
                 "-o", "big.png", *args]) == 0  # fmt: skip
    text = read_parameters(workdir / "big.png")
    for field in ('Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires prompt: "a castle, detailed: stone", '
                  "Hires CFG Scale: 4,",):  # fmt: skip
        assert field in text
    assert "Hires negative prompt" not in text  # the same as the first pass's: not said, as the web UI
    assert main(["generate", "--from-png", "big.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert "does not apply" not in capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(workdir / "again.png")), np.asarray(Image.open(workdir / "big.png")))
    webui = parse_parameters("a castle\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512, Denoising strength: 0.5, "
                             "Hires upscale: 2, Hires sampler: DPM++ 2M Karras, Hires negative prompt: blurry, "
                             "Hires CFG Scale: 5, Version: v1.10.1")  # fmt: skip
    assert (webui["hires_sampler"], webui["hires_schedule_type"], webui["hires_negative_prompt"], webui["hires_guidance_scale"]) == (
        "dpmpp_2m", "karras", "blurry", 5.0)  # fmt: skip
