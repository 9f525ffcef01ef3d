"""Count the work of each SD1.5 component, on the reference and the fast path, without running it.

    python scripts/count_work.py                # 512×512, fp16, one guided step (UNet batch 2)
    python scripts/count_work.py --size 768

The full-size models are built on PyTorch's meta device (shapes, no data), so this takes seconds on any
machine. For each component it counts, per call:

- kernels: the device kernels an eager call would launch (one per operator that moves data; a fused
  Triton operation as the launches it makes). CUDA graphs replay them all from one launch.
- GFLOP: torch's FLOP counter (matrix products, convolutions, attention).
- memory-bound GB: bytes read and written by everything but matrix products, convolutions and attention,
  each input read once and each output written once (GroupNorm reads its input twice: once for the
  statistics, once to normalise). This is the traffic the fused kernels remove.

and the floors they imply on an H200: FLOPs at 790 TFLOP/s (dense fp16, FACTS.md) and memory-bound bytes
at 4.8 TB/s (HBM3e). These are counts of a model of the work, not timings: scripts/profile_unet.py and
scripts/benchmark.py measure on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd15 import attention as attention_module  # noqa: E402
from sd15 import fast  # noqa: E402
from sd15.clip import CLIPTextModel  # noqa: E402
from sd15.unet import UNet  # noqa: E402
from sd15.vae import AutoencoderKL  # noqa: E402

H200_TFLOPS = 790.0  # dense fp16/bf16 matrix work (FACTS.md)
H200_TB_PER_S = 4.8  # HBM3e bandwidth
META = torch.device("meta")
COMPUTE_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution"}


def _bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


class WorkCounter(TorchDispatchMode):
    """Counts kernels and bytes of the operators that run under it, by kind."""

    def __init__(self):
        super().__init__()
        self.kernels, self.bytes = Counter(), Counter()  # by kind
        self.bytes_by_op = Counter()  # memory-bound bytes by operator, to see what is left to fuse
        self.paused = False

    def record(self, kind: str, kernels: int, nbytes: int, op: str) -> None:
        self.kernels[kind] += kernels
        self.bytes[kind] += nbytes
        if kind == "memory-bound":
            self.bytes_by_op[op] += nbytes

    @contextmanager
    def pause(self):
        self.paused, was = True, self.paused
        try:
            yield
        finally:
            self.paused = was

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        name = func.overloadpacket.__name__
        is_view = returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        if self.paused or is_view or name == "_unsafe_view":  # a new header over the same memory, not a kernel
            return out
        inputs, outputs = tree_flatten((args, kwargs))[0], tree_flatten(out)[0]
        nbytes, kernels = _bytes(inputs) + _bytes(outputs), 1
        if name == "native_group_norm":  # a statistics kernel, then the normalising one, which reads x again
            nbytes, kernels = nbytes + _bytes(inputs[:1]), 2
        elif name == "embedding":  # reads the looked-up rows of the table, not the whole table
            nbytes = _bytes(inputs[1:2]) + 2 * _bytes(outputs)
        self.record("compute" if name in COMPUTE_OPS else "memory-bound", kernels, nbytes, name)
        return out


def counting_ops(counter: WorkCounter) -> fast.Ops:
    """The fast path's fused operations as the Triton kernels do them: their launches and their traffic."""

    def group_norm(x, weight, bias, num_groups, eps, silu=False, channel_bias=None):
        with counter.pause():
            y = fast.TORCH_OPS.group_norm(x, weight, bias, num_groups, eps, silu, channel_bias)
        counter.record("memory-bound", 3, 2 * x.nbytes + y.nbytes, "group_norm (Triton)")  # statistics, merge, apply
        return y

    def geglu(h):
        with counter.pause():
            y = fast.TORCH_OPS.geglu(h)
        counter.record("memory-bound", 1, h.nbytes + y.nbytes, "geglu (Triton)")
        return y

    def add_layer_norm(x, delta, weight, bias, eps):
        with counter.pause():
            total, normed = fast.TORCH_OPS.add_layer_norm(x, delta, weight, bias, eps)
        counter.record("memory-bound", 1, x.nbytes + delta.nbytes + total.nbytes + normed.nbytes, "add_layer_norm (Triton)")
        return total, normed

    return fast.Ops("counted", group_norm, geglu, add_layer_norm)


