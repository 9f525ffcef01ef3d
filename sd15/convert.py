"""Streaming, verified checkpoint conversions: original single file <-> diffusers folder, .ckpt -> .safetensors,
dtype changes, EMA extraction, pruning, VAE replacement, component extraction, and merges.

How a conversion runs (the reading and writing live in sd15.streaming):

1. The input is opened as a lazy view in the original single-file layout: `keys()`, `shape(key)`,
   `dtype_name(key)`, `get(key)`. A .safetensors file is read by `MappedSafetensors`, which maps each tensor's
   bytes on its own and unmaps them when the tensor is freed; a diffusers folder by `DiffusersFolder`, which
   renames its keys by the rules in `sd15.keymap`; a pickle only by `torch.load(weights_only=True)`.
2. The output is planned as {key: Item}, each Item knowing its shape and dtype and how to read its tensor, so
   the .safetensors header (8-byte little-endian length, JSON of dtype/shape/data_offsets) is written first
   and then every tensor's bytes one at a time, hashed (SHA-256) as they are written. Peak memory is about the
   largest tensor, not the file.
3. Everything is written under a temporary name next to the target; the result is re-read from disk and
   checked (the safetensors library must parse it; keys, shapes, dtypes and each tensor's SHA-256 must match
   what was planned) before it is renamed into place. An existing output is replaced only with `force`, and
   only when it is what a conversion writes (a file, or a diffusers folder), never another folder; an input
   is never written to; a failure, Ctrl-C or `kill` (SIGTERM, SIGHUP) removes the temporary files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from . import keymap
from .checkpoint import (
    CLIP_PREFIX,
    CLIP_PREFIX_OLD,
    EMA_PREFIX,
    SCHEDULE_BUFFERS,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    check_state_dict,
    ema_key,
    identify,
    printable,
)
from .inspect_checkpoint import lone_component
from .streaming import (
    DATA,
    DiffusersFolder,
    Item,
    Report,
    path_label,
    atomic_output,
    cast,
    item,
    open_source,
    reshape,
    vae_items,
    verify,
    write_verified,
)

SD1_KINDS = ("sd1", "sd1-inpainting")
# --------------------------------------------------------------------------------------------------
# The diffusers folder


def _meta(items: dict[str, Item]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(it.shape, device="meta") for k, it in items.items()}


def diffusers_component(component: str, items: dict[str, Item]) -> tuple[dict[str, Item], dict[str, str], dict]:
    """One component's {diffusers key: Item}, {diffusers key: component key}, and its config.json.

    `items` are keyed relative to the component (text encoder: relative to `cond_stage_model.transformer.`).
    """
    from .clip import CLIPTextConfig
    from .unet import UNetConfig
    from .vae import VAEConfig

    names = keymap.to_diffusers(component, items)  # refuses two keys of one name (a text encoder stored twice)
    out = {}
    for key, dkey in names.items():
        it = items[key]
        if component == "vae" and keymap.is_vae_attention_weight(dkey) and len(it.shape) == 4:
            it = reshape(it, it.shape[:2])  # 1×1 conv -> linear
        out[dkey] = it
    if component == "unet":
        config = keymap.unet_config(UNetConfig.from_state_dict(_meta(items)))
    elif component == "vae":
        config = keymap.vae_config(VAEConfig.from_state_dict(_meta(items)))
    else:
        relative = {k.removeprefix("text_model."): it for k, it in items.items()}
        config = keymap.text_encoder_config(CLIPTextConfig.from_state_dict(_meta(relative)))  # "float32" whatever the weights
    return out, {d: k for k, d in names.items()}, config


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tokenizer(folder: Path) -> None:
    """tokenizer/: CLIP's vocabulary and merges (sd15's package data) and the configs transformers reads."""
    folder.mkdir()
    shutil.copyfile(DATA / "clip_vocab.json", folder / "vocab.json")
    shutil.copyfile(DATA / "clip_merges.txt", folder / "merges.txt")
    _write_json(folder / "tokenizer_config.json", keymap.TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", keymap.SPECIAL_TOKENS)


def write_diffusers_folder(folder: Path, model: dict[str, Item], inpainting: bool, progress: bool) -> int:
    """Write the three components of an original-layout `model` as a diffusers folder, each weights file
    verified on its own, then the whole folder re-read through DiffusersFolder (the inverse key rules) and
    checked against the original keys, shapes, dtypes and bytes. Returns the number of bytes of weights."""
    folder.mkdir()
    parts = keymap.split_original(model)
    expected, total = {}, 0
    for component in keymap.COMPONENTS:
        items = {k: model[fk] for k, fk in parts[component].items()}
        files, back, config = diffusers_component(component, items)
        (folder / component).mkdir()
        _write_json(folder / component / "config.json", config)
        digests = write_verified(folder / component / f"{keymap.WEIGHTS_NAME[component]}.safetensors", files, {"format": "pt"}, progress)
        for dkey, it in files.items():
            key = parts[component][back[dkey]]  # the source's key
            name = CLIP_PREFIX_OLD + dkey if component == "text_encoder" else key  # how DiffusersFolder names it
            attention = component == "vae" and keymap.is_vae_attention_weight(dkey)
            shape = it.shape + (1, 1) if attention else it.shape  # read back as 1×1 convs, whichever the source had
            expected[name] = (shape, it.dtype, digests[dkey])
            total += it.nbytes
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    _write_json(folder / "scheduler" / "scheduler_config.json", keymap.SCHEDULER_CONFIG)
    _write_json(folder / "model_index.json", keymap.model_index(inpainting))
    view = DiffusersFolder(folder, copy=False)
    verify(view, expected, f"{path_label(folder)} read back as an original checkpoint", progress, ignore=view.synthesized)
    return total


# --------------------------------------------------------------------------------------------------
# Conversions


def _vae_replacement(path: Path, current: dict[str, Item], notes: list[str]) -> dict[str, Item]:
    """{VAE key relative to first_stage_model.: Item} from a VAE file (original or diffusers layout, bare or
    prefixed), a diffusers VAE folder, or a full SD1.x checkpoint; checked against the model's VAE."""
    from .vae import AutoencoderKL, VAEConfig

    try:
        items = vae_items(path, notes)  # attention weights as 1×1 convs, [C, C, 1, 1]
    except CheckpointError as e:
        raise CheckpointError(f"--vae: {e}") from None
    if current:
        expected = {k: _conv_form(k, it.shape) for k, it in current.items()}
    else:  # a model without a VAE: the file must hold a whole VAE of some size
        with torch.device("meta"):
            config = VAEConfig.from_state_dict(_meta(items)) if "encoder.conv_in.weight" in items else VAEConfig()
            expected = {k: tuple(v.shape) for k, v in AutoencoderKL(config).state_dict().items()}
    check_state_dict(f"replacement VAE ({path})", expected, {k: it.shape for k, it in items.items()})
    out = {}
    for k, it in items.items():
        if k in current and current[k].shape != it.shape:  # the model's attention weights are [C, C]: keep its form
            it = reshape(it, current[k].shape)
        out[k] = cast(it, current[k].dtype if k in current else None)
    return out


