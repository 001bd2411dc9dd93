"""Runs the real `tgi-mp serve` on a free loopback port; stopped by PID."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, startup_timeout: float = 180, log: Path | None = None) -> None:
        """`log`: a file for the server's output (else it goes to the test's)."""
        self.port = free_port()
        out = open(log, "wb") if log is not None else None  # noqa: SIM115 (the child's)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tgi_mp.cli",
                "serve",
                "--hostname",
                "127.0.0.1",
                "--port",
                str(self.port),
                # The tests compare with transformers in float32: never the bf16 `auto`
                # picks on CPUs with native bf16, unless a test asks for another dtype.
                *([] if "--dtype" in args else ["--dtype", "float32"]),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
        )
        if out is not None:
            out.close()  # the child holds its own descriptor
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tgi-mp serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("tgi-mp serve did not become healthy")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def runtime_of(family: list) -> tuple[str, list[str]]:
    """A running server's private runtime directory (from its children's command lines:
    the config they read lies in it) and which of its processes map the plan ring."""
    import os

    (config,) = {a for p in family for a in p.cmdline() if a.endswith("config.msgpack")}
    ring = []
    for p in family:
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                if "memfd:tgi-mp-plan-ring" in f.read():
                    ring.append(" ".join(p.cmdline()))
        except OSError:
            pass
    return os.path.dirname(config), ring


def tgi_mp_shm() -> list[str]:
    """What tgi-mp might have left in /dev/shm (it names nothing there: the ring is a memfd)."""
    import os

    if not os.path.isdir("/dev/shm"):
        return []
    return [n for n in os.listdir("/dev/shm") if "tgi" in n.lower()]
