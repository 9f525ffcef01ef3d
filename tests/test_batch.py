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


# --------------------------------------------------------------------------------------------------
# review: duplicates, derived seeds, damaged files, adapters, ranks

DEFAULTS = {"negative_prompt": "", "steps": 3, "sampler": "pndm", "guidance_scale": 7.5, "seed": None, "width": 64, "height": 64, "karras": False}


def jobs_of(folder: Path, *lines: str) -> list:
    from sd15.batch import read_jobs

    path = folder / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_jobs(path, DEFAULTS, "modelhash0")


def test_a_derived_seed_depends_on_what_a_line_says_not_how(tmp_path):
    """Spacing, key order, `cfg` for `guidance_scale`, 5 for 5.0, `"seed": null` and a bare string for
    {"prompt": …} do not change a derived seed, so reformatting the file does not redo finished work; raising a
    line's num_images keeps the images it already asked for."""
    same = ['"a red cube"', '  "a red cube"  ', '{"prompt": "a red cube"}', '{"seed": null, "prompt":"a red cube"}']
    assert len({jobs_of(tmp_path, line)[0].id for line in same}) == 1
    cfg = ['{"prompt": "a", "cfg": 5}', '{"guidance_scale": 5.0, "prompt": "a"}']
    assert len({jobs_of(tmp_path, line)[0].id for line in cfg}) == 1
    two, three = (jobs_of(tmp_path, json.dumps({"prompt": "a", "num_images": n})) for n in (2, 3))
    assert [j.id for j in three[:2]] == [j.id for j in two]
    assert jobs_of(tmp_path, '"a"')[0].id != jobs_of(tmp_path, '"b"')[0].id  # but what it says does


def test_a_repeated_image_is_made_once(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Lines asking for the same image (the same settings and seed, however written, or one line's second image
    being another's first) name the same file: it is one job, made once, listed under the first line asking."""
    monkeypatch.setenv("HOME", str(tmp_path))
    lines = ['"a red cube"', json.dumps({"prompt": "b", "seed": 7, "num_images": 2}), '{"prompt": "a red cube"}',
             '"a red cube"', json.dumps({"prompt": "b", "seed": 8})]  # fmt: skip
    assert [(j.line, j.settings.prompt) for j in jobs_of(tmp_path, *lines)] == [(1, "a red cube"), (2, "b"), (2, "b")]
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "p.jsonl"), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS]) == 0
    assert "made 3 images; 3 jobs" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(pngs(out)) == 3 and sorted(v["line"] for v in manifest.values()) == [1, 2, 2]


