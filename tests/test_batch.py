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


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, tiny_checkpoint):
    """The batch of 4 prompts (5 images) run by one plain process: what every distributed layout must equal.
    One thread per process everywhere: results on the CPU depend on the thread count (docs/reliability.md)."""
    folder = tmp_path_factory.mktemp("batch")
    prompts = write_prompts(folder, 5)
    env = {**os.environ, "HOME": str(folder), "OMP_NUM_THREADS": "1"}
    tail = ["-m", "sd15.cli", "batch", str(prompts), "--model", str(tiny_checkpoint), *ARGS]
    one = subprocess.run([sys.executable, *tail, "--out", str(folder / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert len(pngs(folder / "one")) == 5
    return folder / "one", tail, env


def assert_same_batch(out: Path, reference: Path) -> None:
    assert pngs(out) == pngs(reference)
    for name in pngs(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    manifest = lambda folder: json.loads((folder / "manifest.json").read_text())  # noqa: E731
    assert manifest(out).keys() == manifest(reference).keys()


def test_torchrun_two_processes_match_one(tmp_path, single_process_run):
    """Two CPU ranks (gloo) on one node share the jobs; each image equals the single-process one byte for byte."""
    reference, tail, env = single_process_run
    launch = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", "29517"]
    two = subprocess.run([*launch, *tail, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "rank 0/2: made" in two.stdout and "rank 1/2: made" in two.stdout
    assert_same_batch(tmp_path / "two", reference)


def test_torchrun_two_nodes_sharing_the_output_folder_match_one(tmp_path, single_process_run):
    """Two nodes of one process each, as on two machines: two torchrun launches with --nnodes 2 and their own
    --node-rank, meeting at one address, writing to one shared folder. Global ranks come from the node rank,
    while each process's LOCAL_RANK is 0 (the device it would pick on its own machine)."""
    reference, tail, env = single_process_run
    nodes = [
        subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                          "--master-addr", "127.0.0.1", "--master-port", "29518", *tail, "--out", str(tmp_path / "shared")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for node in (0, 1)
    ]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-2000:]
    assert "rank 0/2: made" in results[0][0] and "rank 1/2: made" in results[1][0]
    assert_same_batch(tmp_path / "shared", reference)
