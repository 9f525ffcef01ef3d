"""Loading checkpoints: the forms real files take, and every way a file can be wrong."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sd15
from sd15.checkpoint import CLIP_PREFIX, UNET_PREFIX, CheckpointError, TensorDict, ema_key, identify
from sd15.random_weights import random_checkpoint, save_checkpoint

REFERENCE_KEYS = Path(__file__).parent / "data" / "checkpoint-keys"  # read off real checkpoints (see its README)


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE_KEYS / name).read_text().splitlines():
        key, shape = line.rsplit(" ", 1)
        shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s)
    return shapes


class ShapesOnly(TensorDict):
    """A stand-in for a real checkpoint's key/shape list (no tensor data), for `identify`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__({})
        self.shapes = shapes

    def keys(self):
        return self.shapes.keys()

    def shape(self, key):
        return self.shapes[key]


def prefixed(prefix: str, name: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: v for k, v in reference_shapes(name).items()}


def same_unet_output(a, b) -> bool:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, a.unet.config.in_channels, 8, 8, generator=g), torch.randn(1, 77, 48, generator=g)
    with torch.no_grad():
        return torch.equal(a.unet(x, torch.tensor([1]), ctx), b.unet(x, torch.tensor([1]), ctx))


def test_real_layouts_are_recognised():
    sd1 = {**prefixed(UNET_PREFIX, "UNET-v1-SD.txt"), **prefixed("first_stage_model.", "VAE-v1-SD.txt"),
           **prefixed(CLIP_PREFIX, "CLIP-v1-SD.txt")}  # fmt: skip
    assert identify(ShapesOnly(sd1)).kind == "sd1"
    assert identify(ShapesOnly(sd1)).components == ["unet", "vae", "text_encoder"]
    inpaint = {**sd1, **prefixed(UNET_PREFIX, "UNET-v1-Inpainting.txt")}
    assert identify(ShapesOnly(inpaint)).kind == "sd1-inpainting"
    ema = {**sd1, **prefixed("model_ema.diffusion_model", "UNET-v1-EMA.txt")}  # dots removed
    assert identify(ShapesOnly(ema)).has_ema
    ema_names = {ema_key(k) for k in reference_shapes("UNET-v1-SD.txt")}
    assert ema_names == {k for k in ema if k.startswith("model_ema.")}  # our EMA naming rule fits the real file
    sd2 = {**prefixed(UNET_PREFIX, "UNET-v2-SD.txt"), **prefixed("cond_stage_model.model.", "CLIP-v2-SD.txt")}
    assert identify(ShapesOnly(sd2)).kind == "sd2"
    sd2_unet_only = prefixed(UNET_PREFIX, "UNET-v2-SD.txt")  # recognised by its 1024-wide cross-attention
    assert identify(ShapesOnly(sd2_unet_only)).kind == "sd2"
    assert identify(ShapesOnly(prefixed(UNET_PREFIX, "UNET-XL-SD.txt"))).kind == "sdxl"
    assert identify(ShapesOnly(reference_shapes("LoRA-v1-UNET.txt"))).kind == "lora"
    assert identify(ShapesOnly(reference_shapes("LoRA-v1A-CLIP.txt"))).kind == "lora"
    assert identify(ShapesOnly(prefixed("control_model.", "ControlNet-v1-SD.txt"))).kind == "controlnet"
    assert identify(ShapesOnly(reference_shapes("VAE-v1-SD.txt"))).kind == "vae"
    assert identify(ShapesOnly({"foo.weight": (3,)})).kind == "unknown"


def test_safetensors_and_ckpt_load_the_same_weights(tiny_state_dict, tiny_checkpoint, tmp_path):
    ckpt = save_checkpoint(tiny_state_dict, tmp_path / "tiny.ckpt")
    a, b = sd15.load(tiny_checkpoint), sd15.load(ckpt)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.info.kind == "sd1" and a.info.has_ema


def test_state_dict_matches_file_exactly(tiny_state_dict, tiny_model):
    unet = tiny_model.unet.state_dict()
    assert len(unet) == len([k for k in tiny_state_dict if k.startswith(UNET_PREFIX)])
    assert all(torch.equal(v, tiny_state_dict[UNET_PREFIX + k]) for k, v in unet.items())
    assert all(not p.requires_grad for p in tiny_model.unet.parameters())


def test_nested_state_dict(tiny_state_dict, tiny_model, tmp_path):
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": tiny_state_dict}, "global_step": 470000}, path)
    assert same_unet_output(sd15.load(path), tiny_model)