def _conv_form(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A VAE attention weight's shape as a 1×1 convolution's, [C, C, 1, 1], if it is stored as a linear layer's."""
    return tuple(shape) + (1, 1) if keymap.is_vae_attention_weight(key) and len(shape) == 2 else tuple(shape)


COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}


def _check_architecture(source, model: dict[str, Item], only: str | None = None) -> None:
    """Refuse, before anything is written, an original-layout model whose UNet, VAE or text encoder lacks
    tensors or holds ones of the wrong shape or of no module: each component present (or `only` that one)
    is built on the meta device from the configuration its shapes give, as sd15.load builds it, and its
    planned tensors are checked against it by name and shape. The text encoder's position_ids may be missing:
    it is always arange(77), and diffusers folders rebuild it. Schedule buffers and other extras are not checked."""
    parts = {c: {k: model[fk] for k, fk in part.items()} for c, part in keymap.split_original(model).items() if part}
    _check_components(source, {c: items for c, items in parts.items() if only in (None, c)})


def _check_components(source, components: dict[str, dict[str, Item]]) -> None:
    """`_check_architecture` of {component: {key relative to the component's prefix: Item}} (the text encoder's
    keys relative to `cond_stage_model.transformer.`), every problem named in one error."""
    from .clip import CLIPTextConfig, CLIPTextModel
    from .unet import UNet, UNetConfig
    from .vae import AutoencoderKL, VAEConfig

    modules = {"unet": (UNet, UNetConfig), "vae": (AutoencoderKL, VAEConfig), "text_encoder": (CLIPTextModel, CLIPTextConfig)}
    problems = []
    for component, items in components.items():
        module, config_class = modules[component]
        shapes = {_relative(component, k): _conv_form(k, it.shape) for k, it in items.items()}
        name = f"{COMPONENT_NAMES[component]} ({source})"
        try:
            config = config_class.from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
        except (KeyError, ValueError, IndexError) as e:
            why = f"it has no {printable(e.args[0])}" if isinstance(e, KeyError) else str(e)
            problems.append(f"The {name} weights are incomplete or not SD1.x's: sd15 cannot read the layout off them ({why})")
            continue
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in module(config).state_dict().items()}
        if "embeddings.position_ids" not in shapes:
            expected.pop("embeddings.position_ids", None)
        try:
            check_state_dict(name, expected, shapes)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("\n".join(problems) + "\nNothing was written; convert a complete SD1.x checkpoint "
                              "(was this one cut short, or edited?)")  # fmt: skip


