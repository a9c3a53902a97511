"""AUTOMATIC1111's prompt weighting syntax, parsed into text fragments with a weight each.

``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.4)``
multiplies it by 1.4, and brackets nest. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are
literal characters. ``BREAK`` (in capitals, as a word) ends the current 75-token chunk.
Brackets that do not pair up are taken literally, or (an opening one) weigh the rest of
the prompt, as AUTOMATIC1111 does. Two differences: an explicit weight that is not a number,
such as ``(cat:high)``, is an error here, where AUTOMATIC1111 would take the text literally or
fail with a traceback; and so are brackets nested past ``MAX_DEPTH``, where AUTOMATIC1111's
parse takes time quadratic in the prompt's length.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

PromptSyntax = Literal["a1111", "plain"]
"""How a prompt is read: AUTOMATIC1111's weights and BREAK, or plain text."""

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
BREAK = re.compile(r"\bBREAK\b")
"""``BREAK`` as a word; the whitespace around it goes too (stripped, not matched: ``\\s*`` before it
would retry at every space of a long run, quadratic in the run's length)."""
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")

MAX_DEPTH = 32
"""Most brackets open at once. A closing bracket multiplies the weight of every piece of text since
its opening one, in AUTOMATIC1111's order (so the weights are its float products to the last bit):
with this cap that is at most ``MAX_DEPTH`` multiplications per piece, so a parse takes time linear
in the prompt's length. No weighting needs more: ``1.1 ** 32`` is 21."""

PARSED_CACHE = 32
"""Prompts whose parse is kept: validation, token counting and encoding (per tokenizer) all read a
prompt, and parse it once between them. A request has at most twice ``MAX_PROMPTS`` texts (8 by
default); one parse holds at most about 0.4 MB (10,000 characters in 5,000 fragments)."""


class PromptSyntaxError(ValueError):
    """A prompt's explicit weight is not a number, or its brackets nest past ``MAX_DEPTH``."""


@dataclass(frozen=True, slots=True)
class Fragment:
    """Text with one weight, or (``breaks_chunk``) the end of a chunk."""

    text: str
    weight: float = 1.0
    breaks_chunk: bool = False


@functools.lru_cache(maxsize=PARSED_CACHE)
def parse_weights(prompt: str) -> tuple[Fragment, ...]:
    """The prompt as fragments, adjacent ones of equal weight merged, as AUTOMATIC1111 parses it."""
    return _parsed(prompt)


def _parsed(prompt: str) -> tuple[Fragment, ...]:
    # Runs of text read with no bracket between their pieces (so one weight fits them all), in flat
    # lists of strings and numbers: thousands of small objects would each cost the garbage collector.
    pieces: list[str] = []
    starts: list[int] = []  # each run's first piece
    weights: list[float] = []
    breaks: list[bool] = []
    round_open: list[int] = []
    square_open: list[int] = []
    joins = False  # whether text continues the last run: no bracket was read since its text

    def add_run(piece: str, is_break: bool = False) -> None:
        starts.append(len(pieces))
        pieces.append(piece)
        weights.append(1.0)
        breaks.append(is_break)

    def add_text(text: str) -> None:
        nonlocal joins
        for index, part in enumerate(_break_parts(text)):
            if index:
                add_run("BREAK", is_break=True)
            if joins and not index:
                pieces.append(part)
            else:
                add_run(part)
        joins = True

    def scale(start: int, factor: float) -> None:
        nonlocal joins
        for index in range(start, len(weights)):
            weights[index] *= factor
        joins = False

    for match in TOKEN.finditer(prompt):
        token, explicit = match.group(0), match.group("weight")
        if token.startswith("\\"):
            add_text(token[1:])
        elif token in ("(", "["):
            if len(round_open) + len(square_open) == MAX_DEPTH:
                raise PromptSyntaxError(
                    f"brackets nest more than {MAX_DEPTH} deep (an opening one never closed counts to the end)"
                )
            (round_open if token == "(" else square_open).append(len(weights))
            joins = False
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
    starts.append(len(pieces))
    return _merged(pieces, starts, weights, breaks)


def _break_parts(text: str) -> list[str]:
    """``text`` split at each BREAK, without the whitespace around it."""
    parts = BREAK.split(text)
    if len(parts) == 1:
        return parts
    return [parts[0].rstrip(), *(part.strip() for part in parts[1:-1]), parts[-1].lstrip()]


def explicit_weight(text: str) -> float:
    if NUMBER.fullmatch(text) is None:
        raise PromptSyntaxError(f"the weight in '(…:{text})' is not a number")
    return float(text)


def _merged(pieces: list[str], starts: list[int], weights: list[float], breaks: list[bool]) -> tuple[Fragment, ...]:
    """Adjacent runs of equal weight as one fragment, BREAKs apart; run ``i`` is
    ``pieces[starts[i]:starts[i + 1]]``."""
    fragments: list[Fragment] = []
    first = 0  # the first run of the fragment being gathered
    for run in range(1, len(weights) + 1):
        if run < len(weights) and not (breaks[first] or breaks[run]) and weights[run] == weights[first]:
            continue
        if breaks[first]:
            fragments.append(Fragment("BREAK", 1.0, breaks_chunk=True))
        else:
            fragments.append(Fragment("".join(pieces[starts[first] : starts[run]]), weights[first]))
        first = run
    return tuple(fragments) or (Fragment(""),)


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
