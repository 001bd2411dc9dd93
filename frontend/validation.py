"""TGI's request validation: its checks, in its order, with its messages word for word
(each an `errors.invalid`: a 422 naming the field)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import msgspec
from tokenizers import Tokenizer

from tgi_mp.frontend import errors, grammar
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.frontend.tgi_protocol import U64_MAX, GenerateParameters, GenerateRequest
from tgi_mp.ipc.messages import SamplingParams

# Below this a temperature divides logits into infinities: such a request is greedy
# (vLLM's rule, and its threshold).
GREEDY_TEMPERATURE = 1e-5
INT32_MAX = 2**31 - 1


@dataclass
class ValidRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str]
    seed: int | None  # reported in details: the seed used when sampling, else None
    details: bool
    return_full_text: bool
    best_of: int = 1
    skip_special_tokens: bool = True  # OpenAI routes: special tokens show no text
    include_stop_str: bool = False  # OpenAI routes: keep the stop string that ended it


def adapter_index(name: str | None, cfg: FrontendConfig) -> int:
    """TGI's `adapter_id`: the index of a `--lora-adapters` name; none: -1 (the base
    model). An unknown one is a 422 (TGI itself falls back to the base model: #2505)."""
    if not name:
        return -1
    try:
        return cfg.lora_adapters.index(name)
    except ValueError:
        have = ", ".join(cfg.lora_adapters) or "none"
        raise errors.invalid(
            f"`adapter_id` {name!r} is not a loaded LoRA adapter (loaded: {have})", "adapter_id"
        ) from None


def _to_int64(seed: int) -> int:
    """A u64 seed as the int64 with the same bits (the engine's seed column)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def validate_best_of(p: GenerateParameters, cfg: FrontendConfig) -> None:
    n = p.best_of
    if n is not None and n > 1:
        if cfg.max_best_of == 1:
            raise errors.invalid("`best_of` != 1 is not allowed for this endpoint", "best_of")
        if n > cfg.max_best_of:
            raise errors.invalid(
                f"`best_of` must be > 0 and <= {cfg.max_best_of}. Given: {n}", "best_of"
            )


def validate(req: GenerateRequest, cfg: FrontendConfig, tokenizer: Tokenizer) -> ValidRequest:
    """TGI's `/generate` validation: its checks in its order."""
    p = req.parameters if req.parameters is not None else GenerateParameters(do_sample=True)
    validate_best_of(p, cfg)
    sampling = check_parameters(p, cfg)
    if req.inputs == "":
        raise errors.invalid("`inputs` cannot be empty", "inputs")
    if p.truncate is not None and not 0 < p.truncate <= cfg.max_input_tokens:
        raise errors.invalid(
            "`truncate` must be strictly positive and less than "
            f"{cfg.max_input_tokens}. Given: {p.truncate}",
            "truncate",
        )
    ids = encode(tokenizer, req.inputs, add_special_tokens=True)
    if p.truncate is not None:
        ids = ids[-p.truncate :]
    return build(ids, p, cfg, sampling)


def check_parameters(p: GenerateParameters, cfg: FrontendConfig) -> bool:
    """The per-parameter rules, in TGI's order; whether the request samples."""
    # TGI samples when asked to, or when any warper is set (the shard's rule).
    warpers = (
        (p.temperature is not None and p.temperature != 1.0)
        or bool(p.top_k)
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
    )
    if p.seed is not None and p.seed > U64_MAX:  # TGI's u64: a deserialization error there
        raise errors.invalid(f"`seed` must be >= 0 and <= {U64_MAX}. Given: {p.seed}", "seed")
    best_of = p.best_of or 1
    if best_of > 1 and not (p.do_sample or warpers):
        raise errors.invalid("you must use sampling when `best_of` is > 1", "best_of")
    if p.temperature is not None and p.temperature <= 0:
        raise errors.invalid("`temperature` must be strictly positive", "temperature")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise errors.invalid("`repetition_penalty` must be strictly positive", "repetition_penalty")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise errors.invalid("`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise errors.invalid("`top_p` must be > 0.0 and < 1.0", "top_p")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise errors.invalid("`typical_p` must be > 0.0 and < 1.0", "typical_p")
    if p.top_k is not None and p.top_k <= 0:
        raise errors.invalid("`top_k` must be strictly positive", "top_k")
    if p.max_new_tokens == 0:
        raise errors.invalid("`max_new_tokens` must be strictly positive", "max_new_tokens")
    if len(p.stop) > cfg.max_stop_sequences:
        raise errors.invalid(
            f"`stop` supports up to {cfg.max_stop_sequences} stop sequences. Given: {len(p.stop)}",
            "stop",
        )
    if best_of > 1 and p.seed is not None:
        raise errors.invalid("`seed` must not be set when `best_of` > 1", "seed")
    if (p.top_n_tokens or 0) > cfg.max_top_n_tokens:
        raise errors.invalid(
            f"`top_n_tokens` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {p.top_n_tokens}",
            "top_n_tokens",
        )
    return p.do_sample or warpers


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    try:
        # encode_batch lets go of the GIL while the Rust tokenizer runs (encode holds it),
        # so a huge prompt validated in a worker thread stalls no other stream.
        return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise errors.invalid(f"tokenizer error {e}") from e


def build(
    ids: list[int], p: GenerateParameters, cfg: FrontendConfig, sampling: bool
) -> ValidRequest:
    """The length rules on the prompt's token ids, then the engine's parameters."""
    n_in = len(ids)
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = max(cfg.max_total_tokens - n_in, 0)
    if n_in + max_new > cfg.max_total_tokens:
        raise errors.invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
            f"Given: {n_in} `inputs` tokens and {max_new} `max_new_tokens`",
            "inputs",
        )
    if n_in > cfg.max_input_tokens:
        raise errors.invalid(
            f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {n_in}",
            "inputs",
        )
    constraint = None
    if p.grammar is not None:
        check_grammar_allowed(cfg, "grammar")
        constraint = grammar.from_tgi(p.grammar)
    adapter = adapter_index(p.adapter_id, cfg)
    if p.min_tokens > max_new:
        raise errors.invalid(
            f"`min_tokens` must be <= `max_new_tokens`. Given: {p.min_tokens} > {max_new}",
            "min_tokens",
        )
    if cfg.vocab_size and any(i >= cfg.vocab_size for i in p.stop_token_ids):
        raise errors.invalid(f"`stop_token_ids` must be < {cfg.vocab_size}", "stop_token_ids")

    temperature = p.temperature if p.temperature is not None else 1.0
    sampling = sampling and temperature >= GREEDY_TEMPERATURE
    seed = (p.seed if p.seed is not None else random.getrandbits(64)) if sampling else None
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=top_k_column(p.top_k, cfg.vocab_size),
        top_p=p.top_p if p.top_p is not None else 1.0,
        do_sample=sampling,
        seed=_to_int64(seed) if seed is not None else None,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        top_n_tokens=p.top_n_tokens or 0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        watermark=p.watermark,
        # TGI computes prefill logprobs only when the launcher allows it; else `prefill` is [].
        prefill_logprobs=p.decoder_input_details and cfg.enable_prefill_logprobs,
        grammar=constraint,
        adapter=adapter,
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        stop_token_ids=tuple(p.stop_token_ids),
    )
    return ValidRequest(
        prompt_ids=ids,
        params=params,
        stop=p.stop,
        seed=seed,
        details=p.details or p.decoder_input_details,
        return_full_text=bool(p.return_full_text),
        best_of=p.best_of or 1,
    )


def check_grammar_allowed(cfg: FrontendConfig, field: str) -> None:
    if cfg.disable_grammar_support:  # TGI's words
        raise errors.invalid("grammar is not supported", field)


def top_k_column(top_k: int | None, vocab: int) -> int:
    """The engine's top_k: 0 when off, and when it keeps the whole vocabulary anyway."""
    if not top_k or top_k < 0 or (vocab and top_k >= vocab):
        return 0
    return min(top_k, INT32_MAX)


def with_fresh_seed(v: ValidRequest, seed: int | None = None) -> ValidRequest:
    """Another sequence of the same request (best_of, n): same prompt and parameters, its
    own seed (random unless given)."""
    seed = random.getrandbits(64) if seed is None else seed % (1 << 64)
    params = msgspec.structs.replace(v.params, seed=_to_int64(seed))
    return dataclasses.replace(v, params=params, seed=seed)
