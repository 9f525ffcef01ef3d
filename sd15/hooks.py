"""Looking inside a run: capture or edit named values while sd15 generates.

    with sd15.trace(m, capture=["unet.*.attn2.probs", "step.denoised"], reduce={"*.probs": "cond+mean_heads"}) as tr:
        image = m.generate("a cat on a red sofa", seed=1)[0]
    maps = tr["unet.output_blocks.5.1.transformer_blocks.0.attn2.probs"]   # one (1, HW, 77) tensor per UNet call
    x0 = tr["step.denoised"]                                                  # the predicted clean latent per step

Names follow the checkpoint's own, prefixed by the model (`unet.`, `vae.`, `text_encoder.`):
- any module's output: `unet.input_blocks.1.0` (a ResBlock), `unet.middle_block.1` (a SpatialTransformer),
  `text_encoder.encoder.layers.11` (a CLIP layer), … — `points(m)` lists the usual ones;
- attention probabilities, per head: `<attention module>.probs`, shape (B, h, Tq, Tk), for the UNet's
  `attn1` (self) and `attn2` (cross) layers and CLIP's `self_attn`;
- per sampler call: `step.eps_uncond`, `step.eps_cond` (the two classifier-free-guidance branches),
  `step.eps` (the guided prediction), and per step `step.denoised` (the predicted clean latent x0) and
  `step.x` (the latent after the step).

Patterns are shell-style globs (`fnmatch`; `*` also crosses dots); attention probabilities are matched only by
patterns that end in `probs`, so `unet.*` captures module outputs alone. `patch={name_or_pattern: fn}` replaces a module output or an
attention probability tensor during the run: `fn(value, info) -> new value` (None keeps it), with `info` =
{"name", "step", "call", "image", "branch"}. Only attention layers that are captured or patched compute their
probabilities explicitly; every other layer keeps the fused kernel, and with no trace installed nothing
changes at all.

Reductions keep memory bounded (self-attention probabilities at 512×512 are 8 × 4096 × 4096 floats per
layer per call): `reduce={pattern: "cond+mean_heads"}` keeps the conditional half of the guided batch and
averages over heads. When the prompt and the negative prompt differ in length (in 77-token chunks) the UNet is
called once per branch (sd15.pipeline.guided_eps_model): "cond" then records only the conditional call, and
`info["branch"]` ("both", "cond", "uncond"; None unguided) tells a patch which call it is in; a callable `reduce={pattern: fn}` works too; `steps=range(0, 50, 10)` keeps some steps.
Captured values are detached and moved to `device` ("cpu" by default).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from . import fast
from .clip import CLIPAttention, CLIPEncoderLayer
from .unet import CrossAttention, ResBlock, SpatialTransformer

if TYPE_CHECKING:
    from .model import StableDiffusion

STEP_POINTS = ("step.eps_uncond", "step.eps_cond", "step.eps", "step.denoised", "step.x")
MODELS = ("unet", "vae", "text_encoder")


def _branch(value: torch.Tensor, trace: "Trace", wanted: str) -> torch.Tensor | None:
    """The `wanted` classifier-free-guidance branch ("cond" or "uncond") of a UNet call's value: its half of an
    [uncond; cond] batch, the whole value of a call on that branch alone, None (nothing recorded) for a call on
    the other branch; any other value (the text encoder's, the `step.*` ones: one row per image) is kept whole."""
    if trace.branch == "both":
        return value.chunk(2)[wanted == "cond"]
    return None if trace.branch not in (None, wanted) else value


REDUCTIONS: dict[str, Callable[[torch.Tensor, "Trace"], torch.Tensor | None]] = {
    "cond": lambda v, trace: _branch(v, trace, "cond"),
    "uncond": lambda v, trace: _branch(v, trace, "uncond"),
    "mean_heads": lambda v, trace: v.mean(dim=1),  # (B, h, Tq, Tk) -> (B, Tq, Tk)
    "half": lambda v, trace: v.half(),
}


def _steps(how) -> list:
    """A `reduce` value as its steps: "cond+mean_heads" -> ["cond", "mean_heads"]; a callable, or a list of
    names and callables, as it is."""
    if isinstance(how, str):
        return how.split("+")
    if isinstance(how, (list, tuple)) and how:
        return list(how)
    return [how]


def points(m: "StableDiffusion") -> list[str]:
    """The usual named points of a model: ResBlocks, SpatialTransformers, attention probabilities, CLIP layers."""
    names = []
    for model_name in ("unet", "text_encoder"):
        for name, module in getattr(m, model_name).named_modules():
            if isinstance(module, (ResBlock, SpatialTransformer, CLIPEncoderLayer)):
                names.append(f"{model_name}.{name}")
            if isinstance(module, (CrossAttention, CLIPAttention)):
                names.append(f"{model_name}.{name}.probs")
    return names + list(STEP_POINTS)


@dataclass
class Record:
    value: Any
    step: int  # sampler callbacks so far in this image's run (PLMS reports each of its steps + 1 evaluations)
    call: int  # how many times this name had been recorded before in the trace
    image: int  # index of the first image of the batch being denoised


class _ProbsHook:
    """Installed on an attention module as `probs_hook`; asked `wanted()` before the fused path is skipped."""

    def __init__(self, trace: "Trace", name: str):
        self.trace, self.name = trace, name

    def wanted(self) -> bool:
        return self.trace.wants(self.name)

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        return self.trace.visit(self.name, probs)


class Trace:
    """What `trace()` returns: the captured records, by name; see the module docstring."""

    def __init__(
        self,
        m: "StableDiffusion",
        capture: Iterable[str] = (),
        patch: dict[str, Callable] | None = None,
        reduce: dict[str, str | Callable] | None = None,
        steps: Iterable[int] | Callable[[int], bool] | None = None,
        device: str | torch.device | None = "cpu",
    ):
        self.m = m
        self.capture = [capture] if isinstance(capture, str) else list(capture)
        self.patch = dict(patch or {})
        self.reduce = dict(reduce or {})
        for pattern, how in self.reduce.items():  # refused now, not at the first capture of a long run
            unknown = [step for step in _steps(how) if not callable(step) and step not in REDUCTIONS]
            if unknown:
                raise ValueError(f"reduce[{pattern!r}]: {', '.join(map(repr, unknown))} is not a reduction; use a "
                                 f"function, names from {sorted(REDUCTIONS)} joined by '+', or a list of both")  # fmt: skip
        self.steps = steps if steps is None or callable(steps) else set(steps)
        self.device = device
        self.records: dict[str, list[Record]] = defaultdict(list)
        self.step = 0  # steps completed in the current image run
        self.image = 0
        # the guidance branches of the UNet call under way: "both" ([uncond; cond]), "cond" or "uncond" (the two
        # called one after the other when their texts differ in length); None for an unguided run or no call
        self.branch: str | None = None
        self._handles: list = []
        self._attention_modules: list[nn.Module] = []

    # -- what to do at a point

    def _matches(self, name: str, patterns: Iterable[str]) -> bool:
        # Attention probabilities are matched only by patterns that name them, so that `unet.*` captures
        # module outputs without sending every attention layer off the fused path.
        probs = name.endswith(".probs")
        return any(fnmatch.fnmatchcase(name, p) and (not probs or p.endswith("probs")) for p in patterns)

    def _step_kept(self) -> bool:
        if self.steps is None:
            return True
        return self.steps(self.step) if callable(self.steps) else self.step in self.steps

    def wants(self, name: str) -> bool:
        return (self._matches(name, self.capture) and self._step_kept()) or self._matches(name, self.patch)

    def visit(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Patch then capture `value` at point `name`; returns the (possibly replaced) value."""
        for pattern, fn in self.patch.items():
            if self._matches(name, [pattern]):
                info = {"name": name, "step": self.step, "call": len(self.records.get(name, ())), "image": self.image,
                        "branch": self.branch}  # fmt: skip
                replaced = fn(value, info)
                value = value if replaced is None else replaced
        if self._matches(name, self.capture) and self._step_kept():
            self._record(name, value)
        elif self._matches(name, self.patch):
            self.records[name].append(Record(None, self.step, len(self.records[name]), self.image))  # count calls
        return value

    def _record(self, name: str, value: torch.Tensor) -> None:
        kept = value.detach()
        for pattern, how in self.reduce.items():
            if fnmatch.fnmatchcase(name, pattern):
                for step in _steps(how):
                    kept = REDUCTIONS[step](kept, self) if isinstance(step, str) else step(kept)
                    if kept is None:  # the branch this reduction keeps is not in this call: the call is counted
                        self.records[name].append(Record(None, self.step, len(self.records[name]), self.image))
                        return
        if self.device is not None:
            kept = kept.to(self.device)
        if kept.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
            kept = kept.clone()  # the run may change the tensor in place (inpainting blends x) or reuse its memory
        self.records[name].append(Record(kept, self.step, len(self.records[name]), self.image))

    # -- reading results

    def __getitem__(self, name: str) -> list:
        """The captured values of `name`, in the order they were produced."""
        return [r.value for r in self.records[name] if r.value is not None]

    def names(self) -> list[str]:
        return [n for n, rs in self.records.items() if any(r.value is not None for r in rs)]

    def get(self, name: str, call: int):
        """The value recorded at the `call`-th visit of `name` (as `info["call"]` numbers them)."""
        return self.records[name][call].value

    # -- called by the pipeline

    def begin_images(self, first_image: int) -> None:
        self.step, self.image = 0, first_image

    def end_step(self, info: dict) -> None:
        for name in ("step.denoised", "step.x"):
            if self.wants(name):
                self.visit(name, info["denoised" if name == "step.denoised" else "x"])
        self.step += 1

    # -- installing and removing

    def __enter__(self) -> "Trace":
        if getattr(self.m, "_trace", None) is not None:
            raise RuntimeError("a trace is already installed on this model; nest runs, not traces")
        patterns = self.capture + list(self.patch)
        self._refuse_unmatched(patterns)
        # the fast path's fused modules skip the submodules a trace hooks: record on the reference path
        self._reference_path = fast.suspended(self.m)
        self._reference_path.__enter__()
        for model_name in MODELS:
            model = getattr(self.m, model_name)
            for name, module in model.named_modules():
                full = f"{model_name}.{name}"
                if isinstance(module, (CrossAttention, CLIPAttention)) and self._matches(full + ".probs", patterns):
                    module.probs_hook = _ProbsHook(self, full + ".probs")
                    self._attention_modules.append(module)
                if name and self._matches(full, patterns):
                    self._handles.append(module.register_forward_hook(self._forward_hook(full)))
        self.m._trace = self
        return self

    def _refuse_unmatched(self, patterns: list[str]) -> None:
        """A pattern that names no point of this model (a typo such as `unet.*.atn2.probs`) would capture nothing,
        silently: refuse it, before the fast path is suspended or anything is installed."""
        names = list(STEP_POINTS)
        for model_name in MODELS:
            for name, module in getattr(self.m, model_name).named_modules():
                names += [f"{model_name}.{name}"] if name else []
                if isinstance(module, (CrossAttention, CLIPAttention)):
                    names.append(f"{model_name}.{name}.probs")
        unmatched = [p for p in patterns if not any(self._matches(n, [p]) for n in names)]
        if unmatched:
            raise ValueError(f"{', '.join(map(repr, unmatched))} names no point of this model; "
                             "sd15.hooks.points(m) lists the usual ones")  # fmt: skip

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            return self.visit(name, output) if self.wants(name) else None

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._attention_modules:
            module.probs_hook = None
        self._handles, self._attention_modules = [], []
        self.m._trace = None
        self._reference_path.__exit__(*exc)


def trace(m: "StableDiffusion", capture=(), patch=None, reduce=None, steps=None, device="cpu") -> Trace:
    """Capture (and optionally patch) named values during runs of `m` inside a `with` block."""
    return Trace(m, capture, patch, reduce, steps, device)
