"""`tgi-mp serve`: TGI's launcher flags, the engine, then the HTTP frontend.

Every flag also reads TGI's environment variable (the flag in
SCREAMING_SNAKE_CASE, e.g. `MAX_TOTAL_TOKENS`). The HTTP port opens only
once the model is loaded and the KV cache allocated.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import click
import msgspec

from tgi_mp.config import CHOICES, DEFAULT_CUDA_GRAPHS
from tgi_mp.launcher import Engine, EngineStartupError

log = logging.getLogger("tgi_mp.serve")


def _opt(name: str, **kw: object):  # a click option with TGI's env-var name
    env = name.lstrip("-").replace("-", "_").upper()
    return click.option(name, envvar=env, show_envvar=True, **kw)


def _default_hostname() -> str:
    # $HOSTNAME is the machine's name in most shells; only an IP address counts.
    value = os.environ.get("HOSTNAME", "")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        return "127.0.0.1"


def _fail(message: str) -> None:
    raise click.UsageError(message)


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineStartupError(f"the HTTP frontend exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise EngineStartupError(f"the HTTP frontend did not open {host}:{port} in {timeout:.0f}s")


@click.group()
def main() -> None:
    """tgi-mp: a multiprocess, TGI-compatible LLM inference server."""


@main.command()
@_opt(
    "--model-id",
    default=None,
    help="Local directory, .gguf file, or Hub id found in the local HF cache. "
    "Default: the bundled SmolLM2-135M-Instruct.",
)
@_opt("--revision", default=None, help="Hub revision (branch, tag or commit) of --model-id.")
@_opt(
    "--dtype",
    type=click.Choice(CHOICES["dtype"]),
    default="auto",
    help="Weights and KV cache dtype. auto: bfloat16 on CUDA, float32 on the CPU.",
)
@_opt(
    "--device",
    type=click.Choice(CHOICES["device"]),
    default="auto",
    help="Where the executors run. auto: CUDA when a GPU is visible (shard r on GPU r).",
)
@_opt(
    "--attention",
    type=click.Choice(CHOICES["attention"]),
    default="auto",
    help="Attention kernels. auto: flash-attn if installed and it passes a self-check, "
    "else Triton on CUDA; torch on the CPU. The choice is logged.",
)
@_opt(
    "--cuda-graphs",
    default=",".join(map(str, DEFAULT_CUDA_GRAPHS)),
    help="Decode batch sizes captured in CUDA graphs (Triton attention); 0 disables.",
)
@_opt(
    "--cuda-memory-fraction",
    type=float,
    default=0.95,
    help="Share of each GPU for weights, activations and the KV cache (sized after a "
    "profiling forward of the largest step).",
)
@_opt(
    "--load-format",
    type=click.Choice(CHOICES["load_format"]),
    default="auto",
    help="dummy: random weights from --model-id's config.json alone (benchmarks).",
)
@_opt(
    "--num-shard",
    type=int,
    default=1,
    help="Tensor-parallel executors (one per device; gloo on CPU, NCCL on CUDA).",
)
@_opt(
    "--trust-remote-code",
    is_flag=True,
    help="Accepted for TGI compatibility; tgi-mp runs its own model code only.",
)
@_opt(
    "--max-concurrent-requests",
    type=int,
    default=128,
    help="Requests in flight before answering 429 (split across frontend workers).",
)
@_opt("--max-best-of", type=int, default=2, help="Largest `best_of` accepted.")
@_opt("--max-stop-sequences", type=int, default=4, help="Most `stop` strings per request.")
@_opt("--max-top-n-tokens", type=int, default=5, help="Largest `top_n_tokens` accepted.")
@_opt(
    "--max-input-tokens",
    type=int,
    default=None,
    help="Longest prompt in tokens. Default: max-total-tokens - 1.",
)
@_opt(
    "--max-total-tokens",
    type=int,
    default=None,
    help="Prompt + new tokens per request. Default: min(KV capacity, model context).",
)
@_opt(
    "--max-batch-prefill-tokens",
    type=int,
    default=4096,
    help="Tokens computed per step (decode tokens and prompt chunks together).",
)
@_opt(
    "--max-batch-total-tokens",
    type=int,
    default=None,
    help="KV cache capacity in tokens. Default: from --kv-cache-memory.",
)
@_opt(
    "--kv-cache-memory",
    type=int,
    default=None,
    help="KV cache bytes per executor when --max-batch-total-tokens is not given.",
)
@_opt(
    "--kv-cache-fraction",
    type=float,
    default=0.2,
    help="Without --max-batch-total-tokens or --kv-cache-memory: the KV cache takes this "
    "fraction of the memory available once the weights are loaded.",
)
@_opt("--max-batch-size", type=int, default=None, help="Most sequences per step.")
@_opt(
    "--prefix-caching",
    type=bool,
    default=True,
    help="Reuse the KV of cached prompt prefixes (on by default; false/0 turns it off).",
)
@_opt(
    "--waiting-served-ratio",
    type=float,
    default=None,
    help="TGI's batch-growth rule, off unless given (TGI ignores it with chunked prefill, "
    "always on here): while requests run, admit new ones only when at least this ratio "
    "of the running count are waiting, or after --max-waiting-tokens steps.",
)
@_opt(
    "--max-waiting-tokens",
    type=int,
    default=20,
    help="Steps after which waiting requests are admitted whatever --waiting-served-ratio says.",
)
@click.option(
    "--hostname",
    default=_default_hostname,
    show_default="127.0.0.1",
    help="Address to listen on ($HOSTNAME is used only when it is an IP address).",
)
@_opt("--port", type=int, default=3000, help="HTTP port.")
@_opt("--api-key", default=None, help="Require `Authorization: Bearer <key>` on generation routes.")
@_opt("--cors-allow-origin", multiple=True, help="Allowed CORS origin (repeatable). Default: any.")
@_opt("--payload-limit", type=int, default=2_000_000, help="Largest request body in bytes.")
@_opt("--json-output", is_flag=True, help="Log as JSON lines.")
@_opt(
    "--otlp-endpoint",
    default=None,
    help="Export OpenTelemetry spans per request to this OTLP/HTTP collector "
    "(needs pip install 'tgi-mp[otlp]').",
)
@_opt("--otlp-service-name", default="tgi-mp", help="service.name of the exported spans.")
@_opt(
    "--tokenizer-config-path",
    default=None,
    help="A tokenizer_config.json to use instead of the model's (chat template).",
)
@_opt("--max-client-batch-size", type=int, default=4, help="Most prompts per request.")
@_opt(
    "--graceful-termination-timeout",
    type=float,
    default=90.0,
    help="Seconds to let in-flight requests finish after SIGTERM.",
)
@_opt(
    "--watermark-gamma",
    type=float,
    default=0.5,
    help="Green share of the vocabulary for requests with `watermark: true`.",
)
@_opt("--watermark-delta", type=float, default=2.0, help="Logit bias of green tokens.")
@_opt(
    "--enable-prefill-logprobs",
    is_flag=True,
    help="Compute prompt-token logprobs for `decoder_input_details` (else `prefill` is []).",
)
@_opt(
    "--served-model-name",
    default=None,
    help="The model name of the OpenAI API (/v1/models, `model` in answers). Default: model id.",
)
@_opt("--frontend-workers", type=int, default=1, help="HTTP worker processes (granian).")
def serve(**o: object) -> None:
    """Serve a model over TGI's HTTP API."""
    if o["json_output"]:
        os.environ["LOG_FORMAT"] = "json"
    from tgi_mp.process import setup_logging

    setup_logging("serve")
    mi, mt, mbt = o["max_input_tokens"], o["max_total_tokens"], o["max_batch_total_tokens"]
    if mi is not None and mt is not None and mi >= mt:
        _fail("`max_input_tokens` must be < `max_total_tokens`")
    if mbt is not None and o["max_batch_prefill_tokens"] > mbt:
        _fail("`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`")
    if mbt is not None and mt is not None and mt > mbt:
        _fail("`max_total_tokens` must be <= `max_batch_total_tokens`")
    if o["frontend_workers"] < 1:
        _fail("`frontend_workers` must be at least 1")
    if o["otlp_endpoint"]:
        import importlib.util

        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
            _fail("--otlp-endpoint needs OpenTelemetry: pip install 'tgi-mp[otlp]'")

    from tgi_mp.config import parse_cuda_graphs

    try:
        cuda_graphs = parse_cuda_graphs(str(o["cuda_graphs"]))
    except ValueError as e:
        _fail(str(e))
    try:
        engine = Engine.start(
            o["model_id"],
            o["revision"],
            dtype=o["dtype"],
            device=o["device"],
            attention=o["attention"],
            cuda_graphs=cuda_graphs,
            cuda_memory_fraction=o["cuda_memory_fraction"],
            num_shards=o["num_shard"],
            load_format=o["load_format"],
            max_batch_prefill_tokens=o["max_batch_prefill_tokens"],
            max_batch_total_tokens=mbt,
            kv_cache_memory=o["kv_cache_memory"],
            kv_cache_fraction=o["kv_cache_fraction"],
            max_batch_size=o["max_batch_size"],
            prefix_caching=o["prefix_caching"],
            waiting_served_ratio=o["waiting_served_ratio"],
            max_waiting_tokens=o["max_waiting_tokens"],
            watermark_gamma=o["watermark_gamma"],
            watermark_delta=o["watermark_delta"],
        )
    except (EngineStartupError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        sys.exit(1)
    code = _run(engine, o)
    sys.exit(code)


def _run(engine: Engine, o: dict) -> int:
    from tgi_mp.frontend.protocol import FrontendConfig
    from tgi_mp.tokenizer_export import export_tokenizer

    ready, mc = engine.ready, engine.cfg.model_config
    try:
        capacity = ready.max_batch_total_tokens
        max_total = o["max_total_tokens"] or min(capacity, mc.max_position_embeddings)
        max_input = o["max_input_tokens"] or max_total - 1
        if max_input >= max_total:
            raise click.UsageError("`max_input_tokens` must be < `max_total_tokens`")
        if max_total > capacity:
            raise click.UsageError(
                f"`max_total_tokens` ({max_total}) must be <= `max_batch_total_tokens` "
                f"(the KV cache holds {capacity} tokens)"
            )
        tokenizer_dir = export_tokenizer(engine.cfg.model, o["tokenizer_config_path"])
        fcfg = FrontendConfig(
            ipc_root=engine.endpoints.root,
            tokenizer_dir=tokenizer_dir,
            model_id=engine.cfg.model.model_id,
            eos_token_ids=mc.eos_token_ids,
            vocab_size=mc.vocab_size,
            served_model_name=o["served_model_name"] or engine.cfg.model.model_id,
            max_concurrent_requests=max(1, o["max_concurrent_requests"] // o["frontend_workers"]),
            max_best_of=o["max_best_of"],
            max_stop_sequences=o["max_stop_sequences"],
            max_top_n_tokens=o["max_top_n_tokens"],
            max_input_tokens=max_input,
            max_total_tokens=max_total,
            max_client_batch_size=o["max_client_batch_size"],
            enable_prefill_logprobs=o["enable_prefill_logprobs"],
            payload_limit=o["payload_limit"],
            api_key=o["api_key"],
            cors_allow_origin=list(o["cors_allow_origin"]),
            max_batch_total_tokens=capacity,
            block_size=ready.block_size,
            otlp_endpoint=o["otlp_endpoint"],
            otlp_service_name=o["otlp_service_name"],
            dtype=ready.dtype,
            attention_backend=ready.attention_backend,
        )
        path = os.path.join(engine.endpoints.root, "frontend.msgpack")
        with open(path, "wb") as f:
            f.write(msgspec.msgpack.encode(fcfg))
        host, port = o["hostname"], o["port"]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tgi_mp.frontend.main",
                path,
                host,
                str(port),
                str(o["frontend_workers"]),
                str(os.getpid()),
            ]
        )
        engine.supervise("frontend", proc)
        _wait_for_port(host, port, proc)
    except (click.UsageError, EngineStartupError) as e:
        engine.shutdown()
        if isinstance(e, click.UsageError):
            raise
        log.error("%s", e)
        return 1

    log.info(
        "serving %s (%s) with %d KV tokens (%d blocks), attention %s, on http://%s:%d",
        engine.cfg.model.model_id,
        ready.dtype,
        ready.max_batch_total_tokens,
        ready.num_blocks,
        ready.attention_backend,
        host,
        port,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.2):
        if engine.failure:
            engine.shutdown()
            log.error("%s", engine.failure)
            return 1
    log.info("shutting down")
    _drain(engine, proc, o["graceful_termination_timeout"])
    return 0


SHUTDOWN_MESSAGE = "The server is shutting down"


def _drain(engine: Engine, frontend: subprocess.Popen, timeout: float) -> None:
    """Granian stops accepting and finishes in-flight requests on SIGTERM. What is still
    running when `timeout` ends is answered (503, or a final error event), not cut off;
    then the engine stops."""
    engine.stop_watching()
    log.info("draining %s requests in flight, for up to %g s", engine.requests_in_flight(), timeout)
    frontend.send_signal(signal.SIGTERM)
    try:
        frontend.wait(timeout)
    except subprocess.TimeoutExpired:
        cut = engine.requests_in_flight()
        log.warning("grace period of %g s over: cutting %s requests still in flight", timeout, cut)
        engine.announce_shutdown(SHUTDOWN_MESSAGE)
        try:
            frontend.wait(10)  # time to send those answers
        except subprocess.TimeoutExpired:
            frontend.kill()
            frontend.wait()
    engine.shutdown()


if __name__ == "__main__":
    main()
