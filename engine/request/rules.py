"""Rules over a whole payload: fields checked together, prompt weights, and text that is not Unicode.

Each rule returns its problems as 'field: rule' strings, so a request's problems are
reported in one round, whichever fields failed on their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

from engine.prompts.syntax import weight_problems
from engine.request.limits import Limits
from engine.schedulers import ETA_DEFAULTS, eta_names, offered_name, scheduler_class

MAX_SEED = 2**63 - 1
MAX_SHOWN_KEY = 40
"""The longest key an error repeats whole (the longest field name, with room to spare)."""


def rule(kind: str, message: str, **values: Any) -> PydanticCustomError:
    """A broken rule as pydantic reports it: its kind, and a message naming the rule. A rule broken inside
    a field's value says where with ``at`` (keys and list positions), which the field's location gains."""
    return PydanticCustomError(kind, message, values)


def cross_field_problems(values: dict[str, Any], limits: Limits) -> list[str]:
    """Rules that span fields, over the fields given (valid ones, already in their model form);
    a rule whose fields are not all given is skipped, so a request's problems come in one round."""
    problems = []
    prompts = values.get("prompt")
    negatives = values.get("negative_prompt")
    if (values.get("prompt_syntax") or limits.prompt_syntaxes[0]) == "a1111":
        problems += prompt_weight_problems("prompt", prompts, limits.max_prompt_weight)
        problems += prompt_weight_problems("negative_prompt", negatives, limits.max_prompt_weight)
    if prompts is not None and negatives is not None and len(negatives) not in (1, len(prompts)):
        problems.append("negative_prompt: must be one string or one per prompt")
    width, height = values.get("width") or limits.native_size, values.get("height") or limits.native_size
    if width * height > limits.max_pixels:
        problems.append(f"width: width x height must be at most {limits.max_pixels} pixels, got {width * height}")
    images = values.get("num_images", 1) * len(prompts) if prompts is not None and "num_images" in values else None
    if images is not None and images > limits.max_images:
        problems.append(f"num_images: num_images x prompts must be at most {limits.max_images}, got {images}")
    seed = values.get("seed")
    if seed is not None and images is not None and seed + images > MAX_SEED:
        problems.append("seed: seed plus the number of images must stay below 2**63")
    image, strength = values.get("image"), values.get("strength")
    if strength is not None and image is None and "image" in values:
        problems.append("strength: only applies with an image")
    mask = values.get("mask")
    if mask is not None and image is None and "image" in values:
        problems.append("mask: needs an image, the picture to inpaint")
    if values.get("padding_mask_crop") is not None and mask is None and "mask" in values:
        problems.append("padding_mask_crop: only applies with a mask")
    steps = values.get("num_inference_steps") or limits.default_steps
    effective = limits.default_strength(mask is not None) if strength is None else strength
    if image is not None and "strength" in values and not limits.reference_image and int(steps * effective) < 1:
        problems.append(f"strength: with {steps} steps it must be at least {1 / steps:.3g} to denoise at all")
    problems += eta_problems(values, limits)
    return problems


def eta_problems(values: dict[str, Any], limits: Limits) -> list[str]:
    """``eta`` is refused where the request's scheduler (named, or the model's own) takes none; the refusal
    names it by our name, whichever style it was typed in."""
    if values.get("eta") is None or "scheduler" not in values:
        return []
    typed = values["scheduler"]  # as sent where another field failed, else our name for it
    name = offered_name(typed, limits.schedulers) if typed is not None else None
    if (typed is not None and name is None) or scheduler_class(name, limits.model_scheduler) in ETA_DEFAULTS:
        return []
    own = f" ({limits.model_scheduler})" if limits.model_scheduler else ""
    runs = f"scheduler '{name}'" if name is not None else f"the model's own scheduler{own}"
    takes = ", ".join(eta_names(limits.schedulers)) or "none of this model's"
    return [f"eta: only applies with a scheduler that takes it ({takes}); {runs} takes none"]


def prompt_weight_problems(field: str, texts: list[str] | None, max_weight: float) -> list[str]:
    """Weights that are not numbers or are out of range, under the field (and position) they are in."""
    problems = []
    for index, text in enumerate(texts or ()):
        where = field if len(texts or ()) == 1 else f"{field}[{index}]"
        problems += [f"{where}: {problem}" for problem in weight_problems(text, max_weight)]
    return problems


def field_location(loc: tuple[Any, ...]) -> str:
    """``loras[1].name``: list positions in brackets, as the request writes them."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{shown_key(part)}" if text else shown_key(part)
    return text or "input"


def shown_key(key: Any) -> str:
    """A key as an error names it: as sent where it is a short printable name, else quoted with its control
    characters escaped and cut to ``MAX_SHOWN_KEY`` characters, so a key the caller made up (a megabyte, a
    NUL, a line break) reaches neither the response nor the log as sent."""
    key = str(key)
    if len(key) <= MAX_SHOWN_KEY and key.isprintable():
        return key
    if len(key) <= MAX_SHOWN_KEY:
        return repr(key)
    return f"{key[:MAX_SHOWN_KEY]!r}... ({len(key)} characters)"


def error_location(error: Mapping[str, Any]) -> str:
    """Where one of pydantic's errors is: its location, and below it the ``at`` of a rule that gives one."""
    return field_location((*error["loc"], *error.get("ctx", {}).get("at", ())))


def unencodable_texts(payload: dict[str, Any]) -> list[str]:
    """Where the payload holds text that is not Unicode: JSON can carry a lone UTF-16 surrogate
    (``"\\ud800"``), which the tokenizers, the log and the file system cannot take."""
    found = []
    pending: list[tuple[tuple[Any, ...], Any]] = [((key,), value) for key, value in payload.items()]
    while pending:  # a loop, not recursion: the payload's nesting is the caller's to choose
        loc, value = pending.pop()
        for text in (loc[-1], value):
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    found.append(f"{field_location(loc)}: holds an unpaired surrogate, which is not Unicode text")
                    break
        if isinstance(value, dict):
            pending += [((*loc, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [((*loc, index), item) for index, item in enumerate(value)]
    return sorted(found)
