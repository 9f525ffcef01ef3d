"""Streaming checkpoint I/O for the conversion tools: lazy views of the inputs, and a verified writer.

1. An input is opened as a lazy view in the original single-file layout: `keys()`, `shape(key)`,
   `dtype_name(key)`, `get(key)`. A .safetensors file is read by `MappedSafetensors`, which maps each tensor's
   bytes on its own and unmaps them when the tensor is freed; a diffusers folder by `DiffusersFolder`, which
   renames its keys by the rules in `sd15.keymap`; a pickle only by `torch.load(weights_only=True)`, its pages
   released as the conversion goes (`ReleasingPickle`).
2. An output is planned as {key: Item}, each Item knowing its shape and dtype and how to read its tensor, so
   the .safetensors header (8-byte little-endian length, JSON of dtype/shape/data_offsets) is written first
   and then every tensor's bytes one at a time, hashed (SHA-256) as they are written. Peak memory is about the
   largest tensor, not the file.
3. Everything is written under a temporary name next to the target; the result is re-read from disk and
   checked before it is renamed into place (`write_verified`, `atomic_output`), over an existing output only
   with `force` and only if that output is still what it was at the start.

The operations themselves (convert, merge) are in sd15.convert.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import keymap
from .checkpoint import (
    CLIP_PREFIX,
    EMA_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    SafetensorsFile,
    TensorDict,
    identify,
    load_pickle,
    open_checkpoint,
    printable,
    read_safetensors_header,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
DATA = Path(__file__).parent / "data"


def torch_dtype(name: str) -> torch.dtype:
    """A dtype from a safetensors name ("F16") or a torch name ("float16")."""
    return ST_DTYPES.get(name) or getattr(torch, name)


# --------------------------------------------------------------------------------------------------
# Reading


class MappedSafetensors:
    """A .safetensors file read one tensor at a time. Each tensor is a view of its own copy-on-write memory
    map of the file, unmapped when the tensor is freed, so reading a whole file never holds more than the
    tensors still in use. Writing to a tensor never reaches the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = read_safetensors_header(self.path)  # validates offsets against the file size
        self.metadata = header.pop("__metadata__", None) or {}
        with open(self.path, "rb") as f:
            self._data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self._info = {}
        for key, entry in header.items():
            dtype = ST_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {key!r} has an unknown dtype {entry.get('dtype')!r}")
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path} is corrupt: tensor {key!r} of shape {list(shape)} "
                                      f"has {end - begin} bytes")  # fmt: skip
            self._info[key] = (dtype, shape, begin, end)
        spans = sorted((begin, end) for _, _, begin, end in self._info.values())
        ends = [0] + [end for _, end in spans]  # each tensor starts where the one before it ends, the last at the file's end
        if any(begin != prev for (begin, _), prev in zip(spans, ends)) or ends[-1] != self.path.stat().st_size - self._data_start:
            raise CheckpointError(f"{self.path} is corrupt: its tensors' bytes overlap or leave gaps, where the format stores "
                                  "them back to back (the safetensors library refuses it too); download it again")  # fmt: skip

    def keys(self):
        return self._info.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def dtype_name(self, key: str) -> str:
        return ST_NAMES[self._info[key][0]]

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._info[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        start = self._data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY  # a map must start on a page boundary
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), self._data_start + end - base, offset=base, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=start - base)  # keeps `mapped` alive
        return data.view(dtype).reshape(shape)