def test_old_clip_keys_and_float_position_ids(tiny_model, tmp_path):
    sd = random_checkpoint("tiny", seed=0, old_clip_keys=True)
    pos = "cond_stage_model.transformer.embeddings.position_ids"
    assert pos in sd
    sd[pos] = torch.arange(77, dtype=torch.float32)[None] - 0.0025  # as merged models store it, e.g. 75.9975
    path = save_checkpoint(sd, tmp_path / "old.safetensors")
    m = sd15.load(path)
    assert torch.equal(m.text_encoder.embeddings.position_ids, torch.arange(77)[None])
    ids = m.tokenizer(["a cat"])
    with torch.no_grad():
        assert torch.equal(m.text_encoder(ids), tiny_model.text_encoder(ids))


def test_linear_vae_attention_loads_as_its_convolutions(tiny_model, tiny_state_dict, tmp_path):
    """Some converters store the VAE attention's 1×1 convs (q, k, v, proj_out of encoder and decoder) as linear
    [C, C]; the numbers are the same, so sd15.load reads them (it refused them as "wrong shape"), as the converter
    does. Other shapes stay refused."""
    attention = [k for k in tiny_state_dict if ".mid.attn_1." in k and k.endswith("weight") and tiny_state_dict[k].ndim == 4]
    assert len(attention) == 8
    sd = {k: v.flatten(1) if k in attention else v for k, v in tiny_state_dict.items()}
    m = sd15.load(save_checkpoint(sd, tmp_path / "linear.safetensors"))
    ours, theirs = m.vae.state_dict(), tiny_model.vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    sd[attention[0]] = sd[attention[0]][:, :-1].contiguous()  # [C, C - 1]: not a flattened 1×1 conv
    with pytest.raises(CheckpointError, match="wrong shape"):
        sd15.load(save_checkpoint(sd, tmp_path / "bad.safetensors"))


def test_ema_selection(tiny_checkpoint, tiny_state_dict, tmp_path):
    m = sd15.load(tiny_checkpoint, ema=True)
    key = "input_blocks.0.0.weight"
    assert torch.equal(m.unet.state_dict()[key], tiny_state_dict["model_ema.diffusion_modelinput_blocks00weight"])
    no_ema = save_checkpoint(random_checkpoint("tiny", seed=1), tmp_path / "no-ema.safetensors")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        sd15.load(no_ema, ema=True)


def test_dtype_and_schedule_buffers_ignored(tiny_checkpoint):
    m = sd15.load(tiny_checkpoint, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    assert m.text_encoder.embeddings.position_ids.dtype == torch.int64


def test_inpainting_checkpoint_loads_with_nine_channels(tmp_path):
    path = save_checkpoint(random_checkpoint("tiny", inpainting=True), tmp_path / "inpaint.safetensors")
    m = sd15.load(path)
    assert m.info.kind == "sd1-inpainting"
    assert m.unet.config.in_channels == 9
    with torch.no_grad():
        out = m.unet(torch.randn(1, 9, 8, 8), torch.tensor([5]), torch.randn(1, 77, 48))
    assert out.shape == (1, 4, 8, 8)


def _write_shaped(path, shapes: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
          "cond_stage_model.model.ln_final.weight": (1024,)}, "Stable Diffusion 2"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
          "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
          "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}, "XL"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "LoRA"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320),
          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (320, 4)}, "LoRA"),  # diffusers' PEFT names
        ({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": (4, 320)}, "LoRA"),
        ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "VAE alone"),
        ({"something.else": (3,)}, "not a Stable Diffusion checkpoint"),
    ],
)  # fmt: skip
def test_other_families_are_refused_by_name(tmp_path, shapes, message):
    path = _write_shaped(tmp_path / "other.safetensors", shapes)
    with pytest.raises(CheckpointError, match=message):
        sd15.load(path)


