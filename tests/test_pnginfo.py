"""The PNG `parameters` text against what the AUTOMATIC1111 web UI writes and reads (modules/infotext_utils.py,
processing.create_infotext): the fields whose meaning depends on the sampler or on who wrote the file."""

import numpy as np
import pytest
from PIL import Image

from sd15.cli import main
from sd15.pipeline import GenerationSettings
from sd15.pnginfo import SCHEDULE_TYPE_NAMES, format_parameters, parse_parameters, read_parameters, save_png
from sd15.samplers import SCHEDULES

WEBUI = "a cat\nSteps: 2, Sampler: {sampler}, CFG scale: 7, Seed: 5, Size: 64x64{extra}, Version: v1.10.1"


def webui(sampler: str, extra: str = "") -> dict:
    return parse_parameters(WEBUI.format(sampler=sampler, extra=extra))


def test_eta_is_ddims_only_under_the_web_uis_key_for_it():
    """The web UI writes DDIM's eta as `Eta DDIM`, and `Eta` for its ancestral/SDE samplers' (1 by default)."""
    assert webui("DDIM", ", Eta DDIM: 0.3")["eta"] == 0.3
    assert "eta" not in webui("Euler a", ", Eta: 0.5")  # not DDIM's: left in the fields (and warned of, below)
    assert "eta" not in webui("DDIM", ", Eta: 0.5")  # the web UI's ancestral eta on DDIM: DDIM does not use it
    s = GenerationSettings("a cat", "", 20, 7.0, "ddim", 5, 512, 512, eta=0.25)
    text = format_parameters(s)
    assert "Eta DDIM: 0.25" in text and parse_parameters(text)["eta"] == 0.25
    old = "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 512x512, Eta: 0.25, Version: sd15"
    assert parse_parameters(old)["eta"] == 0.25  # sd15's own earlier files wrote "Eta"


def test_a_schedule_type_recorded_for_a_timestep_sampler_is_not_applied():
    """Web UI 1.9+ records the chosen schedule for every sampler; DDIM, PLMS, UniPC and LCM do not use it."""
    for name in ("DDIM", "PLMS", "UniPC", "LCM"):
        assert webui(name, ", Schedule type: Karras")["karras"] is False, name
    assert webui("DPM++ 2M", ", Schedule type: Karras")["karras"] is True
    ours = format_parameters(GenerationSettings("a cat", "", 20, 7.0, "unipc", 5, 512, 512, karras=True))
    assert parse_parameters(ours)["karras"] is True  # sd15 runs UniPC on Karras sigmas, and says so


def test_the_sampler_default_schedule_is_said_so_the_web_ui_does_not_pick_its_own():
    """A missing Schedule type is "Automatic" to the web UI: Karras for DPM++ 2M. sd15 writes Uniform."""
    text = format_parameters(GenerationSettings("a cat", "", 20, 7.0, "dpmpp_2m", 5, 512, 512))
    assert "Sampler: DPM++ 2M, Schedule type: Uniform," in text and parse_parameters(text)["karras"] is False
    assert "Schedule type" not in format_parameters(GenerationSettings("a cat", "", 20, 7.0, "ddim", 5, 512, 512))


@pytest.mark.parametrize("label", ["Karras", "Exponential", "SGM Uniform", "Polyexponential"])
def test_a_schedule_in_the_samplers_name_is_split_off(label):
    parsed = webui(f"DPM++ 2M SDE {label}")
    assert parsed["sampler"] == "dpmpp_2m_sde" and parsed["fields"]["Schedule type"] == label
    assert parsed["karras"] is (label == "Karras")
    assert webui("DPM++ 2M SDE Heun")["sampler"] == "dpmpp_2m_sde_heun"  # a sampler's own name is not split


def test_an_unknown_sampler_is_kept_and_refused_only_when_no_sampler_is_given(workdir, tiny_checkpoint, capsys):
    parsed = webui("Restart")
    assert parsed["unknown_sampler"] == "Restart" and "sampler" not in parsed
    save_png(Image.new("RGB", (8, 8)), workdir / "in.png", WEBUI.format(sampler="Restart", extra=", RNG: CPU"))
    run = ["generate", "--from-png", "in.png", "--model", str(tiny_checkpoint), "--no-progress"]
    assert main([*run, "-o", "a.png"]) == 2
    assert "the PNG's sampler Restart is not one sd15 has; choose one with --sampler" in capsys.readouterr().err
    assert main([*run, "-o", "b.png", "--sampler", "euler"]) == 0
    assert parse_parameters(read_parameters(workdir / "b.png"))["sampler"] == "euler"