class ShardedSafetensors:
    """Several .safetensors files named by a `*.safetensors.index.json` weight map, read as one. The map must
    name every tensor its shards hold: one left out would otherwise be dropped without a word."""

    def __init__(self, index_path: Path):
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{index_path} is not a readable shard index: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path} is not a shard index: it has no weight_map of key -> file name")
        for name in set(weight_map.values()):
            if name in ("", ".", "..") or Path(name).name != name:
                raise CheckpointError(f"{index_path} names a shard outside its folder ({name!r}); refused")
            if not (index_path.parent / name).is_file():
                raise CheckpointError(f"{index_path} names a shard {name!r} that is not in {index_path.parent}")
        files = {name: MappedSafetensors(index_path.parent / name) for name in set(weight_map.values())}
        for key, name in weight_map.items():
            if key not in files[name].keys():
                raise CheckpointError(f"{index_path} places tensor {key!r} in {name!r}, which does not hold it")
        unlisted = sorted((key, name) for name, f in files.items() for key in f.keys() if key not in weight_map)
        if unlisted:
            key, name = unlisted[0]
            raise CheckpointError(f"{index_path} leaves out {len(unlisted)} tensor{'s' * (len(unlisted) != 1)} that its "
                                  f"shards hold, e.g. {printable(key)} in {name!r}; the index is stale or damaged. "
                                  "Download the folder again, or add them to its weight_map")  # fmt: skip
        self._where = {key: files[name] for key, name in weight_map.items()}
        self.metadata, self.path, self.shards = {}, index_path, sorted(files)

    def keys(self):
        return self._where.keys()

    def shape(self, key):
        return self._where[key].shape(key)

    def dtype_name(self, key):
        return self._where[key].dtype_name(key)

    def get(self, key):
        return self._where[key].get(key)


def _weights_files(name: str, variant: str | None = None) -> list[str]:
    """A component's weights file names, in diffusers' order: NAME.safetensors, its shard index, then the .bin
    pickle (pytorch_model.bin for a transformers model.*); with a variant, NAME.VARIANT.safetensors and so on."""
    bin_name = "pytorch_model" if name == "model" else name
    v = f".{variant}" if variant else ""
    return [f"{name}{v}.safetensors", f"{name}.safetensors.index{v}.json", f"{bin_name}{v}.bin"]


def _variants(folder: Path, name: str) -> list[str]:
    """The variants (fp16, bf16, …) whose weights files are in the folder, by the names diffusers saves them under."""
    bin_name = "pytorch_model" if name == "model" else name
    n, b = re.escape(name), re.escape(bin_name)
    pattern = re.compile(rf"{n}\.(\w+)\.safetensors|{n}\.safetensors\.index\.(\w+)\.json|{b}\.(\w+)\.bin")
    found = {next(g for g in m.groups() if g) for p in folder.iterdir() if p.is_file() and (m := pattern.fullmatch(p.name))}
    return sorted(found)


def open_weights(folder: Path, name: str, notes: list[str] | None = None):
    """A diffusers component's weights, chosen as diffusers chooses them when no variant is asked for: the plain
    files first (NAME.safetensors, its shard index, NAME.bin), else a variant's (NAME.fp16.safetensors, …) when
    the folder holds one variant only. Where there was a choice, a note in `notes` says which file was read."""
    variants = _variants(folder, name)
    plain = [n for n in _weights_files(name) if (folder / n).is_file()]
    if plain:
        chosen, others = plain[0], plain[1:] + [f"the {v} variant" for v in variants]
        note = f"{folder.name}/: read {chosen}, as diffusers does when no variant is asked for" if others else None
    elif len(variants) == 1:  # always said: the weights may not be in the precision the user expects
        files = [n for n in _weights_files(name, variants[0]) if (folder / n).is_file()]
        chosen, others = files[0], files[1:]
        note = f"{folder.name}/: read {chosen}, the only weights it holds (the {variants[0]} variant)"
    elif variants:
        raise CheckpointError(f"{folder} holds the weights of {len(variants)} variants ({', '.join(variants)}) and none "
                              f"without a variant ({name}.safetensors), so which to read is ambiguous: convert a copy of "
                              f"the folder that keeps one variant's files ({name}.VARIANT.safetensors or its shards)")  # fmt: skip
    else:
        raise CheckpointError(f"{folder} holds no weights: it has none of {', '.join(_weights_files(name))}, nor a variant "
                              f"of them ({name}.fp16.safetensors, …). Is the folder complete (a download cut short)?")  # fmt: skip
    if note and notes is not None:
        notes.append(note + (f"; not {', '.join(others)}" if others else ""))
    path = folder / chosen
    if chosen.endswith(".json"):
        return ShardedSafetensors(path)
    return MappedSafetensors(path) if chosen.endswith(".safetensors") else TensorDict(load_pickle(path), path)


