"""OpenAI requests onto the engine: parameter mapping and checks, and OpenAI's
error bodies (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import msgspec
from tokenizers import Tokenizer

from tgi_mp.frontend import metrics
from tgi_mp.frontend.chat_template import ChatTemplate, TemplateError
from tgi_mp.frontend.http import HTTPError
from tgi_mp.frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    SamplingFields,
    TextPart,
)
from tgi_mp.frontend.protocol import FrontendConfig, GenerateParameters
from tgi_mp.frontend.validation import (
    GREEDY_TEMPERATURE,
    INT32_MAX,
    ValidationError,
    ValidRequest,
    encode,
    with_fresh_seed,
)

_json = msgspec.json.Encoder()
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# ---------------------------------------------------------------- errors


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> HTTPError:
    detail = ErrorDetail(message, _ERROR_TYPES.get(status, "server_error"), param, code)
    return HTTPError(status, _json.encode(ErrorBody(detail)), b"application/json")


def invalid(e: ValidationError | TemplateError) -> HTTPError:
    """A 422 naming the parameter that the message names first, counted as TGI counts it."""
    metrics.failure("validation" if isinstance(e, ValidationError) else "template_error")
    found = re.search(r"`(\w+)`", str(e))
    prefix = "Template error: " if isinstance(e, TemplateError) else ""
    return openai_error(422, prefix + str(e), found.group(1) if found else None)


def as_openai(e: HTTPError) -> HTTPError:
    """An error raised by the shared (TGI-shaped) path, reshaped for a /v1 client."""
    if e.body.startswith(b'{"error":{'):
        return e
    message, code, param = e.body.decode(errors="replace"), None, None
    if e.content_type == b"application/json":
        with contextlib.suppress(msgspec.DecodeError, KeyError, TypeError):
            body = msgspec.json.decode(e.body)
            message, code = body["error"], body.get("error_type")
    if found := re.search(r"at `\$\.([^`]+)`", message):  # msgspec names the field's path
        param = found.group(1)
    if not message and e.status == 401:
        message = "Invalid or missing API key"
    elif not message and e.status == 404:
        message = "Not found"
    return openai_error(e.status, message, param, code)


# ---------------------------------------------------------------- requests -> engine


def sampling_parameters(
    r: SamplingFields, max_tokens: int | None, top_n: int
) -> GenerateParameters:
    """OpenAI's fields as TGI parameters (checked by TGI's rules), following OpenAI where
    TGI differs: temperature 0 is greedy, top_p 1.0 means off, stop may be one string."""
    if r.temperature is not None and r.temperature < 0:
        raise ValidationError("`temperature` must be >= 0.0")
    if r.top_p is not None and not 0.0 < r.top_p <= 1.0:
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    if r.top_k is not None and r.top_k < -1:
        raise ValidationError("`top_k` must be -1 (off), 0 (off) or a positive count")
    # vLLM's rule: a temperature too small to divide by is greedy decoding.
    greedy = r.temperature is not None and r.temperature < GREEDY_TEMPERATURE
    return GenerateParameters(
        temperature=None if greedy else r.temperature,
        do_sample=not greedy,
        top_p=None if r.top_p in (None, 1.0) else r.top_p,
        # vLLM's -1: off; beyond the vocabulary it keeps every token (clamped in `build`).
        top_k=None if r.top_k in (None, 0, -1) else min(r.top_k, INT32_MAX),
        repetition_penalty=r.repetition_penalty,
        frequency_penalty=r.frequency_penalty,
        max_new_tokens=max_tokens,
        stop=[r.stop] if isinstance(r.stop, str) else list(r.stop or []),
        seed=None if r.seed is None else r.seed % (1 << 64),
        top_n_tokens=top_n,
        details=True,
    )


def with_extras(r: SamplingFields, v: ValidRequest, vocab: int) -> ValidRequest:
    """The knobs TGI's API lacks, checked and set on the engine parameters."""
    if r.presence_penalty is not None and not -2.0 <= r.presence_penalty <= 2.0:
        raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    if r.min_p is not None and not 0.0 <= r.min_p <= 1.0:
        raise ValidationError("`min_p` must be >= 0.0 and <= 1.0")
    bias: list[tuple[int, float]] = []
    for key, value in (r.logit_bias or {}).items():
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise ValidationError(f"`logit_bias` keys must be token ids. Given: {key[:40]!r}")
        if vocab and int(key) >= vocab:
            raise ValidationError(
                f"`logit_bias` token ids must be >= 0 and < {vocab}. Given: {int(key)}"
            )
        if not -100.0 <= value <= 100.0:
            raise ValidationError(f"`logit_bias` values must be >= -100 and <= 100. Given: {value}")
        bias.append((int(key), float(value)))
    params = msgspec.structs.replace(
        v.params,
        presence_penalty=r.presence_penalty or 0.0,
        min_p=r.min_p or 0.0,
        logit_bias=tuple(bias),
    )
    return dataclasses.replace(v, params=params)


