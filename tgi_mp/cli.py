"""`tgi-mp serve`: TGI's launcher flags (declared in `tgi_mp.options`), the engine,
then the HTTP frontend. The HTTP port opens only once the model is loaded and the
KV cache allocated.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import click
import msgspec

from tgi_mp import tgi_flags
from tgi_mp.launcher import Engine, EngineStartupError
from tgi_mp.options import click_options, split

if TYPE_CHECKING:
    from tgi_mp.frontend.config import FrontendConfig

log = logging.getLogger("tgi_mp.serve")


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
@click_options
@tgi_flags.click_options
def serve(**given: object) -> None:
    """Serve a model over TGI's HTTP API."""
    tgi = tgi_flags.take(given)
    try:
        o = split(given)
    except ValueError as e:  # a value its option cannot convert (e.g. --cuda-graphs 1,two)
        raise click.UsageError(str(e)) from e
    s, f = o["serve"], o["frontend"]
    if s["json_output"]:
        os.environ["LOG_FORMAT"] = "json"
    from tgi_mp.process import setup_logging

    setup_logging("serve")
    tgi_flags.apply(tgi, o)
    check_token_limits(
        f["max_input_tokens"],
        f["max_total_tokens"],
        o["engine"]["max_batch_total_tokens"],
        o["engine"]["max_batch_prefill_tokens"],
    )
    if s["frontend_workers"] < 1:
        _fail("`frontend_workers` must be at least 1")
    if f["validation_workers"] < 1:  # TGI's words
        _fail("`validation_workers` must be > 0")
    if f["otlp_endpoint"]:
        import importlib.util

        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
            _fail("--otlp-endpoint needs OpenTelemetry: pip install 'tgi-mp[otlp]'")
    try:
        engine = Engine.start(s["model_id"], s["revision"], **o["engine"])
    except (EngineStartupError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        sys.exit(1)
    sys.exit(_run(engine, s, f))


def launcher() -> None:
    """`text-generation-launcher`: TGI's launcher command line, served by `tgi-mp serve`."""
    serve(prog_name="text-generation-launcher")


def check_token_limits(
    max_input: int | None, max_total: int | None, max_batch_total: int | None, prefill: int | None
) -> None:
    """TGI's rules between the token limits, on what is known (before the engine starts,
    what was given; after, what was resolved)."""
    if max_input is not None and max_total is not None and max_input >= max_total:
        _fail("`max_input_tokens` must be < `max_total_tokens`")
    if max_batch_total is not None and prefill is not None and prefill > max_batch_total:
        _fail("`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`")
    if max_batch_total is not None and max_total is not None and max_total > max_batch_total:
        _fail(
            "`max_total_tokens` must be <= `max_batch_total_tokens` "
            f"({max_total} > {max_batch_total}, the tokens the KV cache holds)"
        )


def _frontend_config(engine: Engine, s: dict, f: dict) -> FrontendConfig:
    """The frontend options, with what the engine resolved (token limits, model, KV)."""
    from tgi_mp.frontend.config import FrontendConfig
    from tgi_mp.tokenizer_export import export_tokenizer

    ready, mc = engine.ready, engine.cfg.model_config
    capacity = ready.max_batch_total_tokens
    max_total = f["max_total_tokens"] or min(capacity, mc.max_position_embeddings)
    max_input = f["max_input_tokens"] or max_total - 1
    check_token_limits(max_input, max_total, capacity, ready.max_batch_prefill_tokens)
    return FrontendConfig(
        **{
            **f,
            "served_model_name": f["served_model_name"] or engine.cfg.model.model_id,
            "max_concurrent_requests": max(
                1, f["max_concurrent_requests"] // s["frontend_workers"]
            ),
            "max_input_tokens": max_input,
            "max_total_tokens": max_total,
        },
        ipc_root=engine.endpoints.root,
        tokenizer_dir=export_tokenizer(engine.cfg.model, s["tokenizer_config_path"]),
        model_id=engine.cfg.model.model_id,
        lora_adapters=[a.name for a in engine.cfg.lora_adapters],
        vocab_size=mc.vocab_size,
        max_batch_total_tokens=capacity,
        block_size=ready.block_size,
        dtype=ready.dtype,
        attention_backend=ready.attention_backend,
        num_shards=engine.cfg.num_shards,
    )


def _run(engine: Engine, s: dict, f: dict) -> int:
    ready = engine.ready
    try:
        fcfg = _frontend_config(engine, s, f)
        path = os.path.join(engine.endpoints.root, "frontend.msgpack")
        with open(path, "wb") as out:
            out.write(msgspec.msgpack.encode(fcfg))
        host, port = s["hostname"], s["port"]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tgi_mp.frontend.main",
                path,
                host,
                str(port),
                str(s["frontend_workers"]),
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
    _drain(engine, proc, s["graceful_termination_timeout"])
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
