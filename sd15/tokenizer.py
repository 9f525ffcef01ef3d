"""CLIP's byte-pair-encoding tokenizer, as used by SD1.5's text encoder.

A prompt becomes token ids in four steps, following OpenAI's `clip/simple_tokenizer.py`:

1. Clean the text (in Python): `ftfy.fix_text` repairs broken unicode, HTML entities are unescaped
   (twice, for doubly escaped text), whitespace runs collapse to one space, and everything is lowercased.
2. Split it into words with CLIP's regex: the two special tokens, the contractions 's 't 're 've 'm 'll 'd,
   runs of letters, single digits, and runs of other non-space characters. Spaces are dropped.
3. Write each word's UTF-8 bytes as printable characters (GPT-2's byte-to-unicode map), so that every
   string can be tokenized and nothing is ever unknown.
4. Apply byte-pair encoding: start from single characters, with `</w>` appended to the last one to mark
   the end of the word, and merge adjacent pairs in the order of the 48894 learned merges. Each final
   piece is one vocabulary entry, e.g. "astronaut" -> "astronaut</w>" -> 18376.

Steps 2-4 run in the `tokenizers` library. The vocabulary and merges come from OpenAI's CLIP release
(see `scripts/make_tokenizer_files.py`). SD1.5 always feeds the text encoder T = 77 tokens:
`<|startoftext|>`, at most 75 content tokens, `<|endoftext|>`, then `<|endoftext|>` as padding.
"""

import html
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import ftfy
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

# CLIP's word-splitting pattern; OpenAI compiles it case-insensitively, hence (?i).
CLIP_SPLIT_PATTERN = (
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def clean_text(text: str) -> str:
    """OpenAI's `basic_clean` + `whitespace_clean` + lowercase, applied before BPE."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower()


@dataclass
class TokenizedPrompts:
    """A batch of prompts as fixed-length token ids, with what was lost to truncation."""

    ids: torch.Tensor  # (B, T) int64: BOS, content, EOS, EOS padding
    num_truncated: list[int]  # content tokens dropped from each prompt to fit T
    lengths: list[int]  # tokens in each row before padding, BOS and EOS included (so EOS sits at lengths - 1)


class CLIPTokenizer:
    """Text -> (B, 77) token ids for SD1.5's CLIP text encoder.

    `tok(prompts)` gives the ids; `tok.encode(prompts)` also reports truncation; `tok.tokenize(text)` gives
    a single prompt's content ids with no special tokens and no length limit; `tok.decode(ids)` inverts it.
    """

    BOS = 49406  # <|startoftext|>
    EOS = 49407  # <|endoftext|>
    PAD = 49407  # SD1.5 pads with <|endoftext|>
    MAX_LENGTH = 77  # T: BOS + 75 content tokens + EOS
    MAX_CONTENT = MAX_LENGTH - 2  # 75

    def __init__(self, vocab_path: str | Path | None = None, merges_path: str | Path | None = None):
        """Load the vocabulary and merges; defaults are the package data in `sd15/data`."""
        data = resources.files("sd15") / "data"
        vocab_file = Path(vocab_path) if vocab_path else data / "clip_vocab.json"
        merges_file = Path(merges_path) if merges_path else data / "clip_merges.txt"
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merge_lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
        assert vocab["<|startoftext|>"] == self.BOS and vocab["<|endoftext|>"] == self.EOS

        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),  # keep matches only
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars
        ])
        tokenizer.decoder = decoders.ByteLevel()
        # The special tokens are matched whole, before splitting, so "<|endoftext|>" in a prompt is one token.
        tokenizer.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
        self._tokenizer = tokenizer

    def tokenize(self, text: str) -> list[int]:
        """Content token ids of one prompt: no BOS/EOS, no truncation."""
        return self._tokenizer.encode(clean_text(text), add_special_tokens=False).ids

    def encode(self, prompts: str | list[str]) -> TokenizedPrompts:
        """Tokenize, truncate to 75 content tokens, add BOS/EOS and pad to 77 with EOS."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cleaned = [clean_text(p) for p in prompts]
        encodings = self._tokenizer.encode_batch(cleaned, add_special_tokens=False)

        ids = torch.full((len(prompts), self.MAX_LENGTH), self.PAD, dtype=torch.long)  # (B, T)
        num_truncated, lengths = [], []
        for row, encoding in zip(ids, encodings):
            content = encoding.ids[: self.MAX_CONTENT]
            tokens = [self.BOS, *content, self.EOS]
            row[: len(tokens)] = torch.tensor(tokens)
            num_truncated.append(len(encoding.ids) - len(content))
            lengths.append(len(tokens))
        return TokenizedPrompts(ids=ids, num_truncated=num_truncated, lengths=lengths)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, 77) int64 token ids; a single string gives B = 1."""
        return self.encode(prompts).ids

    def decode(self, ids) -> str:
        """Token ids (list or 1-D tensor) -> text, dropping BOS/EOS/padding; each `</w>` becomes a space."""
        ids = [int(i) for i in ids if int(i) not in (self.BOS, self.EOS)]
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text.replace("</w>", " ").strip()
