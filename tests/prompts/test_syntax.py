"""The weighting syntax, checked against AUTOMATIC1111's own documented examples."""

from __future__ import annotations

import collections
import re
import sys
import time
import uuid

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from engine.common.errors import RequestError
from engine.prompts import syntax
from engine.prompts.syntax import (
    MAX_DEPTH,
    TOKEN,
    Fragment,
    PromptSyntaxError,
    _parsed,
    explicit_weight,
    parse_weights,
    weight_problems,
)
from engine.request.checking import validate_request
from engine.request.limits import Limits


def pairs(prompt: str) -> list[list]:
    return [[f.text, f.weight] if not f.breaks_chunk else ["BREAK", -1] for f in parse_weights(prompt)]


# The examples in the docstring of AUTOMATIC1111's modules/prompt_parser.py:parse_prompt_attention.
A1111_EXAMPLES = {
    "normal text": [["normal text", 1.0]],
    "an (important) word": [["an ", 1.0], ["important", 1.1], [" word", 1.0]],
    "(unbalanced": [["unbalanced", 1.1]],
    "\\(literal\\]": [["(literal]", 1.0]],
    "(unnecessary)(parens)": [["unnecessaryparens", 1.1]],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ["a ", 1.0],
        ["house", 1.5730000000000004],
        [" ", 1.1],
        ["on", 1.0],
        [" a ", 1.1],
        ["hill", 0.55],
        [", sun, ", 1.1],
        ["sky", 1.4641000000000006],
        [".", 1.1],
    ],
}


@pytest.mark.parametrize("prompt", A1111_EXAMPLES)
def test_automatic1111_examples_parse_to_the_same_weights(prompt):
    assert pairs(prompt) == A1111_EXAMPLES[prompt]


def test_square_brackets_divide_and_explicit_weights_multiply():
    assert pairs("[faded]") == [["faded", 1 / 1.1]]
    assert pairs("((cat))") == [["cat", 1.1 * 1.1]]
    assert pairs("a (cat:1.4) sat") == [["a ", 1.0], ["cat", 1.4], [" sat", 1.0]]
    assert pairs("((cat:0.5))") == [["cat", 0.5 * 1.1]]


def test_escaped_brackets_and_backslashes_are_literal():
    assert pairs("\\(a\\) \\[b\\] c\\\\d") == [["(a) [b] c\\d", 1.0]]


def test_break_ends_a_chunk_and_only_as_a_capitalized_word():
    assert pairs("a cat BREAK a dog") == [["a cat", 1.0], ["BREAK", -1], ["a dog", 1.0]]
    assert pairs("a BREAKfast break") == [["a BREAKfast break", 1.0]]
    assert pairs("(red BREAK blue)") == [["red", 1.1], ["BREAK", -1], ["blue", 1.1]]


@pytest.mark.parametrize(
    "prompt",
    [")(", "((", "]]", ":)", "a:b", "[(])", "\\", "(cat:1.2", "cat:1.2)", "", "(", "[[x]"],
)
def test_unbalanced_brackets_are_taken_literally_and_never_raise(prompt):
    fragments = parse_weights(prompt)
    assert all(isinstance(fragment, Fragment) for fragment in fragments)
    assert weight_problems(prompt, 3.0) == []


@given(st.text(alphabet="ab ()[]\\.1BREK", max_size=40))
def test_brackets_in_any_order_always_parse(prompt):
    parse_weights(prompt)


@given(st.text(alphabet="ab ()[]:\\.1-BREK", max_size=40))
def test_with_colons_a_prompt_parses_or_names_its_weight(prompt):
    problems = weight_problems(prompt, 3.0)
    assert all("weight" in problem for problem in problems)


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ("(cat:high)", "the weight in '(…:high)' is not a number"),
        ("(cat:1.2.3)", "the weight in '(…:1.2.3)' is not a number"),
        ("(cat:5)", "the weight of 'cat' is 5, outside ±3 (MAX_PROMPT_WEIGHT)"),
        ("(cat:-3.5)", "the weight of 'cat' is -3.5, outside ±3 (MAX_PROMPT_WEIGHT)"),
        ("((((((((((((cat))))))))))))", "the weight of 'cat' is 3.14, outside ±3 (MAX_PROMPT_WEIGHT)"),
    ],
)
def test_weights_that_are_not_numbers_or_too_large_are_named(prompt, problem):
    assert weight_problems(prompt, 3.0) == [problem]


def test_a_weight_outside_a_round_bracket_is_plain_text():
    assert pairs("cat:high)") == [["cat:high)", 1.0]]
    with pytest.raises(PromptSyntaxError):
        parse_weights("(cat:high)")


def reference_parse(prompt: str) -> list[list]:
    """The plain algorithm, as AUTOMATIC1111 writes it: every closing bracket rescales all the text since
    its opening one, each token of text apart, merged at the end (quadratic in the nesting)."""
    texts, weights, breaks, round_open, square_open = [], [], [], [], []

    def add(text: str, is_break: bool = False) -> None:
        texts.append(text)
        weights.append(1.0)
        breaks.append(is_break)

    def scale(start: int, factor: float) -> None:
        for index in range(start, len(weights)):
            weights[index] *= factor

    for match in TOKEN.finditer(prompt):
        token, explicit = match.group(0), match.group("weight")
        if token.startswith("\\"):
            add(token[1:])
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif explicit is not None and round_open:
            scale(round_open.pop(), explicit_weight(explicit))
        elif token == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(re.split(r"\s*\bBREAK\b\s*", token)):
                if index:
                    add("BREAK", is_break=True)
                add(part)
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for text, weight, is_break in zip(texts, weights, breaks, strict=True):
        if is_break:
            merged.append(["BREAK", -1])
        elif merged and merged[-1][1] != -1 and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged or [["", 1.0]]


