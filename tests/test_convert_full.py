"""The full-size round trip: a 2.1 GB fp16 random SD1.5 checkpoint (`random_checkpoint("full")`, the layout of the
fp16 v1-5 files people publish) goes to a diffusers folder and back bit for bit, each conversion in its own process with peak resident memory
under 1.5 GB (the file is read tensor by tensor from memory maps and written as it goes)."""

import hashlib
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


FP16_BYTES = 2.14e9  # the full-size file in fp16
MARGIN = 1e9


def disk_for_two_copies(folder: Path) -> None:
    """The round trip holds two copies of the weights on disk at a time (the diffusers folder beside the source,
    then beside the converted file). It runs in fp16: the file is still larger than PEAK_LIMIT, so streaming is
    what is proven, at half the fp32 file's minute of disk traffic (the conversion's dtype handling is the same
    code for every dtype, and tests/test_convert.py round-trips fp32 and fp16 tiny files). A machine with less
    free disk than two copies cannot hold the test at all; it is skipped there with the numbers, as nothing
    smaller is full size."""
    free = shutil.disk_usage(folder).free
    if free < 2 * FP16_BYTES + MARGIN:
        pytest.skip(f"the full-size round trip needs {(2 * FP16_BYTES + MARGIN) / 1e9:.1f} GB free in {folder}; "
                    f"this machine has {free / 1e9:.1f} GB")  # fmt: skip


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    """random_checkpoint("full") written once, by the project's script in its own process."""
    folder = tmp_path_factory.mktemp("full")
    disk_for_two_copies(folder)
    path, dtype = folder / "full-fp16.safetensors", "fp16"
    script = ROOT / "scripts" / "make_random_checkpoint.py"
    done = subprocess.run([sys.executable, str(script), str(path), "--size", "full", "--dtype", dtype],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, f"make_random_checkpoint.py failed:\n{done.stderr[-3000:]}"
    yield path
    shutil.rmtree(folder, ignore_errors=True)  # gigabytes of files: do not leave them to pytest's tmp retention


def tensor_digests(path: Path) -> dict[str, tuple]:
    """Each tensor's dtype, shape and SHA-256 of its bytes, read one tensor at a time."""
    view, digests = MappedSafetensors(path), {}
    for key in view.keys():
        t = view.get(key).contiguous()
        digests[key] = (t.dtype, tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest())
        del t
    return digests


@pytest.mark.full_size
def test_full_size_round_trip_is_bit_exact_with_little_memory(full_checkpoint, tmp_path):
    size = full_checkpoint.stat().st_size
    assert size > FP16_BYTES * 0.98 > PEAK_LIMIT
    stat = full_checkpoint.stat()
    folder, back = tmp_path / "diffusers", tmp_path / "back.safetensors"
    try:
        peak_export, out = run_measured("convert", full_checkpoint, folder, "--no-progress")
        assert "verified" in out and "12 schedule buffers" in out
        assert (stat.st_mtime_ns, stat.st_size) == (full_checkpoint.stat().st_mtime_ns, full_checkpoint.stat().st_size)
        original = tensor_digests(full_checkpoint)
        full_checkpoint.unlink()  # only two copies on disk at a time; the digests stand for the source now
        peak_import, out = run_measured("convert", folder, back, "--no-progress")
        assert "verified" in out
        report = f"peak RSS: to diffusers {peak_export / 1e9:.2f} GB, back {peak_import / 1e9:.2f} GB, file {size / 1e9:.2f} GB"
        print(report)
        assert peak_export < PEAK_LIMIT and peak_import < PEAK_LIMIT, report

        assert len(original) == 1143  # 686 + 248 + 197 + 12 schedule buffers
        returned = tensor_digests(back)
        assert set(returned) == set(original)
        for key, digest in original.items():
            assert returned[key] == digest, key
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
