"""Request constraints to the grammar the scheduler's matchers run (llguidance's).

Every spelling clients send: TGI's `parameters.grammar` (`{"type": "json" | "json_object"
| "json_schema" | "regex", "value": ...}`), OpenAI's `response_format` (`json_object`,
`json_schema` with its `json_schema.schema` envelope, and TGI's and huggingface_hub's
`{"type", "value"}` forms), and vLLM's `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`. Each is compiled and validated here, so a bad schema or regex is a
422 with the compiler's message before the request reaches the engine.
"""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from tgi_mp.frontend import errors

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# JSON as `json.dumps` writes it: one space after `,` and `:`, no other whitespace (a
# schema may say otherwise with its own "x-guidance"). Free whitespace lets a small
# model spend its token budget on newlines and indentation.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def json_schema_grammar(schema: Any, field: str) -> str:
    """A JSON schema (an object, or a string holding one) as a grammar."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise errors.invalid(f"grammar is not valid: {e}", field) from e
    if not isinstance(schema, dict):
        raise errors.invalid("grammar is not supported", field)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise errors.invalid(f"grammar is not valid: {e.message}", field) from e
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise errors.invalid(f"grammar is not valid: {e}", field) from e
    return checked(grammar, field)


def regex_grammar(regex: Any, field: str) -> str:
    if not isinstance(regex, str):
        raise errors.invalid("grammar is not valid: a regex must be a string", field)
    return checked(llguidance.LLMatcher.grammar_from_regex(regex), field)


def lark_grammar(lark: str, field: str) -> str:
    if "::=" in lark:  # GBNF (llama.cpp's, vLLM's EBNF): llguidance reads it as Lark
        try:
            lark = llguidance.gbnf_to_lark(lark)
        except Exception as e:  # its converter raises plain exceptions
            raise errors.invalid(f"grammar is not valid: {e}", field) from e
    return checked(llguidance.LLMatcher.grammar_from_lark(lark), field)


def checked(grammar: str, field: str) -> str:
    """The grammar, once llguidance's own validation has passed it."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise errors.invalid(f"grammar is not valid: {messages[0]}", field)
    return grammar


def from_tgi(grammar: Any, field: str = "grammar") -> str:
    """TGI's adjacently tagged `{"type", "value"}` (also in `response_format`)."""
    if not isinstance(grammar, dict) or "type" not in grammar:
        raise errors.invalid("grammar is not supported", field)
    kind = grammar["type"]
    if "value" not in grammar:
        raise errors.invalid(f"`{field}` of type {kind!r} needs a `value`", field)
    value = grammar["value"]
    if kind in ("json", "json_object"):
        return json_schema_grammar(value, field)
    if kind == "json_schema":
        # TGI's value is {"name"?, "schema"}; huggingface_hub sends the schema itself.
        if isinstance(value, dict) and isinstance(value.get("schema"), dict):
            value = value["schema"]
        return json_schema_grammar(value, field)
    if kind == "regex":
        return regex_grammar(value, field)
    raise errors.invalid(
        f"`{field}` type must be one of json, json_object, json_schema, regex; got {kind!r}",
        field,
    )


def from_response_format(fmt: dict[str, Any] | None) -> str | None:
    """OpenAI's `response_format` (or TGI's shape of it); None for plain text."""
    field = "response_format"
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if "value" in fmt:
        return from_tgi(fmt, field)
    kind = fmt["type"]
    if kind == "json_object":
        return json_schema_grammar(ANY_OBJECT, field)
    if kind == "json_schema":
        envelope = fmt.get("json_schema")
        if not isinstance(envelope, dict) or "schema" not in envelope:
            raise errors.invalid(
                "`response_format` of type json_schema needs `json_schema.schema`", field
            )
        return json_schema_grammar(envelope["schema"], field)
    raise errors.invalid(
        f"`response_format` type must be text, json_object or json_schema; got {kind!r}", field
    )


def from_guided(name: str, value: Any) -> str:
    """One of vLLM's `guided_*` extras (`name`: which) as a grammar."""
    if name == "guided_json":
        return json_schema_grammar(value, name)
    if name == "guided_regex":
        return regex_grammar(value, name)
    if name == "guided_choice":
        if not value or not all(isinstance(c, str) for c in value):
            raise errors.invalid("`guided_choice` must be a non-empty list of strings", name)
        return regex_grammar("|".join(_escape(c) for c in value), name)
    return lark_grammar(value, name)


def _escape(text: str) -> str:
    """A literal in llguidance's (Rust) regex syntax: its meta characters escaped."""
    return re.sub(r"([\\.+*?()|\[\]{}^$#&\-~])", r"\\\1", text)