def test_a_file_with_no_prompts_is_refused(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.jsonl").write_text("\n# only a comment\n   \n")
    assert main(["batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), "--model", str(tiny_checkpoint), *ARGS]) == 2
    assert "p.jsonl: no prompts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def small_png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(path)


@pytest.mark.parametrize("damaged", [b"[]", b'"text"', b"7", b'{"cut short', b"", b"\xff\xfe"])
def test_a_damaged_manifest_is_kept_aside_and_rebuilt(tmp_path, damaged, capsys):
    """A manifest.json that is not a JSON object (edited by hand, or cut short by a machine crash) is renamed
    to manifest.json.damaged-…, kept as it was, and rebuilt from the PNGs; it used to raise a TypeError."""
    from sd15.batch import update_manifest

    job = jobs_of(tmp_path, '"café ☕"')[0]
    small_png(tmp_path / f"{job.id}.png")
    (tmp_path / "manifest.json").write_bytes(damaged)
    manifest = update_manifest(tmp_path, [job])
    assert list(manifest) == [job.id] and json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == manifest
    kept = list(tmp_path.glob("manifest.json.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert "manifest.json.damaged-" in capsys.readouterr().err


def test_the_manifest_is_utf8_whatever_the_locale(tmp_path):
    """Prompts in any script: files are named by hash, and manifest.json is written and read as UTF-8 even
    where the locale's encoding is ASCII (LC_ALL=C with Python's UTF-8 mode off)."""
    job = jobs_of(tmp_path, '"ein Würfel, 立方体, ☕"')[0]
    assert len(job.id) == 16 and int(job.id, 16) >= 0
    small_png(tmp_path / f"{job.id}.png")
    code = ("import sys; from pathlib import Path; from sd15.batch import read_jobs, update_manifest; "
            f"folder = Path(sys.argv[1]); update_manifest(folder, read_jobs(folder / 'p.jsonl', {DEFAULTS!r}, 'modelhash0'))")  # fmt: skip
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest[job.id]["prompt"] == "ein Würfel, 立方体, ☕"


def test_a_png_cut_short_or_deleted_is_made_again(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """A kill cannot leave a partial PNG (it is renamed into place whole), but a machine crash can: the rename
    reached the disk and the data did not. A PNG that does not end with its IEND chunk is not done; it is made
    again, as is one deleted by hand, whose manifest entry is dropped until then."""
    monkeypatch.setenv("HOME", str(tmp_path))
    prompts, out = write_prompts(tmp_path, 4), tmp_path / "out"
    command = ["batch", str(prompts), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS]
    assert main(command) == 0
    names = pngs(out)
    whole = {name: (out / name).read_bytes() for name in names}
    (out / names[0]).write_bytes(b"")  # as after a crash: renamed, never written
    (out / names[1]).write_bytes(whole[names[1]][:-20])
    (out / names[2]).unlink()
    capsys.readouterr()
    assert main(command) == 0
    assert "made 3 images" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in pngs(out)} == whole


def test_a_changed_lora_makes_new_images(tmp_path, tiny_checkpoint, tiny_model, monkeypatch, capsys):
    """LoRAs (--lora FILE:SCALE, <lora:name:scale> in a prompt) and textual inversions change the image, so they
    are part of its name and recorded in its PNG, as `sd15 generate` records them; before, a rerun with another
    LoRA, or none, took the old images as done."""
    from lora_files import random_attention_lora

    from sd15.pnginfo import read_parameters

    monkeypatch.setenv("HOME", str(tmp_path))
    lora = random_attention_lora(tiny_model, tmp_path / "ink.safetensors")
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out"
    prompts.write_text('"a red cube"\n')
    made = []
    for extra in ([], ["--lora", f"{lora}:0.5"], ["--lora", f"{lora}:1"], ["--lora", f"{lora}:0.5"]):
        assert main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS, *extra]) == 0
        made.append(capsys.readouterr().out.split("made ")[1].split(" images")[0])
    assert made == ["1", "1", "1", "0"] and len(pngs(out)) == 3
    recorded = sorted(read_parameters(out / name).split("\n")[0] for name in pngs(out))
    assert recorded == ["a red cube", "a red cube <lora:ink:0.5>", "a red cube <lora:ink:1>"]


@pytest.mark.parametrize("rank, world, mine", [(0, 2, [0, 2, 4]), (1, 2, [1, 3]), (6, 8, [])])
def test_a_rank_that_finishes_does_not_wait_for_the_others(tmp_path, tiny_model, tiny_checkpoint, monkeypatch, rank, world, mine):
    """Ranks share the pending jobs, rank 0's list, and none waits at the end: a collective waiting for the
    slowest rank longer than its timeout (30 minutes for gloo, 10 for nccl) failed the run, and torchrun then
    killed every rank. Here one rank runs alone, any barrier fails as a timeout would, and the broadcast hands
    it rank 0's list (every job, in a new folder). A rank with no share (8 ranks, 5 jobs) has nothing to do."""
    import torch.distributed as dist

    from sd15 import batch

    def timed_out(*args, **kwargs):
        raise RuntimeError("a collective timed out")

    jobs = jobs_of(tmp_path, *(f'"prompt {i}"' for i in range(5)))
    monkeypatch.setattr(batch, "_distributed", lambda: (rank, world, 0))
    monkeypatch.setattr(dist, "barrier", timed_out)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, box[0] or [j.id for j in jobs]))
    made = batch.run_batch(tiny_model, tiny_checkpoint, "modelhash0", jobs, tmp_path / "out", progress=False)
    assert [job.id for job in made] == [jobs[i].id for i in mine]
    assert sorted(json.loads((tmp_path / "out" / "manifest.json").read_text())) == sorted(jobs[i].id for i in mine)


def test_ranks_started_with_other_jobs_are_refused(tmp_path, tiny_model, tiny_checkpoint, monkeypatch):
    """A rank whose jobs differ from rank 0's (another prompts file, model or --lora on one node) stops with a
    message, rather than making other images than the run lists."""
    import torch.distributed as dist

    from sd15 import batch

    monkeypatch.setattr(batch, "_distributed", lambda: (1, 2, 0))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, ["0123456789abcdef"]))
    with pytest.raises(ValueError, match="rank 1 has other jobs than rank 0"):
        batch.run_batch(tiny_model, tiny_checkpoint, "modelhash0", jobs_of(tmp_path, '"a"'), tmp_path / "out")
    assert pngs(tmp_path / "out") == []


