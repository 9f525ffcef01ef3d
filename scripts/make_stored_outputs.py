"""Write tests/data/stored_outputs.npz: the outputs of the seeded runs in tests/stored_outputs.py.

    python scripts/make_stored_outputs.py

Run it only when a change is meant to alter sd15's outputs, and say in the commit why they moved.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import sd15  # noqa: E402
import stored_outputs  # noqa: E402
from sd15.random_weights import save_checkpoint  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        m = sd15.load(save_checkpoint(stored_outputs.tiny_state_dict(), Path(tmp) / "tiny.safetensors"), fast=False)
        outputs = stored_outputs.compute(m)
    target = Path(stored_outputs.STORED)
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(".partial.npz")
    np.savez_compressed(partial, torch_version=np.array(torch.__version__), **outputs)
    partial.replace(target)  # atomic: a test never reads half a file
    for name, images in outputs.items():
        print(f"{name:28s} {tuple(images.shape)}  mean {images.mean():.4f}")
    print(f"wrote {target.relative_to(ROOT)} ({target.stat().st_size // 1024} KiB, torch {torch.__version__})")


if __name__ == "__main__":
    main()
