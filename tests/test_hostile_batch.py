"""`sd15 batch` and hostile prompt files: every bad line is refused before the model loads, with the file name,
the line number and what is wrong (exit status 2, one line, no traceback), and nothing is created; a line gets
exactly the checks the API applies (sd15.pipeline.check_settings, check_prompts)."""

import json
import os

import pytest

from sd15.batch import read_jobs
from test_hostile_inputs import refused_before_loading

ARGS = ["--steps", "3", "--width", "64", "--height", "64", "--no-progress"]
DEFAULTS = dict(negative_prompt="", steps=3, sampler="pndm", guidance_scale=7.5, seed=None, width=64, height=64, karras=False)


def line(**settings) -> str:
    return json.dumps({"prompt": "a", **settings})


BAD_LINES = [
    (line(seed=[1]), '"seed" must be a whole number', "a JSON array"),
    (line(num_images=None), '"num_images" must be a whole number', "null"),
    ('{"prompt": "a", "seed": 1e400}', "not valid JSON", "1e400 is too large"),
    (line(seed="abc"), '"seed" must be a whole number', 'the string "abc"'),
    (line(num_images="x"), '"num_images" must be a whole number', 'the string "x"'),
    (line(negative_prompt=5), '"negative_prompt" must be a string', "got 5"),
    (line(seed=99999999999999999999999), "seed must be a whole number from", "99999999999999999999999"),
    (line(seed=2**64 - 1, num_images=2), "seed must be a whole number from", "image i uses seed + i"),
    (line(karras="false"), '"karras" must be true or false', 'the string "false"'),
    ('{"prompt": "a", "num_images": 1e12}', '"num_images" must be a whole number', "1000000000000.0"),
    (line(num_images=-3), "number of images must be a whole number from 1 to 10000", "-3"),
    (line(num_images=10**12), "number of images must be a whole number from 1 to 10000", "1000000000000"),
    (line(steps=True), '"steps" must be a whole number', "got true"),
    (line(steps=3.0), '"steps" must be a whole number', "got 3.0"),
    (line(width=64.0), '"width" must be a whole number', "got 64.0"),
    (line(negative_prompt={"x": 1}), '"negative_prompt" must be a string', "a JSON object"),
    (line(sampler=5), '"sampler" must be a string', "got 5"),
    (line(sampler="nope"), "unknown sampler", "'nope'"),
    (line(sampler="ddim", karras=True), "karras sigmas apply to the sigma-space samplers", "not 'ddim'"),
    (line(sampler="lcm", steps=51), "lcm takes 1 to 50 steps", "got 51"),
    (line(cfg="7"), '"guidance_scale" must be a finite number', 'the string "7"'),
    (line(guidance_scale=10**400), '"guidance_scale" must be a finite number', "..."),
    ('{"prompt": "a", "cfg": NaN}', "not valid JSON", "NaN is not a JSON value"),
    ('{"prompt": "a", "cfg": 5, "guidance_scale": 5}', '"cfg"', "not both"),
    ('{"prompt": "a", "seed": 1, "seed": 2}', "not valid JSON", "given more than once"),
    ('"\\ud800"', "lone surrogate", "\\ud800"),
    ('{"prompt": "a", "negative_prompt": "\\udfff"}', "lone surrogate", "\\udfff"),
    ("[" * 100_000, "nested too deeply", ""),
    ('{"prompt": "a", "seed": ' + "[" * 900 + "]" * 900 + "}", '"seed" must be a whole number', "a JSON array"),
]  # fmt: skip


@pytest.fixture
def batch(workdir, tiny_checkpoint, monkeypatch, capsys):
    """Run `sd15 batch` on a prompts file of the given bytes; a refusal must come before the model loads and
    leave the folder as it was. Returns the error message."""

    def run(content: bytes, *extra: str) -> str:
        prompts = workdir / "prompts.jsonl"
        prompts.write_bytes(content)
        args = ["batch", str(prompts), "--out", str(workdir / "out"), "--model", str(tiny_checkpoint), *ARGS, *extra]
        err = refused_before_loading(args, workdir, capsys, monkeypatch)
        assert not (workdir / "out").exists()
        return err

    return run