class DiffusersFolder:
    """A diffusers folder (model_index.json, unet/, vae/, text_encoder/) seen in the original single-file
    layout: its keys are the original file's (`model.diffusion_model.…`), renamed by `sd15.keymap`.

    `copy=True` (as `sd15.load` opens it) returns tensors in memory of their own; `copy=False` (conversions)
    returns views of the file's memory maps, which are valid only while the file is left as it is.
    `notes` says which weights file a component was read from, where it had several (`open_weights`)."""

    def __init__(self, path: str | os.PathLike, copy: bool = True):
        self.path, self.metadata, self.copy, self.notes = Path(path), {}, copy, []
        try:
            index = json.loads((self.path / "model_index.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path} is not a readable diffusers folder: {e}") from None
        if not isinstance(index, dict):
            raise CheckpointError(f"{self.path} is not a diffusers folder: its model_index.json is not a JSON object")
        pipeline = str(index.get("_class_name", ""))
        if "XL" in pipeline or "text_encoder_2" in index:
            raise CheckpointError(f"{self.path} is a Stable Diffusion XL pipeline ({pipeline}); sd15 reads SD1.x")
        self._where: dict[str, tuple] = {}  # original key -> (reader, diffusers key, original shape)
        self.synthesized: set[str] = set()  # keys the folder lacks but the original layout has
        for component in keymap.COMPONENTS:
            if not (self.path / component).is_dir():
                raise CheckpointError(f"{self.path} is a diffusers folder without {component}/")
            reader = open_weights(self.path / component, keymap.WEIGHTS_NAME[component], self.notes)
            try:
                names = keymap.from_diffusers(component, reader.keys())
            except CheckpointError as e:
                raise CheckpointError(f"{reader.path}: {e}") from None
            for dkey, key in names.items():
                shape = tuple(reader.shape(dkey))
                if component == "vae" and keymap.is_vae_attention_weight(dkey) and len(shape) == 2:
                    shape += (1, 1)  # linear -> 1×1 conv
                self._where[keymap.ORIGINAL_PREFIX[component] + key] = (reader, dkey, shape)
        positions = CLIP_PREFIX + "embeddings.position_ids"
        embedding = CLIP_PREFIX + "embeddings.position_embedding.weight"
        if embedding not in self._where:
            raise CheckpointError(f"{self.path / 'text_encoder'} lacks the text encoder's position embedding "
                                  "(text_model.embeddings.position_embedding.weight); the folder is incomplete")  # fmt: skip
        if positions not in self._where:  # transformers no longer saves it; the original layout has it
            count = self._where[embedding][2][0]
            self._where[positions] = (lambda: torch.arange(count)[None], None, (1, count))
            self.synthesized.add(positions)
        for key, tensor in _schedule_buffers(self.path / "scheduler" / "scheduler_config.json").items():
            self._where[key] = (lambda t=tensor: t, None, tuple(tensor.shape))
            self.synthesized.add(key)

    def keys(self):
        return self._where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][2]

    def dtype_name(self, key: str) -> str:
        reader, dkey, _ = self._where[key]
        return str(reader().dtype).removeprefix("torch.") if dkey is None else reader.dtype_name(dkey)

    def get(self, key: str) -> torch.Tensor:
        reader, dkey, shape = self._where[key]
        if dkey is None:
            return reader()
        tensor = reader.get(dkey).reshape(shape)
        return tensor.clone() if self.copy else tensor


