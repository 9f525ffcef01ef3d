"""Reading checkpoint files safely, recognising what they hold, and splitting them into components.

An original SD1.x single-file checkpoint is one flat dictionary of tensors whose key prefixes name the
component (`model.diffusion_model.` the UNet, `first_stage_model.` the VAE, `cond_stage_model.transformer.`
the CLIP text encoder), beside optional extras (EMA weights, schedule buffers). sd15's modules use the
original names, so a component's state dict is the file's keys with the prefix removed: no table.

Safety: `.safetensors` files are parsed by the safetensors library (no code can run); pickled `.ckpt`/`.pt`
files are read only with `torch.load(weights_only=True)`, which refuses any object that is not a tensor or
plain container, so a malicious pickle is refused before its code can run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_PREFIX_OLD = "cond_stage_model.transformer."  # older files lack `text_model.`
EMA_PREFIX = "model_ema."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX}

# Tensors of the training wrapper (ldm's LatentDiffusion) that inference does not use.
SCHEDULE_BUFFERS = frozenset(
    [
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    ]
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message that says why and what to do."""


def printable(text) -> str:
    """A key or metadata value from a file, safe to print: control characters (terminal escape sequences,
    carriage returns) are shown escaped, as Python writes them in a string literal."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


# --------------------------------------------------------------------------------------------------
# Reading files


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file, validated against the file's size before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is too short to be a .safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(
                f"{path} is not a valid .safetensors file: its header claims {n} bytes but the file has {size}. "
                "The file is truncated or corrupt; download it again."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid .safetensors file: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid .safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} is not a valid .safetensors file: its __metadata__ is not a map of strings")
    data_size = size - 8 - n
    for key, info in header.items():
        if key != "__metadata__":
            _check_entry(path, key, info, data_size)
    return header


def _check_entry(path: Path, key: str, info, data_size: int) -> None:
    """One tensor's header entry: {"dtype": str, "shape": [int, …], "data_offsets": [begin, end]} inside the data."""

    def integers(x) -> bool:
        return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or not integers(info.get("shape")):
        raise CheckpointError(f"{path} is not a valid .safetensors file: the header entry of tensor {key!r} "
                              f"lacks a dtype name or a shape (a list of sizes): {printable(info)[:200]}")  # fmt: skip
    offsets = info.get("data_offsets")
    if not integers(offsets) or len(offsets) != 2:
        raise CheckpointError(f"{path} is not a valid .safetensors file: tensor {key!r} has data_offsets "
                              f"{printable(offsets)[:100]}, not [begin, end]")  # fmt: skip
    begin, end = offsets
    if not begin <= end <= data_size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: tensor {key!r} lies at bytes {begin}..{end} "
            f"but the file holds {data_size} bytes of data. Download it again."
        )


class SafetensorsFile:
    """A lazily read .safetensors file: `keys()`, `shape(key)`, and `get(key)` reading one tensor from
    the memory map, so a component can be loaded tensor by tensor without the whole file in memory."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        header = read_safetensors_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self._shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        self._dtypes = {k: v["dtype"] for k, v in header.items()}
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # the library's own errors for malformed files
            raise CheckpointError(f"{self.path} is not a valid .safetensors file: {e}") from None

    def keys(self):
        return self._shapes.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype_name(self, key: str) -> str:
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


class TensorDict:
    """The same interface over an in-memory dict (what a pickle gives)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.tensors = tensors
        self.metadata = {}

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype_name(self, key: str) -> str:
        return str(self.tensors[key].dtype).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _unwrap_state_dict(obj, path) -> dict[str, torch.Tensor]:
    """Follow nested `state_dict` entries (Lightning checkpoints hold the weights under one or more)."""
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (keys: {', '.join(map(printable, list(obj)[:8]))})")
    return tensors


def load_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .ckpt/.pt/.bin file, read with `torch.load(weights_only=True)` only.

    Anything in the pickle other than tensors and plain containers is refused, and its code never runs.
    """
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_can_map(path))
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # torch names it "GLOBAL posix.system whose module posix is blocked" or "GLOBAL print was not an allowed global"
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found[1] if found else "a Python object that is not a tensor"
        raise CheckpointError(
            f"Refused to load {path}: the pickle contains {what}, which could run code. "
            "sd15 reads pickles only with torch.load(weights_only=True). If you trust the file's source, "
            "convert it to .safetensors with a tool you trust, or ask its author for a .safetensors file."
        ) from None
    except CheckpointError:  # from _can_map: the pickle holds no tensors
        raise
    except (EOFError, RuntimeError, OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    return _unwrap_state_dict(obj, path)


def _can_map(path) -> bool:
    """Whether `torch.load(mmap=True)` would read every tensor of this zip checkpoint from bytes of its own.

    The memory-mapped load maps each storage at its zip record's offset and takes as many bytes as the pickle
    says, without comparing them with the record's size or looking at its compression, so a shortened or
    deflated record would load as whatever bytes follow (the plain load checks both, and inflates). Here the
    pickle is first read onto the `meta` device (still weights_only=True; no tensor data is read), which gives
    each storage's size and offset, and each must be the start of an uncompressed record of exactly that size,
    as torch.save writes them. A file that is not a zip gives True: torch refuses to map it, and it is read plainly.
    """
    if not zipfile.is_zipfile(path):
        return True
    records = {}  # offset of a record's data in the file -> the record
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for record in z.infolist():
            f.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            records[record.header_offset + 30 + name_len + extra_len] = record
    for t in _unwrap_state_dict(torch.load(path, map_location="meta", weights_only=True), path).values():
        storage = t.untyped_storage()
        record = records.get(getattr(storage, "_checkpoint_offset", None))
        if record is None or record.compress_type != zipfile.ZIP_STORED or record.file_size != storage.nbytes():
            return False
    return True


def open_checkpoint(path: str | os.PathLike) -> SafetensorsFile | TensorDict:
    """Open a checkpoint file by its content: safetensors, or a zip/legacy torch pickle; or a diffusers
    folder (model_index.json, unet/, vae/, text_encoder/), whose keys `sd15.keymap` renames to the original's."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No such checkpoint file: {path}")
    if path.is_dir():
        if (path / "model_index.json").is_file():  # a diffusers folder, read in the original layout
            from .streaming import DiffusersFolder

            return DiffusersFolder(path)
        raise CheckpointError(f"{path} is a folder; pass the checkpoint file inside it (or a diffusers folder)")
    with open(path, "rb") as f:
        magic = f.read(8)
    is_zip = magic[:4] == b"PK\x03\x04"
    is_legacy_pickle = magic[:1] == b"\x80"
    if path.suffix.lower() == ".safetensors" or not (is_zip or is_legacy_pickle):
        return SafetensorsFile(path)
    return TensorDict(load_pickle(path), path)


