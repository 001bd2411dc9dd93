"""OpenAI requests onto the engine: parameter mapping and checks (each an
`errors.invalid` naming the field)."""

from __future__ import annotations

import dataclasses
import json

import msgspec
from tokenizers import Tokenizer

from tgi_mp.frontend import errors, grammar, tools
from tgi_mp.frontend.chat_template import ChatTemplate
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    TextPart,
)
from tgi_mp.frontend.tgi_protocol import GenerateParameters
from tgi_mp.frontend.validation import (
    GREEDY_TEMPERATURE,
    INT32_MAX,
    ValidRequest,
    check_grammar_allowed,
    encode,
    with_fresh_seed,
)


def sampling_parameters(
    r: SamplingFields, max_tokens: int | None, top_n: int
) -> GenerateParameters:
    """OpenAI's fields as TGI parameters (checked by TGI's rules), following OpenAI where
    TGI differs: temperature 0 is greedy, top_p 1.0 means off, stop may be one string."""
    if r.temperature is not None and r.temperature < 0:
        raise errors.invalid("`temperature` must be >= 0.0", "temperature")
    if r.top_p is not None and not 0.0 < r.top_p <= 1.0:
        raise errors.invalid("`top_p` must be > 0.0 and <= 1.0", "top_p")
    if r.top_k is not None and r.top_k < -1:
        raise errors.invalid("`top_k` must be -1 (off), 0 (off) or a positive count", "top_k")
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


def with_extras(r: SamplingFields, v: ValidRequest, cfg: FrontendConfig) -> ValidRequest:
    """The knobs TGI's API lacks, checked and set on the engine parameters."""
    vocab = cfg.vocab_size
    if r.presence_penalty is not None and not -2.0 <= r.presence_penalty <= 2.0:
        raise errors.invalid("`presence_penalty` must be >= -2.0 and <= 2.0", "presence_penalty")
    if r.min_p is not None and not 0.0 <= r.min_p <= 1.0:
        raise errors.invalid("`min_p` must be >= 0.0 and <= 1.0", "min_p")
    bias: list[tuple[int, float]] = []
    for key, value in (r.logit_bias or {}).items():
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (key.isascii() and key.isdigit() and len(key) <= 18):
            raise errors.invalid(
                f"`logit_bias` keys must be token ids. Given: {key[:40]!r}", "logit_bias"
            )
        if vocab and int(key) >= vocab:
            raise errors.invalid(
                f"`logit_bias` token ids must be >= 0 and < {vocab}. Given: {int(key)}",
                "logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise errors.invalid(
                f"`logit_bias` values must be >= -100 and <= 100. Given: {value}", "logit_bias"
            )
        bias.append((int(key), float(value)))
    top = r.prompt_logprobs
    if top is not None and not 0 <= top <= cfg.max_top_n_tokens:
        raise errors.invalid(
            f"`prompt_logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {top}",
            "prompt_logprobs",
        )
    if top is not None and r.stream:  # vLLM's rule: the prompt is scored before any token
        raise errors.invalid(
            "`prompt_logprobs` are not available when `stream` is true", "prompt_logprobs"
        )
    if r.min_tokens > v.params.max_new_tokens:
        raise errors.invalid(
            f"`min_tokens` must be <= `max_tokens`. Given: {r.min_tokens} > "
            f"{v.params.max_new_tokens}",
            "min_tokens",
        )
    stop_ids = tuple(r.stop_token_ids or ())
    if vocab and any(i >= vocab for i in stop_ids):
        raise errors.invalid(f"`stop_token_ids` must be < {vocab}", "stop_token_ids")
    params = msgspec.structs.replace(
        v.params,
        ignore_eos=r.ignore_eos,
        min_tokens=r.min_tokens,
        stop_token_ids=stop_ids,
        presence_penalty=r.presence_penalty or 0.0,
        min_p=r.min_p or 0.0,
        logit_bias=tuple(bias),
        grammar=constraint(r, cfg),
        # OpenAI's `model` names an adapter; any other name is the base model (as before).
        adapter=cfg.lora_adapters.index(r.model) if r.model in cfg.lora_adapters else -1,
        prefill_logprobs=v.params.prefill_logprobs or top is not None,
        prompt_top_k=-1 if top is None else top,
    )
    return dataclasses.replace(
        v,
        params=params,
        skip_special_tokens=r.skip_special_tokens,
        include_stop_str=r.include_stop_str_in_output,
    )