def test_a_value_that_only_starts_with_a_quote_is_text():
    """The web UI quotes only values with a comma, colon or newline: `"masterpiece" style` is plain text."""
    fields = webui("Euler", ', Hires prompt: "masterpiece" style, Note: "')["fields"]
    assert fields["Hires prompt"] == '"masterpiece" style' and fields["Note"] == '"'
    assert webui("Euler", ', Lora hashes: "a: 0123, b: 4567"')["lora_hashes"] == {"a": "0123", "b": "4567"}


def test_numbers_are_written_so_that_they_read_back_exactly():
    s = GenerationSettings("a cat", "", 20, 7.123456789, "euler", 5, 512, 512, strength=0.333333333)
    parsed = parse_parameters(format_parameters(s))
    assert parsed["guidance_scale"] == 7.123456789 and parsed["strength"] == 0.333333333
    assert "CFG scale: 7.5," in format_parameters(GenerationSettings("a cat", "", 20, 7.5, "euler", 5, 512, 512))


def test_hash_list_names_lose_commas_and_colons_as_the_web_ui_writes_them():
    s = GenerationSettings("a cat", "", 20, 7.0, "euler", 5, 512, 512, lora_hashes={"ink,v2": "0123456789ab"})
    assert parse_parameters(format_parameters(s))["lora_hashes"] == {"inkv2": "0123456789ab"}


def test_from_png_warns_of_web_ui_settings_it_does_not_apply(workdir, tiny_checkpoint, capsys):
    run = ["generate", "--from-png", "in.png", "--model", str(tiny_checkpoint), "--no-progress", "-o", "out.png"]
    cases = [
        ("Euler a", ", Eta: 0.5, RNG: CPU", "(Eta)"),
        ("Euler", ", Emphasis: No norm, Sigma churn: 0.1, RNG: CPU", "(Sigma churn, Emphasis)"),
        ("Euler", ", Schedule type: Beta, Beta schedule alpha: 0.5, Beta schedule beta: 0.6, RNG: CPU", "(Beta schedule alpha)"),
    ]
    for sampler, extra, said in cases:
        save_png(Image.new("RGB", (8, 8)), workdir / "in.png", WEBUI.format(sampler=sampler, extra=extra))
        assert main(run) == 0
        assert said in capsys.readouterr().err, extra
    save_png(Image.new("RGB", (8, 8)), workdir / "in.png", WEBUI.format(sampler="Euler a", extra=", RNG: CPU"))
    assert main(run) == 0
    assert "warning" not in capsys.readouterr().err  # nothing unapplied: nothing said


def test_a_hires_fix_from_before_web_ui_1_0_is_redone_as_one(workdir, tiny_checkpoint):
    """Its PNGs give the final `Size` and a `First pass size` (0x0: about 512² pixels, sides rounded up to 64)."""
    old = WEBUI.format(sampler="Euler", extra=", Denoising strength: 0.5, First pass size: {}, RNG: CPU")
    parsed = parse_parameters(old.replace("64x64", "1024x768").format("0x0"))
    assert (parsed["width"], parsed["height"], parsed["hires_resize"]) == (640, 448, (1024, 768))
    save_png(Image.new("RGB", (8, 8)), workdir / "in.png", old.replace("64x64", "96x96").format("64x64"))
    assert main(["generate", "--from-png", "in.png", "--model", str(tiny_checkpoint), "--no-progress", "-o", "o.png"]) == 0
    redone = parse_parameters(read_parameters(workdir / "o.png"))
    assert Image.open(workdir / "o.png").size == (96, 96) and (redone["width"], redone["hires_scale"]) == (64, 1.5)


