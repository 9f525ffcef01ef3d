"""Prompt editing and alternation: a prompt whose text changes during sampling, as the AUTOMATIC1111 web UI
reads it (`modules/prompt_parser.py`).

    [from:to:when]    `from` until step `when`, `to` after it
    [to:when]         nothing until step `when`, then `to`
    [from::when]      `from` until step `when`, then nothing
    [a|b|c]           a at step 1, b at step 2, c at step 3, a at step 4, …

`when` with a decimal point is a fraction of the steps (0.5 of 20 steps: step 10), without one a step number
(with an exponent too, as the web UI's number syntax has it: `2e1` is step 20); it is capped at the number of
steps, and the earlier text is used up to and including step `when` (steps count from 1). Brackets nest:
`[[a:b:5]:c:10]`, and the text inside may carry emphasis: `([cat:dog:0.5]:1.2)`. Any other bracket is left
as it is for sd15.prompts, which reads `[x]` and `(x:1.2)` as emphasis; so are escaped brackets `\\[`, and a
bracket that is never closed. A prompt with `[` nesting brackets more than MAX_DEPTH deep is refused with a
one-line ValueError (the parser recurses once per level).

    schedule("a [cat:dog:0.5]", 10) -> [(5, "a cat"), (10, "a dog")]

In a hires fix's second pass the steps go on from the first pass's, as in the web UI since 1.6: with 20 steps and
10 hires steps, `[a:b:25]` and `[a:b:1.5]` switch halfway through the second pass, and an edit that ended in the
first pass (`[a:b:0.5]`, `[a:b:5]`) stays ended (`b` throughout the second pass).

The pipeline encodes each distinct text once and conditions the steps up to each end step on it; a prompt
without this syntax has a one-entry schedule holding the prompt unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
import re

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")  # lark's SIGNED_NUMBER, as the web UI reads it
MAX_DEPTH = 100  # brackets inside brackets; deeper is refused, not a RecursionError


@dataclass
class _Scheduled:
    before: list  # nodes shown up to step `when`
    after: list  # nodes shown after it
    when: str  # as written: "0.5" (a fraction) or "10" (a step)


@dataclass
class _Alternate:
    options: list[list]  # one node list per option


Node = "str | _Scheduled | _Alternate"


def parse(prompt: str) -> list:
    """The prompt as a list of nodes: text, and scheduled or alternating parts (which hold node lists)."""
    nodes, end = _parse(prompt, 0, closers="", depth=0)
    assert end == len(prompt)
    return nodes


def _parse(text: str, i: int, closers: str, depth: int) -> tuple[list, int]:
    """Nodes from text[i:] up to (not including) the first character of `closers` at this level."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the prompt nests brackets more than {MAX_DEPTH} deep; remove some")
    nodes: list = []
    while i < len(text) and text[i] not in closers:
        c = text[i]
        if c == "\\" and i + 1 < len(text):  # an escaped character is text, for sd15.prompts to read
            nodes.append(text[i : i + 2])
            i += 2
        elif c == "[":
            node, i = _bracket(text, i, depth + 1)
            nodes.append(node)
        elif c == "(":  # emphasis: kept as text around its contents, which may hold scheduled parts
            inner, j = _parse(text, i + 1, closers=")", depth=depth + 1)
            if j < len(text):
                nodes += ["(", *inner, ")"]
                i = j + 1
            else:  # never closed: the rest as it is
                nodes += ["(", *inner]
                i = j
        else:
            j = i + 1
            while j < len(text) and text[j] not in "\\[]()" + closers:
                j += 1
            nodes.append(text[i:j])
            i = j
    return nodes, i


