"""Tests for sd15.tokenizer: the FACTS.md example, agreement with transformers' CLIPTokenizer built from the
same vocabulary, the places where OpenAI's text cleaning (which we follow) differs from transformers',
truncation bookkeeping, decoding, the package data's reproducibility, and robustness to arbitrary text."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from sd15.tokenizer import CLIPTokenizer, clean_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "sd15" / "data"
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """transformers' CLIPTokenizer (a `tokenizers`-backed class in 5.x) from our files, under the names it expects."""
    hf_dir = tmp_path_factory.mktemp("hf_clip_tokenizer")
    shutil.copyfile(DATA_DIR / "clip_vocab.json", hf_dir / "vocab.json")
    shutil.copyfile(DATA_DIR / "clip_merges.txt", hf_dir / "merges.txt")
    return transformers.CLIPTokenizer.from_pretrained(hf_dir)


def hf_ids(hf_tok, texts: list[str]) -> torch.Tensor:
    return hf_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_facts_example(tok):
    ids = tok("a photo of an astronaut riding a horse on mars")
    expected = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407] + [49407] * 65
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == expected


# Text where OpenAI's cleaning and transformers' (NFC, collapse whitespace, lowercase) give the same result.
AGREEING_CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "Hello, World! How are you?? ...fine; thanks: (really) [sure] {ok} <tag> a|b @user #tag $5 50% ^_^ ~*~ `x`",
    "digits 1234567890 and 3.14159, 1e-3, 2024-01-01 12:30",
    "café naïve résumé Ångström São Paulo Zürich crème brûlée e\u0301",  # the last is a decomposed é (NFC in both)
    "Straße İstanbul ΑΘΗΝΑ Москва",
    "東京タワーの夜景, 北京, 서울의 밤",
    "🐶🔥 a dog on fire 👩‍🚀 astronaut 🏳️‍🌈 flag",
    "tabs\tand\nnewlines\r\n and   many     spaces \u00a0 and\u3000ideographic space",
    "UPPERCASE Words MiXeD CaSe",
    "it's the dog's bone, they're here, we've been, I'm sure, we'll see, he'd go, don't",
    "IT'S THEY'RE WE'VE I'M WE'LL HE'D DON'T",
    "rock & roll, a < b > c, a;b",
    "x<|endoftext|>y and <|startoftext|> literal special tokens",
    "masterpiece, best quality, " * 30,  # truncated to 75 content tokens
    "a " * 200,
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 10,
]


def test_agrees_with_transformers(tok, hf_tok):
    assert torch.equal(tok(AGREEING_CORPUS), hf_ids(hf_tok, AGREEING_CORPUS))


# transformers 5.x's CLIPTokenizer does not run ftfy or html.unescape, and lowercases character by character,
# whereas OpenAI's tokenizer (and ours) runs ftfy.fix_text, unescapes HTML twice and uses Python's str.lower.
# For these texts transformers gives different ids; it agrees once given our cleaned text, and each has an
# explicit expectation below.
NORMALISATION_CORNERS = {
    "rock &amp; roll &lt;3": "rock & roll <3",  # HTML entities
    "&amp;amp; doubly escaped": "& doubly escaped",
    "it\u2019s \u201cquoted\u201d": "it's \"quoted\"",  # ftfy uncurls quotes
    "sch\u00c3\u00b6n": "schön",  # ftfy repairs mojibake (UTF-8 read as Latin-1)
    "\uff21\uff22\uff23 \ufb01ne": "abc fine",  # fullwidth letters and the "fi" ligature
    "a\x1cb\x00c \ufeffd": "abc d",  # control characters and a byte-order mark are removed
    "ΟΔΟΣ": "οδος",  # str.lower() gives a final sigma at the end of a word; tokenizers' Lowercase gives σ
}


@pytest.mark.parametrize("text, cleaned", NORMALISATION_CORNERS.items())
def test_openai_normalisation_corners(tok, hf_tok, text, cleaned):
    assert clean_text(text) == cleaned
    assert tok.tokenize(text) == tok.tokenize(cleaned)
    assert torch.equal(tok(text), hf_ids(hf_tok, [cleaned]))
    assert not torch.equal(tok(text), hf_ids(hf_tok, [text])), "transformers now cleans this text like OpenAI"


def test_case_insensitive_contraction(tok, hf_tok):
    # OpenAI compiles the split pattern with IGNORECASE, under which the long s "ſ" folds to "s", so "'ſ"
    # is matched by the contraction 's and stays one word: "'" (6) then ſ's UTF-8 bytes c5 bf (129, 379 = "¿</w>").
    # transformers' pattern is case-sensitive and splits it into "'</w>" (262) and "ſ".
    assert tok.tokenize("'ſ") == [6, 129, 379]
    assert hf_tok("'ſ", add_special_tokens=False).input_ids == [262, 129, 379]


def test_special_token_after_punctuation(tok):
    # We, like transformers, match special tokens before splitting. OpenAI's split regex would take "!<|" as one
    # punctuation run and BPE "<|endoftext|>" as ordinary text; a prompt never contains this in practice.
    assert tok.tokenize("!<|endoftext|>") == [256, EOS]  # "!</w>", <|endoftext|>
    assert tok.tokenize("a <|startoftext|>b") == [320, BOS, 321]


def test_truncation_counts(tok):
    long_prompt = "red " * 100
    result = tok.encode(["a red apple", long_prompt])
    assert result.num_truncated == [0, 25]
    assert result.lengths == [5, 77]
    assert result.ids[1].tolist() == [BOS] + [736] * 75 + [EOS]  # 736 = "red</w>"
    assert len(tok.tokenize(long_prompt)) == 100  # tokenize() does not truncate


def test_batch(tok):
    prompts = ["a cat", "a photo of an astronaut riding a horse on mars", ""]
    result = tok.encode(prompts)
    assert result.ids.shape == (3, 77)
    assert result.lengths == [4, 12, 2]
    for row, prompt, length in zip(result.ids, prompts, result.lengths):
        assert torch.equal(row, tok(prompt)[0])
        assert row[0] == BOS and row[length - 1] == EOS and (row[length:] == EOS).all()
    assert tok("a cat").shape == (1, 77)


def test_decode_round_trip(tok):
    sentence = "a photo of an astronaut riding a horse on mars"
    assert tok.decode(tok(sentence)[0]) == sentence
    assert tok.decode(tok.tokenize("Café, 東京!")) == "café , 東京 !"  # each word ends in </w>, hence the spaces


def test_package_data_regenerates_identically(tmp_path):
    """The shipped vocabulary and merges are exactly what the script makes from OpenAI's BPE file (a copy of
    which, with its licence, is in tests/data/clip-bpe)."""
    script = REPO_ROOT / "scripts" / "make_tokenizer_files.py"
    bpe = Path(__file__).parent / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
    subprocess.run([sys.executable, str(script), str(bpe), "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for name in ["clip_vocab.json", "clip_merges.txt", "LICENSE-clip-bpe.txt"]:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text(tok, text):
    result = tok.encode(text)
    ids = result.ids[0]
    assert ids.shape == (77,)
    assert ids[0] == BOS and EOS in ids[1:].tolist()
    assert ((ids >= 0) & (ids < 49408)).all()
    assert result.num_truncated[0] == max(0, len(tok.tokenize(text)) - 75)
