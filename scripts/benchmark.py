"""sd15 against diffusers on the same random SD1.5 weights, in one process, on one device.

    python scripts/benchmark.py                       # CUDA, fp16, 512×512, 50 PNDM steps, guidance 7.5
    python scripts/benchmark.py --device cpu --size 256 --steps 5 --repeats 3 --no-compile
    python scripts/benchmark.py --only sd15 --deterministic   # the cost of sd15's --deterministic mode

Both sides get the same full-size random weights in the original layout (sd15.random_weights), converted
for diffusers by diffusers' own converters (tests/reference_models.py; diffusers is imported only here and
in the tests). Configurations timed:

    sd15 reference      the plain modules (`fast=False`), eager
    sd15 fast           sd15.fast: fused projections and k/v cache, Triton GroupNorm/GEGLU, channels-last
    sd15 fast+graphs    the same, replayed from CUDA graphs (the default on CUDA in fp16/bf16)
    sd15 compiled       the reference UNet under torch.compile(mode="reduce-overhead"), with --sd15-compile
    diffusers eager     StableDiffusionPipeline, SDPA, channels-last UNet
    diffusers compiled  the same with torch.compile(unet, mode="reduce-overhead", fullgraph=True)

Each figure is the median of --repeats runs after a warm-up, with the device synchronised around each run;
the runs of all configurations are interleaved, so drift in the machine's speed hits all alike. "First
image" is the time from loaded weights to the first finished image, with compilation, Triton's kernel
compilation (into an empty cache) and graph capture included. "Peak memory" is a configuration's weights
plus the most it allocates on top while drawing an image: for the first image, which includes warm-up,
compilation and capture, and for a later one. The first is the fair comparison: a CUDA graph (sd15's, or
torch.compile's "reduce-overhead") allocates its working memory during capture and keeps it in a private
pool, which later images reuse without allocating, so the later figure leaves it out. The table goes to
stdout; --json keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # reference_models: the diffusers side

import sd15  # noqa: E402
from sd15 import determinism  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sd15.random_weights import random_checkpoint_file  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device) -> float:
    """Wall time of one fn() call, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def parameter_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


@dataclass
class Workload:
    """What one configuration runs: its four parts, and a whole image (or a batch of `n` images)."""

    text: Callable[[], object]
    unet: Callable[[], object]
    vae: Callable[[], object]
    generate: Callable[[int], object]
    weight_bytes: int


def sd15_workload(m, args, device) -> Workload:
    h = args.size // 8
    x = torch.randn(2, 4, h, h, device=device, dtype=m.dtype)
    t = torch.full((2,), 501.0, device=device)
    ctx = torch.randn(2, 77, m.unet.config.context_dim, device=device, dtype=m.dtype)
    ids = m.tokenizer([PROMPT, ""]).to(device)
    z = torch.randn(1, 4, h, h, device=device, dtype=m.dtype)
    run = dict(steps=args.steps, width=args.size, height=args.size, output_type="np", seed=0)
    return Workload(
        text=lambda: m.text_encoder(ids),
        unet=lambda: m.unet(x, t, ctx),  # the same context every call: its k/v come from the cache
        vae=lambda: m.vae.decode(z),
        generate=lambda n=1: m.generate(PROMPT, num_images=n, batch_size=n, **run),
        weight_bytes=parameter_bytes(m.unet, m.vae, m.text_encoder),
    )


