"""Every `tgi-mp serve` option, declared once: flag, type, default, help, where it goes.

The click options, and the defaults of `EngineConfig`, `FrontendConfig` and
`SchedulerConfig`, all come from this table, so no default is written twice.
Every flag also reads TGI's environment variable (the flag in
SCREAMING_SNAKE_CASE, e.g. `MAX_TOTAL_TOKENS`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import click

from tgi_mp.lora_source import parse_adapters

# The values of the option-like fields (the CLI and perf scripts offer the same).
CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "attention": ("auto", "torch", "cpu", "triton", "flash-attn"),
    "load_format": ("auto", "dummy"),
    "quantize": ("int8", "int4", "gguf"),  # weight-only, at load (executor/quant.py)
}
# The step's token budget when --max-batch-prefill-tokens is not given: TGI's on CUDA;
# on the CPU what keeps a step short enough that running streams keep getting tokens
# while long prompts prefill (perf/RESULTS.md measures it).
CUDA_STEP_TOKENS = 4096
CPU_STEP_TOKENS = 256
# TGI's default --cuda-graphs: the decode batch sizes captured in CUDA graphs.
DEFAULT_CUDA_GRAPHS = (1, 2, 4, 8, 16, 32, 64, 128)


def parse_cuda_graphs(spec: str) -> tuple[int, ...]:
    """TGI's `--cuda-graphs` value: comma-separated batch sizes; `0` (or nothing) disables."""
    try:
        sizes = sorted({int(x) for x in spec.replace(" ", "").split(",") if x})
    except ValueError:
        raise ValueError(f"--cuda-graphs takes comma-separated batch sizes, got {spec!r}") from None
    if any(s < 0 for s in sizes):
        raise ValueError(f"--cuda-graphs sizes must be positive, got {spec!r}")
    return tuple(s for s in sizes if s > 0)


def _default_hostname() -> str:
    # $HOSTNAME is the machine's name in most shells; only an IP address counts.
    value = os.environ.get("HOSTNAME", "")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        return "127.0.0.1"


Target = Literal["engine", "frontend", "serve"]


@dataclass(frozen=True)
class Option:
    flag: str
    default: Any
    help: str
    to: Target = "serve"  # which config takes it ("serve": the launcher itself)
    type: Any = None  # a click type; None: a string (or a flag, for a False default)
    field: str | None = None  # the config field, when it is not the flag's name
    convert: Callable[[Any], Any] | None = None  # from the flag's value to the field's
    multiple: bool = False
    envvar: bool = True  # False: the flag only (e.g. $HOSTNAME means something else)
    short: str | None = None  # a one-letter alias (TGI's `-p`)

    @property
    def name(self) -> str:  # click's parameter name
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def target_field(self) -> str:
        return self.field or self.name

    def value(self, given: Any) -> Any:
        if self.multiple:
            given = list(given or ())
        return self.convert(given) if self.convert is not None else given

    def click_option(self) -> Callable[[Callable], Callable]:
        kw: dict[str, Any] = {"help": self.help, "multiple": self.multiple}
        if self.envvar:
            kw.update(envvar=self.name.upper(), show_envvar=True)
        if self.default is False and self.type is None:
            kw["is_flag"] = True
        elif callable(self.default):
            kw.update(default=self.default, show_default="127.0.0.1")
        elif self.multiple:
            kw["default"] = ()
        else:
            kw.update(default=self.default, type=self.type)
        return click.option(*filter(None, (self.short, self.flag)), **kw)


def _choice(name: str) -> click.Choice:
    return click.Choice(CHOICES[name])


