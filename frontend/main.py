"""HTTP frontend process: granian serving `tgi_mp.frontend.app:app` on uvloop.

Usage (by `tgi-mp serve` only): python -m tgi_mp.frontend.main CONFIG HOST PORT WORKERS PARENT_PID
"""

from __future__ import annotations

import os
import sys

from granian import Granian
from granian.constants import Interfaces, Loops

from tgi_mp.frontend.app import CONFIG_ENV
from tgi_mp.process import bind_to_parent


def main() -> None:
    path, host, port, workers, parent = sys.argv[1:6]
    bind_to_parent(int(parent))
    os.environ[CONFIG_ENV] = path  # each granian worker reads it when it imports the app
    Granian(
        "tgi_mp.frontend.app:app",
        address=host,
        port=int(port),
        interface=Interfaces.ASGI,
        workers=int(workers),
        loop=Loops.uvloop,
        log_access=False,
    ).serve()


if __name__ == "__main__":
    main()
