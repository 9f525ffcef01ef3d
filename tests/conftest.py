import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_models.py
if torch.cuda.is_available():  # tests/gpu turns on deterministic mode, whose cuBLAS setting is read at the first GEMM
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
else:  # Triton kernels run under triton's CPU interpreter (set before they are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    collect_ignore = ["gpu"]  # tests/gpu needs a GPU: scripts/device_check.sh runs it on one

from sd15.random_weights import random_checkpoint, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    """A seeded tiny SD1.x checkpoint in the original layout, with EMA weights and schedule buffers."""
    return random_checkpoint("tiny", seed=0, ema=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_state_dict, tmp_path_factory) -> Path:
    return save_checkpoint(tiny_state_dict, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import sd15

    return sd15.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def controlnet_state_dict() -> dict[str, torch.Tensor]:
    """A tiny random ControlNet in ControlNet 1.1's layout, to go with tiny_model (sd15.random_weights)."""
    from sd15.random_weights import random_controlnet

    return random_controlnet("tiny", seed=0)


@pytest.fixture(scope="module")
def controlnet_file(controlnet_state_dict, tmp_path_factory) -> Path:
    return save_checkpoint(controlnet_state_dict, tmp_path_factory.mktemp("cn") / "canny-tiny.safetensors")


@pytest.fixture(scope="module")
def controlnet(tiny_model, controlnet_file):
    return tiny_model.load_controlnet(controlnet_file)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh current folder for CLI tests: no model or safety checker from the environment, and a HOME
    of its own (the model-hash cache goes there, not into the real home)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SD15_MODEL", raising=False)
    monkeypatch.delenv("SD15_SAFETY_CHECKER", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path
