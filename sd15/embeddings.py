"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new words for the text encoder.

An embedding file holds one or more vectors in the text encoder's input space (D = 768 for SD1.x), learned so
that a trigger word stands for a concept. sd15 reads the two file formats in use:

- the AUTOMATIC1111 web UI's `.pt` / `.safetensors`: `{"string_to_param": {"*": (n, D)}, "name": …, …}` (the
  original textual-inversion code's files hold an nn.ParameterDict there), or `{"emb_params": (n, D)}`; the
  trigger word is the file's name without its extension (as that UI uses);
- diffusers' `learned_embeds.bin` / `.safetensors`: `{token: (D,) or (n, D)}`; the trigger word is the token.

The model's own token table is never changed. A trigger word's vectors get token ids after the vocabulary
(49408, 49409, …); the tokenizer path (`sd15.prompts.tokenize_prompt`) replaces the trigger word's tokens by
those ids, and the text encoder looks them up in `EmbeddingSet.vectors` instead of its table. Removing an
embedding from the set undoes it completely.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError

if TYPE_CHECKING:
    from .model import StableDiffusion

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


@dataclass
class TextualInversion:
    """One embedding: its trigger word and its vectors (n, D), float32 on the CPU."""

    name: str
    vectors: torch.Tensor  # (n, D)
    path: Path | None = None
    hash: str | None = None  # first 12 hex digits of the file's SHA-256 (the web UI's "TI hashes")

    @property
    def width(self) -> int:
        return self.vectors.shape[-1]


def file_hash(path: str | os.PathLike, skip: int = 0) -> str:
    """SHA-256 of a file's bytes from offset `skip` on, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_pickle(path: Path):
    """The object in a torch pickle, read with weights_only=True (tensors, dicts, lists, strings, numbers, and
    nn.ParameterDict: the original textual-inversion code saved `string_to_param` as one, and the web UI reads
    those files; unpickling it sets a module's attributes and runs no code of the file's choosing)."""
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; before it, such files are refused
    try:
        with allow([torch.nn.ParameterDict]) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's refusal of a global; other errors: a damaged file
        if found is None:  # torch's text here would suggest weights_only=False, which is never the answer
            raise CheckpointError(f"{path} is not a readable embedding file (truncated or corrupt?)") from None
        raise CheckpointError(
            f"Refused to load {path}: the pickle contains {found[1]}, which could run code (sd15 reads pickles only "
            f"with torch.load(weights_only=True)). Convert it to .safetensors with a tool you trust."
        ) from None
    except Exception as e:  # EOFError, RuntimeError, KeyError (the "load key" of a file that is no pickle), …
        raise CheckpointError(f"{path} is not a readable embedding file (truncated or corrupt?): {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _as_vectors(value, path: Path, key: str) -> torch.Tensor:
    if (not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point()
            or value.layout != torch.strided or value.is_meta):  # fmt: skip
        raise CheckpointError(f"{path}: {key} is not a vector or a (n, D) matrix of vectors")
    if value.numel() == 0:
        raise CheckpointError(f"{path}: {key} holds no numbers (its shape is {tuple(value.shape)})")
    if not torch.isfinite(value).all():
        raise CheckpointError(f"{path}: {key} holds NaN or infinite numbers; the file is damaged")
    return value.detach().float().reshape(-1, value.shape[-1]).cpu()  # (n, D)


def read_embedding(path: str | os.PathLike, name: str | None = None) -> TextualInversion:
    """Read a textual-inversion file (web UI or diffusers format); `name` overrides the trigger word."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No such embedding file: {path}")
    if path.suffix.lower() == ".safetensors":  # the web UI reads suffixes in any case (and so does the folder loader)
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as e:  # the library's own errors for malformed files
            raise CheckpointError(f"{path} is not a valid .safetensors file: {e}") from None
    else:
        data = _read_pickle(path)
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path} is not a textual-inversion embedding (it holds a {type(data).__name__})")

    if "string_to_param" in data:  # the web UI's training output
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])  # a ParameterDict's dict
        if not isinstance(params, dict) or len(params) != 1:
            held = f"{len(params)} entries" if isinstance(params, dict) else f"a {type(params).__name__}"
            raise CheckpointError(f"{path}: string_to_param should be a dict of one entry, it holds {held}")
        vectors, default_name = _as_vectors(next(iter(params.values())), path, "string_to_param"), path.stem
    elif "emb_params" in data:
        vectors, default_name = _as_vectors(data["emb_params"], path, "emb_params"), path.stem
    elif {"clip_l", "clip_g"} & set(data):
        raise CheckpointError(f"{path} is an SDXL embedding (clip_l/clip_g vectors); sd15 runs SD1.x models")
    elif len(data) == 1:  # diffusers: {token: vector(s)}
        token, value = next(iter(data.items()))
        vectors, default_name = _as_vectors(value, path, repr(token)), str(token)
    else:
        keys = ", ".join(map(str, list(data)[:6]))
        raise CheckpointError(f"{path} is not a textual-inversion embedding sd15 recognises (keys: {keys})")
    return TextualInversion(name or default_name, vectors, path, file_hash(path)[:12])