@contextmanager
def fused_attention(counter: WorkCounter):
    """SDPA as one fused kernel (flash/cuDNN on a GPU): q, k, v read once, the output written once; on the
    meta device it would otherwise expand into the explicit softmax path."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        with counter.pause():  # flash and cuDNN attention write (B, T, h, d) memory: merging heads is a view
            out = real(q, k, v, *args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
        counter.record("attention", 1, q.nbytes + k.nbytes + v.nbytes + out.nbytes, "sdpa")
        return out

    attention_module.F = types.SimpleNamespace(scaled_dot_product_attention=sdpa)
    try:
        yield
    finally:
        attention_module.F = F


def build(dtype: torch.dtype, fast_path: bool):
    with torch.device(META):
        models = types.SimpleNamespace(unet=UNet(), vae=AutoencoderKL(), text_encoder=CLIPTextModel())
    for model in (models.unet, models.vae, models.text_encoder):
        model.to(dtype).eval().requires_grad_(False)
    models.device = META
    if fast_path:
        fast.enable(models, kernels=False, channels_last=True, cuda_graphs=False)
    return models


def calls(models, size: int, dtype: torch.dtype) -> dict:
    h = size // 8
    ids = torch.zeros(2, 77, dtype=torch.long, device=META)  # prompt and negative prompt
    x = torch.zeros(2, 4, h, h, device=META, dtype=dtype)  # [uncond; cond] latents
    t = torch.zeros(2, device=META)
    context = torch.zeros(2, 77, 768, device=META, dtype=dtype)
    z = torch.zeros(1, 4, h, h, device=META, dtype=dtype)
    models.unet(x, t, context)  # the fast path computes the cross-attention k/v here, once per generation
    return {
        "text encoder (2 prompts)": lambda: models.text_encoder(ids),
        "UNet, one guided step": lambda: models.unet(x, t, context),
        "VAE decode": lambda: models.vae.decode(z),
    }


def count(models, size: int, dtype: torch.dtype) -> dict:
    results = {}
    for name, call in calls(models, size, dtype).items():
        counter = WorkCounter()
        fast.use_ops(models, counting_ops(counter))
        with torch.no_grad(), fused_attention(counter), FlopCounterMode(display=False) as flops, counter:
            call()
        results[name] = (counter, flops.get_total_flops())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--top", type=int, default=6, help="operators listed by memory-bound traffic (default 6)")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    paths = {"reference": count(build(dtype, False), args.size, dtype), "fast": count(build(dtype, True), args.size, dtype)}

    print(f"{args.size}×{args.size}, {args.dtype}; floors on an H200: FLOPs at {H200_TFLOPS:.0f} TFLOP/s, "
          f"memory-bound bytes at {H200_TB_PER_S} TB/s")  # fmt: skip
    print("| component | path | kernels | GFLOP | compute floor (ms) | memory-bound GB | memory-bound floor (ms) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for component in paths["reference"]:
        for path, results in paths.items():
            counter, flops = results[component]
            kernels = sum(counter.kernels.values())
            memory = counter.bytes["memory-bound"] / 1e9
            print(f"| {component} | {path} | {kernels} | {flops / 1e9:.1f} | {flops / H200_TFLOPS / 1e9:.3f} | "
                  f"{memory:.3f} | {memory / H200_TB_PER_S:.3f} |")  # fmt: skip
    for component in paths["reference"]:
        print(f"\n{component}: memory-bound traffic by operator (GB)")
        for path, results in paths.items():
            top = results[component][0].bytes_by_op.most_common(args.top)
            print(f"  {path:9s} " + ", ".join(f"{op} {nbytes / 1e9:.3f}" for op, nbytes in top))


if __name__ == "__main__":
    main()
