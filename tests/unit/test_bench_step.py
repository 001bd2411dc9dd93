"""perf/bench_step.py runs (on the CPU, a tiny dummy config) and prints its table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_step_prints_a_row_per_batch(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 192,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "bench_step.py"), "--config", str(path),
         "--device", "cpu", "--dtype", "float32", "--batches", "1,3", "--context", "20",
         "--steps", "2", "--warmup", "1", "--bandwidth-bytes", "10000000"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    rows = re.findall(
        r"^\| (\d+) \| off \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", out, re.M
    )
    assert [r[0] for r in rows] == ["1", "3"], out
    for _, step, bound, ratio, tok_s in rows:
        assert float(step) > 0 and float(bound) >= 0 and float(ratio) > 0 and int(tok_s) > 0
    assert "attention torch" in out and "float32 on cpu" in out
