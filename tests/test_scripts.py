"""The GPU session's scripts run end to end (on tiny random weights, on the CPU), so that the few minutes
of a lent GPU are not lost to a crash in them. What they measure is not checked here: timings are never
tested, and their numbers come from the GPU (docs/performance.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_benchmark_runs_sd15_and_diffusers_and_prints_the_ratios(tmp_path):
    out = run(str(ROOT / "scripts" / "benchmark.py"), "--device", "cpu", "--weights", "tiny", "--size", "64", "--steps", "2",
              "--repeats", "1", "--batch-sizes", "2", "--json", str(tmp_path / "b.json"), cwd=tmp_path)  # fmt: skip
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert list(results) == ["sd15 reference", "sd15 fast", "diffusers eager"]
    for name, metrics in results.items():
        assert "error" not in metrics, (name, metrics)
        assert all(metrics[k] > 0 for k in ("first image (s)", "text encoder (ms)", "UNet guided step (ms)",
                                            "VAE decode (ms)", "end to end (s)", "batch 2 (images/s)"))  # fmt: skip
    assert "| UNet guided step (ms) |" in out
    assert "speed-up of sd15 reference over diffusers eager" in out and "speed-up of sd15 fast over diffusers eager" in out


def stopped_by_sigterm(script: str, *args: str, after: str, folder) -> tuple[str, dict]:
    """Run a script, send it SIGTERM (what `timeout` sends) once a stderr progress line holds `after`, and return
    its stdout and the JSON it saved. It must exit cleanly, saying it stopped early."""
    import signal

    cmd = [sys.executable, str(ROOT / "scripts" / script), *args, "--json", str(folder / "out.json")]
    proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if after in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped early by a time limit" in out
    saved = json.loads((folder / "out.json").read_text())
    assert saved["stopped_early"] is True
    return out, saved


def test_benchmark_stopped_by_a_time_limit_still_prints_what_it_measured(tmp_path):
    """On the GPU it runs under `timeout`: SIGTERM mid-run must leave the table and the JSON, not nothing."""
    out, saved = stopped_by_sigterm("benchmark.py", "--device", "cpu", "--weights", "tiny", "--size", "64", "--steps", "2",
                                    "--repeats", "50", "--batch-sizes", "--only", "sd15", after="UNet guided step",
                                    folder=tmp_path)  # fmt: skip
    assert "| UNet guided step (ms) |" in out
    assert saved["results"]["sd15 reference"]["first image (s)"] > 0
    assert "end to end (s)" not in saved["results"]["sd15 reference"]  # 50 repeats of everything: not reached


def test_profile_runs_on_both_paths(tmp_path):
    out = run(str(ROOT / "scripts" / "profile_unet.py"), "--device", "cpu", "--weights", "tiny", "--size", "64", "--top", "5",
              cwd=tmp_path)  # fmt: skip
    assert "reference path" in out and "fast path" in out
    assert out.count("matmul / conv") >= 2 and "total" in out


def test_ablation_runs_its_ladder_and_prints_the_table(tmp_path):
    out = run(str(ROOT / "scripts" / "ablate_fast_path.py"), "--device", "cpu", "--weights", "tiny", "--size", "64",
              "--calls", "1", "--json", str(tmp_path / "a.json"), cwd=tmp_path)  # fmt: skip
    results = json.loads((tmp_path / "a.json").read_text())["results"]
    assert list(results) == ["reference, NCHW", "reference, channels-last", "fused modules, PyTorch ops"]
    for name, metrics in results.items():
        assert "error" not in metrics, (name, metrics)
        assert metrics["UNet guided step (ms)"] > 0 and metrics["VAE decode (ms)"] > 0
    assert "| fused modules, PyTorch ops |" in out


def _script_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_stopped_by_a_time_limit_still_prints_what_it_measured(tmp_path):
    """device_check.sh runs it under `timeout`: SIGTERM mid-ladder must leave the rows measured, not nothing."""
    out, saved = stopped_by_sigterm("ablate_fast_path.py", "--device", "cpu", "--weights", "tiny", "--size", "32",
                                    "--calls", "10", after="reference, NCHW", folder=tmp_path)  # one line per finished row
    assert "| reference, NCHW |" in out
    assert saved["results"]["reference, NCHW"]["UNet guided step (ms)"] > 0
    assert "fused modules, PyTorch ops" not in saved["results"]  # the third row, seconds away: not reached


def test_ablation_compares_each_sdpa_row_with_the_graphs_row(monkeypatch, capsys):
    """A forced-SDPA row differs from "+ CUDA graphs" in its backend alone; "+ cudnn.benchmark", the row
    printed above it, also turns cuDNN's autotuning on, so a ratio against it would mix the two."""
    ablate = _script_module("ablate_fast_path")
    same = dict(fast=None, channels_last=False)  # runs on the CPU; the timings below stand in for the GPU's
    rows = ["reference, NCHW", "+ CUDA graphs", "+ cudnn.benchmark", "graphs, SDPA forced to flash"]
    monkeypatch.setattr(ablate, "ladder", lambda cuda: [(name, same) for name in rows])
    unet_ms = iter([40.0, 10.0, 5.0, 8.0])
    monkeypatch.setattr(ablate, "median_ms", lambda fn, device, calls, warmup=3: next(unet_ms) if calls > 5 else 30.0)
    monkeypatch.setattr(sys, "argv", ["ablate_fast_path.py", "--device", "cpu", "--weights", "tiny", "--size", "64"])
    ablate.main()
    out = capsys.readouterr().out
    assert "| + cudnn.benchmark | 5.00 | 2.00× |" in out
    assert "| graphs, SDPA forced to flash | 8.00 | 1.25× |" in out  # 10 / 8, not 5 / 8


