"""LyCORIS LoHa, LoKr and Tucker LoCon layers (sd15.lycoris) on a tiny model.

Three kinds of check: each layer's merged weight change against its definition written out here with numpy
(float64; the model's float32 weights agree to 1e-6 relative); degenerate LoHa and LoKr files that are exactly a
plain LoRA (one Hadamard factor all ones, or a 1×1 Kronecker factor of 1) against that LoRA, whose path
tests/test_lora.py checks against diffusers (bit-equal weights); and on-the-fly against merged (1e-5 on [0, 1]
pixels: the same sums in another order).
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sd15
from sd15 import lora as L
from sd15.checkpoint import CheckpointError

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (32, 32)
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # (64, 32, 3, 3)
TEXT = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # CLIP's MLP


@pytest.fixture(scope="module")
def m(tiny_checkpoint):
    return sd15.load(tiny_checkpoint)


def module_of(m, name):
    return L.lora_targets(m.unet, m.text_encoder)[name][2]


def randn(g, *shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


def loha(m, seed=0, rank=4, tucker=False) -> dict[str, torch.Tensor]:
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name in (LINEAR, CONV, TEXT):
        out, *rest = module_of(m, name).weight.shape
        flat_in = int(np.prod(rest))
        if tucker and name == CONV:  # w_a (r, out), w_b (r, in), core (r, r, kh, kw)
            for i in ("1", "2"):
                tensors |= {f"{name}.hada_w{i}_a": randn(g, rank, out), f"{name}.hada_w{i}_b": randn(g, rank, rest[0]),
                            f"{name}.hada_t{i}": randn(g, rank, rank, *rest[1:])}  # fmt: skip
        else:
            for i in ("1", "2"):
                tensors |= {f"{name}.hada_w{i}_a": randn(g, out, rank), f"{name}.hada_w{i}_b": randn(g, rank, flat_in)}
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return tensors


def lokr(m, seed=0, rank=4) -> dict[str, torch.Tensor]:
    """w1 whole (out1, in1), w2 factored (out2, r)·(r, in2[·kh·kw]) or whole; the usual LyCORIS layout."""
    g, tensors = torch.Generator().manual_seed(seed), {}
    for name, factored in ((LINEAR, True), (CONV, True), (TEXT, False)):
        out, inp, *kernel = module_of(m, name).weight.shape
        tensors[f"{name}.lokr_w1"] = randn(g, 4, 8 if inp % 8 == 0 else 1)
        out2, in2 = out // 4, inp // tensors[f"{name}.lokr_w1"].shape[1]
        if factored:
            tensors |= {f"{name}.lokr_w2_a": randn(g, out2, rank), f"{name}.lokr_w2_b": randn(g, rank, in2 * int(np.prod(kernel or [1])))}
        else:
            tensors[f"{name}.lokr_w2"] = randn(g, out2, in2, *kernel)
        tensors[f"{name}.alpha"] = torch.tensor(3.0)
    return tensors


def write(tensors, path):
    save_file(tensors, str(path))
    return path


def expected_loha(t, name, shape):
    a = {k: t[f"{name}.{k}"].double().numpy() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    rank = a["hada_w1_b"].shape[0]
    if f"{name}.hada_t1" in t:  # W[p, q, k, l] = Σ_ij t[i, j, k, l] a[i, p] b[j, q]
        first, second = (np.einsum("ijkl,ip,jq->pqkl", t[f"{name}.hada_t{i}"].double().numpy(), a[f"hada_w{i}_a"], a[f"hada_w{i}_b"])
                         for i in ("1", "2"))  # fmt: skip
    else:
        first, second = a["hada_w1_a"] @ a["hada_w1_b"], a["hada_w2_a"] @ a["hada_w2_b"]
    return (first * second).reshape(shape) * 2.0 / rank


def expected_lokr(t, name, shape):
    w1 = t[f"{name}.lokr_w1"].double().numpy()
    if f"{name}.lokr_w2" in t:
        w2, scale = t[f"{name}.lokr_w2"].double().numpy(), 1.0  # neither factor factored: alpha unused
    else:
        w2a, w2b = t[f"{name}.lokr_w2_a"].double().numpy(), t[f"{name}.lokr_w2_b"].double().numpy()
        w2, scale = w2a @ w2b, 3.0 / w2b.shape[0]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2).reshape(shape) * scale


def locon_tucker(m, seed=0, rank=4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, inp, kh, kw = module_of(m, CONV).weight.shape
    return {f"{CONV}.lora_down.weight": randn(g, rank, inp, 1, 1), f"{CONV}.lora_mid.weight": randn(g, rank, rank, kh, kw),
            f"{CONV}.lora_up.weight": randn(g, out, rank, 1, 1), f"{CONV}.alpha": torch.tensor(2.0)}  # fmt: skip


def expected_locon_tucker(t, name, shape):
    down, mid, up = (t[f"{name}.lora_{k}.weight"].double().numpy() for k in ("down", "mid", "up"))
    return np.einsum("ijkl,pi,jq->pqkl", mid, up[:, :, 0, 0], down[:, :, 0, 0]).reshape(shape) * 2.0 / down.shape[0]


KINDS = {"loha": (loha, expected_loha), "loha_tucker": (lambda m: loha(m, tucker=True), expected_loha),
         "lokr": (lokr, expected_lokr), "locon_tucker": (locon_tucker, expected_locon_tucker)}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_merged_weights_are_the_definition(m, tmp_path, kind):
    make, expected = KINDS[kind]
    tensors = make(m)
    names = [name for name in (LINEAR, CONV, TEXT) if f"{name}.alpha" in tensors]
    before = {name: module_of(m, name).weight.detach().double().clone() for name in names}
    with m.load_lora(write(tensors, tmp_path / f"{kind}.safetensors"), scale=0.7):
        for name, w0 in before.items():
            w = module_of(m, name).weight.detach().double()
            definition = expected(tensors, name, tuple(w.shape))
            np.testing.assert_allclose((w - w0).numpy(), 0.7 * definition, rtol=1e-5, atol=1e-6)
            assert np.abs(definition).max() > 1e-2, name  # a real change, not zeros matching zeros
    for name, w0 in before.items():
        assert torch.equal(module_of(m, name).weight.detach().double(), w0)  # removed: bit for bit


def test_degenerate_loha_and_lokr_are_the_plain_lora(m, tmp_path):
    """(w1_a w1_b) ⊙ 1 is a LoRA with up w1_a, down w1_b; 1 ⊗ (w2_a w2_b) one with up w2_a, down w2_b."""
    g = torch.Generator().manual_seed(5)
    out, inp = module_of(m, LINEAR).weight.shape
    up, down = randn(g, out, 4), randn(g, 4, inp)
    plain = {f"{LINEAR}.lora_up.weight": up, f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.alpha": torch.tensor(2.0)}
    hada = {f"{LINEAR}.hada_w1_a": up, f"{LINEAR}.hada_w1_b": down, f"{LINEAR}.hada_w2_a": torch.ones(out, 1),
            f"{LINEAR}.hada_w2_b": torch.ones(1, inp), f"{LINEAR}.alpha": torch.tensor(2.0)}  # fmt: skip
    kron = {f"{LINEAR}.lokr_w1": torch.ones(1, 1), f"{LINEAR}.lokr_w2_a": up, f"{LINEAR}.lokr_w2_b": down,
            f"{LINEAR}.alpha": torch.tensor(2.0)}  # fmt: skip
    results = []
    for name, tensors in (("plain", plain), ("hada", hada), ("kron", kron)):
        with m.load_lora(write(tensors, tmp_path / f"{name}.safetensors")):
            results.append(module_of(m, LINEAR).weight.detach().clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0], m.unet.state_dict()[_path(m, LINEAR)])


def _path(m, name):
    component, path, _ = L.lora_targets(m.unet, m.text_encoder)[name]
    return f"{path}.weight"


@pytest.mark.parametrize("kind", ["loha", "lokr", "locon_tucker"])
def test_on_the_fly_equals_merged_also_seamless(m, tmp_path, kind):
    """On the fly, the whole ΔW is applied to the layer's input through the layer's own convolution, so its
    padding (circular, with sd15.seamless) is the layer's."""
    path = write(KINDS[kind][0](m), tmp_path / f"{kind}.safetensors")
    run = dict(steps=2, seed=1, width=64, height=64, output_type="np", sampler="euler")
    for seamless in (False, True):
        with m.load_lora(path, scale=0.8):
            merged = m.generate("a cat", seamless=seamless, **run)
        with m.load_lora(path, scale=0.8, merge=False):
            live = m.generate("a cat", seamless=seamless, **run)
        plain = m.generate("a cat", seamless=seamless, **run)
        assert np.abs(merged - live).max() < 1e-5 and np.abs(merged - plain).max() > 1e-3, seamless