# --------------------------------------------------------------------------------------------------
# Recognising what a file is


@dataclass
class CheckpointInfo:
    kind: str  # "sd1", "sd1-inpainting", "sd2", "sdxl", "vae", "lora", "controlnet", "embedding", "unknown"
    description: str
    components: list[str] = field(default_factory=list)
    clip_prefix: str | None = None  # which of the two CLIP key forms the file uses
    has_ema: bool = False


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def identify(ckpt: SafetensorsFile | TensorDict) -> CheckpointInfo:
    """Recognise the model family of a checkpoint from its keys and shapes."""
    keys = list(ckpt.keys())
    has_ema = _has_prefix(keys, EMA_PREFIX + "diffusion_model")
    lora_parts = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora_linear_layer.", "_lora.down.")
    if any(part in k for k in keys for part in lora_parts) or any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return CheckpointInfo("lora", "a LoRA adapter (load it onto a base model, not as a model)")
    if _has_prefix(keys, "conditioner.embedders.") or _has_prefix(keys, UNET_PREFIX + "label_emb."):
        return CheckpointInfo("sdxl", "a Stable Diffusion XL checkpoint")
    if _has_prefix(keys, "control_model.") or any("input_hint_block" in k for k in keys):
        return CheckpointInfo("controlnet", "a ControlNet (an adapter that needs a base model)")
    if set(keys) & {"string_to_param", "emb_params"} or (len(keys) <= 2 and "clip_l" in keys):
        return CheckpointInfo("embedding", "a textual-inversion embedding")
    unet_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if unet_in in keys:
        to_k = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if _has_prefix(keys, "cond_stage_model.model.") or (to_k in keys and ckpt.shape(to_k)[-1] == 1024):
            return CheckpointInfo("sd2", "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder, 1024-wide context)")
        clip_prefix = CLIP_PREFIX if _has_prefix(keys, CLIP_PREFIX) else CLIP_PREFIX_OLD
        components = ["unet"]
        components += ["vae"] if _has_prefix(keys, VAE_PREFIX) else []
        components += ["text_encoder"] if _has_prefix(keys, CLIP_PREFIX_OLD) else []
        in_ch = ckpt.shape(unet_in)[1]
        if in_ch == 9:
            return CheckpointInfo("sd1-inpainting", "a Stable Diffusion 1.x inpainting checkpoint (9-channel UNet input)", components, clip_prefix, has_ema)
        if in_ch != 4:
            return CheckpointInfo("unknown", f"a UNet with {in_ch} input channels (SD1.x has 4, inpainting 9)")
        return CheckpointInfo("sd1", "a Stable Diffusion 1.x checkpoint", components, clip_prefix, has_ema)
    vae_keys = {"encoder.conv_in.weight", "decoder.conv_in.weight"}
    if vae_keys <= set(keys) or {VAE_PREFIX + k for k in vae_keys} <= set(keys):
        return CheckpointInfo("vae", "a VAE alone (use it to replace a model's VAE)", ["vae"])
    return CheckpointInfo("unknown", "not a Stable Diffusion checkpoint that sd15 recognises")


# --------------------------------------------------------------------------------------------------
# Component state dicts


def ema_key(unet_key: str) -> str:
    """The EMA copy of a UNet weight: `model_ema.` + `diffusion_model` + the key with its dots removed
    (`input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`)."""
    return EMA_PREFIX + "diffusion_model" + unet_key.replace(".", "")


def component_keys(ckpt, prefix: str) -> dict[str, str]:
    """{component key: file key} for the keys under `prefix`."""
    return {k[len(prefix):]: k for k in ckpt.keys() if k.startswith(prefix)}


def unexplained_keys(ckpt, info: CheckpointInfo) -> list[str]:
    """File keys that belong to no component and are not a known extra (EMA, schedule buffers)."""
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX_OLD, EMA_PREFIX)
    return [k for k in ckpt.keys() if not k.startswith(prefixes) and k not in SCHEDULE_BUFFERS]


def check_state_dict(name: str, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """Raise a CheckpointError naming every missing, unexpected and mis-shaped key of a component."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: file {list(found[k])}, model {list(expected[k])}" for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        lines = [f"The {name} weights do not match the model:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = "\n    ".join(map(printable, items[:20])) + (f"\n    … and {len(items) - 20} more" if len(items) > 20 else "")
                lines.append(f"  {len(items)} {label}:\n    {shown}")
        raise CheckpointError("\n".join(lines))