class EmbeddingSet:
    """The textual-inversion embeddings known to a model, each under its trigger word.

    Embedding i's vectors are rows `vector_ids(name)` of `vectors` (N, D); the tokenizer path numbers them
    from the text encoder's vocabulary size up. `match(tokens, pos)` finds the trigger word whose token ids
    start at `tokens[pos]` (the longest one when several do).
    """

    def __init__(self):
        self._items: dict[str, TextualInversion] = {}
        self._triggers: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items.values())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> TextualInversion:
        return self._items[name]

    def add(self, embedding: TextualInversion, trigger_ids: list[int]) -> None:
        """Add (or replace) an embedding; `trigger_ids` are its name's token ids."""
        if not trigger_ids:
            raise ValueError(f"the trigger word {embedding.name!r} has no tokens")
        self._items.pop(embedding.name, None)
        self._items[embedding.name] = embedding
        self._triggers[embedding.name] = list(trigger_ids)

    def remove(self, name: str) -> None:
        del self._items[name], self._triggers[name]

    def clear(self) -> None:
        self._items.clear()
        self._triggers.clear()

    @property
    def vectors(self) -> torch.Tensor:
        """All vectors, in the order the embeddings were added: (N, D)."""
        return torch.cat([e.vectors for e in self._items.values()])

    def vector_ids(self, name: str) -> range:
        """Rows of `vectors` that hold `name`'s vectors."""
        start = 0
        for other in self._items.values():
            if other.name == name:
                return range(start, start + other.vectors.shape[0])
            start += other.vectors.shape[0]
        raise KeyError(name)

    def match(self, tokens: list[int], pos: int) -> tuple[TextualInversion, int] | None:
        """(embedding, number of tokens of its trigger word) if a trigger word starts at tokens[pos]."""
        best = None
        for name, trigger in self._triggers.items():
            if tokens[pos: pos + len(trigger)] == trigger and (best is None or len(trigger) > best[1]):
                best = (self._items[name], len(trigger))
        return best


def add_embedding(m: "StableDiffusion", embedding: TextualInversion) -> TextualInversion:
    """Add an embedding to the model's set, checking that its vectors fit the text encoder."""
    width = m.text_encoder.config.hidden_size
    if embedding.width != width:
        hint = " (a Stable Diffusion 2.x embedding: OpenCLIP ViT-H is 1024 wide)" if embedding.width == 1024 else ""
        where = f"{embedding.path}" if embedding.path else f"embedding {embedding.name!r}"
        raise CheckpointError(
            f"{where} has vectors of width {embedding.width}{hint}; this model's text encoder takes width {width}"
        )
    if embedding.vectors.shape[0] > 75:
        raise CheckpointError(f"embedding {embedding.name!r} has {embedding.vectors.shape[0]} vectors; at most 75 fit a prompt chunk")
    trigger = m.tokenizer.tokenize(embedding.name)
    if not trigger:
        where = f"{embedding.path}" if embedding.path else "an embedding"
        raise CheckpointError(f"{where}: its trigger word {embedding.name!r} has no tokens to match in a prompt; "
                              "rename the file (or pass a name)")  # fmt: skip
    same = m.embeddings.match(trigger, 0)  # another trigger word of exactly these tokens would be unreachable
    if same is not None and same[1] == len(trigger) and same[0].name != embedding.name:
        where = f"{embedding.path}" if embedding.path else "an embedding"
        raise CheckpointError(f"{where}: its trigger word {embedding.name!r} reads as the same tokens as "
                              f"{same[0].name!r}, already loaded (the tokenizer ignores case and extra spaces); "
                              "rename one (or pass a name)")  # fmt: skip
    m.embeddings.add(embedding, trigger)
    return embedding


def load_embedding(m: "StableDiffusion", path: str | os.PathLike, name: str | None = None) -> TextualInversion:
    """Read a textual-inversion file and add it to `m.embeddings` under its trigger word (or `name`).

    Several can be loaded; loading another under the same name replaces it; `m.embeddings.remove(name)`
    undoes it.
    """
    return add_embedding(m, read_embedding(path, name))


def load_embeddings_folder(m: "StableDiffusion", folder: str | os.PathLike) -> list[str]:
    """Load every embedding file in a folder (and its subfolders), as the web UI does with its
    `embeddings/` folder: each under its file name without the extension, whatever token a diffusers file
    stores. Files that cannot be used here (another model family, unreadable, a name another file of the
    folder already gives) are skipped: returns one line per skipped file saying why."""
    skipped, named = [], {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
            continue
        if path.stem in named:
            skipped.append(f"skipped {path}: {named[path.stem]} already gives the trigger word {path.stem!r}")
            continue
        try:
            load_embedding(m, path, name=path.stem)
            named[path.stem] = path
        except CheckpointError as e:
            skipped.append(f"skipped {path}: {e}")
    return skipped

