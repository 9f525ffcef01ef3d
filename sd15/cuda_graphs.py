"""CUDA graphs: capture a model's forward once per input shape, then replay it with one launch.

Eagerly, a UNet call launches about 700 kernels, and at batch 2 the CPU needs longer to launch them than
the GPU needs to run them. A CUDA graph (`torch.cuda.CUDAGraph`) records the launches of one call into
static input and output buffers; `replay()` then runs them all from one host call. The price is static
shapes and addresses, so the runner here keeps:

- one graph per input signature (shapes, dtypes, the non-tensor options such as `clip_skip`), captured the
  first time that signature is seen, after two warm-up calls on a side stream (cuDNN and Triton choose and
  compile their kernels there, outside the capture);
- static input buffers the caller's tensors (also each tensor of a list, as a ControlNet's residuals) are
  copied into, and an output buffer copied out of (a clone, since the next replay overwrites it);
- for the UNet, the cross-attention k/v buffers of the text context (sd15.fast computes them once per
  context): when a new context arrives it is copied in and those buffers are recomputed eagerly, once per
  generation, not once per step;
- a stamp of the model's state (parameter addresses, hooks and what they compute with): when it changes,
  e.g. after `.to()` or a LoRA applied on the fly, every graph is dropped and captured again, since a graph
  would otherwise read the old weights or skip the new hook. Taking the stamp walks every module, so it is
  taken for a new context (once per generation), and after `state_changed()`, which sd15.lora calls when
  it puts a LoRA on a layer or takes one off: then the k/v buffers are recomputed too, since a merged
  LoRA changes the k/v weights in place;
- eager calls while a submodule has a hook that may only watch (any hook but an on-the-fly LoRA's): a
  replay runs no Python, so such a hook would see the capture and then nothing.

The sampler loop does not synchronise with the GPU between steps: timesteps and sigmas live on the host,
the NaN check runs once at the end, and step noise (ancestral samplers) is one asynchronous copy from pinned
host memory.
Calls that autograd must record (an input or a parameter requires grad), calls made during a capture and
CPU tensors go to the eager forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast import CACHED_CONTEXTS

if TYPE_CHECKING:
    from .model import StableDiffusion

WARMUP_CALLS = 2


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]  # static buffers, in the order of the call's tensor arguments
    output: torch.Tensor
    static_context: torch.Tensor | None = None  # UNet: the context buffer, and the k/v buffers computed from it
    kv_buffers: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)
    context_seen: tuple = (None, -1, -1)  # (context tensor, its _version, _changes) the k/v buffers were computed at


OBSERVER = "observer"  # the state of a hook that gives none: Python a graph replay would not run
_changes = 0  # how many times state_changed() was called


def state_changed() -> None:
    """Tell every graph runner that weights or hooks changed in place (sd15.lora calls it for each layer it
    adapts or restores): at its next call it takes the stamp again and recomputes its k/v buffers, even for
    the same context tensor. Without it that happens only when a new context arrives."""
    global _changes
    _changes += 1


def _hook_state(hook) -> object:
    """A hook that is a method of an object with `graph_state()` (an on-the-fly LoRA) computes on the GPU
    from that state, which a graph captures; any other hook may be Python that watches (appends outputs to
    a list, prints), which a replay would silently skip."""
    graph_state = getattr(getattr(hook, "__self__", None), "graph_state", None)
    return graph_state() if callable(graph_state) else OBSERVER


def _state_stamp(module: nn.Module) -> tuple:
    """What a captured graph depends on besides its inputs: where the weights live, which hooks run, with
    what, and how the convolutions pad. (The module's own hooks run around the graph, not in it, so they are left out.)"""
    pointers = tuple(p.data_ptr() for p in module.parameters())
    paddings = tuple(m.padding_mode for m in module.modules() if isinstance(m, nn.Conv2d))  # sd15.seamless's
    hooks = tuple(
        (
            tuple(_hook_state(h) for h in m._forward_hooks.values()),
            tuple(_hook_state(h) for h in m._forward_pre_hooks.values()),
            OBSERVER if getattr(m, "probs_hook", None) is not None else None,
        )
        for m in module.modules()
        if m is not module
    )
    return pointers, hooks, paddings


def _observed(stamp: tuple) -> bool:
    return any(OBSERVER in forward + pre + (probs,) for forward, pre, probs in stamp[1])


class GraphedForward:
    """Stands in for `module.forward`: replays a captured graph per input signature.

    Every call's arguments are taken by name (`unet(x, t, ctx)` and `unet(x, t=t, context=ctx)` are one
    signature and share a graph). `context`: the name of the argument holding the text context (the
    UNet's), whose cross-attention k/v the graph reads from buffers refreshed when the context changes;
    None for modules without cross-attention (the text encoder). `eager_when(named)` picks calls to run
    eagerly.
    """

    def __init__(self, module: nn.Module, pool, context: str | None = None, eager_when=None):
        self.module, self.pool, self.context_name = module, pool, context
        self.parameter_names = list(inspect.signature(type(module).forward).parameters)[1:]  # after self
        self.eager_when = eager_when  # (named arguments) -> True for calls a graph cannot hold
        self.graphs: dict[tuple, _Graph] = {}
        self.stamp = None
        self.observed = False  # a submodule has a hook a replay would skip (see _hook_state)
        self.recent_contexts: tuple = ()  # the caller's last context tensors (both guidance branches' when apart)
        self.changes_seen = _changes  # state_changed() calls when the stamp was last taken
        self.captures = 0  # how many graphs were captured (for tests and the benchmark)

    def eager(self, **named):
        return type(self.module).forward(self.module, **named)

    def __call__(self, *args, **options):
        named = {**dict(zip(self.parameter_names, args)), **options}
        names = sorted(named)  # the order of the static input buffers, and of the signature
        tensors = [t for k in names for t in _tensors_in(named[k])]
        if (
            not tensors
            or not _all_on_cuda(tensors)
            or torch.cuda.is_current_stream_capturing()
            or (self.eager_when is not None and self.eager_when(named))
        ):
            return self.eager(**named)
        context = named.get(self.context_name) if self.context_name else None
        if context is None or all(context is not c for c in self.recent_contexts) or self.changes_seen != _changes:
            stamp = _state_stamp(self.module)  # once per new context (per generation, not per step) or change
            if stamp != self.stamp:
                self.graphs.clear()
                self.stamp, self.observed = stamp, _observed(stamp)
            self.recent_contexts = (context, *self.recent_contexts[: CACHED_CONTEXTS - 1])
            self.changes_seen = _changes
        if self.observed:  # a hook that watches must see every call: no graph
            return self.eager(**named)
        if torch.is_grad_enabled() and _autograd_wants(tensors, self.module):
            return self.eager(**named)  # autograd needs the eager ops (a graph records no backward)
        key = tuple((k, _signature(named[k])) for k in names)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(named, names)
        for static, value in zip(entry.inputs, tensors):
            static.copy_(value)
        seen, version, changes = entry.context_seen
        if context is not None and (seen is not context or version != context._version or changes != _changes):
            self._refresh_context(entry)
            entry.context_seen = (context, context._version, _changes)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, named: dict, names: list[str]) -> _Graph:
        statics = []  # clones of the call's tensors, in the order of `names`

        def static(value):
            if isinstance(value, torch.Tensor):
                statics.append(value.clone())
                return statics[-1]
            if _tensors_in(value):  # a list of tensors (a ControlNet's residuals): a buffer for each
                return [static(v) for v in value]
            return value

        static_named = {k: static(named[k]) for k in names}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.eager(**static_named)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.eager(**static_named)
        self.captures += 1
        entry = _Graph(graph, statics, output)
        if self.context_name is not None:
            entry.static_context = static_context = static_named[self.context_name]
            for module in self.module.modules():
                cached = next((kv for ctx, _, kv in module.__dict__.get("_context_kv", ()) if ctx is static_context), None)
                if cached is not None:
                    entry.kv_buffers.append((module, cached))  # held here, so it outlives the module's cache
            context = named[self.context_name]
            entry.context_seen = (context, context._version, _changes)
        return entry

    def _refresh_context(self, entry: _Graph) -> None:
        """Recompute the cross-attention k/v of the (newly copied) static context into the graph's buffers."""
        from .fast import fused_weight

        for module, buffer in entry.kv_buffers:
            weight, _ = fused_weight(module, ("to_k", "to_v"))
            buffer.copy_(F.linear(entry.static_context, weight))  # (B, T, 2D)


