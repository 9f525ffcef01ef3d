"""The `sd15` command line on a tiny random checkpoint: outputs, PNG parameters, and refusals."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd15.cli import main
from sd15.pnginfo import format_parameters, parse_parameters, read_parameters
from sd15.pipeline import GenerationSettings




def files_in(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "home" not in p.parts)


def test_generate_writes_png_whose_parameters_reproduce_it(workdir, tiny_checkpoint, capsys):
    args = ["generate", "a lighthouse at dusk", "--negative", "blurry, dark", "--steps", "3", "--cfg", "6.5",
            "--sampler", "euler_a", "--seed", "42", "--width", "64", "--height", "48", "--model", str(tiny_checkpoint),
            "-o", "out/first.png", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    text = read_parameters(workdir / "out/first.png")
    lines = text.split("\n")
    assert lines[0] == "a lighthouse at dusk"
    assert lines[1] == "Negative prompt: blurry, dark"
    assert lines[2].startswith("Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6.5, Seed: 42, Size: 64x48, Model hash: ")
    assert "Model: tiny" in lines[2]
    settings = parse_parameters(text)
    assert settings["seed"] == 42 and settings["sampler"] == "euler_a" and settings["guidance_scale"] == 6.5

    assert main(["generate", "--from-png", "out/first.png", "--model", str(tiny_checkpoint), "-o", "again.png", "--no-progress"]) == 0
    first, again = np.asarray(Image.open(workdir / "out/first.png")), np.asarray(Image.open(workdir / "again.png"))
    assert first.shape == (48, 64, 3)
    assert np.array_equal(first, again)
    assert read_parameters(workdir / "again.png") == text


def test_python_dash_m_runs_the_same_command_line():
    out = subprocess.run([sys.executable, "-m", "sd15", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--from-png" in out.stdout


def test_several_images_get_numbered_files_and_consecutive_seeds(workdir, tiny_checkpoint):
    assert main(["generate", "a cat", "-n", "2", "--steps", "2", "-W", "64", "-H", "56", "--seed", "7",
                 "--model", str(tiny_checkpoint), "-o", "cat.png", "--no-progress"]) == 0  # fmt: skip
    assert [str(p) for p in files_in(workdir)] == ["cat-0.png", "cat-1.png"]
    assert parse_parameters(read_parameters(workdir / "cat-1.png"))["seed"] == 8
    assert Image.open(workdir / "cat-1.png").size == (64, 56)  # -W/-H as CompVis' txt2img.py has them


def test_model_from_environment_and_weights_folder(workdir, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("SD15_MODEL", str(tiny_checkpoint))
    assert main(["generate", "a", "--steps", "1", "--width", "64", "--height", "64", "-o", "env.png", "--no-progress"]) == 0
    monkeypatch.delenv("SD15_MODEL")
    (workdir / "weights").mkdir()
    (workdir / "weights" / "my-model.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    assert main(["generate", "a", "--steps", "1", "--width", "64", "--height", "64", "-o", "w.png", "--no-progress"]) == 0
    assert "Model: my-model" in read_parameters(workdir / "w.png")


def test_img2img_cli(workdir, tiny_checkpoint):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(workdir / "in.png")
    assert main(["img2img", "in.png", "a watercolour", "--strength", "0.5", "--steps", "4", "--seed", "3",
                 "--model", str(tiny_checkpoint), "-o", "out.png", "--no-progress"]) == 0  # fmt: skip
    settings = parse_parameters(read_parameters(workdir / "out.png"))
    assert settings["strength"] == 0.5 and settings["prompt"] == "a watercolour"
    assert Image.open(workdir / "out.png").size == (64, 64)


def test_from_png_of_an_img2img_image_says_it_makes_a_text_to_image(workdir, tiny_checkpoint, capsys):
    """The PNG holds the settings but not the input image: the rerun is a text-to-image, and the user is told."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(workdir / "in.png")
    common = ["--steps", "2", "--seed", "3", "--model", str(tiny_checkpoint), "--no-progress"]
    assert main(["img2img", "in.png", "a watercolour", "--strength", "0.5", *common, "-o", "i2i.png"]) == 0
    assert main(["generate", "--from-png", "i2i.png", "-o", "again.png", "--no-progress", "--model", str(tiny_checkpoint)]) == 0
    err = capsys.readouterr().err
    assert "i2i.png was made from an input image" in err and "without its denoising strength" in err
    assert main(["generate", "a watercolour", *common, "-W", "64", "-H", "64", "-o", "t2i.png"]) == 0
    assert np.array_equal(np.asarray(Image.open(workdir / "again.png")), np.asarray(Image.open(workdir / "t2i.png")))
    assert main(["generate", "--from-png", "t2i.png", "-o", "t2i-again.png", "--no-progress", "--model", str(tiny_checkpoint)]) == 0
    assert "input image" not in capsys.readouterr().err  # a text-to-image PNG reruns without the warning


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "a", "--width", "500"], "multiple of 8"),
        (["generate", "a", "--steps", "0"], "at least 1"),
        (["generate", "a", "--sampler", "k_lms"], "invalid choice"),
        (["generate", "a", "--cfg", "nan"], "finite"),
        (["generate", "a", "--model", "missing.safetensors"], "does not exist"),
        (["generate", "a"], "no checkpoint found"),
        (["generate", "a", "-o", "out.jpg"], "must be a .png"),
        (["img2img", "nothere.png", "a"], "cannot read the image"),
        (["img2img", "nothere.png", "a", "--strength", "1.5"], "strength"),
    ],
)
def test_bad_arguments_exit_nonzero_and_write_nothing(workdir, args, message, capsys):
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert files_in(workdir) == []