@pytest.mark.parametrize("bad, what, shown", BAD_LINES, ids=range(len(BAD_LINES)))
def test_bad_lines_are_refused_with_file_and_line(batch, workdir, bad, what, shown):
    content = '"a good line first"\n# a comment\n\n' + bad + '\n"a good line after"\n'
    err = batch(content.encode())
    assert f"{workdir / 'prompts.jsonl'}:4: " in err, err
    assert what in err and shown in err, err


def test_a_file_that_is_not_utf8_is_refused_with_its_line(batch, workdir):
    err = batch(b'"fine"\n"caf\xe9"\n')
    assert f"{workdir / 'prompts.jsonl'}:2: not UTF-8 text (byte 0xe9 at byte 5 of the line)" in err


def test_a_bad_default_is_refused_as_the_command_lines(batch):
    err = batch(b'"fine"\n', "--seed", str(2**70))
    assert "seed must be a whole number from" in err and "from the command line" in err


def test_line_endings_and_byte_order_mark_do_not_change_jobs(tmp_path):
    """CRLF and a UTF-8 BOM read as the plain file does, to the same ids; U+2028 inside a prompt does not split
    its line (str.splitlines would)."""
    lines = ['"a red cube"', line(seed=3, num_images=2), json.dumps({"prompt": "one\u2028line"}, ensure_ascii=False)]
    plain, crlf = tmp_path / "plain.jsonl", tmp_path / "crlf.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    crlf.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    jobs = read_jobs(plain, DEFAULTS, "hash")
    assert [(j.id, j.line) for j in jobs] == [(j.id, j.line) for j in read_jobs(crlf, DEFAULTS, "hash")]
    assert [j.line for j in jobs] == [1, 2, 2, 3] and jobs[3].settings.prompt == "one\u2028line"
    assert [j.settings.seed for j in jobs[1:3]] == [3, 4]
    assert isinstance(jobs[0].settings.guidance_scale, float)


@pytest.mark.parametrize("flag", [["--clip-skip", "2"], ["--preview", "p.png"]])
def test_flags_batch_would_ignore_are_refused(batch, flag):
    err = batch(b'"fine"\n', *flag)
    assert f"batch does not take {flag[0]}" in err


def test_an_output_folder_that_cannot_hold_the_run_is_refused_before_the_model_loads(workdir, tiny_checkpoint, monkeypatch, capsys):
    (workdir / "prompts.jsonl").write_text('"fine"\n')
    (workdir / "afile").write_text("keep me")
    (workdir / "taken" / "manifest.json").mkdir(parents=True)
    for out, message in (("afile", "is a file, not a folder"), ("afile/sub", "is a file, not a folder"),
                         ("taken", "manifest.json is a folder")):  # fmt: skip
        args = ["batch", "prompts.jsonl", "--out", out, "--model", str(tiny_checkpoint), *ARGS]
        err = refused_before_loading(args, workdir, capsys, monkeypatch)
        assert message in err, err


