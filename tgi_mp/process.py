"""What every tgi-mp child process does at start: logging, signals, parent death."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def setup_logging(name: str) -> logging.Logger:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {name}[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    return logging.getLogger(f"tgi_mp.{name}")


def bind_to_parent(parent_pid: int) -> None:
    """Exit when the supervisor dies, even by SIGKILL, so no child is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's teardown still applies
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks close sockets on the way out."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
