"""The fast path: the same modules and weights, computed with fewer and larger kernels.

On a GPU, one guided UNet step of SD1.5 at 512×512 is 1.6 TFLOP, about 2 ms of an H200's fp16 tensor
cores; run eagerly it takes 20-45 ms, because most of the time goes to launching ~700 small kernels and
to memory-bound passes over the feature maps. The fast path removes that overhead in five ways:

1. channels-last (NHWC) feature maps, the layout cuDNN's fp16/bf16 convolutions and the Triton GroupNorm
   want; the SpatialTransformer's (B, C, H, W) -> (B, HW, C) then costs no copy.
2. fused projections: self-attention computes q, k, v with one matrix product on the concatenated weight
   [W_q; W_k; W_v] (B, T, 3D), cross-attention k and v with one on [W_k; W_v]. The concatenated weight is
   made once and the checkpoint's `to_q.weight`, `to_k.weight`, `to_v.weight` become views of it, so the
   module keeps the checkpoint's names and no memory is added; a LoRA merged into `to_k.weight` in place
   reaches the fused weight by construction.
3. cross-attention k, v from the text are computed once per prompt (per context tensor), not once per
   step: they depend on the context and the weights only, and both stay fixed for a whole generation.
4. Triton kernels (sd15.kernels) for the memory-bound elementwise work: GroupNorm fused with the SiLU
   after it and with the ResBlock's timestep-embedding add before it, GEGLU, and each transformer
   sublayer's residual add fused with the LayerNorm after it. Without Triton (or on the CPU) the same
   fused modules call PyTorch's own ops.
5. CUDA graphs (sd15.cuda_graphs): the whole UNet call is captured once per shape and replayed, so a step
   costs one launch instead of ~700.

How. Every fast module is a subclass of the reference module with the same parameters under the same names
and the same maths, differing only in `forward`. `enable` swaps each module's class for its fast subclass
in place, and `disable` swaps it back, so `state_dict()`, LoRA, the converters and the tests see the
checkpoint's layout either way. The reference modules (unet.py, vae.py, clip.py) stay the readable
definition and the oracle the tests compare the fast path with (tests/test_fast.py).

What falls back. A fast module runs the reference `forward` whenever something wants to see what the fused
version skips: an attention layer with a probability hook (sd15.hooks) or a forward hook on one of its
projections (an on-the-fly LoRA); a block with a hook on a norm or SiLU that it fuses.
`sd15.trace` turns the whole fast path off while it records, since fused modules skip the submodules it
would hook.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import clip, kernels, unet, vae
from .attention import attention

if TYPE_CHECKING:
    from .model import StableDiffusion

# cross-attention k/v kept per layer: both guidance branches when their texts differ in length and the UNet
# is called once for each (sd15.pipeline.guided_eps_model)
CACHED_CONTEXTS = 2

# --------------------------------------------------------------------------- the elementwise ops


@dataclass(frozen=True)
class Ops:
    """The fused memory-bound operations, from Triton or from PyTorch (same signatures, same maths)."""

    name: str
    group_norm: Callable  # (x, weight, bias, num_groups, eps, silu=False, channel_bias=None) -> like x
    geglu: Callable  # (B, T, 2F) -> (B, T, F): a · GELU(gate)
    add_layer_norm: Callable  # (x, delta, weight, bias, eps) -> (x + delta, LayerNorm(x + delta))


def _torch_group_norm(x, weight, bias, num_groups, eps, silu=False, channel_bias=None):
    if channel_bias is not None:
        x = x + channel_bias[:, :, None, None].to(x.dtype)  # (B, C, H, W)
    h = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(h) if silu else h


def _torch_geglu(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def _torch_add_layer_norm(x, delta, weight, bias, eps):
    total = x + delta
    return total, F.layer_norm(total, (total.shape[-1],), weight, bias, eps)


TORCH_OPS = Ops("torch", _torch_group_norm, _torch_geglu, _torch_add_layer_norm)


def triton_ops() -> Ops:
    from .kernels.add_layer_norm import add_layer_norm
    from .kernels.geglu import geglu
    from .kernels.group_norm import group_norm

    return Ops(
        "triton",
        _falling_back(group_norm, _torch_group_norm),
        _falling_back(geglu, _torch_geglu),
        _falling_back(add_layer_norm, _torch_add_layer_norm),
    )


def _falling_back(kernel: Callable, fallback: Callable) -> Callable:
    """`kernel`, until it fails once (Triton cannot compile for every GPU, or may lack a compiler); from
    then on `fallback`, with one warning that says so. Failures inside a CUDA-graph capture propagate."""
    failed = False

    def call(*args, **kwargs):
        nonlocal failed
        if not failed:
            try:
                return kernel(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 (any compile or launch failure: the fallback is exact)
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                failed = True
                warnings.warn(f"the Triton kernel {kernel.__name__} failed ({type(error).__name__}: {error}); "
                              "using PyTorch's ops instead")  # fmt: skip
        return fallback(*args, **kwargs)

    return call


def choose_ops(device: torch.device, kernels_wanted: bool | None) -> Ops:
    """Triton on CUDA when it is installed, else PyTorch. On the CPU, Triton only when asked for and
    interpreted (TRITON_INTERPRET=1, which is how the tests run the kernels without a GPU)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    usable = kernels.triton_available() and (device.type == "cuda" or interpreted)
    if kernels_wanted is None:
        kernels_wanted = usable and device.type == "cuda"
    if kernels_wanted and not usable:
        raise RuntimeError("Triton kernels need CUDA and the `triton` package (or TRITON_INTERPRET=1 to test them on the CPU)")
    return triton_ops() if kernels_wanted else TORCH_OPS


