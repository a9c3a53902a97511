"""AUTOMATIC1111's prompt weighting syntax, parsed into text fragments with a weight each.

``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.4)``
multiplies it by 1.4, and brackets nest. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are
literal characters. ``BREAK`` (in capitals, as a word) ends the current 75-token chunk.
Brackets that do not pair up are taken literally, or (an opening one) weigh the rest of
the prompt, as AUTOMATIC1111 does: a prompt never fails to parse for its brackets. The
one difference: an explicit weight that is not a number, such as ``(cat:high)``, is an
error here, where AUTOMATIC1111 would take the text literally or fail with a traceback.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                          # an escaped bracket or backslash: the character itself
    | \\                                    # any other backslash: dropped
    | [(\[]                                 # an opening bracket
    | :(?P<weight>[^\s()\[\]\\:]+)\)        # an explicit weight that closes a round bracket
    | [)\]]                                 # a closing bracket
    | [^\\()\[\]:]+                         # text
    | :
    """,
    re.VERBOSE,
)
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")


class PromptSyntaxError(ValueError):
    """A prompt's explicit weight is not a number."""


@dataclass(frozen=True)
class Fragment:
    """Text with one weight, or (``breaks_chunk``) the end of a chunk."""

    text: str
    weight: float = 1.0
    breaks_chunk: bool = False


def parse_weights(prompt: str) -> list[Fragment]:
    """The prompt as fragments, adjacent ones of equal weight merged, as AUTOMATIC1111 parses it."""
    texts: list[str] = []
    weights: list[float] = []
    breaks: list[bool] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def add_text(text: str) -> None:
        for index, part in enumerate(BREAK.split(text)):
            if index:
                texts.append("BREAK")
                weights.append(1.0)
                breaks.append(True)
            texts.append(part)
            weights.append(1.0)
            breaks.append(False)

    def scale(start: int, factor: float) -> None:
        for index in range(start, len(weights)):
            weights[index] *= factor

    for match in TOKEN.finditer(prompt):
        token, explicit = match.group(0), match.group("weight")
        if token.startswith("\\"):
            texts.append(token[1:])
            weights.append(1.0)
            breaks.append(False)
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif explicit is not None and round_open:
            scale(round_open.pop(), explicit_weight(explicit))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE_FACTOR)
        else:
            add_text(token)
    for start in round_open:
        scale(start, ROUND_FACTOR)
    for start in square_open:
        scale(start, SQUARE_FACTOR)
    return _merged(texts, weights, breaks)


def explicit_weight(text: str) -> float:
    if NUMBER.fullmatch(text) is None:
        raise PromptSyntaxError(f"the weight in '(…:{text})' is not a number")
    return float(text)


def _merged(texts: list[str], weights: list[float], breaks: list[bool]) -> list[Fragment]:
    fragments: list[Fragment] = []
    for text, weight, is_break in zip(texts, weights, breaks, strict=True):
        if is_break:
            fragments.append(Fragment("BREAK", 1.0, breaks_chunk=True))
        elif fragments and not fragments[-1].breaks_chunk and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("")]


def weight_problems(prompt: str, max_weight: float) -> list[str]:
    """What is wrong with a prompt's weights: a weight that is not a number, or one past ±max_weight."""
    try:
        fragments = parse_weights(prompt)
    except PromptSyntaxError as error:
        return [str(error)]
    return [
        f"the weight of '{fragment.text.strip()}' is {fragment.weight:.3g}, outside ±{max_weight:g} (MAX_PROMPT_WEIGHT)"
        for fragment in fragments
        if not fragment.breaks_chunk and not (math.isfinite(fragment.weight) and abs(fragment.weight) <= max_weight)
    ]