OPTIONS: tuple[Option, ...] = (
    # ---------------------------------------------------------------- the model
    Option(
        "--model-id",
        None,
        "Local directory, .gguf file, or Hub id found in the local HF cache. "
        "Default: the bundled SmolLM2-135M-Instruct.",
    ),
    Option("--revision", None, "Hub revision (branch, tag or commit) of --model-id."),
    Option(
        "--dtype",
        "auto",
        "Weights and KV cache dtype. auto: bfloat16 on CUDA, float32 on the CPU.",
        "engine",
        _choice("dtype"),
    ),
    Option(
        "--device",
        "auto",
        "Where the executors run. auto: CUDA when a GPU is visible (shard r on GPU r).",
        "engine",
        _choice("device"),
    ),
    Option(
        "--attention",
        "auto",
        "Attention kernels. auto: flash-attn if installed and it passes a self-check, "
        "else Triton on CUDA; torch on the CPU. The choice is logged.",
        "engine",
        _choice("attention"),
    ),
    Option(
        "--cuda-graphs",
        ",".join(map(str, DEFAULT_CUDA_GRAPHS)),
        "Decode batch sizes captured in CUDA graphs (Triton attention); 0 disables.",
        "engine",
        convert=lambda spec: parse_cuda_graphs(str(spec)),
    ),
    Option(
        "--cuda-memory-fraction",
        0.95,
        "Share of each GPU for weights, activations and the KV cache (sized after a "
        "profiling forward of the largest step).",
        "engine",
        float,
    ),
    Option(
        "--load-format",
        "auto",
        "dummy: random weights from --model-id's config.json alone (benchmarks).",
        "engine",
        _choice("load_format"),
    ),
    Option(
        "--num-shard",
        1,
        "Tensor-parallel executors (one per device; gloo on CPU, NCCL on CUDA).",
        "engine",
        int,
        field="num_shards",
    ),
    Option(
        "--quantize",
        None,
        "Weight-only quantization at load (CPU): int8 (one scale per output channel), int4 "
        "(a scale and a zero per 32 weights; a GGUF's Q4_0/Q4_1 weights are used as "
        "shipped, others quantized), both from any float checkpoint; gguf (a GGUF's 4-bit "
        "weights as shipped, the rest dense). Other methods (gptq, awq, fp8, "
        "bitsandbytes, ...) and pre-quantized checkpoints are refused.",
        "engine",
        _choice("quantize"),
    ),
    Option(
        "--trust-remote-code",
        False,
        "Accepted for TGI compatibility; tgi-mp runs its own model code only.",
    ),
    # ---------------------------------------------------------------- request limits
    Option(
        "--max-concurrent-requests",
        128,
        "Requests in flight before answering 429 (split across frontend workers).",
        "frontend",
        int,
    ),
    Option(
        "--validation-workers",
        2,
        "Threads per HTTP worker that tokenize and template prompts, off the event loop "
        "(TGI's flag): a huge prompt never stalls other streams.",
        "frontend",
        int,
    ),
    Option("--max-best-of", 2, "Largest `best_of` accepted.", "frontend", int),
    Option("--max-stop-sequences", 4, "Most `stop` strings per request.", "frontend", int),
    Option("--max-top-n-tokens", 5, "Largest `top_n_tokens` accepted.", "frontend", int),
    Option(
        "--max-input-tokens",
        None,
        "Longest prompt in tokens. Default: max-total-tokens - 1.",
        "frontend",
        int,
    ),
    Option(
        "--max-total-tokens",
        None,
        "Prompt + new tokens per request. Default: min(KV capacity, model context).",
        "frontend",
        int,
    ),
    Option("--max-client-batch-size", 4, "Most prompts per request.", "frontend", int),
    # ---------------------------------------------------------------- batching and KV
    Option(
        "--max-batch-prefill-tokens",
        None,
        "Tokens computed per step (decode tokens and prompt chunks together). Default: "
        f"{CUDA_STEP_TOKENS} on CUDA; {CPU_STEP_TOKENS} on the CPU, where a step's time "
        "grows with its tokens and running streams wait for it (perf/RESULTS.md).",
        "engine",
        int,
    ),
    Option(
        "--max-batch-total-tokens",
        None,
        "KV cache capacity in tokens. Default: from --kv-cache-memory.",
        "engine",
        int,
    ),
    Option(
        "--kv-cache-memory",
        None,
        "KV cache bytes per executor when --max-batch-total-tokens is not given.",
        "engine",
        int,
    ),
    Option(
        "--kv-cache-fraction",
        0.2,
        "Without --max-batch-total-tokens or --kv-cache-memory: the KV cache takes this "
        "fraction of the memory available once the weights are loaded.",
        "engine",
        float,
    ),
    Option(
        "--max-batch-size",
        None,
        "Most sequences per step. Default: as many as the step's token budget.",
        "engine",
        int,
    ),
    Option(
        "--prefix-caching",
        True,
        "Reuse the KV of cached prompt prefixes (on by default; false/0 turns it off).",
        "engine",
        bool,
    ),
    Option(
        "--overlap-scheduling",
        True,
        "Plan step N+1 while the executors compute step N (false/0: one step at a time, "
        "for comparison and debugging).",
        "engine",
        bool,
    ),
    Option(
        "--shared-memory",
        True,
        "Send the step plan's large arrays through a shared-memory ring, written once for "
        "every executor (false/0: as ZeroMQ frames).",
        "engine",
        bool,
    ),
    Option(
        "--waiting-served-ratio",
        None,
        "TGI's batch-growth rule, off unless given (TGI ignores it with chunked prefill, "
        "always on here): while requests run, admit new ones only when at least this ratio "
        "of the running count are waiting, or after --max-waiting-tokens steps.",
        "engine",
        float,
    ),
    Option(
        "--max-waiting-tokens",
        20,
        "Steps after which waiting requests are admitted whatever --waiting-served-ratio says.",
        "engine",
        int,
    ),
    Option(
        "--speculate",
        0,
        "Speculative decoding: up to N tokens a step proposed per decoding request by "
        "n-gram lookup in its own prompt and output (or by --speculative-model), verified "
        "in one forward (0: off). Greedy output is unchanged (token for token in float32); "
        "so is seeded output with n-gram proposals.",
        "engine",
        int,
    ),
    Option(
        "--speculative-model",
        None,
        "A small draft model (local path, or Hub id; same tokenizer as the target) that "
        "proposes the --speculate N tokens instead of n-gram lookup: it runs in the "
        "executors beside the target, with its own KV cache in the same blocks. Greedy "
        "output is unchanged; sampled rows are verified by rejection sampling.",
        "engine",
    ),
    Option(
        "--speculate-ngram-max",
        3,
        "Longest suffix (tokens) the n-gram proposer matches; shorter ones are tried next.",
        "engine",
        int,
    ),
    Option(
        "--speculate-ngram-min",
        1,
        "Shortest suffix the n-gram proposer matches.",
        "engine",
        int,
    ),
    Option(
        "--speculate-max-batch",
        4,
        "Speculate only while at most this many requests run: beyond it a "
        "step is bound by compute, not weight reads, and proposals cost more than they "
        "save (perf/RESULTS.md measures it).",
        "engine",
        int,
    ),
    Option(
        "--lora-adapters",
        None,
        "LoRA adapters to serve (PEFT directories): `name=path` or a Hub id in the local "
        "cache (name = id), comma-separated. Requests pick one by `adapter_id` (TGI) or "
        "`model` (OpenAI).",
        "engine",
        convert=parse_adapters,
    ),
    Option(
        "--max-loras",
        4,
        "LoRA adapters resident at once (slots); a request whose adapter has no slot waits "
        "until one is free. Each slot costs every adapter step a little compute.",
        "engine",
        int,
    ),
    Option(
        "--max-lora-rank",
        None,
        "Highest adapter rank accepted (slots are this wide). Default: the highest given.",
        "engine",
        int,
    ),
    # ---------------------------------------------------------------- HTTP
    Option(
        "--hostname",
        _default_hostname,
        "Address to listen on ($HOSTNAME is used only when it is an IP address).",
        envvar=False,
    ),
    Option("--port", 3000, "HTTP port.", type=int, short="-p"),
    Option(
        "--api-key",
        None,
        "Require `Authorization: Bearer <key>` on generation routes.",
        "frontend",
    ),
    Option(
        "--cors-allow-origin",
        None,
        "Allowed CORS origin (repeatable). Default: any.",
        "frontend",
        multiple=True,
    ),
    Option("--payload-limit", 2_000_000, "Largest request body in bytes.", "frontend", int),
    Option("--json-output", False, "Log as JSON lines."),
    Option(
        "--disable-access-log",
        False,
        "No access log line per request (method, route, status, latency, tokens, request id).",
        "frontend",
        field="access_log",
        convert=lambda off: not off,
    ),
    Option(
        "--otlp-endpoint",
        None,
        "Export OpenTelemetry spans per request to this OTLP/HTTP collector "
        "(needs pip install 'tgi-mp[otlp]').",
        "frontend",
    ),
    Option("--otlp-service-name", "tgi-mp", "service.name of the exported spans.", "frontend"),
    Option(
        "--tokenizer-config-path",
        None,
        "A tokenizer_config.json to use instead of the model's (chat template).",
    ),
    Option(
        "--graceful-termination-timeout",
        90.0,
        "Seconds to let in-flight requests finish after SIGTERM.",
        type=float,
    ),
    # ---------------------------------------------------------------- generation
    Option(
        "--watermark-gamma",
        0.5,
        "Green share of the vocabulary for requests with `watermark: true`.",
        "engine",
        float,
    ),
    Option("--watermark-delta", 2.0, "Logit bias of green tokens.", "engine", float),
    Option(
        "--disable-grammar-support",
        False,
        "Refuse `grammar`, `response_format` (other than text), `tools` and vLLM's "
        "`guided_*` with a 422, as TGI's flag does.",
        "frontend",
    ),
    Option(
        "--enable-prefill-logprobs",
        False,
        "Compute prompt-token logprobs for `decoder_input_details` (else `prefill` is []).",
        "frontend",
    ),
    Option(
        "--served-model-name",
        None,
        "The model name of the OpenAI API (/v1/models, `model` in answers). Default: model id.",
        "frontend",
    ),
    Option("--frontend-workers", 1, "HTTP worker processes (granian).", type=int),
)