CONTROL = dict(controlnet="cn.safetensors", control_image="edges.png")
BAD_CONTROLNET_LINES = [
    (line(**{**CONTROL, "control_image": "missing.png"}), "missing.png: No such file or directory"),
    (line(control_image="edges.png"), ':4: control_image given without a "controlnet"'),
    (line(controlnet_scale=0.5, guess_mode=True), ':4: controlnet_scale, guess_mode given without a "controlnet"'),
    (line(**CONTROL, controlnet_scale="0.5"), ':4: "controlnet_scale" must be a finite number, or a list of one per ControlNet, got the string "0.5"'),
    (line(**CONTROL, controlnet_scale=True), '"controlnet_scale" must be a finite number'),
    (line(**CONTROL, controlnet_scale=[1, 0.5]), ':4: "controlnet_scale" must be one number, or a list of one per ControlNet (1), got 2'),
    ('{"prompt": "a", "controlnet": "cn.safetensors", "control_image": "edges.png", "controlnet_scale": 1e400}', ":4: not valid JSON"),
    (line(**CONTROL, control_start=0.9, control_end=0.2), "0 <= start < end <= 1, got 0.9 and 0.2"),
    (line(**CONTROL, guess_mode="yes"), '"guess_mode" must be true or false (a JSON boolean), got the string "yes"'),
    (line(controlnet="cn.safetensors"), ':4: give one "control_image" per "controlnet": 1 ControlNets, 0 control images'),
    (line(controlnet=5, control_image="edges.png"), '"controlnet" must be a file name or a list of file names, got 5'),
    (line(controlnet=[], control_image=[]), '"controlnet" must be a file name or a list of file names, got a JSON array'),
    (line(**{**CONTROL, "controlnet": "missing.safetensors"}), ":4: no such ControlNet file: "),
    (line(**{**CONTROL, "controlnet": "cn.safetensors:0.5"}), 'a scale goes in "controlnet_scale", not after a colon'),
    (line(**{**CONTROL, "control_image": "folder"}), "cannot read the control image"),
    (line(**{**CONTROL, "control_image": "notes.txt"}), "cannot identify image file"),
    (line(**{**CONTROL, "control_image": "depth.tiff"}), "floating-point image (PIL mode F)"),
    (line(**{**CONTROL, "control_image": "dot.png"}), "too small"),
    (line(**{**CONTROL, "controlnet": "lora.safetensors"}), "lora.safetensors is a LoRA adapter"),
    (line(**{**CONTROL, "control_image": "fifo.png"}), "fifo.png: not a regular file"),  # read_bytes would wait forever
    (line(**{**CONTROL, "control_image": "zero.png"}), "zero.png: not a regular file"),  # a link to /dev/zero: no end
    (line(**{**CONTROL, "control_image": "huge.png"}), "more than sd15 reads of a control image"),  # not read into memory
    (line(**{**CONTROL, "control_image": "e\x1b[2J.png"}), "e\\x1b[2J.png: No such file"),  # no escape reaches the terminal
]  # fmt: skip


@pytest.mark.parametrize("bad, message", BAD_CONTROLNET_LINES, ids=range(len(BAD_CONTROLNET_LINES)))
def test_bad_controlnet_lines_are_refused_before_the_model_loads(batch, workdir, bad, message):
    """A line's ControlNet fields are typed and checked, its files found and read (paths from the prompts file's
    folder), and each ControlNet loaded (so checked) before the model: one line, the line number, nothing made."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from sd15.random_weights import random_controlnet, save_checkpoint

    save_checkpoint(random_controlnet("tiny", seed=0), workdir / "cn.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(workdir / "lora.safetensors"))  # fmt: skip
    Image.new("RGB", (64, 64), "white").save(workdir / "edges.png")
    Image.new("RGB", (1, 1)).save(workdir / "dot.png")
    Image.fromarray(np.full((64, 64), 0.5, np.float32)).save(workdir / "depth.tiff")  # mode F
    (workdir / "notes.txt").write_text("not an image")
    (workdir / "folder").mkdir()
    os.mkfifo(workdir / "fifo.png")
    (workdir / "zero.png").symlink_to("/dev/zero")
    with open(workdir / "huge.png", "wb") as f:
        f.write((workdir / "edges.png").read_bytes())
        f.truncate(300 << 20)  # sparse: a PNG header, then 300 MB of zeros
    good = json.dumps({"prompt": "a good line with a ControlNet", **CONTROL})
    err = batch(f'{good}\n# a comment\n\n{bad}\n"a good line after"\n'.encode())
    assert message in err and (f"{workdir / 'prompts.jsonl'}:4: " in err or "line 4 of the prompts file: " in err), err
    assert "\x1b" not in err
