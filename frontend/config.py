"""What every HTTP worker is configured with: written by `tgi-mp serve`, read by each."""

from __future__ import annotations

import msgspec

from tgi_mp.options import DEFAULTS


class FrontendConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The frontend's options (their defaults and help: `tgi_mp.options`), and what the
    launcher resolved once the engine was up."""

    ipc_root: str
    tokenizer_dir: str
    model_id: str
    max_input_tokens: int  # resolved: the option, else max_total_tokens - 1
    max_total_tokens: int  # resolved: the option, else min(KV capacity, model context)
    vocab_size: int = 0  # the model's: token ids must be below it
    served_model_name: str = ""  # the `model` of OpenAI answers; model_id when empty
    lora_adapters: list[str] = msgspec.field(default_factory=list)  # names, in engine order
    max_concurrent_requests: int = DEFAULTS["max_concurrent_requests"]  # of this worker
    validation_workers: int = DEFAULTS["validation_workers"]  # threads, per HTTP worker
    max_best_of: int = DEFAULTS["max_best_of"]
    max_stop_sequences: int = DEFAULTS["max_stop_sequences"]
    max_top_n_tokens: int = DEFAULTS["max_top_n_tokens"]
    max_client_batch_size: int = DEFAULTS["max_client_batch_size"]
    enable_prefill_logprobs: bool = DEFAULTS["enable_prefill_logprobs"]
    disable_grammar_support: bool = DEFAULTS["disable_grammar_support"]
    payload_limit: int = DEFAULTS["payload_limit"]
    access_log: bool = DEFAULTS["access_log"]  # off with --disable-access-log
    api_key: str | None = DEFAULTS["api_key"]
    cors_allow_origin: list[str] = msgspec.field(default_factory=list)
    otlp_endpoint: str | None = DEFAULTS["otlp_endpoint"]
    otlp_service_name: str = DEFAULTS["otlp_service_name"]
    # What the engine reported when it was ready.
    max_batch_total_tokens: int = 0
    block_size: int = 16
    dtype: str = "float32"
    attention_backend: str = "torch"
    num_shards: int = 1
    version: str = "0.1.0"
