"""LyCORIS's LoHa and LoKr adapters, as kohya-named LoRA files hold them (KohakuBlueleaf's LyCORIS, read by the
AUTOMATIC1111 web UI's built-in Lora extension).

Both change a layer's weight by a ΔW that is not low-rank but is stored in few numbers:

    LoHa (Hadamard product, Hyeon-Woo et al. 2022, "FedPara"):
        ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / r            w1_a (out, r), w1_b (r, in·kh·kw), r = w1_b rows
    LoKr (Kronecker product, Yeh et al. 2023, "Navigating Text-To-Image Customization"):
        ΔW = w1 ⊗ w2 · alpha / r                                  w1 (out1, in1), w2 (out2, in2[, kh, kw])
        each factor stored whole (`lokr_w1`) or as a product (`lokr_w1_a` · `lokr_w1_b`); r is the rank of the
        factored one (w2's if both are), and with neither factored the scale is 1 (alpha is then not used)

where ⊙ multiplies element by element and ⊗ is the Kronecker product (out = out1·out2, in = in1·in2). A
convolution's factors may be Tucker-decomposed (`hada_t1`, `hada_t2`, `lokr_t2`: a core (r, r, kh, kw) between
w_a (r, out) and w_b (r, in)): W[p, q, k, l] = Σ_ij t[i, j, k, l] · w_a[i, p] · w_b[j, q].

LyCORIS's LoCon may Tucker-decompose a plain LoRA's convolution the same way (`lora_mid`, `TuckerLoRALayer`).

Each layer class has LoRALayer's interface (sd15.lora): `delta(shape, device)` (scaled by alpha / r),
`problem(weight_shape)` (why it does not fit a layer, or None) and `multiplier`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _product(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None, device) -> torch.Tensor:
    """a · b as a (out, in·kh·kw) matrix, or, with a Tucker core, the (out, in, kh, kw) kernel it builds."""
    a, b = a.to(device, torch.float32), b.to(device, torch.float32)
    if core is None:
        return a.flatten(1) @ b.flatten(1)
    return torch.einsum("ijkl,ip,jq->pqkl", core.to(device, torch.float32), a.flatten(1), b.flatten(1))


def _shape_of(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None) -> tuple[int, ...]:
    """The shape `_product` gives, without computing it."""
    if core is None:
        return (a.shape[0], b.flatten(1).shape[1])
    return (a.shape[1], b.flatten(1).shape[1], *core.shape[2:])


def _flat(shape) -> tuple[int, int]:
    """A weight shape as the matrix it is: (out, in·kh·kw)."""
    out, rest = shape[0], 1
    for side in shape[1:]:
        rest *= side
    return out, rest


class AlphaOverRank:
    """The scale of an adapter's ΔW, alpha / rank (the `alpha` and `rank` of the class it is mixed into); 1 when
    the file has no alpha (or alpha 0, which kohya's trainer reads as the rank) or the layer no rank."""

    @property
    def multiplier(self) -> float:
        return self.alpha / self.rank if self.alpha and self.rank else 1.0


@dataclass
class HadamardLayer(AlphaOverRank):
    """A LoHa layer: ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / r (Tucker cores t1, t2 optional)."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def problem(self, weight_shape) -> str | None:
        first, second = _shape_of(self.w1_a, self.w1_b, self.t1), _shape_of(self.w2_a, self.w2_b, self.t2)
        if _flat(first) == _flat(second) == _flat(weight_shape) and (self.t1 is None or tuple(first) == tuple(weight_shape)):
            return None
        return f"LoHa factors of {list(first)} and {list(second)} do not fit a layer of weight {list(weight_shape)}"

    def delta(self, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        first = _product(self.w1_a, self.w1_b, self.t1, device).reshape(shape)
        second = _product(self.w2_a, self.w2_b, self.t2, device).reshape(shape)
        return first * second * self.multiplier


@dataclass
class KroneckerLayer(AlphaOverRank):
    """A LoKr layer: ΔW = w1 ⊗ w2 · alpha / r, each factor whole (`w1`) or a product (`w1_a` · `w1_b`)."""

    w1: torch.Tensor | None
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    alpha: float | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        """The rank of the factored factor (w2's if both are), None if neither is."""
        factored = self.w2_b if self.w2_b is not None else self.w1_b
        return None if factored is None else factored.shape[0]

    def _factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.to(device, torch.float32) if self.w1 is not None else _product(self.w1_a, self.w1_b, None, device)
        w2 = self.w2.to(device, torch.float32) if self.w2 is not None else _product(self.w2_a, self.w2_b, self.t2, device)
        return w1, w2

    def _factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        first = tuple(self.w1.shape) if self.w1 is not None else _shape_of(self.w1_a, self.w1_b, None)
        second = tuple(self.w2.shape) if self.w2 is not None else _shape_of(self.w2_a, self.w2_b, self.t2)
        return first, second

    def problem(self, weight_shape) -> str | None:
        first, second = self._factor_shapes()
        out, flat_in = _flat(weight_shape)
        fits = len(first) == 2 and first[0] * second[0] == out and first[1] * _flat(second)[1] == flat_in
        if len(second) == 4:  # a kernel factor: its kernel is the layer's
            fits = fits and tuple(second[2:]) == tuple(weight_shape[2:])
        return None if fits else f"LoKr factors of {list(first)} and {list(second)} do not fit a layer of weight {list(weight_shape)}"

    def delta(self, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        w1, w2 = self._factors(device)
        if w2.dim() == 4:  # (out1, in1) ⊗ (out2, in2, kh, kw): the kernel is w2's
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(shape) * self.multiplier


@dataclass
class TuckerLoRALayer(AlphaOverRank):
    """A LoCon layer with a Tucker core (`lora_mid`): down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1),
    ΔW[p, q, k, l] = Σ_ij mid[i, j, k, l] · up[p, i] · down[j, q] · alpha / r: a 1×1 convolution down to r
    channels, the r×r kernel, a 1×1 convolution up."""

    down: torch.Tensor
    mid: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def problem(self, weight_shape) -> str | None:
        shape = (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        square = self.mid.shape[:2] == (self.up.shape[1], self.down.shape[0])
        if square and tuple(shape) == tuple(weight_shape):
            return None
        return (f"down {list(self.down.shape)}, mid {list(self.mid.shape)}, up {list(self.up.shape)} do not fit a layer "
                f"of weight {list(weight_shape)}")  # fmt: skip

    def delta(self, shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        up, down = self.up.to(device, torch.float32).flatten(1), self.down.to(device, torch.float32).flatten(1)
        kernel = torch.einsum("ijkl,pi,jq->pqkl", self.mid.to(device, torch.float32), up, down)
        return kernel.reshape(shape) * self.multiplier


HADA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lycoris_layer(tensors: dict[str, torch.Tensor], alpha: float | None) -> HadamardLayer | KroneckerLayer | None:
    """The LoHa or LoKr layer of one entry's tensors ({part: tensor}, parts as in the file: `hada_w1_a`, …), or
    None when they are not a complete one."""
    if all(p in tensors for p in HADA_PARTS[:4]):
        return HadamardLayer(*(tensors[p] for p in HADA_PARTS[:4]), alpha, tensors.get("hada_t1"), tensors.get("hada_t2"))
    has_1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
    has_2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
    if has_1 and has_2:
        return KroneckerLayer(*(tensors.get(p) for p in LOKR_PARTS[:6]), alpha, tensors.get("lokr_t2"))
    return None
