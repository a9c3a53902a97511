"""A payload checked against the request schema: every problem at once, as 'field: rule', and what passed.

The schema (``engine.request.schema``) says what each field takes; here a payload is checked whole:
text that is not Unicode stops it first, then every field's problems and the rules across fields
are gathered in one round, and the fields that passed are kept for admission's own checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from engine.common.errors import RequestError
from engine.request.entries import ControlImageEntry, ControlNetEntry, LoraEntry
from engine.request.ip_adapter_entry import IpAdapterEntry
from engine.request.limits import Limits
from engine.request.resolved import ResolvedRequest
from engine.request.rules import cross_field_problems, error_location, unencodable_texts
from engine.request.schema import GenerateRequest, text_list


@dataclass(frozen=True)
class Checked:
    """What the schema made of a payload: the request when every rule holds; else its problems, as
    'field: rule', and the fields that passed on their own, for the checks that can go on without
    the others (admission's, in ``engine.serving.admission``)."""

    request: GenerateRequest | None
    fields: dict[str, Any]
    """Every field that passed on its own, in model form; one not sent has its default. A field that
    failed is left out, and so is every field when the payload is no JSON object or holds text that
    is not Unicode."""
    problems: tuple[str, ...] = ()


def check_request(payload: Any, limits: Limits) -> Checked:
    """Validates ``job["input"]``, listing every problem as 'field: rule' and keeping what passed."""
    if not isinstance(payload, dict):
        return Checked(None, {}, ("input: must be a JSON object",))
    unencodable = unencodable_texts(payload)
    if unencodable:
        return Checked(None, {}, tuple(unencodable))
    try:
        request = GenerateRequest.model_validate(payload, context=limits)
    except ValidationError as error:
        items = error.errors(include_url=False)
        problems = [f"{error_location(item)}: {item['msg']}" for item in items]
        fields = _valid_fields(payload, {item["loc"][0] for item in items if item["loc"]})
        problems += cross_field_problems(fields, limits)
        return Checked(None, fields, tuple(dict.fromkeys(problems)))
    except RequestError as error:  # every field passed on its own; a rule across them did not
        return Checked(None, _valid_fields(payload, set()), (str(error),))
    return Checked(request, {name: getattr(request, name) for name in GenerateRequest.model_fields})


def validate_request(payload: Any, limits: Limits) -> GenerateRequest:
    """Validates ``job["input"]``; raises RequestError listing every problem as 'field: rule'."""
    checked = check_request(payload, limits)
    if checked.request is None:
        raise RequestError("; ".join(checked.problems))
    return checked.request


def _valid_fields(payload: dict[str, Any], failed: set[Any]) -> dict[str, Any]:
    """The fields that passed on their own, in model form, with defaults for the ones not sent."""
    fields = GenerateRequest.model_fields
    values = {name: field.default for name, field in fields.items() if not field.is_required() and name not in failed}
    values.update({name: value for name, value in payload.items() if name in fields and name not in failed})
    for name in ("prompt", "negative_prompt"):
        if values.get(name) is not None:
            values[name] = text_list(values[name])
    if values.get("loras") is not None:
        values["loras"] = [LoraEntry.model_validate(entry) for entry in values["loras"]]
    if values.get("controlnets") is not None:
        values["controlnets"] = [ControlNetEntry.model_validate(entry) for entry in values["controlnets"]]
    if values.get("control") is not None:
        values["control"] = ControlImageEntry.model_validate(values["control"])
    if values.get("ip_adapters") is not None:
        values["ip_adapters"] = [IpAdapterEntry.model_validate(entry) for entry in values["ip_adapters"]]
    return values


def parse_request(payload: Any, limits: Limits) -> ResolvedRequest:
    """A text-to-image request, validated and with its defaults."""
    return validate_request(payload, limits).resolved(limits)
