"""The model's chat template, rendered as transformers' `apply_chat_template` does.

The template comes from the tokenizer directory the launcher exported:
`chat_template.jinja`, else `chat_template.json`, else the `chat_template` of
`tokenizer_config.json` (a string, or a list of named templates of which
`default` is used). It runs in Jinja's immutable sandbox with transformers'
settings (`trim_blocks`, `lstrip_blocks`, loop controls) and helpers
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text).
A missing template or a failed rendering (e.g. the template's own
`raise_exception`) is an `errors.template` error (422).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tgi_mp.frontend import errors


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _special(value: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _read_template(directory: str) -> str | None:
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # named templates
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled: jinja2.Template | None = None
        if source is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(source)
            except jinja2.exceptions.TemplateError as e:
                self._error = f"the chat template does not compile: {e}"

    @classmethod
    def load(cls, directory: str) -> ChatTemplate:
        config: dict[str, Any] = {}
        path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        return cls(
            _read_template(directory),
            _special(config.get("bos_token")),
            _special(config.get("eos_token")),
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        extra: dict[str, Any] | None = None,
        continue_final: bool | None = None,
        generation_prompt: bool | None = None,
    ) -> str:
        """The prompt text for `messages` (`extra`: more template variables). When the
        last message is the assistant's, the text stops right after its content, so the
        model continues that message (unless `continue_final` is False, or
        `generation_prompt` is True: then a new assistant turn follows). The generation
        prompt follows unless continuing or `generation_prompt` is False (vLLM's)."""
        if self._compiled is None:
            raise errors.template(
                getattr(self, "_error", "this model has no chat template; use /v1/completions")
            )
        last_is_assistant = bool(messages) and messages[-1].get("role") == "assistant"
        if continue_final and not last_is_assistant:
            raise errors.invalid(
                "`continue_final_message` needs an assistant message last", "messages"
            )
        if continue_final is None:
            continue_final = last_is_assistant and generation_prompt is not True
        if generation_prompt is None:
            generation_prompt = not continue_final
        try:
            # The extra variables cannot replace the ones the rendering itself sets.
            text = self._compiled.render(
                {
                    **(extra or {}),
                    "messages": messages,
                    "bos_token": self.bos_token,
                    "eos_token": self.eos_token,
                    "add_generation_prompt": generation_prompt and not continue_final,
                }
            )
        except jinja2.exceptions.TemplateError as e:
            raise errors.template(str(e)) from e
        if continue_final:
            final = str(messages[-1].get("content") or "").strip()
            at = text.rfind(final) if final else -1
            if at < 0:
                raise errors.template("the final assistant message is not in the rendered prompt")
            text = text[: at + len(final)]
        return text
