"""What every tgi-mp child process does at start: logging, signals, parent death."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


class _JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": self.formatTime(record),
            "level": record.levelname,
            "process": self.process_name,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Fields given with `extra=` (the access log's request id, route, status...).
        line |= {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# A LogRecord's own attributes: anything else on one came from `extra=`.
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def setup_logging(name: str) -> logging.Logger:
    """LOG_LEVEL sets the level; LOG_FORMAT=json (set by --json-output) gives JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("LOG_FORMAT") == "json":
        handler.setFormatter(_JsonFormatter(name))
    else:
        fmt = f"%(asctime)s %(levelname)s {name}[%(process)d] %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), handlers=[handler])
    return logging.getLogger(f"tgi_mp.{name}")


def bind_to_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Exit when the supervisor dies, even by SIGKILL, so no child is orphaned: the
    kernel sends us `signum` (SIGTERM for a child that cleans up after it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):  # not Linux: the supervisor's teardown still applies
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks close sockets on the way out; a
    second SIGTERM (a dying parent's threads each send one) must not cut them short."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