def _relative(component: str, key: str) -> str:
    """A component-relative key as sd15's module names it (the text encoder's without `text_model.`)."""
    return key.removeprefix("text_model.") if component == "text_encoder" else key


def _require_sd1(path, info) -> None:
    if info.kind not in SD1_KINDS:
        raise CheckpointError(f"{path} is {info.description}. This conversion needs a Stable Diffusion 1.x checkpoint "
                              "(its key rules are SD1.x's); only a plain .safetensors/dtype conversion takes any file.")  # fmt: skip


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    ema: bool = False,
    prune: bool = False,
    vae: str | os.PathLike | None = None,
    component: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Report:
    """Convert a checkpoint. OUTPUT ending in .safetensors is a single file in the original layout; any other
    name is a diffusers folder. With no option this changes only the container (e.g. .ckpt -> .safetensors,
    or diffusers folder -> single file); `dtype` casts floating tensors; `ema` makes model_ema.* the UNet;
    `prune` keeps only the UNet, VAE and text encoder; `vae` replaces the VAE; `component` ("unet", "vae",
    "text_encoder") writes that part alone, keys relative to its prefix (or as a diffusers component folder).
    An input that holds one component alone (a diffusers component folder, a VAE file, a file `component`
    wrote) takes `component` naming that component, to be written as a component folder or file.

    Every SD1.x component written, but for a plain single-file container or dtype conversion (which copies any
    file as it is), is first checked against its architecture: a missing or mis-shaped tensor is refused.
    """
    start, source, output = time.time(), Path(source), Path(output)
    to_folder = _writes_folder(output)
    report = Report(output)
    with _terminate_as_interrupt(), atomic_output(output, force, [source] + ([Path(vae)] if vae else [])) as tmp:
        _check_replaceable(output, to_folder)
        view = open_source(source, report.notes)
        info = identify(view)
        model = {k: item(view, k) for k in view.keys()}
        sd1_rules = to_folder or ema or prune or vae or component  # these need the SD1.x key rules
        alone = None  # the component that the input holds alone
        if isinstance(view, DiffusersFolder):  # read through the SD1.x key rules
            _require_sd1(source, info)
            model = _schedule_in_model_dtype(model)
        elif source.is_dir():  # a diffusers component folder (config.json and its weights)
            alone, model = _component_folder(source, model)
        elif sd1_rules and info.kind not in SD1_KINDS:
            alone = lone_component(info, model.keys())
            if alone is None:
                _require_sd1(source, info)
            model = _lone_component(source, view, alone, model, report.notes)
        if alone:
            _check_lone(source, alone, to_folder, component, {"--ema": ema, "--prune": prune, "--vae": vae})
            _check_components(source, {alone: model})
        elif sd1_rules:
            _require_sd1(source, info)
            model = _select(source, info, model, ema, prune or (to_folder and not component), vae, report.notes)
            if to_folder and not component:
                _require_components(source, model)
            _check_architecture(source, model, only=component)
            if component:
                model = _component(source, model, component, report.notes)
        elif isinstance(view, DiffusersFolder):
            _check_architecture(source, model)
        model = {k: cast(it, dtype) for k, it in model.items()}
        if component:
            if to_folder:
                files, _, config = diffusers_component(component, model)
                tmp.mkdir()
                _write_json(tmp / "config.json", config)
                write_verified(tmp / f"{keymap.WEIGHTS_NAME[component]}.safetensors", files, {"format": "pt"}, progress)
            else:
                write_verified(tmp, model, {"format": "pt"}, progress)
        elif to_folder:
            write_diffusers_folder(tmp, model, info.kind == "sd1-inpainting", progress)
        else:
            write_verified(tmp, model, {**getattr(view, "metadata", {}), "format": "pt"}, progress)
    report.tensors, report.bytes = len(model), sum(it.nbytes for it in model.values())
    report.seconds = time.time() - start
    return report


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Make `kill` (SIGTERM) and a closed terminal (SIGHUP) stop a conversion as Ctrl-C does, so that
    atomic_output removes its temporary files; by default these signals end Python with no cleanup at all."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    names = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, interrupt) for s in names}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _check_replaceable(output: Path, to_folder: bool) -> None:
    """An existing output (`force`) is replaced only by its own kind: a .safetensors file by a file, a diffusers
    folder (model_index.json, or a component's config.json) by a folder; never a folder of other files."""
    if not output.exists():
        return
    if to_folder:
        ours = output.is_dir() and ((output / "model_index.json").is_file() or (output / "config.json").is_file())
    else:
        ours = output.is_file()
    if not ours:
        what = "a diffusers folder (no model_index.json or config.json)" if to_folder else "a file"
        raise ValueError(f"{output} exists and is not {what}; it is not replaced, even with --force. "
                         "Choose another output, or remove it yourself")  # fmt: skip


