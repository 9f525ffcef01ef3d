"""Prompt syntax (sd15.prompts): emphasis as the AUTOMATIC1111 web UI parses it (its documented examples),
75-token chunks and BREAK, the emphasis arithmetic on the text encoder's output, CLIP skip, `<lora:…>` tags,
and fuzzing: no prompt makes the parser or the chunker raise."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sd15
from sd15 import prompts as P
from sd15.pnginfo import format_parameters, parse_parameters

BOS, EOS, COMMA = 49406, 49407, 267


@pytest.fixture(scope="module")
def m(tiny_checkpoint):
    return sd15.load(tiny_checkpoint)


def approx_pieces(pieces):
    return [(t, pytest.approx(w)) for t, w in pieces]


# --------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    "text, expected",
    [  # the examples in the docstring of the web UI's parse_prompt_attention
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
          (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
        # and the rest of the syntax
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("( word : 0.25 )", [(" word ", 0.25)]),
        ("((a:1.5) b)", [("a", 1.65), (" b", 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
        ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
        # inside brackets the web UI scales BREAK's marker too, which makes it the word, weighted, not a break
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ("[a BREAK b", [("a", 1 / 1.1), ("BREAK", -1 / 1.1), ("b", 1 / 1.1)]),
        ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
        ("50\\% \\\\ slash", [("50% \\ slash", 1.0)]),  # a lone backslash is dropped, \\ is one
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("smile :)", [("smile :)", 1.0)]),  # a weight with no open bracket is text
        ("a ) b ]", [("a ) b ]", 1.0)]),  # closers with no opener are text
        ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # not a number: text, and the bracket an ordinary one
        ("", [("", 1.0)]),
    ],
)  # fmt: skip
def test_parse_emphasis(text, expected):
    assert P.parse_emphasis(text) == approx_pieces(expected)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab ()[]:\\.,-+0123456789BREAK<>|")) | st.characters(), max_size=60))
def test_parser_never_raises_and_gives_finite_weights(text):
    pieces = P.parse_emphasis(text)
    assert pieces
    assert all(isinstance(t, str) and isinstance(w, float) and w == w and abs(w) != float("inf") for t, w in pieces)
    plain = "".join(t for t, w in pieces if not (t == "BREAK" and w == -1.0))
    assert all(c in text for c in plain)  # nothing invented


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab ()[]:\\.,1<>BREAK")) | st.characters(), max_size=200))
def test_chunker_never_raises_and_gives_well_formed_chunks(m, text):
    tokenized = P.tokenize_prompt(m.tokenizer, text)
    for chunk in tokenized.chunks:
        assert len(chunk.ids) == len(chunk.weights) == 77
        assert chunk.ids[0] == BOS and chunk.ids[-1] == EOS
    assert tokenized.num_tokens <= 75 * len(tokenized.chunks)


def test_text_without_syntax_is_one_piece_of_weight_one():
    assert P.parse_emphasis("a photo of an astronaut, riding a horse") == [("a photo of an astronaut, riding a horse", 1.0)]


def test_lora_tags_are_taken_out_of_the_text():
    prompt = "a cat <lora:film grain:0.8>, <lora:b:0.5:0.25> <lora:c> <lora:d:unet=0.3> <hypernet:e:1>"
    text, found = P.extract_extra_networks(prompt)
    assert text == "a cat ,    "
    assert [k for k, _ in found] == ["lora", "lora", "lora", "lora", "hypernet"]
    assert P.lora_tags(prompt) == [
        P.LoraTag("film grain", 0.8, 0.8), P.LoraTag("b", 0.5, 0.25), P.LoraTag("c", 1.0, 1.0), P.LoraTag("d", 1.0, 0.3)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a number"):
        P.lora_tags("<lora:x:strong>")


# --------------------------------------------------------------------------------------------------
# Chunks


def test_150_token_prompt_gives_two_chunks_the_first_equal_to_the_75_token_prompt(m):
    words = ["cat", "dog", "sky"] * 50  # one token each, no commas (so no backtracking)
    long_prompt, short_prompt, rest = " ".join(words), " ".join(words[:75]), " ".join(words[75:])
    assert len(m.tokenizer.tokenize(long_prompt)) == 150
    with torch.no_grad():
        long_ctx = P.encode_prompts(m, [long_prompt])
        short_ctx = P.encode_prompts(m, [short_prompt])
        second = P.encode_prompts(m, [rest])
    assert long_ctx.shape == (1, 154, 48) and short_ctx.shape == (1, 77, 48)
    assert torch.equal(long_ctx[:, :77], short_ctx)
    assert torch.equal(long_ctx[:, 77:], second)  # each chunk encoded on its own, with its own BOS and EOS


def test_prompts_within_75_tokens_are_bit_identical_to_plain_encoding(m):
    prompts = ["a photo of an astronaut riding a horse on mars", "", "a (cat:1.0) and (a dog:1)", " ".join(["cat"] * 75)]
    with torch.no_grad():
        plain = m.text_encoder(m.tokenizer([p.replace("(", "").replace(":1.0)", "").replace(":1)", "") for p in prompts]))
        ours = P.encode_prompts(m, prompts)
        via_pipeline = sd15.pipeline.encode_text(m, prompts)
    assert torch.equal(ours, plain)
    assert torch.equal(via_pipeline, plain)


def test_break_starts_a_new_chunk_and_tags_do_not_reach_the_encoder(m):
    chunks = P.tokenize_prompt(m.tokenizer, "a cat BREAK a dog").chunks
    assert len(chunks) == 2
    assert chunks[0].ids[:4] == [BOS, *m.tokenizer.tokenize("a cat"), EOS]
    assert chunks[1].ids[:4] == [BOS, *m.tokenizer.tokenize("a dog"), EOS]
    assert len(P.tokenize_prompt(m.tokenizer, "BREAK a dog").chunks) == 2  # an empty first chunk, as the web UI
    inside, = P.tokenize_prompt(m.tokenizer, "(a cat BREAK a dog").chunks  # the web UI: the word, at -1.1
    assert inside.ids[1:7] == m.tokenizer.tokenize("a cat break a dog") + [EOS]
    assert inside.weights[3] == pytest.approx(-1.1) and inside.weights[2] == pytest.approx(1.1)
    with torch.no_grad():
        assert torch.equal(P.encode_prompts(m, ["a cat <lora:x:0.5>"]), P.encode_prompts(m, ["a cat "]))


def test_comma_near_the_end_of_a_full_chunk_moves_the_rest_to_the_next(m):
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)  # the comma is token 71
    first, second = P.tokenize_prompt(m.tokenizer, prompt).chunks
    assert first.ids[71] == COMMA and first.ids[72:] == [EOS] * 5
    assert second.ids[1:11] == m.tokenizer.tokenize("dog") * 10
    no_backtrack = P.tokenize_prompt(m.tokenizer, prompt, comma_backtrack=0).chunks
    assert no_backtrack[0].ids[72:76] == m.tokenizer.tokenize("dog") * 4


def test_pad_pair_pads_the_shorter_of_prompt_and_negative_with_the_empty_prompt(m):
    """The web UI's "Pad prompt/negative prompt" (sd15's pad_conds): whole copies of the encoding of ""."""
    long_prompt = " ".join(["cat"] * 100)
    with torch.no_grad():
        long, blurry, empty = (P.encode_prompts(m, [p]) for p in (long_prompt, "blurry", ""))
        cond, uncond = P.pad_pair(long, blurry, empty)
        cond_short, uncond_long = P.pad_pair(blurry, long, empty)
    assert cond.shape == uncond.shape == (1, 154, 48) and torch.equal(cond, long)
    assert torch.equal(uncond[:, :77], blurry) and torch.equal(uncond[:, 77:], empty)
    assert cond_short.shape == uncond_long.shape == (1, 154, 48)
    assert torch.equal(cond_short[:, 77:], empty) and torch.equal(uncond_long, long)


def test_images_of_different_lengths_are_stacked_by_repeating_the_last_vector(m):
    """The web UI's stack_conds: a batch's shorter prompt is extended with copies of its own last vector."""
    with torch.no_grad():
        long, short = P.encode_prompts(m, [" ".join(["cat"] * 100)])[0], P.encode_prompts(m, ["a dog"])[0]
    batch = P.stack_contexts([short, long])
    assert batch.shape == (2, 154, 48) and torch.equal(batch[1], long) and torch.equal(batch[0, :77], short)
    assert torch.equal(batch[0, 77:], short[-1:].expand(77, -1))


def test_a_prompts_stretches_are_encoded_together_as_the_web_ui_does(m):
    """Prompt editing's texts of one prompt: one batch, as many chunks each (the shorter padded with the empty
    chunk, not the last vector), emphasis normalised over all of them (one mean for the batch)."""
    long_text = " ".join(["cat"] * 100)
    with torch.no_grad():
        both = P.encode_schedule(m, [long_text, "a dog"])
        assert both.shape == (2, 154, 48)
        assert torch.equal(both[1, :77], P.encode_prompts(m, ["a dog"])[0])
        assert torch.equal(both[1, 77:], P.encode_prompts(m, [""])[0])
        texts = ["a (red:1.5) car", "a (blue:0.5) car"]
        together, apart = P.encode_schedule(m, texts), P.encode_prompts(m, texts)
        ids = [c.ids for t in P.tokenize_prompts(m, texts) for c in t.chunks]
        z = m.text_encoder(torch.tensor(ids))  # (2, 77, D) unweighted
        weights = torch.tensor([c.weights for t in P.tokenize_prompts(m, texts) for c in t.chunks])
    weighted = z * weights[..., None]
    expected = weighted * (z.mean() / weighted.mean())  # the web UI: one mean over the whole batch
    assert torch.allclose(together, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together, apart, rtol=1e-5, atol=1e-6)  # per-prompt normalisation differs
    assert torch.equal(P.encode_schedule(m, ["a (red:1.5) car"]), P.encode_prompts(m, ["a (red:1.5) car"]))


# --------------------------------------------------------------------------------------------------
# Emphasis arithmetic


def test_emphasis_scales_the_encoder_output_and_restores_the_mean(m):
    prompt = "a (red:1.5) car on a [road]"
    chunk = P.tokenize_prompt(m.tokenizer, prompt).chunks[0]
    red, road = m.tokenizer.tokenize("red")[0], m.tokenizer.tokenize("road")[0]
    assert chunk.weights[chunk.ids.index(red)] == 1.5
    assert chunk.weights[chunk.ids.index(road)] == pytest.approx(1 / 1.1)
    with torch.no_grad():
        z = m.text_encoder(torch.tensor([chunk.ids]))  # the same ids, unweighted
        ours = P.encode_prompts(m, [prompt])
    weighted = z * torch.tensor(chunk.weights)[None, :, None]
    expected = weighted * (z.mean() / weighted.mean())
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert ours.mean().item() == pytest.approx(z.mean().item(), rel=1e-4)
    assert not torch.allclose(ours, z, atol=1e-3)


def test_emphasis_weight_one_is_bit_identical_to_none(m):
    with torch.no_grad():
        plain = P.encode_prompts(m, ["a red car on a road"])
        for prompt in ["a (red:1.0) car on a road", "a ([red]) car on a road", "a red car on a (road:1)"]:
            assert torch.equal(P.encode_prompts(m, [prompt]), plain)
        assert not torch.equal(P.encode_prompts(m, ["a (red) car on a road"]), plain)


# --------------------------------------------------------------------------------------------------
# CLIP skip


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(m, tiny_state_dict):
    from reference_models import transformers_clip

    prompt = "a (watercolour:1.2) of a lighthouse"
    ids = torch.tensor([P.tokenize_prompt(m.tokenizer, "a watercolour of a lighthouse").chunks[0].ids])
    reference = transformers_clip(tiny_state_dict, m.text_encoder.config)
    with torch.no_grad():
        ours = P.encode_prompts(m, ["a watercolour of a lighthouse"], clip_skip=2)
        hf = reference(ids, output_hidden_states=True)
        theirs = reference.text_model.final_layer_norm(hf.hidden_states[-2]) if hasattr(reference, "text_model") else reference.final_layer_norm(hf.hidden_states[-2])
        last = P.encode_prompts(m, ["a watercolour of a lighthouse"], clip_skip=1)
        weighted = P.encode_prompts(m, [prompt], clip_skip=2)
    assert (ours - theirs).abs().max() < 1e-5
    assert (last - ours).abs().max() > 1e-2
    assert weighted.shape == ours.shape and not torch.equal(weighted, ours)


def test_clip_skip_reaches_generate_and_the_png(m):
    kwargs = dict(steps=1, seed=4, width=64, height=64)
    one, two = m.generate("a cat", **kwargs)[0], m.generate("a cat", clip_skip=2, **kwargs)[0]
    assert (one.info["sd15"].clip_skip, two.info["sd15"].clip_skip) == (1, 2)
    assert one.tobytes() != two.tobytes()
    text = format_parameters(two.info["sd15"])
    assert "Clip skip: 2" in text and "Clip skip" not in format_parameters(one.info["sd15"])
    assert parse_parameters(text)["clip_skip"] == 2
    with pytest.raises(ValueError, match="clip_skip"):
        m.generate("a cat", clip_skip=5, **kwargs)  # the tiny text encoder has 2 layers