def test_benchmark_a_time_limit_that_surfaces_as_another_error_still_stops(monkeypatch):
    """A SIGTERM inside a CUDA-graph capture or a compiler can come out as that code's own error (the
    capture's cleanup raises); it must stop the run like the TimeUp it was, not drop one configuration
    and go on measuring until `timeout -k` kills the process with nothing printed."""
    import argparse

    import pytest
    import torch

    benchmark = _script_module("benchmark")
    monkeypatch.setattr(benchmark.TimeUp, "arrived", False)

    def interrupted_capture(n=1):
        benchmark.TimeUp.arrived = True  # what the SIGTERM handler sets before it raises
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    work = benchmark.Workload(text=lambda: None, unet=lambda: None, vae=lambda: None, generate=interrupted_capture,
                              weight_bytes=0)  # fmt: skip
    results = {}
    with pytest.raises(benchmark.TimeUp):
        benchmark.measure({"sd15 fast+graphs": work}, argparse.Namespace(repeats=1, batch_sizes=[]),
                          torch.device("cpu"), results)  # fmt: skip
    assert "error" not in results["sd15 fast+graphs"]


def test_ablation_ladder_on_cuda_names_every_part_and_each_sdpa_backend():
    """The CUDA rows cannot run here; their construction (torch's SDPA backend names) can."""
    names = [name for name, _ in _script_module("ablate_fast_path").ladder(cuda=True)]
    assert names[3:6] == ["+ Triton kernels", "+ CUDA graphs", "+ cudnn.benchmark"]
    assert [n for n in names if "SDPA" in n] == [f"graphs, SDPA forced to {b}" for b in ("flash", "cuDNN", "memory-efficient")]


def test_count_work_reproduces_the_flop_figures_and_shows_what_the_fusions_remove():
    """scripts/count_work.py on the full-size models (meta device: no data, seconds). Its FLOPs must be
    FACTS.md's, measured on the real configs (1.607 T per guided UNet step, 2.515 T per VAE decode); the
    fast path must launch fewer kernels and move fewer memory-bound bytes per UNet step."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("count_work", ROOT / "scripts" / "count_work.py")
    count_work = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count_work)
    import torch

    reference = count_work.count(count_work.build(torch.float16, fast_path=False), 512, torch.float16)
    fast = count_work.count(count_work.build(torch.float16, fast_path=True), 512, torch.float16)
    unet, vae = "UNet, one guided step", "VAE decode"
    assert abs(reference[unet][1] / 1.607e12 - 1) < 1e-3
    assert abs(reference[vae][1] / 2.515e12 - 1) < 1e-3
    assert fast[unet][1] < reference[unet][1]  # the cross-attention k/v are not recomputed per step
    for component in (unet, vae):
        ours, theirs = fast[component][0], reference[component][0]
        assert ours.bytes["memory-bound"] < 0.8 * theirs.bytes["memory-bound"], component
    assert sum(fast[unet][0].kernels.values()) < sum(reference[unet][0].kernels.values())


def test_every_triton_kernel_variant_of_the_full_size_model_compiles_for_sm90(tmp_path):
    """scripts/compile_kernels.py: the variants the fast path launches at 512×512, compiled to cubins for
    the H100/H200 without a GPU (a kernel that cannot compile would otherwise fail in a GPU session).
    At most 20 variants: each costs the first image on a new machine about half a second of compiling."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--arch", "90"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    variants = int(done.stdout.split(" kernel variants")[0].rsplit(" ", 1)[1])
    assert 0 < variants <= 20
    assert f"compiled all {variants} in" in done.stdout
    for kernel in ("_partial_stats_kernel", "_finalize_stats_kernel", "_apply_kernel", "_geglu_kernel", "_add_layer_norm_kernel"):
        assert kernel in done.stdout


def test_half_precision_error_runs_and_reports_both_dtypes(tmp_path):
    out = run(str(ROOT / "scripts" / "half_precision_error.py"), "--weights", "tiny", "--size", "64", "--steps", "2",
              cwd=tmp_path)  # fmt: skip
    for dtype in ("torch.float16", "torch.bfloat16"):
        line = next(line for line in out.splitlines() if line.strip().startswith(dtype))
        relative = float(line.split("UNet call ")[1].split()[0])
        assert 0 < relative < 0.1  # half precision moves the output, and not by much