def _autograd_wants(tensors: list[torch.Tensor], module: nn.Module) -> bool:
    """Whether autograd would record this call: some input or weight requires grad (checked on every call
    in grad mode, since `requires_grad_` changes no address a stamp would see)."""
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def _all_on_cuda(tensors: list[torch.Tensor]) -> bool:
    return all(t.is_cuda for t in tensors)


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors an argument holds: itself, or each item of a list or tuple of tensors (a ControlNet's
    `down_residuals`), which then get static buffers of their own."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return []


def _signature(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.stride())
    if _tensors_in(value):
        return ("tensors", tuple(_signature(v) for v in value))
    return ("value", value)


def install(m: "StableDiffusion") -> None:
    """Route `m.unet` and `m.text_encoder` calls through CUDA graphs (one memory pool shared by both)."""
    pool = torch.cuda.graph_pool_handle()
    # a timestep given as a Python number would be a constant of the graph, made a tensor by a host copy that
    # capture forbids: such calls (not the samplers', which pass tensors) run eagerly
    m.unet.forward = GraphedForward(m.unet, pool, context="context", eager_when=lambda named: not isinstance(named.get("t"), torch.Tensor))
    # textual-inversion tokens are placed by boolean indexing, whose output size the host must read: eager
    m.text_encoder.forward = GraphedForward(m.text_encoder, pool, eager_when=lambda named: named.get("extra_tokens") is not None)


def uninstall(m: "StableDiffusion") -> None:
    """Drop the graphs (and their memory) and go back to the modules' own forward."""
    for module in (m.unet, m.text_encoder):
        if isinstance(module.__dict__.get("forward"), GraphedForward):
            del module.forward
