"""OpenAI tool calling on top of grammars: the tools into the prompt, a grammar that makes
the answer a valid call (`{"name": <tool>, "arguments": <its parameters>}`), and the
answer back as `tool_calls`, whole or streamed as OpenAI's deltas.

`tool_choice`: `none` (plain chat, tools left out, as TGI), `required` (one of the
tools), a named function (that one; `{"type": "function", "function": {"name"}}` or,
as TGI also takes, the bare name), `auto` (the default: a call, or text that does not
start with `{`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import llguidance

from tgi_mp.frontend import errors, grammar

TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with "
    'its proper arguments that best answers the given prompt. Respond in the format {"name": '
    'function name, "arguments": dictionary of argument name and its value}. Do not use '
    "variables.\n"
)
# What a call starts with (the grammar writes the name first, then the arguments).
_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


@dataclass
class Tools:
    tools: list[dict[str, Any]]  # OpenAI's tool objects, checked
    names: list[str]
    auto: bool  # the answer may be text instead of a call
    grammar: str = ""
    prompt: str = TOOL_PROMPT


def from_request(
    tools: list[dict[str, Any]] | None, choice: Any, tool_prompt: str | None = None
) -> Tools | None:
    """The checked tools and the grammar of the answer; None when no tool may be called."""
    if not tools or choice == "none":
        return None
    functions = [_function(t, i) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    auto = choice in (None, "auto")
    chosen = functions
    if not auto and choice != "required":
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else choice
        if not isinstance(name, str):
            raise errors.invalid("Tool error: `tool_choice` must name a function", "tool_choice")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:  # TGI's words
            raise errors.invalid(f"Tool error: Tool with name {name} not found", "tool_choice")
    calls = [_call_schema(f) for f in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": grammar.JSON_STYLE}
    if auto:
        lark = f"start: call | text\ncall: %json {json.dumps(schema)}\ntext: /[^{{][\\s\\S]*/\n"
        compiled = grammar.checked(llguidance.LLMatcher.grammar_from_lark(lark), "tools")
    else:
        compiled = grammar.json_schema_grammar(schema, "tools")
    return Tools(tools, names, auto, compiled, tool_prompt or TOOL_PROMPT)


def _function(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise errors.invalid(f"Tool error: `tools`[{i}] must be of type function", "tools")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise errors.invalid(f"Tool error: `tools`[{i}] needs `function.name`", "tools")
    params = fn.get("parameters", fn.get("arguments", {"type": "object"}))  # TGI's alias
    if not isinstance(params, dict):
        raise errors.invalid(f"Tool error: `tools`[{i}] parameters must be a schema", "tools")
    return {"name": fn["name"], "parameters": params or {"type": "object"}}


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn["parameters"]
    if "additionalProperties" not in params:  # TGI's default: only the declared ones
        params = {**params, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def render_extra(tools: Tools, template_source: str | None, messages: list[dict]) -> dict:
    """The template's `tools=` when it takes them; otherwise the tools and the prompt are
    appended to the last message (TGI's rule). Returns the template's extra arguments."""
    if template_source is not None and "tools" in template_source:
        messages[-1]["content"] = f"{messages[-1]['content']}\n---\n{tools.prompt}"
        return {"tools": tools.tools}
    listed = json.dumps(tools.tools, ensure_ascii=False)
    messages[-1]["content"] = f"{messages[-1]['content']}\n---\n{listed}\n{tools.prompt}"
    return {}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete call, or None (text, or cut short)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    return value["name"], json.dumps(value["arguments"], ensure_ascii=False)


@dataclass
class CallStream:
    """One choice's streamed text as OpenAI's deltas: `feed` each piece, `end` once;
    each returns (content, (id, name) of a call that starts, argument fragment)."""

    auto: bool
    mode: str = "undecided"  # "text" or "call" once the first character says
    buffer: str = ""
    id: str = field(default_factory=call_id)

    def feed(self, piece: str) -> tuple[str, tuple[str, str] | None, str]:
        self.buffer += piece
        if self.mode == "undecided":
            head = self.buffer.lstrip()
            if not head:
                return "", None, ""
            self.mode = "call" if head.startswith("{") or not self.auto else "text"
        if self.mode == "text":
            out, self.buffer = self.buffer, ""
            return out, None, ""
        if self.mode == "call":
            m = _HEAD.match(self.buffer)
            if m is None:
                return "", None, ""
            self.mode, self.buffer = "arguments", self.buffer[m.end() :]
            return "", (self.id, json.loads(f'"{m[1]}"')), self._fragment()
        return "", None, self._fragment()

    def _fragment(self) -> str:
        # Hold back the last character: the call's closing brace is not the arguments'.
        out, self.buffer = self.buffer[:-1], self.buffer[-1:]
        return out

    def end(self) -> tuple[str, tuple[str, str] | None, str]:
        if self.mode in ("undecided", "text", "call"):  # a call cut short stays text
            out, self.buffer = self.buffer, ""
            return out, None, ""
        rest, self.buffer = self.buffer, ""
        return "", None, rest[:-1] if rest.endswith("}") else rest