def test_a_plain_lora_on_the_fly_keeps_a_seamless_convolutions_padding(m, tmp_path):
    g, tensors = torch.Generator().manual_seed(2), {}
    out, inp, kh, kw = module_of(m, CONV).weight.shape
    tensors |= {f"{CONV}.lora_down.weight": randn(g, 4, inp, kh, kw), f"{CONV}.lora_up.weight": randn(g, out, 4, 1, 1)}
    path = write(tensors, tmp_path / "locon.safetensors")
    run = dict(steps=2, seed=1, width=64, height=64, output_type="np", sampler="euler", seamless=True)
    with m.load_lora(path):
        merged = m.generate("a cat", **run)
    with m.load_lora(path, merge=False):
        live = m.generate("a cat", **run)
    assert np.abs(merged - live).max() < 1e-5


def test_misfits_and_damaged_factors_are_refused(m, tmp_path):
    tensors = loha(m)
    tensors[f"{LINEAR}.hada_w2_b"] = torch.zeros(4, 31)  # one input short
    with pytest.raises(CheckpointError, match=f"{LINEAR}: LoHa factors of \\[32, 32\\] and \\[32, 31\\] do not fit"):
        m.load_lora(write(tensors, tmp_path / "misfit.safetensors"))
    tensors = lokr(m)
    tensors[f"{CONV}.lokr_w1"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="lokr_w1 is not finite"):
        m.load_lora(write(tensors, tmp_path / "nan.safetensors"))
    mixed = loha(m) | {f"{LINEAR}.lokr_w1": torch.ones(1, 1)}  # a stray factor of another kind on a LoHa layer
    with pytest.warns(UserWarning, match="1 entries match no layer .*lokr_w1"):
        m.load_lora(write(mixed, tmp_path / "mixed.safetensors")).remove()