def _schedule_in_model_dtype(model: dict[str, Item]) -> dict[str, Item]:
    """A diffusers folder's rebuilt schedule buffers (float32) in the UNet's dtype, as a model cast whole
    (`.half()`) stores them, so that such a file comes back from its diffusers folder bit for bit."""
    unet = model.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet is None:
        return model
    return {k: cast(it, unet.dtype) if k in SCHEDULE_BUFFERS else it for k, it in model.items()}


def _component_folder(source: Path, model: dict[str, Item]) -> tuple[str, dict[str, Item]]:
    """Which component a diffusers component folder holds, and its tensors under the original layout's names
    (without the component's prefix, as `--component` writes them): the inverse of writing a component folder."""
    try:
        config = json.loads((source / "config.json").read_text())
        name = str(config.get("_class_name") or config["architectures"][0])
    except (OSError, ValueError, AttributeError, KeyError, IndexError, TypeError):
        raise CheckpointError(f"{source / 'config.json'} does not name the component's class") from None
    component = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}.get(name)
    if component is None:
        raise CheckpointError(f"{source} holds a {printable(name)}; sd15 converts SD1.x components "
                              "(UNet2DConditionModel, AutoencoderKL, CLIPTextModel)")  # fmt: skip
    out = {}
    for dkey, key in keymap.from_diffusers(component, model).items():
        it = model[dkey]
        attention = component == "vae" and keymap.is_vae_attention_weight(dkey) and len(it.shape) == 2
        out[key] = reshape(it, it.shape + (1, 1)) if attention else it  # linear -> 1×1 conv
    return component, out


def _lone_component(source, view, component: str, model: dict[str, Item], notes: list[str]) -> dict[str, Item]:
    """A file of one component alone, as `--component` writes it or as VAE files ship, in the original layout
    keyed relative to the component's prefix (a VAE or UNet in the diffusers layout is renamed)."""
    if component == "vae":  # bare or prefixed keys, either layout, training extras left out
        return vae_items(source, notes, view)
    if component == "unet" and "conv_in.weight" in model:  # the diffusers layout
        return {key: model[dkey] for dkey, key in keymap.from_diffusers("unet", model).items()}
    return model


def _check_lone(source, alone: str, to_folder: bool, component: str | None, options: dict) -> None:
    """A component alone converts only to that component, as a component folder or a file."""
    name = COMPONENT_NAMES[alone]
    given = [flag for flag, value in options.items() if value]
    if given:
        raise CheckpointError(f"{source} holds a {name} alone; {' and '.join(given)} need{'s' * (len(given) == 1)} "
                              "a whole SD1.x model")  # fmt: skip
    if component and component != alone:
        raise CheckpointError(f"{source} holds a {name} alone, not a {COMPONENT_NAMES[component]}; "
                              f"pass --component {alone}, or a whole SD1.x model")  # fmt: skip
    if to_folder and not component:
        raise CheckpointError(f"{source} holds a {name} alone; to write it as a diffusers component folder "
                              f"(config.json and weights), add --component {alone}")  # fmt: skip


def _writes_folder(output: Path) -> bool:
    """Whether OUTPUT names a diffusers folder (any name but NAME.safetensors, in any case); pickles are refused."""
    suffix = output.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise ValueError(f"sd15 writes .safetensors files only (a pickle can carry code): {output}")
    return suffix != ".safetensors"


