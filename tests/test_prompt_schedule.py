"""Prompt editing `[from:to:when]` and alternation `[a|b]` (sd15.prompt_schedule), and the pipeline switching
its conditioning at the right step. The cases follow the web UI's documentation of the syntax
(AUTOMATIC1111 wiki, "Features": prompt editing, alternating words)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sd15
from sd15 import prompts as prompt_io
from sd15.prompt_schedule import encoding_counts, schedule

RUN = dict(steps=4, seed=2, width=64, height=64, sampler="euler", output_type="np")


@pytest.mark.parametrize(
    "prompt, steps, expected",
    [
        ("a [cat:dog:0.5]", 10, [(5, "a cat"), (10, "a dog")]),  # a fraction of the steps
        ("a [cat:dog:3] b", 10, [(3, "a cat b"), (10, "a dog b")]),  # a step number
        ("a [dog:4]", 10, [(4, "a "), (10, "a dog")]),  # added after step 4
        ("[cat::0.25]", 8, [(2, "cat"), (8, "")]),  # removed after a quarter
        ("[cat|dog]", 4, [(1, "cat"), (2, "dog"), (3, "cat"), (4, "dog")]),
        ("[a|b|c] x", 4, [(1, "a x"), (2, "b x"), (3, "c x"), (4, "a x")]),
        ("[[a:b:2]:c:4]", 6, [(2, "a"), (4, "b"), (6, "c")]),  # nested
        ("([cat:dog:0.5]:1.2)", 4, [(2, "(cat:1.2)"), (4, "(dog:1.2)")]),  # inside emphasis
        ("[(red:1.3) cat:blue dog: 2 ]", 4, [(2, "(red:1.3) cat"), (4, "blue dog")]),
        ("[cat:dog:30]", 20, [(20, "cat")]),  # `when` past the end: capped, never switches
        ("[cat:dog:0]", 5, [(5, "dog")]),
        ("[cat:dog:1.0]", 5, [(5, "cat")]),  # "1.0" is the whole run
        ("[cat:dog:1]", 5, [(1, "cat"), (5, "dog")]),  # "1" is step 1
        ("[cat:dog:2e0]", 5, [(2, "cat"), (5, "dog")]),  # the web UI's numbers take an exponent: a step
        ("[cat:dog:2.5e-1]", 8, [(2, "cat"), (8, "dog")]),  # with a decimal point: a fraction
        ("[cat:dog:1e999]", 5, [(5, "cat")]),  # beyond a float's range: infinite, capped like any other
        ("[cat:dog:1" + "0" * 400 + ".5]", 5, [(5, "cat")]),
        ("[cat:dog:-1e999]", 5, [(5, "dog")]),
    ],
)
def test_schedules(prompt, steps, expected):
    assert schedule(prompt, steps) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a (red:1.3) car, [blurry] BREAK night <lora:film:0.8>",  # emphasis, BREAK, tags: untouched
        "[a:b]",  # no number: emphasis of "a:b"
        "[a:b:c]",  # not a number either
        "[cat:dog:0.5",  # never closed
        "\\[cat:dog:0.5\\]",  # escaped
        "((a)) [[b]] (c:1.1) ]x) (y",
        "a | b",  # a bar outside brackets is text
    ],
)
def test_other_brackets_are_left_as_they_are(prompt):
    assert schedule(prompt, 7) == [(7, prompt)]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab ()[]:|\\.0123", max_size=30), st.integers(1, 12))
def test_every_step_is_covered_once_and_plain_prompts_come_back_unchanged(prompt, steps):
    result = schedule(prompt, steps)
    ends = [end for end, _ in result]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    if not any(c in prompt for c in "[|"):
        assert result == [(steps, prompt)]


def test_unclosed_brackets_are_read_in_linear_time(monkeypatch):
    """Each unclosed `[` used to parse what followed it twice: 2^n parses for n of them (30 took hours)."""
    from sd15 import prompt_schedule

    calls, real = [0], prompt_schedule._parse

    def counted(*args, **kwargs):
        calls[0] += 1
        assert calls[0] < 10_000, "exponential parsing"
        return real(*args, **kwargs)

    monkeypatch.setattr(prompt_schedule, "_parse", counted)
    prompt = "[" * 40 + "a [b:c:2] [x"
    assert schedule(prompt, 4) == [(2, "[" * 40 + "a b [x"), (4, "[" * 40 + "a c [x")]


def test_deep_nesting_is_refused_in_one_line_and_deep_emphasis_is_left_to_the_emphasis_parser():
    for prompt in ["[" * 5000 + "a", "[a:" * 3000 + "b:1]", "([" * 2000 + "b"]:
        with pytest.raises(ValueError, match="nests brackets more than 100 deep"):
            schedule(prompt, 4)
    deep = "(" * 3000 + "a" + ")" * 3000  # sd15.prompts reads it; no `[`, so nothing to schedule
    assert schedule(deep, 4) == [(4, deep)]


def spy_on_schedules(monkeypatch, encoded: list) -> None:
    """Make encode_schedule append (text, its context (1, T, D)) to `encoded` for each text it encodes."""
    real = prompt_io.encode_schedule

    def spy(model, texts, clip_skip=1, counts=None):
        contexts = real(model, texts, clip_skip, counts)
        encoded.extend((text, contexts[i : i + 1]) for i, text in enumerate(texts))
        return contexts

    monkeypatch.setattr(prompt_io, "encode_schedule", spy)


def conditioning_per_unet_call(m, monkeypatch, prompt: str, **kwargs) -> tuple[list, list[str]]:
    """The texts encoded for `prompt` (in order) and, per UNet call, which of them conditioned it."""
    encoded = []
    spy_on_schedules(monkeypatch, encoded)
    seen = []
    real_forward = type(m.unet).forward
    monkeypatch.setattr(m.unet, "forward", lambda x, t, ctx: (seen.append(ctx[1:]), real_forward(m.unet, x, t, ctx))[1])
    m.generate(prompt, **kwargs)
    monkeypatch.undo()
    texts = [text for text, _ in encoded if text]  # "" is the negative prompt's
    return texts, [next(text for text, c in encoded if c.equal(ctx)) for ctx in seen]


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "heun"])
def test_steps_are_counted_as_steps_whatever_the_sampler_evaluates(tiny_checkpoint, monkeypatch, sampler):
    """PLMS evaluates its first step twice, Heun every step but the last twice: prompt editing counts steps."""
    m = sd15.load(tiny_checkpoint)
    run = dict(steps=5, width=64, height=64, seed=0, output_type="np", sampler=sampler)
    calls_per_step = {"pndm": [2, 1, 1, 1, 1], "ddim": [1] * 5, "heun": [2, 2, 2, 2, 1]}[sampler]

    def per_call(per_step: list[str]) -> list[str]:
        return [text for text, n in zip(per_step, calls_per_step) for _ in range(n)]

    texts, used = conditioning_per_unet_call(m, monkeypatch, "a [cat:dog:2]", **run)
    assert texts == ["a cat", "a dog"]
    assert used == per_call(["a cat", "a cat", "a dog", "a dog", "a dog"])
    texts, used = conditioning_per_unet_call(m, monkeypatch, "a [cat|dog]", **run)
    assert used == per_call(["a cat", "a dog", "a cat", "a dog", "a cat"])


def test_pipeline_switches_conditioning_at_the_scheduled_step(tiny_checkpoint, monkeypatch):
    m = sd15.load(tiny_checkpoint)
    encoded = []
    spy_on_schedules(monkeypatch, encoded)
    seen = []
    real_forward = type(m.unet).forward
    monkeypatch.setattr(m.unet, "forward", lambda x, t, ctx: (seen.append(ctx[1:]), real_forward(m.unet, x, t, ctx))[1])
    m.generate("a [cat:dog:2]", **RUN)  # euler: one UNet call per step
    assert [text for text, _ in encoded] == ["a cat", "a dog", ""]  # each text encoded once (and the negative)
    cat, dog = encoded[0][1], encoded[1][1]
    assert [("cat" if c.equal(cat) else "dog" if c.equal(dog) else "?") for c in seen] == ["cat", "cat", "dog", "dog"]


def test_edited_prompt_equals_its_plain_prompt_when_it_never_switches(tiny_model):
    never = tiny_model.generate("a [cat:dog:4]", **RUN)  # step 4 of 4: cat throughout
    assert np.array_equal(never, tiny_model.generate("a cat", **RUN))
    at_once = tiny_model.generate("a [cat:dog:0]", **RUN)
    assert np.array_equal(at_once, tiny_model.generate("a dog", **RUN))
    mixed = tiny_model.generate("a [cat:dog:2]", **RUN)
    assert not np.array_equal(mixed, never) and not np.array_equal(mixed, at_once)


def test_encoding_counts_are_the_rows_the_web_ui_encodes():
    """The web UI encodes the text at each step where some part may change (every edit's step, every step when
    there is an alternation, and the last), repeats included, and takes emphasis's mean over those rows."""
    assert encoding_counts("a cat", 20) == {"a cat": 1}
    assert encoding_counts("a [cat:dog:10]", 20) == {"a cat": 1, "a dog": 1}
    assert encoding_counts("a [cat:dog:0]", 20) == {"a dog": 1}  # an edit at step 0 adds no row
    assert encoding_counts("a [[cat|dog]:bird:0.3]", 20) == {"a cat": 3, "a dog": 3, "a bird": 14}
    assert encoding_counts("[a:[b:c:15]:5]", 20) == {"a": 1, "b": 1, "c": 1}  # an edit not shown yet still counts


def test_a_prompts_texts_are_weighted_by_their_encoding_counts(tiny_model):
    """Encoding each distinct text once, weighted, equals encoding the web UI's rows one by one."""
    prompt = "(masterpiece:1.4), a [[cat|dog]:(bird:0.6):0.3]"
    counts = encoding_counts(prompt, 20)
    texts = list(counts)
    rows = [text for text in texts for _ in range(counts[text])]
    with torch.no_grad():
        weighted = prompt_io.encode_schedule(tiny_model, texts, counts=[counts[t] for t in texts])
        repeated = prompt_io.encode_schedule(tiny_model, rows)
        unweighted = prompt_io.encode_schedule(tiny_model, texts)
    firsts = [rows.index(t) for t in texts]
    assert torch.allclose(weighted, repeated[firsts], rtol=1e-5, atol=1e-6)  # fp32: summation order only
    assert not torch.allclose(weighted, unweighted, rtol=1e-5, atol=1e-6)