def _schedule_buffers(scheduler_config: Path) -> dict[str, torch.Tensor]:
    """The 12 buffers that ldm's LatentDiffusion stores beside the weights (betas, alphas_cumprod, …), which a
    diffusers folder leaves out: recomputed by ldm's recipe when the scheduler is SD1.x's, else none."""
    from .random_weights import schedule_buffers  # ldm's register_schedule: float64, stored as float32

    try:
        config = json.loads(scheduler_config.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    sd1 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    return schedule_buffers() if all(config.get(k) == v for k, v in sd1.items()) else {}


class ReleasingPickle:
    """The tensors of a pickle loaded by `torch.load(weights_only=True, mmap=True)`, whose pages are dropped from
    this process once used: each `get` first releases the pages of the tensor handed out before it.

    torch maps the whole file privately and the pages a conversion touches would otherwise stay resident
    until the end, as many as the file's size. `madvise(MADV_DONTNEED)` on a private file mapping whose pages
    were never written only unmaps them: a later read faults them back in from the file, so a tensor sharing
    those pages stays correct. Only ranges inside this file's own mappings (from /proc/self/maps) are
    released; a pickle that was not memory-mapped (the legacy format) is left alone.
    """

    def __init__(self, tensors: TensorDict):
        self.tensors, self.path, self.metadata = tensors, tensors.path, {}
        self._maps = _file_mappings(tensors.path)
        self._previous: torch.Tensor | None = None

    def keys(self):
        return self.tensors.keys()

    def shape(self, key):
        return self.tensors.shape(key)

    def dtype_name(self, key):
        return self.tensors.dtype_name(key)

    def get(self, key):
        """The tensor, which must not be modified in place (its pages may be re-read from the file)."""
        if self._previous is not None:
            _release(self._previous, self._maps)
        self._previous = self.tensors.get(key)
        return self._previous


def _file_mappings(path) -> list[tuple[int, int]]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    target, ranges = str(Path(path).resolve()), []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _release(t: torch.Tensor, maps: list[tuple[int, int]]) -> None:
    import ctypes

    page = mmap.PAGESIZE
    begin = t.untyped_storage().data_ptr()
    end = begin + t.untyped_storage().nbytes()
    begin, end = begin - begin % page, -(-end // page) * page
    if any(lo <= begin and end <= hi for lo, hi in maps):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 4)  # MADV_DONTNEED


def open_source(path: str | os.PathLike, notes: list[str] | None = None):
    """Any input in the original layout: a .safetensors file (memory-mapped per tensor), a pickle (read
    with weights_only=True), a diffusers folder, or a diffusers component folder (config.json + weights).
    Which weights file a folder was read from, where it had several, is added to `notes`."""
    path = Path(path)
    if path.is_dir() and not (path / "model_index.json").exists() and (path / "config.json").exists():
        return open_weights(path, _weights_name(path / "config.json"), notes)
    if path.is_dir() and (path / "model_index.json").is_file():
        folder = DiffusersFolder(path, copy=False)
        if notes is not None:
            notes.extend(folder.notes)
        return folder
    view = open_checkpoint(path)
    if isinstance(view, SafetensorsFile):
        return MappedSafetensors(path)
    return ReleasingPickle(view) if isinstance(view, TensorDict) and sys.platform == "linux" else view


def _weights_name(config_path: Path) -> str:
    """A component folder's weights name, by which library wrote its config.json: diffusers (`_class_name`:
    diffusion_pytorch_model.*) or transformers (`architectures`: model.*)."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not readable JSON: {e}") from None
    if isinstance(config, dict) and "_class_name" in config:
        return "diffusion_pytorch_model"
    if isinstance(config, dict) and "architectures" in config:
        return "model"
    raise CheckpointError(f"{config_path} names no model class (diffusers' _class_name or transformers' architectures); "
                          "sd15 reads component folders written by diffusers or transformers")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Planning: an output is {key: Item}, known by shape and dtype before any tensor is read


@dataclass(frozen=True)
class Item:
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def item(view, key: str) -> Item:
    return Item(tuple(view.shape(key)), torch_dtype(view.dtype_name(key)), partial(view.get, key))


def cast(it: Item, dtype: torch.dtype | None) -> Item:
    """The item in `dtype` if it is floating point (integer tensors such as position_ids keep theirs)."""
    if dtype is None or dtype == it.dtype or not it.dtype.is_floating_point:
        return it
    return Item(it.shape, dtype, lambda: it.read().to(dtype))


def reshape(it: Item, shape: tuple[int, ...]) -> Item:
    return Item(tuple(shape), it.dtype, lambda: it.read().reshape(shape))


class ItemView:
    """{key: Item} as a lazy view (keys, shape, dtype_name, get), as sd15.model.load reads checkpoints."""

    def __init__(self, items: dict[str, Item]):
        self.items = items

    def keys(self):
        return self.items.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.items[key].shape

    def dtype_name(self, key: str) -> str:
        return ST_NAMES[self.items[key].dtype]

    def get(self, key: str) -> torch.Tensor:
        return self.items[key].read()


def vae_items(path: str | os.PathLike, notes: list[str], view=None) -> dict[str, Item]:
    """A VAE on its own, {key without `first_stage_model.`: Item} in the original layout, from a VAE file
    (original or diffusers layout, keys bare or prefixed, .safetensors or .ckpt, as
    vae-ft-mse-840000-ema-pruned is published), a diffusers VAE folder, or a full SD1.x checkpoint's VAE.
    A VAE training checkpoint's loss.* and model_ema.* tensors are left out, with a note. The mid-block
    attention's q, k, v and proj_out come as 1×1 convolutions, [C, C, 1, 1], whichever form the file holds.
    Shapes are not checked here: the caller knows which VAE it expects. `view`: `path` already opened."""
    if not Path(path).exists():
        raise CheckpointError(f"No such VAE file or folder: {path}")
    view = view if view is not None else open_source(path, notes)
    info = identify(view)
    keys = list(view.keys())
    if info.kind in ("sd1", "sd1-inpainting") and "vae" not in info.components:
        raise CheckpointError(f"{path} is {info.description} without VAE weights, not a VAE")
    if info.kind in ("sd1", "sd1-inpainting"):
        keys = [k for k in keys if k.startswith(VAE_PREFIX)]
    elif info.kind != "vae":
        raise CheckpointError(f"{path} is {info.description}, not a VAE; pass a VAE file (such as "
                              "vae-ft-mse-840000-ema-pruned.safetensors), a diffusers vae/ folder or an SD1.x checkpoint")  # fmt: skip
    dropped = [k for k in keys if k.startswith(("loss.", EMA_PREFIX))]
    if dropped:
        notes.append(f"the VAE file's {len(dropped)} training-only tensors (loss.*, model_ema.*) are not used")
    names = {k.removeprefix(VAE_PREFIX): k for k in keys if k not in dropped}
    if any(".down_blocks." in k or ".mid_block." in k for k in names):  # the diffusers layout
        names = {key: names[dkey] for dkey, key in keymap.from_diffusers("vae", names).items()}
    items = {}
    for key, file_key in names.items():
        it = item(view, file_key)
        items[key] = reshape(it, it.shape + (1, 1)) if keymap.is_vae_attention_weight(key) and len(it.shape) == 2 else it
    return items


@dataclass
class Report:
    output: Path
    tensors: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Writing and checking


def _bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy when it is already contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def path_label(path: Path) -> str:
    """A file being written, named as the user will see it: `.NAME.partial-PID/unet/x` shown as NAME/unet/x."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        m = re.fullmatch(r"\.(.+)\.partial-\d+", part)
        if m:
            return "/".join((m[1], *parts[i + 1 :]))
    return Path(path).name


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, leave=False)


