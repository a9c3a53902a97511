"""The weighting syntax, checked against AUTOMATIC1111's own documented examples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.prompts.syntax import Fragment, PromptSyntaxError, parse_weights, weight_problems


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
