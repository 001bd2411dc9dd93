"""Starts the engine's processes, waits until they are ready, and supervises them.

The supervisor runs in the caller's process (the `tgi-mp serve` parent, or a
test). It spawns every child with `python -m`, so children start from a
clean interpreter and never inherit the caller's state. If any child exits,
the supervisor publishes `EngineDead` to every frontend (each fails its
pending requests at once) and stops the other children: a broken engine is
loud and quick, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import msgspec
import zmq

from tgi_mp.config import EngineConfig
from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Endpoints, SupervisorChannels
from tgi_mp.ipc.shm import create_ring
from tgi_mp.lora_source import LoraSpec, parse_adapters, resolve_adapters
from tgi_mp.model_source import load_model_config, resolve_model

log = logging.getLogger("tgi_mp.launcher")


class EngineStartupError(RuntimeError):
    pass


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _tokenizer_dir(source) -> str | None:
    """Where the model's tokenizer.json is (exported once, cached), for the scheduler's
    grammar matchers; None when the model ships none (then grammars are refused)."""
    from tgi_mp.tokenizer_export import export_tokenizer

    try:
        return export_tokenizer(source)
    except Exception as e:  # e.g. a config-only model (--load-format dummy)
        log.warning("no tokenizer for %s (%s): grammars are unavailable", source.model_id, e)
        return None


class Engine:
    """A running scheduler + executors; `client()` talks to it."""

    def __init__(self, cfg: EngineConfig, endpoints: Endpoints) -> None:
        self.cfg = cfg
        self.endpoints = endpoints
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready: m.SchedulerReady | None = None
        self.failure: str | None = None
        self._ctx = zmq.Context()
        self._ch = SupervisorChannels(self._ctx, endpoints)
        self._stopping = threading.Event()
        self._closed = False
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------ start

    @classmethod
    def start(cls, model_id: str | None = None, revision: str | None = None, **opts: Any) -> Engine:
        source = resolve_model(model_id, revision)
        opts.setdefault("tokenizer_dir", _tokenizer_dir(source))
        endpoints = Endpoints.create()
        try:  # a refused configuration leaves no runtime directory behind
            mc = load_model_config(source)
            if (factor := opts.pop("rope_factor", None)) is not None:  # TGI's --rope-factor
                mc = msgspec.structs.replace(
                    mc, rope_scaling={"rope_type": "linear", "factor": factor}
                )
            adapters = opts.pop("lora_adapters", ())
            if adapters and not isinstance(adapters[0], LoraSpec):  # names and paths
                pairs = parse_adapters(adapters) if isinstance(adapters, str) else adapters
                adapters = resolve_adapters(pairs, mc, opts.get("max_lora_rank"))
            if (draft := opts.pop("speculative_model", None)) is not None:
                opts["draft_model"] = resolve_model(draft)
                opts["draft_model_config"] = load_model_config(opts["draft_model"])
            cfg = EngineConfig(
                model=source,
                model_config=mc,
                ipc_root=endpoints.root,
                lora_adapters=tuple(adapters),
                **opts,
            )
            engine = cls(cfg, endpoints)
        except BaseException:
            endpoints.remove()
            raise
        try:
            engine._spawn()
            engine._wait_ready()
        except BaseException:
            engine.shutdown()
            raise
        engine._watcher = threading.Thread(target=engine._watch, name="supervisor", daemon=True)
        engine._watcher.start()
        return engine

    def _spawn(self) -> None:
        ring = create_ring(self.cfg.num_shards) if self.cfg.shared_memory else None
        if ring is not None:
            self.cfg = msgspec.structs.replace(self.cfg, plan_ring=ring)
        fds = (ring.fd,) if ring is not None else ()
        path, parent = self.cfg.save(), str(os.getpid())
        try:
            for rank in range(self.cfg.num_shards):
                self.procs[f"executor{rank}"] = subprocess.Popen(
                    [sys.executable, "-m", "tgi_mp.executor.main", path, str(rank), parent],
                    pass_fds=fds,
                )
            self.procs["scheduler"] = subprocess.Popen(
                [sys.executable, "-m", "tgi_mp.scheduler.main", path, parent], pass_fds=fds
            )
        finally:
            if ring is not None:  # the children hold it now; it dies with the last of them
                os.close(ring.fd)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout
        while time.monotonic() < deadline:
            if self._ch.control.sock.poll(200):
                msg = self._ch.control.recv()
                if isinstance(msg, m.SchedulerReady):
                    self.ready = msg
                    return
                raise EngineStartupError(f"tgi-mp failed to start: {msg.message}")
            dead = self._first_dead()
            if dead:
                raise EngineStartupError(f"tgi-mp failed to start: {dead}{self._cause()}")
        raise EngineStartupError(f"tgi-mp not ready after {self.cfg.startup_timeout:.0f}s")

    # ------------------------------------------------------------ supervision

    def supervise(self, name: str, proc: subprocess.Popen) -> None:
        """Adds a process (e.g. the HTTP frontend) whose death also stops the engine."""
        self.procs = {**self.procs, name: proc}  # a new dict: the watcher may be iterating

    def _first_dead(self) -> str | None:
        """The dead child to blame: one killed by a signal before one that exited (the
        others may have exited because of it, e.g. a rank whose peer vanished)."""
        dead = [(name, proc, proc.poll()) for name, proc in self.procs.items()]
        dead = [d for d in dead if d[2] is not None]
        if not dead:
            return None
        name, proc, code = min(dead, key=lambda d: d[2] >= 0)
        return f"{name} (pid {proc.pid}) {_describe_exit(code)}"

    def _cause(self, wait_ms: int = 500) -> str:
        """The reason the scheduler reported for the failure, if it had time to."""
        if self._ch.control.sock.poll(wait_ms):
            msg = self._ch.control.recv()
            if isinstance(msg, m.EngineDead):
                return f" ({msg.message})"
        return ""

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            dead = self._first_dead()
            if dead:
                self.failure = f"the engine stopped: {dead}{self._cause()}"
                log.error("%s; shutting down the other processes", self.failure)
                self._ch.events.send(m.EngineDead(self.failure))
                self._terminate()
                return

    @property
    def alive(self) -> bool:
        return self.failure is None and not self._stopping.is_set()

    # ------------------------------------------------------------ stop

    def _terminate(self, grace: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def requests_in_flight(self, timeout: float = 5.0) -> int | None:
        """Waiting + running requests as the scheduler counts them (None: no answer)."""
        from tgi_mp.frontend.engine_client import EngineClient, EngineError

        async def ask() -> int:
            client = EngineClient(self.endpoints.root)
            try:
                stats = await asyncio.wait_for(client.stats(), timeout)
                return stats.waiting + stats.running
            finally:
                client.close()

        try:
            return asyncio.run(ask())
        except (EngineError, TimeoutError):
            return None

    def announce_shutdown(self, message: str) -> None:
        """Every frontend answers its requests still in flight with `message` (503)."""
        self._ch.events.send(m.ShuttingDown(message))

    def stop_watching(self) -> None:
        """From now on a child's exit is expected (an orderly shutdown), not a failure."""
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop_watching()
        self._terminate()
        self._ch.close()
        self._ctx.term()
        self.endpoints.remove()

    def client(self) -> Any:
        from tgi_mp.frontend.engine_client import EngineClient

        return EngineClient(self.endpoints.root)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