def write_safetensors(path: Path, items: dict[str, Item], metadata: dict | None, progress: bool) -> dict[str, str]:
    """Write `items` as a .safetensors file, tensor by tensor; return each tensor's SHA-256."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, it in items.items():
        header[key] = {"dtype": ST_NAMES[it.dtype], "shape": list(it.shape), "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    digests = {}
    with open(path, "xb") as f, _bar(offset, f"write {path_label(path)}", progress) as bar:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, it in items.items():
            t = it.read()
            if t.dtype != it.dtype or tuple(t.shape) != it.shape:
                raise CheckpointError(f"{printable(key)}: read {t.dtype} {list(t.shape)}, the header says {it.dtype} {list(it.shape)}")
            data = _bytes(t)
            f.write(data)
            digests[key] = hashlib.sha256(data).hexdigest()
            bar.update(len(data))
            del t, data  # unmaps the source's pages before the next tensor is read
        f.flush()
        os.fsync(f.fileno())
    return digests


def verify(view, expected: dict[str, tuple], what: str, progress: bool, ignore: set[str] = frozenset()) -> None:
    """Check a written output, re-read through `view`: the same keys, and per key the dtype, shape and SHA-256
    of its bytes in `expected` ({key: (shape, dtype, sha256)})."""
    keys = set(view.keys()) - set(ignore)
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise CheckpointError(f"verification of {what} failed: missing {missing[:5]}, unexpected {extra[:5]}")
    total = sum(math.prod(s) * d.itemsize for s, d, _ in expected.values())
    with _bar(total, f"check {what}", progress) as bar:
        for key, (shape, dtype, digest) in expected.items():
            if torch_dtype(view.dtype_name(key)) != dtype or tuple(view.shape(key)) != tuple(shape):
                raise CheckpointError(f"verification of {what} failed: {printable(key)} is {view.dtype_name(key)} "
                                      f"{list(view.shape(key))} on disk, {dtype} {list(shape)} planned")  # fmt: skip
            t = view.get(key)
            data = _bytes(t)
            if hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(f"verification of {what} failed: {printable(key)} reads back different bytes")
            bar.update(len(data))
            del t, data


def _check_format(path: Path) -> None:
    """The safetensors library, an independent reader of the format, must open the file and list its keys."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:
        raise CheckpointError(f"verification failed: the safetensors library cannot read {path.name}: {e}") from None