def exit_code(args) -> int:
    """main()'s status, also when argparse rejects an argument (it exits with status 2)."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def test_not_an_sd1_model_is_named(workdir, tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(path))
    assert main(["generate", "a", "--model", str(path)]) == 2
    assert "LoRA" in capsys.readouterr().err


def test_long_prompt_is_not_truncated(workdir, tiny_checkpoint, capsys):
    """Past 75 tokens the prompt goes on in a second chunk (sd15.prompts): the last words still count."""
    common = ["--steps", "1", "--width", "64", "--height", "64", "--seed", "1", "--model", str(tiny_checkpoint), "--no-progress"]
    assert main(["generate", " ".join(["word"] * 80 + ["red"]), *common, "-o", "red.png"]) == 0
    assert main(["generate", " ".join(["word"] * 80 + ["blue"]), *common, "-o", "blue.png"]) == 0
    assert "dropped" not in capsys.readouterr().err
    red, blue = (np.asarray(Image.open(workdir / f"{c}.png")) for c in ("red", "blue"))
    assert not np.array_equal(red, blue)


def test_download_explains_what_is_missing(workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    assert main(["download"]) == 2
    assert "pip install 'sd15[download]'" in capsys.readouterr().err


def test_console_script_runs(workdir, tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "sd15.cli", "generate", "a", "--steps", "1", "--width", "64",
                          "--height", "64", "--model", str(tiny_checkpoint), "-o", "s.png", "--no-progress"],
                         capture_output=True, text=True, cwd=workdir)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (workdir / "s.png").exists()


def test_parameters_format_round_trip():
    s = GenerationSettings('a "quoted", multi\nline prompt', "neg: with colon", 20, 7.0, "dpmpp_2m", 1, 512, 768, True, 0.0, 0.6)
    text = format_parameters(s, "0123456789", "v1-5-pruned-emaonly")
    parsed = parse_parameters(text)
    assert parsed["prompt"] == s.prompt and parsed["negative_prompt"] == s.negative_prompt
    assert (parsed["steps"], parsed["sampler"], parsed["karras"], parsed["guidance_scale"]) == (20, "dpmpp_2m", True, 7.0)
    assert (parsed["width"], parsed["height"], parsed["strength"]) == (512, 768, 0.6)
    # A1111's own older form: the schedule in the sampler's name
    old = parse_parameters("a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512")
    assert old["sampler"] == "dpmpp_2m" and old["karras"] and old["prompt"] == "a cat" and old["negative_prompt"] == ""


def test_from_png_says_when_it_cannot_use_the_recorded_schedule_type(workdir, tiny_checkpoint, capsys):
    """A schedule type sd15 lacks (Forge's "Align Your Steps GITS", Polyexponential at another rho): the run says
    so, not silently. The web UI's own schedule types it runs."""
    from sd15.pnginfo import save_png

    base = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64"
    cases = [("Align Your Steps GITS", "", True), ("Polyexponential", ", Schedule rho: 2", True), ("Karras", "", False),
             ("KL Optimal", "", False), ("SGM Uniform", "", False), ("Uniform", "", False), ("Exponential", "", False),
             ("Polyexponential", "", False)]  # fmt: skip
    for i, (schedule, extra, warned) in enumerate(cases):
        save_png(Image.new("RGB", (8, 8)), workdir / f"in{i}.png", f"{base}, Schedule type: {schedule}{extra}")
        assert main(["generate", "--from-png", f"in{i}.png", "--model", str(tiny_checkpoint), "-o", f"out{i}.png", "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert (f"sampled with the {schedule} schedule of noise levels, which sd15 lacks" in err) == warned, schedule
    assert parse_parameters(read_parameters(workdir / "out2.png"))["karras"]
    assert parse_parameters(read_parameters(workdir / "out3.png"))["schedule_type"] == "kl_optimal"


def test_from_png_names_the_recorded_settings_it_does_not_apply(workdir, tiny_checkpoint, capsys):
    from sd15.pnginfo import save_png

    text = ("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Variation seed: 9, "
            "Variation seed strength: 0.3, ENSD: 31337, Hires checkpoint: other.safetensors, Face restoration: CodeFormer")  # fmt: skip
    save_png(Image.new("RGB", (8, 8)), workdir / "webui.png", text)
    assert main(["generate", "--from-png", "webui.png", "--model", str(tiny_checkpoint), "-o", "out.png", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "records settings sd15 does not apply (Face restoration, Hires checkpoint)" in err  # the variation and ENSD it does
    save_png(Image.new("RGB", (8, 8)), workdir / "plain.png", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    assert main(["generate", "--from-png", "plain.png", "--model", str(tiny_checkpoint), "-o", "out2.png", "--no-progress"]) == 0
    assert "does not apply" not in capsys.readouterr().err