def test_the_exponential_schedule_is_run_recorded_and_reproduced(workdir, tiny_checkpoint, capsys):
    """The web UI's default for DPM++ 2M SDE since 1.9: `Schedule type: Exponential`."""
    assert webui("DPM++ 2M SDE", ", Schedule type: Exponential")["schedule_type"] == "exponential"
    assert "schedule_type" not in webui("DDIM", ", Schedule type: Exponential")  # recorded, not used, by the web UI
    assert webui("Euler", ", Schedule type: Polyexponential")["schedule_type"] == "exponential"  # at its rho, 1
    assert "schedule_type" not in webui("Euler", ", Schedule type: Polyexponential, Schedule rho: 2")
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--steps", "3", "-W", "64", "-H", "64", "--seed", "2",
           "--sampler", "dpmpp_2m"]  # fmt: skip
    assert main(["generate", "a cat", "--schedule-type", "exponential", "-o", "exp.png", *run]) == 0
    assert main(["generate", "a cat", "-o", "own.png", *run]) == 0
    assert "Sampler: DPM++ 2M, Schedule type: Exponential," in read_parameters(workdir / "exp.png")
    assert main(["generate", "--from-png", "exp.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert "schedule of noise levels" not in capsys.readouterr().err
    pixels = {n: np.asarray(Image.open(workdir / f"{n}.png")) for n in ("exp", "own", "again")}
    assert np.array_equal(pixels["again"], pixels["exp"]) and not np.array_equal(pixels["own"], pixels["exp"])
    assert main(["generate", "a cat", "--karras", "--schedule-type", "exponential", "-o", "x.png", *run]) == 2
    assert "name two schedules" in capsys.readouterr().err


def test_from_png_warns_when_a_recorded_lora_or_embedding_is_another_file_or_missing(workdir, tiny_checkpoint, capsys):
    import sd15
    from lora_files import random_attention_lora

    random_attention_lora(sd15.load(tiny_checkpoint), workdir / "film.safetensors")
    text = WEBUI.format(sampler="Euler", extra=', RNG: CPU, Lora hashes: "film: 0123456789ab", TI hashes: "zzemb: ba9876543210"')
    save_png(Image.new("RGB", (8, 8)), workdir / "in.png", text.replace("a cat", "a zzemb cat <lora:film:0.5>"))
    run = ["generate", "--from-png", "in.png", "--model", str(tiny_checkpoint), "--no-progress", "--lora-dir", "."]
    assert main([*run, "-o", "out.png"]) == 0
    err = capsys.readouterr().err
    assert "made with the LoRA film [0123456789ab]; the one found here is another file [" in err
    assert "made with the embedding zzemb [ba9876543210], which this run does not have" in err
    recorded = parse_parameters(read_parameters(workdir / "out.png"))["lora_hashes"]["film"]
    save_png(Image.new("RGB", (8, 8)), workdir / "in.png", text.replace("a cat", "a cat <lora:film:0.5>").replace(
        "0123456789ab", recorded).replace(', TI hashes: "zzemb: ba9876543210"', ""))  # fmt: skip
    assert main([*run, "-o", "out2.png"]) == 0
    assert "warning" not in capsys.readouterr().err  # the same LoRA file: nothing said


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n not in ("default", "karras")])
def test_each_schedule_type_is_written_and_read_by_the_web_uis_name(name):
    label = SCHEDULE_TYPE_NAMES[name]
    text = format_parameters(GenerationSettings("a cat", "", 20, 7.0, "euler", 5, 512, 512, schedule_type=name))
    assert f"Sampler: Euler, Schedule type: {label}," in text
    assert ("Beta schedule alpha: 0.6, Beta schedule beta: 0.6," in text) is (name == "beta")  # as the web UI adds them
    assert parse_parameters(text)["schedule_type"] == name
    assert webui("DPM++ 2M SDE", f", Schedule type: {label}")["schedule_type"] == name
    assert "schedule_type" not in webui("PLMS", f", Schedule type: {label}")  # recorded, not used, by the web UI