def diffusers_workload(pipe, args, device, dtype) -> Workload:
    h = args.size // 8
    x = torch.randn(2, 4, h, h, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor(501, device=device)  # as the pipeline passes it (0-d int64), so a compiled UNet is not recompiled
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    z = torch.randn(1, 4, h, h, device=device, dtype=dtype)
    run = dict(num_inference_steps=args.steps, width=args.size, height=args.size, output_type="np")
    return Workload(
        text=lambda: pipe.text_encoder(ids),
        unet=lambda: pipe.unet(x, t, encoder_hidden_states=ctx, timestep_cond=None, cross_attention_kwargs=None,
                               added_cond_kwargs=None, return_dict=False)[0],  # the pipeline's call, argument for argument
        vae=lambda: pipe.vae.decode(z),
        generate=lambda n=1: pipe(PROMPT, num_images_per_prompt=n, generator=torch.Generator().manual_seed(0), **run),
        weight_bytes=parameter_bytes(pipe.unet, pipe.vae, pipe.text_encoder),
    )


class TimeUp(BaseException):
    """SIGTERM (a time limit such as `timeout`'s) arrived: stop measuring, and print what was measured."""

    arrived = False  # set by the handler: code that catches the TimeUp (a capture's cleanup) may raise its own error


def measure(workloads: dict[str, Workload], args, device, results: dict[str, dict]) -> None:
    """Every metric of every configuration, into `results`. Timings are interleaved, each round running
    every configuration once, so that drift in the machine's speed (clocks, other tenants) hits all alike.
    A configuration that fails (a compiler error, say) is reported and dropped; the others go on."""
    results.update({name: {} for name in workloads})
    alive = dict(workloads)

    def note(name, metric, value):
        results[name][metric] = value
        print(f"  {name:20s} {metric:24s} {'-' if value is None else f'{value:.4g}'}", file=sys.stderr)

    def attempt(name, fn):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 (one configuration's failure must not lose the table)
            if TimeUp.arrived:  # a SIGTERM raised inside a graph capture or a compiler surfaces as its error
                raise TimeUp from error
            print(f"  {name}: failed, dropped: {type(error).__name__}: {error}", file=sys.stderr)
            results[name]["error"] = f"{type(error).__name__}: {error}"[:300]
            alive.pop(name, None)
            return None

    with torch.no_grad():
        for name, w in workloads.items():  # first, while nothing of that configuration is warm
            first = attempt(name, lambda: first_image(w, device))
            note(name, "first image (s)", first and first[0])
            note(name, "peak memory, first image (GiB)", first and first[1])
        many = args.repeats * 4 if device.type == "cuda" else args.repeats  # short calls: more samples
        timings = [
            ("text encoder (ms)", lambda w: w.text, many, 1000.0),
            ("UNet guided step (ms)", lambda w: w.unet, many, 1000.0),
            ("VAE decode (ms)", lambda w: w.vae, args.repeats, 1000.0),
            ("end to end (s)", lambda w: w.generate, args.repeats, 1.0),
        ]
        for b in args.batch_sizes:
            timings.append((f"batch {b} (images/s)", lambda w, b=b: (lambda: w.generate(b)), max(1, args.repeats // 2), -b))
        for metric, call, repeats, scale in timings:
            samples = {name: [] for name in workloads}
            for name, w in list(alive.items()):
                attempt(name, call(w))  # warm-up (and, for a new batch size, its graph capture)
            for _ in range(repeats):
                for name, w in list(alive.items()):
                    t = attempt(name, lambda: seconds(call(w), device))
                    if t is not None:
                        samples[name].append(t)
            for name in alive:
                median = statistics.median(samples[name])
                note(name, metric, -scale / median if scale < 0 else median * scale)  # images/s for batches
        for name, w in list(alive.items()):
            note(name, "peak memory, later image (GiB)", attempt(name, lambda: peak_memory(w, device)))


def first_image(w: Workload, device) -> tuple[float, float | None]:
    """Seconds from loaded weights to the first image, and the peak memory meanwhile (see peak_memory)."""
    before = _reset_peak(device)
    elapsed = seconds(w.generate, device)
    return elapsed, _peak_since(w, device, before)


def peak_memory(w: Workload, device) -> float | None:
    """GiB: the configuration's weights plus the most it allocates on top of what is resident while it
    draws one image (other configurations' weights stay resident and are not counted), on CUDA."""
    before = _reset_peak(device)
    w.generate()
    return _peak_since(w, device, before)


def _reset_peak(device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(w: Workload, device, before: int | None) -> float | None:
    if before is None:
        return None
    sync(device)
    return (w.weight_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**30


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    metrics = [k for k in dict.fromkeys(k for r in results.values() for k in r) if k != "error"]
    print("| metric | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for metric in metrics:
        cells = [f"{results[n].get(metric):.3f}" if results[n].get(metric) is not None else "-" for n in names]
        print(f"| {metric} | " + " | ".join(cells) + " |")
    for name in names:
        if "error" in results[name]:
            print(f"\n{name} failed: {results[name]['error']}")
    for ours_name in [n for n in names if n.startswith("sd15")]:
        for other in [n for n in names if n.startswith("diffusers")]:
            print(f"\nspeed-up of {ours_name} over {other} (higher is better):")
            for metric in metrics:
                ours, theirs = results[ours_name].get(metric), results[other].get(metric)
                if ours and theirs:
                    better = ours / theirs if "images/s" in metric else theirs / ours
                    print(f"  {metric:24s} {better:6.2f}×")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[8], help="throughput at these batch sizes")
    p.add_argument("--only", choices=("sd15", "diffusers"), default=None)
    p.add_argument("--no-compile", action="store_true", help="skip diffusers + torch.compile (about 80 s of compilation)")
    p.add_argument("--deterministic", action="store_true", help="time sd15 under sd15.determinism.enable()")
    p.add_argument("--sd15-compile", action="store_true", help="also time sd15's torch.compile mode (CUDA)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--weights", choices=("full", "tiny"), default="full", help="tiny: a quick run of the script itself")
    args = p.parse_args()
    if args.deterministic:
        determinism.enable()  # before any cuBLAS call
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sd15-triton-")  # "first image" compiles from cold
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)

    workloads: dict[str, Workload] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint_file(args.weights, 0, tmp)
        if args.only != "diffusers":
            configs = {"sd15 reference": dict(fast=False)}
            if on_cuda:  # before "sd15 fast", so that its first image pays for compiling the Triton kernels
                configs["sd15 fast+graphs"] = dict(fast=True, cuda_graphs=True)
            configs["sd15 fast"] = dict(fast=True, cuda_graphs=False)
            if on_cuda and args.sd15_compile:
                configs["sd15 compiled"] = dict(fast=True, compile=True)
            for name, opts in configs.items():
                m = sd15.load(path, device=device, dtype=dtype, fast=False)
                if opts.pop("fast"):
                    m.enable_fast_path(**opts)
                workloads[name + (" (deterministic)" if args.deterministic else "")] = sd15_workload(m, args, device)
        if args.only != "sd15":
            import diffusers
            from reference_models import diffusers_pipeline

            m = sd15.load(path, device="cpu", dtype=torch.float32, fast=False)  # only for its configs
            pipe = diffusers_pipeline(load_file(path), m, Path(tmp))
            del m
            pipe = pipe.to(device, dtype)
            pipe.set_progress_bar_config(disable=True)
            if on_cuda:
                pipe.unet.to(memory_format=torch.channels_last)
            workloads["diffusers eager"] = diffusers_workload(pipe, args, device, dtype)
            if on_cuda and not args.no_compile:  # the same weights, with the UNet compiled
                compiled = diffusers.StableDiffusionPipeline(**{**pipe.components, "unet": torch.compile(
                    pipe.unet, mode="reduce-overhead", fullgraph=True)})  # fmt: skip
                compiled.set_progress_bar_config(disable=True)
                workloads["diffusers compiled"] = diffusers_workload(compiled, args, device, dtype)
        results: dict[str, dict] = {}
        signal.signal(signal.SIGTERM, _time_up)
        try:
            measure(workloads, args, device, results)
        except TimeUp:
            print("\nstopped by SIGTERM (a time limit): the table holds what was measured before", file=sys.stderr)
            stopped = True
        else:
            stopped = False

    env = f"{torch.cuda.get_device_name(device) if on_cuda else 'CPU'}, torch {torch.__version__}, {str(dtype)[6:]}, " \
          f"{args.size}×{args.size}, {args.steps} PNDM steps, guidance 7.5, median of {args.repeats}"
    print(f"\n{env}{' (stopped early by a time limit)' if stopped else ''}\n")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "stopped_early": stopped, "results": results}, indent=2))


def _time_up(signum, frame):
    TimeUp.arrived = True
    raise TimeUp


if __name__ == "__main__":
    main()