def _bracket(text: str, start: int, depth: int) -> tuple[object, int]:
    """The node of the `[` at text[start], and the index after its `]`. Splits its contents at the `:` and
    `|` of its own level; a `[` that is neither editing nor alternation is kept as text (emphasis)."""
    parts, seps, i = [], [], start + 1
    while True:
        part, i = _parse(text, i, closers=":|]", depth=depth)
        parts.append(part)
        if i >= len(text) or text[i] == "]":
            break
        seps.append(text[i])
        i += 1
    joined: list = []  # the parts with their separators, as text
    for k, part in enumerate(parts):
        joined += part + ([seps[k]] if k < len(seps) else [])
    if i >= len(text):  # never closed: "[" is text, and what followed is parsed as usual (not parsed again:
        return _Group("[", joined, ""), len(text)  # that is exponential in the number of unclosed brackets)
    end = i + 1
    number = _NUMBER.fullmatch(_plain(parts[-1])) if seps and set(seps) == {":"} else None
    if number and len(parts) in (2, 3):
        before, after = ([], parts[0]) if len(parts) == 2 else (parts[0], parts[1])
        return _Scheduled(before, after, number.group(1)), end
    if seps and set(seps) == {"|"}:
        return _Alternate(parts), end
    return _Group("[", joined, "]"), end


@dataclass
class _Group:
    """Brackets kept as text around nodes (emphasis, or a bracket never closed)."""

    open: str
    nodes: list
    close: str


def _plain(nodes: list) -> str:
    """The text of nodes that are all text (else a string no number matches)."""
    return "".join(nodes) if all(isinstance(n, str) for n in nodes) else "\0"


def _step(when: str, steps: int, base_steps: int | None = None) -> int:
    """The last step of the earlier text: `when` as a fraction or a step, within [0, steps] (a number too large
    for a float, "1e999", is infinite and capped like any other). In a hires fix's second pass (`base_steps`:
    the first pass's steps) the timeline goes on: fractions 1 … 2 and step numbers after `base_steps` fall in it,
    as in the web UI since 1.6 (`[a:b:1.5]` switches halfway through the second pass, `[a:b:0.5]` before it)."""
    if base_steps is None:
        value = float(when) * steps if "." in when else float(when)
    else:
        value = (float(when) - 1.0) * steps if "." in when else float(when) - base_steps
    return int(min(max(value, 0.0), steps))


def render(nodes: list, step: int, steps: int, base_steps: int | None = None) -> str:
    """The prompt's text at `step` (1 … steps); `base_steps` for a hires fix's second pass (see _step)."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(render(node.before if step <= _step(node.when, steps, base_steps) else node.after, step, steps, base_steps))
        elif isinstance(node, _Alternate):
            out.append(render(node.options[(step - 1) % len(node.options)], step, steps, base_steps))
        else:
            out.append(node.open + render(node.nodes, step, steps, base_steps) + node.close)
    return "".join(out)


def schedule(prompt: str, steps: int, base_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), …]: the prompt's text for steps up to each last step, in order (steps count from 1);
    `base_steps` for a hires fix's second pass, whose steps follow the first pass's (see _step)."""
    if "[" not in prompt:  # no editing or alternation possible (and deep emphasis is sd15.prompts' to read)
        return [(steps, prompt)]
    nodes = parse(prompt)
    if all(isinstance(n, str) for n in nodes):
        return [(steps, prompt)]
    result: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        text = render(nodes, step, steps, base_steps)
        if result and result[-1][1] == text:
            result[-1] = (step, text)
        else:
            result.append((step, text))
    return result



def _change_steps(nodes: list, steps: int, base_steps: int | None, found: set[int]) -> None:
    """Add to `found` every step at which some part of `nodes` may change, the branches not shown included:
    each edit's last step (from 1 on), and every step where there is an alternation."""
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = _step(node.when, steps, base_steps)
            found.update([when] if when >= 1 else [])
            _change_steps(node.before, steps, base_steps, found)
            _change_steps(node.after, steps, base_steps, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _change_steps(option, steps, base_steps, found)
        elif isinstance(node, _Group):
            _change_steps(node.nodes, steps, base_steps, found)


def encoding_counts(prompt: str, steps: int, base_steps: int | None = None) -> dict[str, int]:
    """{text: n}: how many times the web UI encodes each text of the prompt's schedule in its one batch (its
    get_learned_conditioning encodes the text at each step where something may change, repeats included, and
    takes emphasis's mean over them all); sd15 encodes each text once and weights the mean by these counts."""
    if "[" not in prompt:
        return {prompt: 1}
    nodes = parse(prompt)
    found = {steps}
    _change_steps(nodes, steps, base_steps, found)
    counts: dict[str, int] = {}
    for step in sorted(found):
        text = render(nodes, step, steps, base_steps)
        counts[text] = counts.get(text, 0) + 1
    return counts