@given(st.text(alphabet="ab \t\u00a0()[]:\\.1-BREK", max_size=60))
@example("a \u00a0BREAK\t b (c BREAK) [d:1.2] BREAKfast \\BREAK")
def test_the_parse_is_the_plain_algorithms_to_the_last_bit(prompt):
    assume(prompt.count("(") + prompt.count("[") <= MAX_DEPTH)
    try:
        expected = reference_parse(prompt)
    except PromptSyntaxError as error:
        with pytest.raises(PromptSyntaxError, match=re.escape(str(error))):
            _parsed(prompt)
        return
    assert [[f.text, f.weight] if not f.breaks_chunk else ["BREAK", -1] for f in _parsed(prompt)] == expected


def test_deep_brackets_weigh_to_the_same_bits_as_the_plain_algorithm():
    prompt = "a " + "[(" * 8 + "(b:0.9) c" + ")" * 5 + " \\( d BREAK e" + "(" * 15 + "f (g) h"
    assert pairs(prompt) == reference_parse(prompt)


def test_brackets_nested_past_the_cap_are_refused_with_the_rule():
    problem = f"brackets nest more than {MAX_DEPTH} deep (an opening one never closed counts to the end)"
    assert weight_problems("[(" * 16 + "cat" + ")]" * 16, 3.0) == []
    assert weight_problems("(" * 17 + "[" * 16 + "cat", 3.0) == [problem]
    assert weight_problems("[(" * 2500 + "\\(" * 2500, 3.0) == [problem]
    limits = Limits(64, 25, 7.5, 64, 1024, 1024 * 1024, 50, 4, 4, 60.0)
    with pytest.raises(RequestError, match=re.escape(f"negative_prompt: {problem}")):
        validate_request({"prompt": "a fox", "negative_prompt": "(" * 40}, limits)
    assert validate_request({"prompt": "(" * 40, "prompt_syntax": "plain"}, limits).prompt == ["(" * 40]


def work(prompt: str) -> int:
    """Lines of Python the parse runs: its cost, counted rather than timed."""
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        _parsed(prompt)
    except PromptSyntaxError:
        pass
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize(
    "shape",
    [
        lambda n: "[(" * n + "\\(" * n,  # the prompt that took 1.2 s at n = 2500
        lambda n: "(a" * n + ")" * n,
        lambda n: "(" * 16 + "[" * 15 + ")(a" * n,  # as deep as allowed, all along
        lambda n: "(a)b" * n,
        lambda n: "(a:1.1)b" * n,
        lambda n: "\\(" * n,
        lambda n: "a BREAK " * n,
    ],
    ids=["issue", "nested", "deepest", "pairs", "weights", "escapes", "breaks"],
)
def test_the_parse_takes_work_linear_in_the_prompts_length(shape):
    assert work(shape(400)) <= 2.3 * work(shape(200)) + 50


@pytest.mark.parametrize(
    "prompt",
    ["[(" * 2500 + "\\(" * 2500, " " * 9_999 + "x", "\t" * 9_990 + "a BREAK", "(a)b" * 2500, ":a" * 5000],
)
def test_hostile_prompts_of_the_largest_size_parse_in_well_under_a_second(prompt):
    started = time.perf_counter()
    weight_problems(prompt, 3.0)
    assert time.perf_counter() - started < 0.25


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_each_prompt_is_parsed_once_per_request(request, family, monkeypatch):
    """Validation, token counting and encoding (per tokenizer) share one parse of each prompt."""
    worker, _ = request.getfixturevalue(family)
    parses = collections.Counter()
    parse = syntax._parsed

    def counted(prompt: str) -> tuple[Fragment, ...]:
        parses[prompt] += 1
        return parse(prompt)

    monkeypatch.setattr(syntax, "_parsed", counted)
    tag = uuid.uuid4().hex[:8]  # prompts no earlier test parsed
    prompts = [f"a (red:1.2) fox {tag}", f"a [blue] bird BREAK sky {tag}"]
    negative = f"(blurry), low quality {tag}"
    payload = {"prompt": prompts, "negative_prompt": negative, "num_inference_steps": 2, "seed": 1}
    response = worker.handle({"id": "once", "input": payload})
    assert response["status"] == "success", response
    assert parses == {prompts[0]: 1, prompts[1]: 1, negative: 1}


@pytest.mark.parametrize(
    "prompt", ["[(" * 2499 + "\\(" * 2499, "(a)b" * 2499, "(a)[b]" * 1666], ids=["issue", "pairs", "both"]
)
def test_a_request_of_eight_hostile_prompts_is_refused_in_well_under_a_second(sd, prompt):
    """Each prompt and negative prompt as long as allowed: refused for its brackets or its length."""
    worker, _ = sd
    texts = [f"{prompt}{index}" for index in range(8)]
    started = time.perf_counter()
    with pytest.raises(RequestError, match=r"^prompt\[0\]: .*(deep|MAX_PROMPT_CHUNKS)"):
        worker.resolve({"prompt": texts[:4], "negative_prompt": texts[4:]})
    assert time.perf_counter() - started < 1.0