def write_verified(path: Path, items: dict[str, Item], metadata: dict | None, progress: bool) -> dict[str, str]:
    digests = write_safetensors(path, items, metadata, progress)
    _check_format(path)
    expected = {k: (it.shape, it.dtype, digests[k]) for k, it in items.items()}
    verify(MappedSafetensors(path), expected, path_label(path), progress)
    return digests


def _identity(path: Path) -> tuple | None:
    """What is at `path`, a symlink not followed: None if nothing, else its device, inode and modification time,
    which change when it is replaced or written to."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    """Remove a file, a folder, or a symlink (never what it points to)."""
    if _is_folder(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def atomic_output(target: Path, force: bool, inputs: list[Path]):
    """Yield a temporary path next to `target`; on success move it into place, on any failure remove it.

    Whatever is at `target` is replaced only with `force`, and only if it is still, at the rename, what was there
    at the start (which the caller may have checked): an output that appears or changes meanwhile is kept and the
    new one discarded. A symlink at `target` is itself replaced, never followed."""
    target = Path(target)
    if not target.parent.is_dir():
        raise ValueError(f"the output's folder does not exist: {target.parent}")
    resolved = target.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if resolved == p or resolved in p.parents:
            raise ValueError(f"the output {target} would replace the input {p}; choose another output")
        if p in resolved.parents:
            raise ValueError(f"the output {target} lies inside the input folder {p}; choose an output outside it")
    before = _identity(target)
    if before is not None and not force:
        raise FileExistsError(f"{target} already exists; pass --force to replace it")
    tmp, old = (target.with_name(f".{target.name}.{what}-{os.getpid()}") for what in ("partial", "old"))
    for p in (tmp, old):
        if os.path.lexists(p):
            raise FileExistsError(f"{p} is in the way: a conversion to {target.name} in this process is writing it, or "
                                  "one killed with kill -9 under this process number left it. If none is running, delete it"
                                  + (" (it is the output that conversion was replacing)" if p == old else ""))  # fmt: skip
    try:
        yield tmp
        if _identity(target) != before:
            raise FileExistsError(f"{target} was {'created' if before is None else 'replaced or changed'} by something else "
                                  "while the conversion ran; it is left as it is and the new output is discarded. "
                                  "Check what it is, then run again (with --force to replace it)")  # fmt: skip
        if before is None or not (tmp.is_dir() or _is_folder(target)):
            os.replace(tmp, target)  # a file over a file or a symlink (the link itself)
        else:  # rename() cannot put a folder over a file or a link, nor a file over a folder: move the old one aside
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _remove(old)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)  # nothing once it is in place
        raise