# --------------------------------------------------------------------------- fused weights


def fused_weight(module: nn.Module, names: tuple[str, ...], with_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights of `module`'s Linear layers `names` stacked along the output dimension, (ΣD_out, D_in).

    Made once: the layers' own weights (and biases) are replaced by views of the stacked tensor, so that
    later in-place changes reach it. If a layer's weight was replaced since (by `.to()`, `load_state_dict`
    or a LoRA unload that assigns), the stack is made again.
    """
    layers = [getattr(module, name) for name in names]
    cache = module.__dict__.setdefault("_fused", {})
    found = cache.get(names)
    if found is None or any(layer.weight.data_ptr() != ptr for layer, ptr in zip(layers, found[2])):
        weight = torch.cat([layer.weight.detach() for layer in layers])  # (ΣD_out, D_in)
        bias = torch.cat([layer.bias.detach() for layer in layers]) if with_bias else None
        row = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight = nn.Parameter(weight[row : row + rows], requires_grad=False)
            if with_bias:
                layer.bias = nn.Parameter(bias[row : row + rows], requires_grad=False)
            row += rows
        found = cache[names] = (weight, bias, [layer.weight.data_ptr() for layer in layers])
    return found[0], found[1]


def unfuse(module: nn.Module) -> None:
    """Give each Linear layer its own weight again (so that e.g. safetensors can save the state dict)."""
    for names in module.__dict__.pop("_fused", {}):
        for name in names:
            layer = getattr(module, name)
            layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    module.__dict__.pop("_context_kv", None)


def _hooked(*layers: nn.Module) -> bool:
    return any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


# --------------------------------------------------------------------------- fast modules


class FastCrossAttention(unet.CrossAttention):
    """unet.CrossAttention with fused q/k/v (self-attention) or fused and cached k/v (cross-attention)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        wants_probs = self.probs_hook is not None and self.probs_hook.wanted()
        if wants_probs or _hooked(self.to_q, self.to_k, self.to_v):
            return super().forward(x, context)
        if context is None:  # self-attention: one product for q, k and v
            weight, _ = fused_weight(self, ("to_q", "to_k", "to_v"))
            q, k, v = F.linear(x, weight).chunk(3, dim=-1)  # (B, HW, D) each, views of (B, HW, 3D)
        else:
            q = self.to_q(x)  # (B, HW, D)
            k, v = self.context_kv(context)  # (B, T, D) each
        return self.to_out(attention(q, k, v, self.heads))  # (B, HW, D)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of the text context, computed when the context or the weights change and reused otherwise.

        The cache is keyed by the context tensor itself and the version counters of it and the weight (an
        in-place change of either bumps them); it holds the last CACHED_CONTEXTS contexts. A CUDA graph keeps the
        buffer it read and refreshes it itself (sd15.cuda_graphs), so a recomputation here always makes a new tensor.
        """
        weight, _ = fused_weight(self, ("to_k", "to_v"))
        key = (weight.data_ptr(), weight._version, context._version)
        cache = self.__dict__.setdefault("_context_kv", [])  # [(context, key, kv (B, T, 2D))], newest first
        hit = next((entry for entry in cache if entry[0] is context), None)
        if hit is None or hit[1] != key:
            hit = (context, key, F.linear(context, weight))
            cache[:] = [hit] + [entry for entry in cache if entry[0] is not context][: CACHED_CONTEXTS - 1]
        return hit[2].chunk(2, dim=-1)


class FastGEGLU(unet.GEGLU):
    """unet.GEGLU with the gate computed in one pass over proj(x) (a Triton kernel on CUDA)."""

    ops: Ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.geglu(self.proj(x))  # (B, T, F)


class FastBasicTransformerBlock(unet.BasicTransformerBlock):
    """unet.BasicTransformerBlock with each residual add fused into the LayerNorm that follows it.

    Each `x = x + sublayer(…)` and the LayerNorm of the new x that the next sublayer takes are one pass:
    x, h = x + attn1(norm1(x)), norm2(that sum);  x, h = x + attn2(h, context), norm3(that sum);  x + ff(h).
    """

    ops: Ops = TORCH_OPS

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if _hooked(self.norm2, self.norm3):  # someone watches a norm this path skips
            return super().forward(x, context)
        x, h = self.ops.add_layer_norm(x, self.attn1(self.norm1(x)), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        x, h = self.ops.add_layer_norm(x, self.attn2(h, context), self.norm3.weight, self.norm3.bias, self.norm3.eps)
        return x + self.ff(h)


class FastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm through the fast path's group_norm (for norms not followed by a SiLU)."""

    ops: Ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.group_norm(x, self.weight, self.bias, self.num_groups, self.eps)


