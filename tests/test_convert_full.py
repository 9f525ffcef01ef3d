"""The full-size round trip: a 4.3 GB fp32 random SD1.5 checkpoint (`random_checkpoint("full")`) goes to a
diffusers folder and back bit for bit, each conversion in its own process with peak resident memory
under 1.5 GB (the file is read tensor by tensor from memory maps and written as it goes)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd15.streaming import MappedSafetensors

ROOT = Path(__file__).parents[1]
PEAK_LIMIT = 1.5e9  # bytes
PEAK_SCRIPT = """
import resource, sys
from sd15.cli import main
code = main(sys.argv[1:])
print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def run_measured(*args) -> tuple[int, str]:
    """Run `sd15 ARGS` in a fresh process; return its peak resident memory in bytes and its output.
    Measured by /usr/bin/time -v where present, else by getrusage inside the process (both in KiB)."""
    if Path("/usr/bin/time").exists():
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "sd15.cli", *map(str, args)]
        marker = "Maximum resident set size (kbytes):"
    else:
        cmd = [sys.executable, "-c", PEAK_SCRIPT, *map(str, args)]
        marker = "peak_kib"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if marker in line)
    return int(line.split()[-1]) * 1024, done.stdout + done.stderr


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """random_checkpoint("full") written once, by the project's script in its own process."""
    folder = tmp_path_factory.mktemp("full")
    path = folder / "full.safetensors"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_checkpoint.py"), str(path), "--size", "full"],
                   check=True, capture_output=True)  # fmt: skip
    yield path
    shutil.rmtree(folder, ignore_errors=True)  # 13 GB of files in all: do not leave them to pytest's tmp retention


@pytest.mark.full_size
def test_full_size_round_trip_is_bit_exact_with_little_memory(full_checkpoint, tmp_path):
    size = full_checkpoint.stat().st_size
    assert size > 4.2e9
    stat = full_checkpoint.stat()
    folder, back = tmp_path / "diffusers", tmp_path / "back.safetensors"
    try:
        peak_export, out = run_measured("convert", full_checkpoint, folder, "--no-progress")
        assert "verified" in out and "12 schedule buffers" in out
        peak_import, out = run_measured("convert", folder, back, "--no-progress")
        assert "verified" in out
        report = f"peak RSS: to diffusers {peak_export / 1e9:.2f} GB, back {peak_import / 1e9:.2f} GB, file {size / 1e9:.2f} GB"
        print(report)
        assert peak_export < PEAK_LIMIT and peak_import < PEAK_LIMIT, report
        assert (stat.st_mtime_ns, stat.st_size) == (full_checkpoint.stat().st_mtime_ns, full_checkpoint.stat().st_size)

        a, b = MappedSafetensors(full_checkpoint), MappedSafetensors(back)
        assert set(a.keys()) == set(b.keys()) and len(a.keys()) == 1143  # 686 + 248 + 197 + 12 schedule buffers
        for key in a.keys():
            x, y = a.get(key), b.get(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), key
            del x, y
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        back.unlink(missing_ok=True)


def test_pickle_pages_are_released_as_the_conversion_goes(tmp_path):
    """A .ckpt is memory-mapped whole by torch.load; without releasing each used tensor's pages, converting
    600 MB of tensors would leave all 600 MB resident. With it, the peak stays near a tiny file's."""
    torch.save({"state_dict": {f"t{i}": torch.full((1_000_000,), float(i)) for i in range(150)}}, tmp_path / "big.ckpt")
    torch.save({"state_dict": {"t0": torch.zeros(10)}}, tmp_path / "small.ckpt")
    peak_big, _ = run_measured("convert", tmp_path / "big.ckpt", tmp_path / "big.safetensors", "--no-progress")
    peak_small, _ = run_measured("convert", tmp_path / "small.ckpt", tmp_path / "small.safetensors", "--no-progress")
    assert (tmp_path / "big.safetensors").stat().st_size > 600e6
    assert peak_big - peak_small < 150e6, f"{peak_big / 1e6:.0f} MB vs {peak_small / 1e6:.0f} MB"
