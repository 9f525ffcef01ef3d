"""Build the CLIP tokenizer's package data from OpenAI's BPE merges file.

Source: `bpe_simple_vocab_16e6.txt.gz`, the byte-pair-encoding merges that OpenAI released with CLIP
(github.com/openai/CLIP, MIT licence) and that open_clip redistributes (github.com/mlfoundations/open_clip,
MIT licence, copied next to the data as `sd15/data/LICENSE-clip-bpe.txt`). SD1.5's text encoder is
OpenAI's CLIP ViT-L/14, so it uses this vocabulary unchanged.

The gz file holds one merge per line ("i n", "t h", ...), after a header on line 0. CLIP keeps the first
48894 merges and numbers its 49408 tokens as follows:

    0     .. 255    the 256 byte-level characters, in GPT-2's `bytes_to_unicode` order
    256   .. 511    the same 256 characters with the end-of-word marker `</w>` appended
    512   .. 49405  one token per merge, in merge order: the two halves joined ("in", "th", ...)
    49406, 49407    `<|startoftext|>`, `<|endoftext|>`

Outputs (deterministic, so the test can regenerate them and compare bytes):

    sd15/data/clip_vocab.json       {token: id}, one entry per line, in id order
    sd15/data/clip_merges.txt       `#version: 0.2` header, then the 48894 merges, one "a b" per line
    sd15/data/LICENSE-clip-bpe.txt  the open_clip licence

Regenerate from the repository root with

    python scripts/make_tokenizer_files.py [path/to/bpe_simple_vocab_16e6.txt.gz] [--out-dir sd15/data]
"""

import argparse
import gzip
import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BPE = REPO_ROOT / "../shared/reference/clip-bpe/bpe_simple_vocab_16e6.txt.gz"
LICENSE_NAME = "LICENSE-open_clip.txt"  # expected next to the gz file
NUM_MERGES = 49408 - 2 * 256 - 2  # 48894: vocab size less byte tokens and the two special tokens
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the remaining 68 bytes
    (controls, space, soft hyphen, ...) map to U+0100 onwards, in byte order. The dict's insertion
    order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..48894 of the gz file, each split into its two halves."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    assert len(merges) == NUM_MERGES, f"{bpe_path} has only {len(merges)} merges, expected {NUM_MERGES}"
    assert all(len(m) == 2 for m in merges), "every merge line must hold exactly two tokens"
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in CLIP's order (see the module docstring)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, "CLIP's tokens must be unique and number 49408"
    return vocab


def write_files(bpe_path: Path, out_dir: Path) -> None:
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)

    entries = ",\n".join(f"{json.dumps(token, ensure_ascii=False)}: {i}" for token, i in vocab.items())
    (out_dir / "clip_vocab.json").write_text("{\n" + entries + "\n}\n", encoding="utf-8", newline="\n")

    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "clip_merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8", newline="\n")

    shutil.copyfile(bpe_path.parent / LICENSE_NAME, out_dir / "LICENSE-clip-bpe.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_path", nargs="?", type=Path, default=DEFAULT_BPE, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "sd15" / "data")
    args = parser.parse_args()
    write_files(args.bpe_path, args.out_dir)
    print(f"wrote clip_vocab.json, clip_merges.txt and LICENSE-clip-bpe.txt to {args.out_dir}")


if __name__ == "__main__":
    main()
