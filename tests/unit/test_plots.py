"""`perf/plots.py`: the serving benchmark's PNG plots, from a results file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

ROOT = Path(__file__).resolve().parents[2]


def results() -> dict:
    runs = [
        {
            "api": api,
            "concurrency": c,
            "tok_s": 20.0 * c * (1 if api == "tgi" else 0.9),
            "ttft_ms": {"p50": 50.0 * c, "p90": 70.0 * c, "p99": 90.0 * c},
            "itl_ms": {"p50": 40.0, "p90": 45.0 + c, "p99": 60.0 + 2 * c},
        }
        for api in ("tgi", "chat")
        for c in (1, 4, 16)
    ]
    return {"title": "test", "runs": runs}


def test_plots_are_written_from_a_saved_results_file(tmp_path) -> None:
    saved = tmp_path / "serving.json"
    saved.write_text(json.dumps(results()))
    out = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "plots.py"), str(saved)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [Path(p).name for p in out] == ["throughput.png", "latency.png"]
    for name, width in (("throughput.png", 704), ("latency.png", 1210)):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[1] == width  # figure inches x dpi
        assert pixels[..., :3].std() > 0.05  # something is drawn, not a blank canvas
