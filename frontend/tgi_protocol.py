"""TGI's HTTP request and response bodies, as msgspec types (wire order kept).

These are the HTTP schemas only (OpenAI's are in `openai_protocol`); what
crosses to the scheduler is in `tgi_mp.ipc.messages`. Unknown request keys are
ignored, as TGI does.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

UInt = Annotated[int, msgspec.Meta(ge=0)]
UInt32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
# msgspec takes ints of any size and bounds only within int64: validation checks the top.
UInt64 = Annotated[int, msgspec.Meta(ge=0)]
U64_MAX = 2**64 - 1
# TGI's f32: a JSON number beyond float32's range is refused, not turned into infinity.
F32_MAX = 3.4028234663852886e38
F32 = Annotated[float, msgspec.Meta(ge=-F32_MAX, le=F32_MAX)]


class GenerateParameters(msgspec.Struct, kw_only=True):
    best_of: UInt | None = None
    temperature: F32 | None = None
    repetition_penalty: F32 | None = None
    frequency_penalty: F32 | None = None
    top_k: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)] | None = None
    top_p: F32 | None = None
    typical_p: F32 | None = None
    do_sample: bool = False
    max_new_tokens: UInt32 | None = None
    return_full_text: bool | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    truncate: UInt | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: UInt64 | None = None
    top_n_tokens: UInt32 | None = None
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None
    # vLLM's extras, taken on TGI's routes too.
    ignore_eos: bool = False
    min_tokens: UInt32 = 0
    stop_token_ids: list[UInt32] = msgspec.field(default_factory=list)


class GenerateRequest(msgspec.Struct, kw_only=True):
    inputs: str
    # Absent `parameters` means sampling on (TGI's default); `{}` means greedy.
    parameters: GenerateParameters | None = None
    stream: bool = False  # only read by `POST /`


class Token(msgspec.Struct):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(msgspec.Struct):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(msgspec.Struct, omit_defaults=True):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] = []


class Details(msgspec.Struct, omit_defaults=True):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] = []  # only when best_of > 1
    top_tokens: list[list[Token]] = []  # only when top_n_tokens > 0


class GenerateResponse(msgspec.Struct, omit_defaults=True):
    generated_text: str
    details: Details | None = None


class StreamDetails(msgspec.Struct):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    token: Token
    top_tokens: list[Token] = []  # only when top_n_tokens > 0
    generated_text: str | None
    details: StreamDetails | None


class ErrorResponse(msgspec.Struct):
    error: str
    error_type: str


class TokenizeItem(msgspec.Struct):
    id: int
    text: str
    start: int
    stop: int


class Version(msgspec.Struct):
    version: str


class ChatTokenizeResponse(msgspec.Struct):
    tokenize_response: list[TokenizeItem]
    templated_text: str


class Info(msgspec.Struct):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    # tgi-mp's additions (TGI comments these out): what the engine really has.
    max_batch_total_tokens: int
    dtype: str
    attention_backend: str