def _norm_silu(ops: Ops, norm: nn.GroupNorm, x: torch.Tensor, channel_bias: torch.Tensor | None = None):
    """SiLU(GroupNorm(x + channel_bias)) in one pass."""
    return ops.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=True, channel_bias=channel_bias)


class FastResBlock(unet.ResBlock):
    """unet.ResBlock with GroupNorm, SiLU and the timestep-embedding add fused (dropout is off at inference).

    h = conv(SiLU(GN(x))); h = conv(SiLU(GN(h + Linear(SiLU(emb))))); out = skip(x) + h.
    """

    ops: Ops = TORCH_OPS

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if _hooked(*self.in_layers[:2], *self.out_layers[:3]):  # someone watches a norm or SiLU this path skips
            return super().forward(x, emb)
        norm_in, _, conv_in = self.in_layers
        norm_out, _, _, conv_out = self.out_layers
        h = conv_in(_norm_silu(self.ops, norm_in, x))  # (B, C_out, H, W)
        h = conv_out(_norm_silu(self.ops, norm_out, h, channel_bias=self.emb_layers(emb)))  # emb: (B, C_out)
        return self.skip_connection(x) + h


class FastResnetBlock(vae.ResnetBlock):
    """vae.ResnetBlock with each GroupNorm and its SiLU fused."""

    ops: Ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _hooked(self.norm1, self.norm2):
            return super().forward(x)
        h = self.conv1(_norm_silu(self.ops, self.norm1, x))
        h = self.conv2(_norm_silu(self.ops, self.norm2, h))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class FastCLIPAttention(clip.CLIPAttention):
    """clip.CLIPAttention with q, k, v (and their biases) from one matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wants_probs = self.probs_hook is not None and self.probs_hook.wanted()
        if wants_probs or _hooked(self.q_proj, self.k_proj, self.v_proj):
            return super().forward(x)
        weight, bias = fused_weight(self, ("q_proj", "k_proj", "v_proj"), with_bias=True)
        q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)  # (B, T, D) each
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


FAST_CLASSES: dict[type, type] = {
    unet.CrossAttention: FastCrossAttention,
    unet.GEGLU: FastGEGLU,
    unet.BasicTransformerBlock: FastBasicTransformerBlock,
    unet.ResBlock: FastResBlock,
    nn.GroupNorm: FastGroupNorm,
    vae.ResnetBlock: FastResnetBlock,
    clip.CLIPAttention: FastCLIPAttention,
}
REFERENCE_CLASSES = {fast: reference for reference, fast in FAST_CLASSES.items()}


# --------------------------------------------------------------------------- switching


@dataclass
class FastPath:
    """What `enable` turned on for a model (kept as `m.fast`)."""

    ops: str  # "triton", "torch", or "inductor" (torch.compile)
    channels_last: bool
    cuda_graphs: bool
    compiled: bool = False  # the UNet's forward under torch.compile


def _models(m: "StableDiffusion") -> list[nn.Module]:
    return [m.unet, m.vae, m.text_encoder]


def enable(m: "StableDiffusion", kernels: bool | None = None, channels_last: bool | None = None,
           cuda_graphs: bool | None = None, compile: bool = False) -> FastPath:  # fmt: skip
    """Switch `m` to the fast path. Each option defaults to what pays on the model's device: on CUDA, Triton
    kernels (if installed), channels-last and CUDA graphs; on the CPU, the fused modules only.

    `compile=True` hands the reference UNet to `torch.compile(fullgraph=True)` instead (mode
    "reduce-overhead" on CUDA, which brings its own CUDA graphs): inductor generates its own fused kernels
    from the plain modules, so no module is swapped and sd15's graphs are off. It costs a minute or more of
    compilation per input shape; it is here to compare with, the default path needs none.
    """
    disable(m)
    on_cuda = m.device.type == "cuda"
    if compile and kernels:
        raise RuntimeError("torch.compile makes its own kernels from the reference modules; leave kernels unset")
    ops = Ops("inductor", None, None, None) if compile else choose_ops(m.device, kernels)
    channels_last = on_cuda if channels_last is None else channels_last
    cuda_graphs = on_cuda and not compile if cuda_graphs is None else cuda_graphs
    if cuda_graphs and not on_cuda:
        raise RuntimeError("CUDA graphs need the model on a CUDA device")
    if cuda_graphs and compile:
        raise RuntimeError("choose sd15's CUDA graphs or torch.compile (which captures its own graphs), not both")
    for model in _models(m):
        if channels_last:
            model.to(memory_format=torch.channels_last)
        for module in model.modules() if not compile else ():
            fast = FAST_CLASSES.get(type(module))
            if fast is not None:
                module.__class__ = fast
        for name, module in model.named_modules():  # fuse now, not during a first call or a graph capture
            if isinstance(module, FastCrossAttention):
                fused_weight(module, ("to_k", "to_v") if name.endswith("attn2") else ("to_q", "to_k", "to_v"))
            elif isinstance(module, FastCLIPAttention):
                fused_weight(module, ("q_proj", "k_proj", "v_proj"), with_bias=True)
    use_ops(m, ops)
    if cuda_graphs:
        from . import cuda_graphs as graphs

        graphs.install(m)
    if compile:
        mode = "reduce-overhead" if on_cuda else None
        m.unet.forward = torch.compile(type(m.unet).forward.__get__(m.unet), mode=mode, dynamic=False, fullgraph=True)
    m.fast = FastPath(ops.name, channels_last, cuda_graphs, compile)
    return m.fast


def use_ops(m: "StableDiffusion", ops: Ops) -> None:
    """Point every fused module of `m` at `ops` (Triton's, PyTorch's, or a script's instrumented ones)."""
    for model in _models(m):
        for module in model.modules():
            if isinstance(getattr(type(module), "ops", None), Ops):
                module.ops = ops


def disable(m: "StableDiffusion") -> None:
    """Back to the reference path: the reference classes, contiguous tensors, separate weights, no graphs."""
    from . import cuda_graphs as graphs

    graphs.uninstall(m)
    m.unet.__dict__.pop("forward", None)  # a torch.compile'd forward
    for model in _models(m):
        for module in model.modules():
            reference = REFERENCE_CLASSES.get(type(module))
            if reference is not None:
                unfuse(module)
                module.__class__ = reference
                module.__dict__.pop("ops", None)
        if getattr(m, "fast", None) is not None and m.fast.channels_last:
            model.to(memory_format=torch.contiguous_format)
    m.fast = None


class suspended:
    """`with fast.suspended(m):` runs the block on the reference path and restores the fast path after."""

    def __init__(self, m: "StableDiffusion"):
        self.m, self.state = m, getattr(m, "fast", None)

    def __enter__(self):
        if self.state is not None:
            disable(self.m)

    def __exit__(self, *exc):
        if self.state is not None:
            enable(self.m, kernels=self.state.ops == "triton", channels_last=self.state.channels_last,
                   cuda_graphs=self.state.cuda_graphs, compile=self.state.compiled)  # fmt: skip


def wanted(device: torch.device, dtype: torch.dtype, requested: bool | None) -> bool:
    """The automatic choice: the fast path on CUDA in fp16/bf16, the reference path otherwise."""
    if requested is not None:
        return requested
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