def test_torchrun_resume_shares_what_is_left_evenly(tmp_path, single_process_run, tiny_checkpoint):
    """A run whose rank 1 died at once left rank 0's share done (jobs 0, 2, 4). Before, a rerun gave each rank its
    old share, so rank 1 made everything left while rank 0 idled; now the pending jobs are split, one each."""
    import shutil

    from sd15.batch import read_jobs
    from sd15.pnginfo import short_hash

    reference, tail, env = single_process_run
    prompts = Path(tail[tail.index("batch") + 1])
    jobs = read_jobs(prompts, DEFAULTS, short_hash(tiny_checkpoint, cache_dir=tmp_path))
    assert len(jobs) == 5 and all((reference / f"{job.id}.png").exists() for job in jobs)
    out = tmp_path / "out"
    out.mkdir()
    for job in jobs[::2]:
        shutil.copy(reference / f"{job.id}.png", out)
    launch = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", "29519"]
    run = subprocess.run([*launch, *tail, "--out", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rank 0/2: made 1 images" in run.stdout and "rank 1/2: made 1 images" in run.stdout
    assert_same_batch(out, reference)


def test_the_safety_checker_is_part_of_an_images_id(tmp_path, tiny_model, monkeypatch):
    """The safety checker blacks out what it flags, so a rerun with it off must make such images anew: its being on
    is part of the id. Without it the ids are those the prompts file alone gives (earlier folders stay done)."""
    from sd15.batch import read_jobs, with_adapters

    prompts = write_prompts(tmp_path, 4)
    defaults = dict(negative_prompt="", steps=3, sampler="pndm", guidance_scale=7.5, seed=None, width=64, height=64, karras=False)
    jobs = read_jobs(prompts, defaults, "0abb3eca25")
    monkeypatch.setattr(tiny_model, "safety_checker", None, raising=False)
    unchecked = [job.id for job in with_adapters(tiny_model, "0abb3eca25", jobs)]
    monkeypatch.setattr(tiny_model, "safety_checker", object())  # any checker: only its presence counts
    checked = [job.id for job in with_adapters(tiny_model, "0abb3eca25", jobs)]
    assert unchecked == [job.id for job in jobs]
    assert len(set(checked)) == len(jobs) and not set(checked) & set(unchecked)


def test_an_out_folder_that_cannot_be_written_is_refused_before_loading(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Found before the model loads (the tests run as root, for whom every folder is writable: os.access is faked)."""
    import sd15.cli

    prompts, out = write_prompts(tmp_path, 3), tmp_path / "locked" / "out"
    out.parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(sd15.cli.os, "access", lambda p, mode: Path(p) != out.parent and real_access(p, mode))
    monkeypatch.setattr(sd15.cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    assert main(["batch", str(prompts), "--out", str(out), "--model", str(tiny_checkpoint), *ARGS]) == 2
    assert "is not writable" in capsys.readouterr().err and not out.exists()


def test_a_png_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """After a machine crash a renamed file may be short unless its data was synced first (a kill cannot do that)."""
    from PIL import Image

    from sd15 import pnginfo

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(pnginfo.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(pnginfo.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    path = pnginfo.save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", "a cat\nSteps: 3")
    assert events == ["fsync", "replace"]
    assert pnginfo.read_parameters(path) == "a cat\nSteps: 3"


# --------------------------------------------------------------------------------------------------
# ControlNet lines


def test_ids_of_lines_without_a_controlnet_are_those_of_earlier_versions(tmp_path):
    """Pinned: the ids these lines had before lines could carry ControlNets (GenerationSettings.controlnets, an
    empty list here, is left out of the id), so a rerun of an old prompts file still finds its images."""
    jobs = jobs_of(tmp_path, '"a red cube"', json.dumps({"prompt": "a blue sphere", "seed": 3, "num_images": 2, "cfg": 5}))
    assert [job.id for job in jobs] == ["cb97af9de68c3ecb", "ebac0171d7bed368", "107e67320556fa24"]
    assert [job.settings.controlnets for job in jobs] == [[], [], []] and jobs[0].settings.seed == 3901110779


def test_a_line_may_choose_a_schedule_type(tmp_path):
    """"schedule_type": "exponential" is a setting of its own (a new id); "karras" is the same job as "karras": true."""
    lines = [json.dumps({"prompt": "a cube", "seed": 1, "sampler": "euler", **extra})
             for extra in ({}, {"schedule_type": "exponential"}, {"schedule_type": "karras"}, {"karras": True})]  # fmt: skip
    plain, exponential, karras = jobs_of(tmp_path, *lines)  # the last two lines ask for one image: one job
    assert exponential.settings.schedule_type == "exponential" and len({plain.id, exponential.id, karras.id}) == 3
    assert karras.settings.karras and karras.settings.schedule_type is None
    assert [job.id for job in jobs_of(tmp_path, lines[3])] == [karras.id]
    with pytest.raises(ValueError, match="unknown schedule type 'cosine'"):
        jobs_of(tmp_path, json.dumps({"prompt": "a cube", "sampler": "euler", "schedule_type": "cosine"}))


@pytest.fixture(scope="module")
def controlnet_files(tmp_path_factory):
    """Two tiny random ControlNets (other weights, one name each) in a folder of their own."""
    from sd15.random_weights import random_controlnet, save_checkpoint

    folder = tmp_path_factory.mktemp("controlnets")
    return [save_checkpoint(random_controlnet("tiny", seed=seed), folder / f"net{seed}.safetensors") for seed in (0, 1)]


def control_picture(path: Path, seed: int) -> Path:
    from PIL import Image
    import numpy as np

    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))).save(path)
    return path


def test_what_makes_a_controlnet_lines_id(tmp_path, controlnet_files):
    """A ControlNet line's id hashes the ControlNet file's content (its short hash, as the PNG records it), the
    control image's bytes, the weight, start, end and guess mode; not how the paths are written. Its derived seed
    is that of the same line without the ControlNet, so adding one steers the same picture."""
    import shutil

    net = shutil.copy(controlnet_files[0], tmp_path / "net.safetensors")
    control_picture(tmp_path / "edges.png", 0)

    def line_id(**settings) -> str:
        return jobs_of(tmp_path, json.dumps({"prompt": "a house", **settings}))[0].id

    base = dict(controlnet="net.safetensors", control_image="edges.png")
    first = line_id(**base)
    assert line_id(controlnet=["./net.safetensors"], control_image=[str(tmp_path / "edges.png")], controlnet_scale=1) == first
    others = [line_id(**base, controlnet_scale=0.5), line_id(**base, control_end=0.5), line_id(**base, guess_mode=True)]
    assert len({first, *others}) == 4
    job = jobs_of(tmp_path, json.dumps({"prompt": "a house", **base}))[0]
    assert job.settings.seed == jobs_of(tmp_path, '"a house"')[0].settings.seed
    assert job.settings.controlnets == [dict(model="net", hash=job.settings.controlnets[0]["hash"], weight=1.0,
                                             guidance_start=0.0, guidance_end=1.0)]  # fmt: skip
    control_picture(tmp_path / "edges.png", 1)  # the same file name, another picture
    assert line_id(**base) not in (first, *others)
    control_picture(tmp_path / "edges.png", 0)
    assert line_id(**base) == first
    shutil.copy(controlnet_files[1], net)  # the same ControlNet name, other weights
    assert line_id(**base) not in (first, *others)


def test_a_controlnet_line_is_the_image_sd15_generate_makes(tmp_path, tiny_checkpoint, controlnet_files, monkeypatch, capsys):
    """A batch line with a ControlNet makes the PNG `sd15 generate` makes with the same settings (pixels and
    parameters). Paths are read from the prompts file's folder; each distinct ControlNet file loads once; a rerun
    skips finished work; a changed control image is new work."""
    import numpy as np
    from PIL import Image

    import sd15.controlnet
    from sd15.pnginfo import read_parameters

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    control_picture(jobs / "edges.png", 0)
    net = str(controlnet_files[0])
    lines = ['"a red cube"',
             json.dumps({"prompt": "a house", "seed": 5, "controlnet": net, "control_image": "edges.png",
                         "controlnet_scale": 0.5, "control_end": 0.8}),
             json.dumps({"prompt": "a house", "seed": 6, "controlnet": [net], "control_image": ["./edges.png"], "guess_mode": True})]  # fmt: skip
    (jobs / "p.jsonl").write_text("\n".join(lines) + "\n")
    loads = []
    real_load = sd15.controlnet.load_controlnet
    monkeypatch.setattr(sd15.controlnet, "load_controlnet", lambda *args: loads.append(args[0]) or real_load(*args))
    command = ["batch", "jobs/p.jsonl", "--out", "out", "--model", str(tiny_checkpoint), "--no-safety-checker", *ARGS]
    assert main(command) == 0
    assert "made 3 images" in capsys.readouterr().out and len(loads) == 1  # one file, two lines: loaded once
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    made = next(key for key, entry in manifest.items() if entry["seed"] == 5)
    assert manifest[made]["control_images"] == [str(Path("jobs") / "edges.png")]

    assert main(["generate", "a house", "--seed", "5", "--controlnet", f"{net}:0.5", "--control-image", "jobs/edges.png",
                 "--control-end", "0.8", "--model", str(tiny_checkpoint), "--no-safety-checker", "-o", "cli.png", *ARGS]) == 0  # fmt: skip
    batch_png, cli_png = tmp_path / "out" / f"{made}.png", tmp_path / "cli.png"
    assert np.array_equal(np.asarray(Image.open(batch_png)), np.asarray(Image.open(cli_png)))
    assert read_parameters(batch_png) == read_parameters(cli_png)
    guessed = next(key for key, entry in manifest.items() if entry["seed"] == 6)  # guess mode: recorded alike too
    assert main(["generate", "a house", "--seed", "6", "--controlnet", net, "--control-image", "jobs/edges.png", "--guess-mode",
                 "--model", str(tiny_checkpoint), "--no-safety-checker", "-o", "cli6.png", *ARGS]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{guessed}.png")), np.asarray(Image.open("cli6.png")))
    assert read_parameters(tmp_path / "out" / f"{guessed}.png") == read_parameters("cli6.png")
    assert "Guess Mode: True" in read_parameters("cli6.png")

    capsys.readouterr()
    assert main(command) == 0
    assert "made 0 images" in capsys.readouterr().out  # nothing redone
    control_picture(jobs / "edges.png", 1)  # the same name, another picture: both ControlNet lines are new work
    assert main(command) == 0
    assert "made 2 images; 3 jobs" in capsys.readouterr().out and len(pngs(tmp_path / "out")) == 5
    assert batch_png.exists()  # the image of the old control image stays


def test_a_controlnet_file_that_changes_after_the_jobs_are_read_is_refused(tmp_path, controlnet_files, monkeypatch):
    """The id hashes the ControlNet file as it was when the prompts file was read; loading it later (sd15 batch
    loads every ControlNet after reading every line) must not make that id's image with other weights."""
    import shutil

    from sd15.batch import load_controlnets

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the hash cache
    net = shutil.copy(controlnet_files[0], tmp_path / "net.safetensors")
    control_picture(tmp_path / "edges.png", 0)
    jobs = jobs_of(tmp_path, json.dumps({"prompt": "a house", "controlnet": "net.safetensors", "control_image": "edges.png"}))
    assert load_controlnets(jobs)[Path(net)].hash == jobs[0].settings.controlnets[0]["hash"]
    shutil.copy(controlnet_files[1], net)  # replaced meanwhile: the same name, other weights
    with pytest.raises(ValueError, match=r"net.safetensors \(line 1\) changed since the prompts file was read; run the batch again"):
        load_controlnets(jobs)
