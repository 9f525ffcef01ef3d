"""Numerics guards and determinism."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import sd15
from sd15.cli import main
from sd15.pipeline import NumericsError

RUN = dict(steps=2, seed=1, width=64, height=64, output_type="np")


def test_nan_from_the_unet_is_an_error_not_an_image(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    m = sd15.load(tiny_checkpoint)
    original = m.unet.forward
    monkeypatch.setattr(m.unet, "forward", lambda x, t, c: original(x, t, c) * float("nan"))
    with pytest.raises(NumericsError, match="UNet produced NaN"):
        m.generate("a cat", **RUN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sd15, "load", lambda *a, **k: m)
    assert main(["generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--model", str(tiny_checkpoint),
                 "-o", "nan.png", "--no-progress"]) == 2  # fmt: skip
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "nan.png").exists()


def test_half_precision_vae_overflow_is_retried_in_float32(tiny_checkpoint, monkeypatch):
    reference = sd15.load(tiny_checkpoint).generate("a cat", **RUN)
    m = sd15.load(tiny_checkpoint, dtype=torch.bfloat16)
    conv_out = m.vae.decoder.conv_out
    original = conv_out.forward

    def overflow_in_half(x):  # what SD's VAE does in fp16 on some images
        y = original(x)
        return y * float("inf") if y.dtype != torch.float32 else y

    monkeypatch.setattr(conv_out, "forward", overflow_in_half)
    with pytest.warns(UserWarning, match="decoding again in float32"):
        images = m.generate("a cat", **RUN)
    assert np.isfinite(images).all()
    assert next(m.vae.parameters()).dtype == torch.bfloat16  # put back as it was
    assert np.abs(images - reference).mean() < 0.05  # a bf16 UNet, an fp32 decode: close to the fp32 run


def test_vae_nan_in_float32_is_an_error(tiny_checkpoint, monkeypatch):
    m = sd15.load(tiny_checkpoint)
    monkeypatch.setattr(m.vae.decoder.conv_out, "forward", lambda x: x[:, :3] * float("nan"))
    with pytest.raises(NumericsError, match="VAE decoder produced NaN"):
        m.generate("a cat", **RUN)


THREADS_SCRIPT = """
import sys, hashlib, torch, sd15
torch.set_num_threads(int(sys.argv[2]))
m = sd15.load(sys.argv[1])
a = m.generate("a lighthouse", steps=3, seed=5, width=64, height=64, output_type="np")
sys.stdout.buffer.write(a.tobytes())
"""


def test_same_thread_count_is_bit_identical_and_thread_counts_agree_closely(tiny_checkpoint):
    def run(threads: int) -> np.ndarray:
        out = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(tiny_checkpoint), str(threads)], capture_output=True, check=True)
        return np.frombuffer(out.stdout, dtype=np.float32)

    one, one_again, two = run(1), run(1), run(2)
    assert np.array_equal(one, one_again)  # reproducible for a given thread count
    # oneDNN/BLAS split their sums differently with more threads: differences of a few float32 ulps
    assert np.abs(one - two).max() < 1e-4


def test_deterministic_flag_sets_the_library_switches(tiny_checkpoint, tmp_path):
    script = (
        "import sys, torch\n"
        "from sd15.cli import main\n"
        "code = main(['generate', 'a', '--steps', '1', '--width', '64', '--height', '64', '--model', sys.argv[1],\n"
        "             '-o', sys.argv[2], '--no-progress', '--deterministic'])\n"
        "import os\n"
        "print(code, torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,\n"
        "      torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG'],\n"
        "      torch.utils.deterministic.fill_uninitialized_memory)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tiny_checkpoint), str(tmp_path / "d.png")],
                         capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].split() == ["0", "True", "True", "False", ":4096:8", "False"]


def test_enabling_determinism_after_cuda_started_warns_how_to_fix_it(monkeypatch):
    """PyTorch reads CUBLAS_WORKSPACE_CONFIG once, at the first GEMM; set later it is ignored and the next
    GEMM under deterministic mode raises. enable() says so when CUDA is already up and the variable unset."""
    from sd15 import determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    try:
        with pytest.warns(UserWarning, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
            determinism.enable()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            determinism.enable()  # set beforehand: nothing to say
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
        torch.utils.deterministic.fill_uninitialized_memory = True