def constraint(r: SamplingFields, cfg: FrontendConfig) -> str | None:
    """The grammar of `response_format` or of vLLM's `guided_*` (one of them at most)."""
    fmt = r.response_format
    given = {"response_format": fmt} if fmt and fmt.get("type") not in (None, "text") else {}
    given |= {name: getattr(r, name) for name in _GUIDED if getattr(r, name) is not None}
    if not given:
        return None
    name, value = next(iter(given.items()))
    check_grammar_allowed(cfg, name)
    if len(given) > 1:
        raise errors.invalid(f"only one of {', '.join(given)} may be given", list(given)[1])
    if name == "response_format":
        return grammar.from_response_format(value)
    return grammar.from_guided(name, value)


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def check_n(n: int, best_of: int, cfg_max: int) -> None:
    if best_of > cfg_max:
        name = "best_of" if best_of > n else "n"
        raise errors.invalid(f"`{name}` must be >= 1 and <= {cfg_max}. Given: {best_of}", name)


def check_ids(ids: list[int], vocab: int) -> None:
    if vocab and any(not 0 <= i < vocab for i in ids):
        raise errors.invalid(f"`prompt` token ids must be >= 0 and < {vocab}", "prompt")


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
    req: ChatCompletionRequest,
    template: ChatTemplate,
    tokenizer: Tokenizer,
    with_tools: tools.Tools | None = None,
) -> list[int]:
    """The prompt's token ids (`chat_text`, tokenized)."""
    return encode(tokenizer, chat_text(req, template, with_tools), add_special_tokens=False)


def chat_text(
    req: ChatCompletionRequest, template: ChatTemplate, with_tools: tools.Tools | None = None
) -> str:
    """The prompt: the messages checked, flattened and rendered by the template (with the
    tools that may be called, if any)."""
    if not req.messages:
        raise errors.invalid("`messages` must not be empty", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise errors.invalid(
                f"`messages` has an unknown role {m.role[:40]!r} (expected one of "
                f"{', '.join(sorted(CHAT_ROLES))})",
                "messages",
            )
        if m.role == "tool" and not m.tool_call_id:  # OpenAI's rule
            raise errors.invalid(
                f"`messages`[{i}] has role `tool` but no `tool_call_id`", "messages"
            )
        if m.tool_calls is not None and m.role != "assistant":
            raise errors.invalid(
                f"`messages`[{i}] has `tool_calls` but role {m.role[:40]!r}", "messages"
            )
        content = m.content
        if isinstance(content, list):
            if any(not isinstance(part, TextPart) for part in content):
                raise errors.invalid(
                    "`messages` has image content; this model reads text", "messages"
                )
            content = "".join(part.text for part in content)
        role = "system" if m.role == "developer" else m.role
        message: dict = {"role": role, "content": content or ""}
        if m.tool_calls:
            calls = [msgspec.to_builtins(c) for c in m.tool_calls]
            if "tool_calls" in (template.source or ""):
                message["tool_calls"] = calls
            elif not content:  # TGI's rendering for templates that know no tool calls
                message["content"] = json.dumps(calls, ensure_ascii=False)
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    extra = {}
    if with_tools is not None:
        extra = tools.render_extra(with_tools, template.source, messages)
    # vLLM's template options: more template variables (the tools' win over them).
    extra = {**(req.chat_template_kwargs or {}), **extra}
    if req.continue_final_message and req.add_generation_prompt:
        raise errors.invalid(
            "`continue_final_message` and `add_generation_prompt` cannot both be true",
            "continue_final_message",
        )
    return template.render(
        messages,
        extra,
        continue_final=req.continue_final_message,
        generation_prompt=req.add_generation_prompt,
    )  # the template places BOS itself


def chat_tools(req: ChatCompletionRequest, cfg: FrontendConfig) -> tools.Tools | None:
    """The request's callable tools (checked, with their grammar), or None."""
    if req.tools is not None and req.response_format is not None:  # TGI's rule and words
        raise errors.invalid("Tool error: Grammar and tools are mutually exclusive", "tools")
    if req.tools and req.tool_choice != "none":
        check_grammar_allowed(cfg, "tools")
    return tools.from_request(req.tools, req.tool_choice, req.tool_prompt)


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
        raise errors.invalid(
            "`prompt` must be a string, a list of strings, a list of token ids, or a "
            "list of lists of token ids",
            "prompt",
        )
    if not prompts or any(len(x) == 0 for x in prompts):
        raise errors.invalid("`prompt` must not be empty", "prompt")
    if len(prompts) > cfg.max_client_batch_size:
        raise errors.invalid(
            "Number of prompts exceeds the maximum allowed batch size of "
            f"{cfg.max_client_batch_size}",
            None,
        )
    out = []
    for x in prompts:
        if isinstance(x, str):
            out.append((encode(tokenizer, x, add_special_tokens=True), x))
        else:
            check_ids(x, cfg.vocab_size)
            out.append((list(x), tokenizer.decode(x, skip_special_tokens=False)))
    return out