def check_n(n: int, best_of: int, cfg_max: int) -> None:
    if best_of > cfg_max:
        name = "best_of" if best_of > n else "n"
        raise ValidationError(f"`{name}` must be >= 1 and <= {cfg_max}. Given: {best_of}")


def check_ids(ids: list[int], vocab: int) -> None:
    if vocab and any(not 0 <= i < vocab for i in ids):
        raise ValidationError(f"`prompt` token ids must be >= 0 and < {vocab}")


def copies(v: ValidRequest, count: int, seed: int | None) -> list[ValidRequest]:
    """`count` sequences of one prompt: seeded ones get seed, seed + 1, ... (reproducible),
    others their own random seeds; greedy ones are the same request again."""
    if v.seed is None:
        return [v] * count
    if seed is None:
        return [v, *(with_fresh_seed(v) for _ in range(count - 1))]
    return [with_fresh_seed(v, seed + j) for j in range(count)]


CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


def chat_prompt(
    req: ChatCompletionRequest, template: ChatTemplate, tokenizer: Tokenizer
) -> list[int]:
    """The prompt's token ids: the messages checked, flattened and rendered by the template."""
    if not req.messages:
        raise ValidationError("`messages` must not be empty")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise ValidationError(
                f"`messages` has an unknown role {m.role[:40]!r} (expected one of "
                f"{', '.join(sorted(CHAT_ROLES))})"
            )
        if m.role == "tool" and not m.tool_call_id:  # OpenAI's rule
            raise ValidationError(f"`messages`[{i}] has role `tool` but no `tool_call_id`")
        if m.tool_calls is not None and m.role != "assistant":
            raise ValidationError(f"`messages`[{i}] has `tool_calls` but role {m.role[:40]!r}")
        content = m.content
        if isinstance(content, list):
            if any(not isinstance(part, TextPart) for part in content):
                raise ValidationError("`messages` has image content; this model reads text")
            content = "".join(part.text for part in content)
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": content or ""})
    if req.tools and req.tool_choice != "none":
        raise ValidationError("`tools` are not supported by this server yet")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise ValidationError("`response_format` other than text is not supported yet")
    text = template.render(messages)  # the template places BOS itself
    return encode(tokenizer, text, add_special_tokens=False)


def completion_prompts(
    req: CompletionRequest, cfg: FrontendConfig, tokenizer: Tokenizer
) -> list[tuple[list[int], str]]:
    """Each prompt's token ids and text (ids given as a prompt are decoded)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]  # one prompt of token ids
    elif all(isinstance(x, str) for x in prompt) or all(isinstance(x, list) for x in prompt):
        prompts = list(prompt)
    else:
        raise ValidationError(
            "`prompt` must be a string, a list of strings, a list of token ids, or a "
            "list of lists of token ids"
        )
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ValidationError("`prompt` must not be empty")
    if len(prompts) > cfg.max_client_batch_size:
        raise ValidationError(
            "Number of prompts exceeds the maximum allowed batch size of "
            f"{cfg.max_client_batch_size}"
        )
    out = []
    for x in prompts:
        if isinstance(x, str):
            out.append((encode(tokenizer, x, add_special_tokens=True), x))
        else:
            check_ids(x, cfg.vocab_size)
            out.append((list(x), tokenizer.decode(x, skip_special_tokens=False)))
    return out