def _select(source, info, model: dict[str, Item], ema: bool, prune: bool, vae, notes: list[str]) -> dict[str, Item]:
    """An SD1.x model's tensors after EMA extraction, VAE replacement and pruning, in the original layout."""
    if ema:
        model = _use_ema(source, info, model, notes)
    if vae:
        current = {k: model.pop(fk) for k, fk in keymap.split_original(model)["vae"].items()}
        model.update({VAE_PREFIX + k: it for k, it in _vae_replacement(Path(vae), current, notes).items()})
    if prune:
        extras = [k for k in model if not k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX_OLD))]
        if extras:
            notes.append(f"{len(extras)} tensors outside the UNet, VAE and text encoder are not written ({_summarise(extras)})")
        model = {k: it for k, it in model.items() if k not in extras}
    return model


def _require_components(source, model: dict[str, Item]) -> None:
    missing = [c for c, part in keymap.split_original(model).items() if not part]
    if missing:
        raise CheckpointError(f"{source} has no {' or '.join(missing)} weights"
                              + ("; add a VAE with --vae FILE" if missing == ["vae"] else ""))  # fmt: skip


def _component(source, model: dict[str, Item], component: str, notes: list[str]) -> dict[str, Item]:
    """One component's tensors, keyed relative to its prefix."""
    part = keymap.split_original(model)[component]
    if not part:
        raise CheckpointError(f"{source} has no {component} weights")
    notes.append(f"only the {component} is written ({len(part)} of {len(model)} tensors)")
    return {k: model[fk] for k, fk in part.items()}


def _summarise(keys: list[str]) -> str:
    from .checkpoint import SCHEDULE_BUFFERS

    ema = sum(k.startswith(EMA_PREFIX) for k in keys)
    schedule = sum(k in SCHEDULE_BUFFERS for k in keys)
    other = [k for k in keys if not k.startswith(EMA_PREFIX) and k not in SCHEDULE_BUFFERS]
    parts = [f"{ema} EMA"] * bool(ema) + [f"{schedule} schedule buffers"] * bool(schedule)
    parts += [f"{len(other)} other: {', '.join(map(printable, other[:3]))}{'…' if len(other) > 3 else ''}"] * bool(other)
    return ", ".join(parts)


def _use_ema(source, info, model: dict[str, Item], notes: list[str]) -> dict[str, Item]:
    """The model with its UNet taken from model_ema.* and the EMA tensors themselves left out."""
    if not info.has_ema:
        raise CheckpointError(f"{source} has no EMA weights (no model_ema.* keys)")
    unet = [k for k in model if k.startswith(UNET_PREFIX)]
    missing = [ema_key(k[len(UNET_PREFIX):]) for k in unet if ema_key(k[len(UNET_PREFIX):]) not in model]
    if missing:
        raise CheckpointError(f"{source}'s EMA weights are incomplete: {len(missing)} missing, e.g. {printable(missing[0])}")
    out = {k: it for k, it in model.items() if not k.startswith(EMA_PREFIX)}
    for k in unet:
        it = model[ema_key(k[len(UNET_PREFIX):])]
        if it.shape != model[k].shape:
            raise CheckpointError(f"{source}: the EMA copy of {printable(k)} has shape {list(it.shape)}, the UNet {list(model[k].shape)}")
        out[k] = it
    notes.append(f"the UNet is the EMA copy (model_ema.*), not written again under model_ema. ({len(model) - len(out)} tensors)")
    return out


# --------------------------------------------------------------------------------------------------
# Merging


def canonical_keys(view) -> dict[str, str]:
    """{canonical key: file key} for a model's UNet, VAE and text encoder; the text encoder's older key form
    (`cond_stage_model.transformer.embeddings…`) is named as the newer (`…transformer.text_model.embeddings…`)."""
    out = {}
    for component, part in keymap.split_original(view.keys()).items():
        for key, file_key in part.items():
            if component == "text_encoder":
                out[CLIP_PREFIX + key.removeprefix("text_model.")] = file_key
            else:
                out[keymap.ORIGINAL_PREFIX[component] + key] = file_key
    return out


