"""Compile every Triton kernel variant the full-size model launches, for a GPU architecture, without a GPU.

    python scripts/compile_kernels.py                        # sm_90 (H100, H200), fp16
    python scripts/compile_kernels.py --arch 80 --dtype bf16 # sm_80 (A100)

The first image on a new machine waits while Triton compiles each variant of sd15's kernels (a variant: one
kernel with one set of constexpr values and argument types). This script finds the variants by running the
fast path's text encoder, guided UNet step and VAE decode at full size on PyTorch's meta device, with the
kernel launches recorded instead of run. It then compiles each variant with `triton.compile` for the given
target, down to a cubin, so that a kernel Triton cannot compile for that GPU fails here and not in the
middle of a GPU session. It prints each variant's compile time and the total: an estimate of what the
first image pays for compilation (on the GPU the JIT also specialises integer arguments that are
multiples of 16, which can add variants; Triton's cache in ~/.triton then serves later runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import count_work  # noqa: E402  (builds the meta-device models and their calls)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sd15 import fast  # noqa: E402
from sd15.kernels import add_layer_norm, geglu, group_norm  # noqa: E402

KERNEL_MODULES = {
    group_norm: ("_partial_stats_kernel", "_finalize_stats_kernel", "_apply_kernel"),
    geglu: ("_geglu_kernel",),
    add_layer_norm: ("_add_layer_norm_kernel",),
}
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Variant:
    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, triton type) of the runtime arguments
    constexprs: tuple[tuple[str, object], ...]


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {value!r}")


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **constexprs)` records, runs nothing."""

    def __init__(self, kernel, seen: dict):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            runtime = [name for name in self.kernel.arg_names if name not in constexprs]
            signature = tuple((name, _triton_type(value)) for name, value in zip(runtime, args))
            variant = Variant(self.kernel.__name__, signature, tuple(sorted(constexprs.items())))
            self.seen[variant] = self.seen.get(variant, 0) + 1

        return launch


def kernel_functions() -> dict:
    return {name: getattr(module, name) for module, names in KERNEL_MODULES.items() for name in names}


def record_variants(dtype: torch.dtype, size: int = 512) -> dict[Variant, int]:
    """The kernel variants (and how often each is launched) in one text encoding, one guided UNet step
    and one VAE decode of the full-size model on the fast path."""
    seen: dict[Variant, int] = {}
    originals = kernel_functions()
    for module, names in KERNEL_MODULES.items():
        for name in names:
            setattr(module, name, _Recorder(getattr(module, name), seen))
    try:
        models = count_work.build(dtype, fast_path=True)
        fast.use_ops(models, fast.Ops("triton", group_norm.group_norm, geglu.geglu, add_layer_norm.add_layer_norm))
        with torch.no_grad():
            for call in count_work.calls(models, size, dtype).values():
                call()
    finally:
        for module, names in KERNEL_MODULES.items():
            for name in names:
                setattr(module, name, originals[name])
    return seen


def compile_variant(variant: Variant, arch: int):
    """triton.compile down to a cubin for sm_<arch>; returns the compiled kernel."""
    kernel = kernel_functions()[variant.kernel]
    constexprs = dict(variant.constexprs)
    signature = {name: "constexpr" if name in constexprs else dict(variant.signature)[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability × 10 (default 90: H100/H200)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: under the interpreter triton has no compiled kernels to build")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sd15-triton-")  # compile, not read ~/.triton
    variants = record_variants(DTYPES[args.dtype], args.size)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, {args.size}×{args.size}: "
          f"{len(variants)} kernel variants, launched {sum(variants.values())} times by one text encoding, "
          "guided UNet step and VAE decode")  # fmt: skip
    total = 0.0
    for variant, launches in sorted(variants.items(), key=lambda kv: (kv[0].kernel, kv[0].constexprs)):
        start = time.perf_counter()
        compiled = compile_variant(variant, args.arch)
        seconds = time.perf_counter() - start
        total += seconds
        constants = ", ".join(f"{k}={v}" for k, v in variant.constexprs)
        print(f"  {seconds:5.2f} s  {len(compiled.asm['cubin']):6d} B cubin  {launches:3d}×  {variant.kernel}({constants})")
    print(f"compiled all {len(variants)} in {total:.1f} s, one after another on this machine's CPU")


if __name__ == "__main__":
    main()