def step_tokens(given: int | None, device_type: str, max_batch_size: int | None = None) -> int:
    """The step's token budget: `--max-batch-prefill-tokens`, or the device's default
    (never below `--max-batch-size`: every running sequence needs one token of it)."""
    if given is not None:
        return given
    default = CUDA_STEP_TOKENS if device_type == "cuda" else CPU_STEP_TOKENS
    return max(default, max_batch_size or 0)


def sequences_per_step(max_batch_size: int | None, max_batch_prefill_tokens: int) -> int:
    """What `--max-batch-size` means: at most this many sequences per step; unset, as many
    as the step's token budget (each needs one token of it)."""
    return max_batch_size or max_batch_prefill_tokens


BY_NAME = {o.name: o for o in OPTIONS}
# Each config field's default, by field name: what the config classes declare.
DEFAULTS: dict[str, Any] = {
    o.target_field: o.value(o.default)
    for o in OPTIONS
    if o.to != "serve" and not callable(o.default)
}


def click_options(fn: Callable) -> Callable:
    """Decorates a click command with every option, in the table's order."""
    for option in reversed(OPTIONS):
        fn = option.click_option()(fn)
    return fn


def split(given: dict[str, Any]) -> dict[Target, dict[str, Any]]:
    """click's values, converted and grouped by the config that takes each."""
    out: dict[Target, dict[str, Any]] = {"engine": {}, "frontend": {}, "serve": {}}
    for name, value in given.items():
        option = BY_NAME[name]
        out[option.to][option.target_field] = option.value(value)
    return out