def merge(
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    *,
    alpha: float = 0.5,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
) -> Report:
    """Merge SD1.x models tensor by tensor, in fp32:

    two inputs (A, B): weighted sum, (1 - alpha)·A + alpha·B (`torch.lerp`, exact at alpha 0 and 1);
    three inputs (A, B, C): add difference, A + alpha·(B - C), e.g. to move a fine-tune's change (B - C,
    C its base model) onto another model A. When A is an inpainting model and B, C are not, the difference
    goes into the first four input channels of the UNet's first convolution.

    Only the UNet, VAE and text encoder are merged (EMA copies and other extras are left out); integer
    tensors (position_ids) come from A; every other tensor must match in name and shape in all inputs (a VAE
    attention weight stored as [C, C] matches its 1×1 convolution form [C, C, 1, 1], and is written in A's form).
    """
    start, output = time.time(), Path(output)
    if len(inputs) not in (2, 3):
        raise ValueError(f"merge takes two models (weighted sum) or three (add difference), got {len(inputs)}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    to_folder = _writes_folder(output)
    with _terminate_as_interrupt(), atomic_output(output, force, [Path(p) for p in inputs]) as tmp:
        _check_replaceable(output, to_folder)
        notes = []  # which weights file a folder was read from, where it had several
        views = [open_source(p, notes) for p in inputs]
        infos = [identify(v) for v in views]
        for path, info in zip(inputs, infos):
            if info.kind not in SD1_KINDS:
                raise CheckpointError(f"cannot merge {path}: it is {info.description}; sd15 merges SD1.x models")
        names = [canonical_keys(v) for v in views]
        first_conv = UNET_PREFIX + "input_blocks.0.0.weight"
        inpaint_into = len(inputs) == 3 and infos[0].kind == "sd1-inpainting" and infos[1].kind == infos[2].kind == "sd1"
        expected = {k: _conv_form(k, views[0].shape(fk)) for k, fk in names[0].items()}
        for path, view, n in zip(inputs[1:], views[1:], names[1:]):
            found = {k: _conv_form(k, view.shape(fk)) for k, fk in n.items()}
            if inpaint_into:
                found[first_conv] = expected[first_conv]
            differences = _architecture_differences(expected, found)
            if differences:
                raise CheckpointError(f"cannot merge {inputs[0]} ({infos[0].kind}) with {path}: the architectures differ:\n  "
                                      + "\n  ".join(differences))  # fmt: skip
        model = {}
        for key, file_key in names[0].items():
            a = item(views[0], file_key)
            form = a.shape if keymap.is_vae_attention_weight(key) else None  # [C, C] or [C, C, 1, 1], as A has it
            others = [partial(_read, v, n[key], form) for v, n in zip(views[1:], names[1:])]
            model[file_key] = cast(Item(a.shape, a.dtype, partial(_merged, a, others, alpha, key == first_conv)), dtype)
        if to_folder:
            _require_components(inputs[0], model)
        _check_architecture(inputs[0], model)
        notes.append(f"{'weighted sum' if len(inputs) == 2 else 'add difference'} with alpha {alpha}")
        if to_folder:
            write_diffusers_folder(tmp, model, infos[0].kind == "sd1-inpainting", progress)
        else:
            write_verified(tmp, model, {"format": "pt", "sd15_merge": json.dumps(
                {"inputs": [str(p) for p in inputs], "alpha": alpha})}, progress)  # fmt: skip
    return Report(output, len(model), sum(it.nbytes for it in model.values()), notes, time.time() - start)


def _read(view, key: str, shape: tuple | None) -> torch.Tensor:
    """A tensor of another merge input, reshaped to `shape` (A's form of a VAE attention weight) if given."""
    tensor = view.get(key)
    return tensor if shape is None else tensor.reshape(shape)


def _merged(a: Item, others: list[Callable], alpha: float, first_conv: bool) -> torch.Tensor:
    x = a.read()
    if not x.is_floating_point():
        return x
    out = x.float()
    tensors = [get().float() for get in others]
    if len(tensors) == 1:
        out = torch.lerp(out, tensors[0], alpha)
    elif first_conv and out.shape != tensors[0].shape:  # inpainting A: its first 4 channels are the latent's
        n = tensors[0].shape[1]
        out = out.clone()
        out[:, :n] += alpha * (tensors[0] - tensors[1])
    else:
        out = out + alpha * (tensors[0] - tensors[1])
    return out.to(a.dtype)


def _architecture_differences(a: dict[str, tuple], b: dict[str, tuple]) -> list[str]:
    """What keeps two models' tensors from pairing up: keys only in one, and shapes that differ (first few)."""
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    shapes = [f"{k}: {list(a[k])} vs {list(b[k])}" for k in a if k in b and a[k] != b[k]]
    out = []
    for label, items in (("only in the first", only_a), ("only in the other", only_b), ("shapes differ", shapes)):
        if items:
            out.append(f"{len(items)} {label}: " + ", ".join(map(printable, items[:4])) + (" …" if len(items) > 4 else ""))
    return out