def test_a_web_ui_schedule_is_run_recorded_and_reproduced(workdir, tiny_checkpoint, capsys):
    """KL Optimal, whose last step ends above sigma = 0, through the whole pipeline and back from its PNG."""
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--steps", "3", "-W", "64", "-H", "64", "--seed", "2",
           "--sampler", "heun"]  # fmt: skip
    assert main(["generate", "a cat", "--schedule-type", "kl_optimal", "-o", "kl.png", *run]) == 0
    assert main(["generate", "a cat", "--schedule-type", "sgm_uniform", "-o", "sgm.png", *run]) == 0
    assert "Sampler: Heun, Schedule type: KL Optimal," in read_parameters(workdir / "kl.png")
    assert main(["generate", "--from-png", "kl.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    pixels = {n: np.asarray(Image.open(workdir / f"{n}.png")) for n in ("kl", "sgm", "again")}
    assert np.array_equal(pixels["again"], pixels["kl"]) and not np.array_equal(pixels["sgm"], pixels["kl"])


def test_the_web_uis_dpm2_discards_the_penultimate_sigma_and_so_does_from_png(workdir, tiny_checkpoint, capsys):
    """A web UI PNG of DPM2 or DPM2 a (which it always runs so) or one saying `Discard penultimate sigma: True`;
    not sd15's own DPM2 PNGs, whose DPM2 is diffusers' unless the flag says otherwise, which the PNG then records."""
    assert webui("DPM2")["discard_penultimate_sigma"] and webui("DPM2 a")["discard_penultimate_sigma"]
    assert not webui("Euler")["discard_penultimate_sigma"]
    assert webui("Euler", ", Discard penultimate sigma: True")["discard_penultimate_sigma"]
    ours = format_parameters(GenerationSettings("a cat", "", 20, 7.0, "dpm_2", 5, 512, 512))
    assert not parse_parameters(ours)["discard_penultimate_sigma"]
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--steps", "3", "-W", "64", "-H", "64", "--seed", "2",
           "--sampler", "dpm_2"]  # fmt: skip
    assert main(["generate", "a cat", "--discard-penultimate-sigma", "-o", "cut.png", *run]) == 0
    assert main(["generate", "a cat", "-o", "full.png", *run]) == 0
    assert ", Discard penultimate sigma: True," in read_parameters(workdir / "cut.png")
    assert main(["generate", "--from-png", "cut.png", "-o", "again.png", "--model", str(tiny_checkpoint), "--no-progress"]) == 0
    assert "does not apply" not in capsys.readouterr().err
    pixels = {n: np.asarray(Image.open(workdir / f"{n}.png")) for n in ("cut", "full", "again")}
    assert np.array_equal(pixels["again"], pixels["cut"]) and not np.array_equal(pixels["full"], pixels["cut"])
    assert main(["generate", "a cat", "--discard-penultimate-sigma", "--sampler", "ddim", "-o", "x.png", *run[:-2]]) == 2
    assert "not 'ddim'" in capsys.readouterr().err


def test_the_web_uis_own_noise_levels_are_read_as_normal():
    """A web UI PNG of a k-diffusion sampler with no schedule type (or `Uniform`) ran on k-diffusion's get_sigmas,
    sd15's "normal": for DPM++ 2M not diffusers' grid, which stops at t = 50 for 20 steps. Not for the samplers the
    web UI runs on timesteps (DDIM, PLMS, UniPC, LCM), nor for sd15's own PNGs, whose Uniform is sd15's grid."""
    for sampler, extra in (("DPM++ 2M", ", Schedule type: Uniform"), ("Euler a", ""), ("DPM2", ""), ("DPM++ 2M", "")):
        assert webui(sampler, extra)["schedule_type"] == "normal", (sampler, extra)
    assert webui("DPM++ 2M", ", Schedule type: Karras")["karras"] and "schedule_type" not in webui("DPM++ 2M", ", Schedule type: Karras")
    for sampler in ("DDIM", "PLMS", "UniPC", "LCM"):
        assert "schedule_type" not in webui(sampler), sampler
    ours = format_parameters(GenerationSettings("a cat", "", 20, 7.0, "dpmpp_2m", 5, 512, 512))
    assert "Schedule type: Uniform" in ours and "schedule_type" not in parse_parameters(ours)


def test_another_sampler_over_a_png_drops_noise_levels_it_cannot_take(workdir, tiny_checkpoint, capsys):
    """A web UI Euler PNG runs on its own noise levels ("normal"), a DPM2 one discards the penultimate sigma:
    `--sampler ddim` over either runs DDIM (its timestep grid), not a refusal; asked for on the command line, the
    same schedule with DDIM is refused."""
    base = "a cat\nSteps: 2, Sampler: {}, CFG scale: 7, Seed: 5, Size: 64x64, Version: v1.10.1"
    run = ["--model", str(tiny_checkpoint), "--no-progress", "--sampler", "ddim"]
    for i, sampler in enumerate(("Euler", "DPM2", "DPM++ 2M Karras")):
        save_png(Image.new("RGB", (8, 8)), workdir / f"in{i}.png", base.format(sampler))
        assert main(["generate", "--from-png", f"in{i}.png", "-o", f"out{i}.png", *run]) == 0, sampler
        assert "Sampler: DDIM," in read_parameters(workdir / f"out{i}.png")
    assert main(["generate", "--from-png", "in0.png", "-o", "x.png", "--schedule-type", "normal", *run]) == 2
    assert "not 'ddim'" in capsys.readouterr().err