def test_mismatched_keys_are_named(tiny_state_dict, tmp_path):
    sd = dict(tiny_state_dict)
    del sd[UNET_PREFIX + "out.2.bias"]
    sd[UNET_PREFIX + "input_blocks.1.0.emb_layers.1.weight"] = torch.zeros(32, 7)
    sd[UNET_PREFIX + "input_blocks.1.0.extra.weight"] = torch.zeros(3)
    path = save_checkpoint(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        sd15.load(path)
    message = str(e.value)
    assert "UNet" in message
    assert "1 missing" in message and "out.2.bias" in message
    assert "1 unexpected" in message and "input_blocks.1.0.extra.weight" in message
    assert "wrong shape" in message and "input_blocks.1.0.emb_layers.1.weight: file [32, 7], model [32, 128]" in message


def test_stray_top_level_keys_are_reported(tiny_state_dict, tmp_path):
    path = save_checkpoint({**tiny_state_dict, "lora_te_stray": torch.zeros(1)}, tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match="LoRA"):  # a file mixing in adapter keys is named for what it holds
        sd15.load(path)
    path = save_checkpoint({**tiny_state_dict, "cond_stage_model.stray": torch.zeros(1)}, tmp_path / "s2.safetensors")
    with pytest.raises(CheckpointError, match="cond_stage_model.stray"):
        sd15.load(path)


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|too short|not a valid"):
            sd15.load(path)


def test_truncated_ckpt(tiny_state_dict, tmp_path):
    full = save_checkpoint(tiny_state_dict, tmp_path / "full.ckpt")
    path = tmp_path / "cut.ckpt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        sd15.load(path)


class RunsCode:
    """Unpickling this object would call os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tiny_state_dict, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(tiny_state_dict), "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"Refused to load .*(posix|os)\.system"):
        sd15.load(path)
    assert not marker.exists()


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="No such checkpoint file"):
        sd15.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        sd15.load(tmp_path)


PEAK_RSS_SCRIPT = """
import resource, sys, torch
import sd15
def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak_rss()  # the libraries alone: ~0.4 GB with a CPU build of torch, ~1.5 GB with a CUDA build
m = sd15.load(sys.argv[1])
params = sum(p.numel() * p.element_size() for part in (m.unet, m.vae, m.text_encoder) for p in part.parameters())
print(params, peak_rss() - before)
"""


@pytest.mark.full_size
def test_full_size_load_keeps_one_copy_in_memory(tmp_path):
    """A 4.3 GB fp32 checkpoint loads with peak resident memory well under two copies of the model."""
    free = shutil.disk_usage(tmp_path).free
    if free < 5.3e9:
        pytest.skip(f"the full-size load needs 5.3 GB free in {tmp_path}; this machine has {free / 1e9:.1f} GB")
    path = save_checkpoint(random_checkpoint("full", seed=0), tmp_path / "full.safetensors")
    try:
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True)
    finally:
        path.unlink()  # 4.3 GB: not left for the rest of the run (the full-size round trip needs the disk)
    assert out.returncode == 0, out.stderr[-3000:]
    model_bytes, load_peak = map(int, out.stdout.split())
    assert model_bytes > 4.2e9  # 1.066 B fp32 parameters
    assert load_peak < 1.25 * model_bytes, (
        f"loading raised peak RSS by {load_peak / 2**30:.2f} GiB for a {model_bytes / 2**30:.2f} GiB model"
    )


@pytest.mark.parametrize(
    "module, reference",
    [("unet", "UNET-v1-SD.txt"), ("vae", "VAE-v1-SD.txt"), ("text_encoder", "CLIP-v1-SD.txt")],
)
def test_full_size_modules_have_exactly_the_original_keys_and_shapes(module, reference):
    from sd15.random_weights import FULL, UNet, AutoencoderKL, CLIPTextModel

    cls = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[module]
    with torch.device("meta"):
        model = cls(FULL[module])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = reference_shapes(reference)
    assert len(ours) == {"unet": 686, "vae": 248, "text_encoder": 197}[module]
    assert ours == theirs


def test_make_random_checkpoint_script(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "make_random_checkpoint.py"
    out = tmp_path / "r.ckpt"
    result = subprocess.run([sys.executable, str(script), str(out), "--size", "tiny", "--inpainting", "--seed", "3"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    m = sd15.load(out)
    assert m.info.kind == "sd1-inpainting"
    expected = random_checkpoint("tiny", seed=3, inpainting=True)
    assert torch.equal(m.unet.out[2].weight, expected[UNET_PREFIX + "out.2.weight"])  # seeded: reproducible


def test_random_checkpoint_file_is_made_once_in_the_cache_and_reused(tmp_path, monkeypatch):
    from sd15.random_weights import CACHE_VARIABLE, random_checkpoint_file

    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    plain = random_checkpoint_file("tiny", 3, tmp_path / "plain")
    assert plain.parent == tmp_path / "plain"
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    first = random_checkpoint_file("tiny", 3, tmp_path / "ignored")
    assert first.parent == tmp_path / "cache" and not (tmp_path / "ignored").exists()
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no partial file left behind
    assert first.read_bytes() == plain.read_bytes()  # seeded: the same weights wherever they are saved
    stamp = first.stat().st_mtime_ns
    assert random_checkpoint_file("tiny", 3, tmp_path / "ignored") == first and first.stat().st_mtime_ns == stamp
    assert random_checkpoint_file("tiny", 4, tmp_path / "ignored") != first
