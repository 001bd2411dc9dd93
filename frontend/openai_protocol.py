"""The OpenAI API's request and response bodies (chat, completions, models, errors).

Request fields follow OpenAI's API reference; the extra sampling fields
(`top_k`, `min_p`, `repetition_penalty`) are the ones vLLM also accepts.
Unknown keys are ignored. Response structs omit what OpenAI omits: `usage` on
stream chunks appears only with `stream_options.include_usage`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from tgi_mp.frontend.tgi_protocol import F32

UNSET = msgspec.UNSET
Unset = msgspec.UnsetType


# ---------------------------------------------------------------- requests


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageUrlPart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: dict[str, Any]


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[TextPart | ImageUrlPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # OpenAI's `seed`


class SamplingFields(msgspec.Struct, kw_only=True):
    """What chat and completions requests share."""

    model: str | None = None
    max_tokens: NonNegativeInt | None = None
    temperature: F32 | None = None
    top_p: F32 | None = None
    n: PositiveInt = 1
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: F32 | None = None
    frequency_penalty: F32 | None = None
    logit_bias: dict[str, F32] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted beyond OpenAI's set, as vLLM does.
    top_k: Int64 | None = None
    min_p: F32 | None = None
    repetition_penalty: F32 | None = None
    # Structured output: OpenAI's (chat; vLLM also takes it on completions) and vLLM's.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's extras (benchmark tools and clients send them).
    ignore_eos: bool = False
    min_tokens: NonNegativeInt = 0
    stop_token_ids: list[NonNegativeInt] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # no effect: fast tokenizers have no such choice
    include_stop_str_in_output: bool = False
    # vLLM's: each prompt token's logprob and rank, and the k most likely tokens there.
    prompt_logprobs: int | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: bool = False
    top_logprobs: NonNegativeInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    tool_prompt: str | None = None  # TGI's: the instruction appended after the tools
    # vLLM's chat extras: template options, and echoing the final assistant message.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    echo: bool = False


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of such lists
    # (msgspec takes one array type per union: the kinds are told apart on use).
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    logprobs: NonNegativeInt | None = None
    best_of: PositiveInt | None = None
    suffix: str | None = None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class PromptLogprob(msgspec.Struct):
    """vLLM's entry of `prompt_logprobs`: a token at a prompt position."""

    logprob: float
    rank: int  # 1 + the tokens more likely there
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token, null for the first, then {token id: entry}
# for the prompt's own token and the most likely ones.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | Unset = UNSET  # with vLLM's `prompt_logprobs`


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """OpenAI's streamed call: the first delta of a call has its id, type and name,
    later ones fragments of the arguments' JSON."""

    index: int
    function: FunctionDelta
    id: str | None = None
    type: str | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | Unset | None = UNSET


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobs | Unset = UNSET  # with vLLM's `prompt_logprobs`


class Completion(msgspec.Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | Unset | None = UNSET


class Model(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field)


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


# ---------------------------------------------------------------- vLLM's tokenizer routes


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct):
    prompt: str
