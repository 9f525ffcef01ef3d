"""`sd15 batch`: content-named outputs, exactly-once across kills and reruns, and torchrun on CPU (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd15.cli import main

ARGS = ["--steps", "3", "--width", "64", "--height", "64", "--no-progress"]


def write_prompts(folder: Path, n: int) -> Path:
    lines = ['"a red cube"', json.dumps({"prompt": "a blue sphere", "seed": 3, "num_images": 2})]
    lines += [json.dumps({"prompt": f"prompt number {i}", "cfg": 5}) for i in range(n - 3)]
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n# a comment line\n")
    return path


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_batch_names_by_content_and_skips_finished_work(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    prompts = write_prompts(tmp_path, 4)
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS]) == 0
    first = {name: (out / name).stat().st_mtime_ns for name in pngs(out)}
    assert len(first) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(v["file"] for v in manifest.values()) == sorted(first)
    assert sorted(v["seed"] for v in manifest.values() if v["prompt"] == "a blue sphere") == [3, 4]
    assert main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS]) == 0
    assert {name: (out / name).stat().st_mtime_ns for name in pngs(out)} == first  # nothing redone


@pytest.mark.parametrize(
    "line, message",
    [("not json", ":1: not valid JSON"), ('{"text": "a"}', 'a "prompt" string'),
     ('{"prompt": "a", "stepz": 3}', "unknown settings"), ('{"prompt": "a", "width": 100}', ":1: width must be")],
)  # fmt: skip
def test_bad_prompt_lines_are_refused_with_their_line(tmp_path, tiny_checkpoint, line, message, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--model", str(tiny_checkpoint), *ARGS]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_after_sigkill_makes_every_image_exactly_once(tmp_path, tiny_checkpoint):
    prompts = write_prompts(tmp_path, 8)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sd15.cli", "batch", str(prompts), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS]
    env = {**os.environ, "HOME": str(tmp_path)}
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(pngs(out) if out.exists() else []) < 3 and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    done_before = {name: (out / name).stat().st_mtime_ns for name in pngs(out)}
    assert 3 <= len(done_before) < 8, "the kill should land midway"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert len(pngs(out)) == 8
    assert all((out / name).stat().st_mtime_ns == t for name, t in done_before.items())  # not redone
    assert f"made {8 - len(done_before)} images" in resumed.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(v["file"] for v in manifest.values()) == pngs(out)


def test_torchrun_two_processes_match_one(tmp_path, tiny_checkpoint):
    """Two CPU ranks (gloo) share the jobs; each image equals the single-process one byte for byte.
    Both runs use one thread per process: results on the CPU depend on the thread count (docs/reliability.md)."""
    prompts = write_prompts(tmp_path, 5)
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    tail = ["-m", "sd15.cli", "batch", str(prompts), "--model", str(tiny_checkpoint), *ARGS]
    two = subprocess.run([*torchrun, *tail, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "rank 0/2: made" in two.stdout and "rank 1/2: made" in two.stdout
    one = subprocess.run([sys.executable, *tail, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one") and len(pngs(tmp_path / "one")) == 5
    for name in pngs(tmp_path / "one"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert json.loads((tmp_path / "two" / "manifest.json").read_text()).keys() == json.loads(
        (tmp_path / "one" / "manifest.json").read_text()
    ).keys()
