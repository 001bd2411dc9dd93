"""Perplexity of the bundled model per weight mode, on a fixed public-domain text.

    python perf/perplexity.py                        # every mode, the whole text
    python perf/perplexity.py --modes bfloat16,int4 --tokens 4096

The text is `tests/data/shakespeare.txt` (~20k tokens). It is cut into windows of
`--window` tokens; each window is one prefill through the engine's own model code
(paged KV cache, the torch attention reference), and every token but a window's
first is scored given the ones before it in its window. A mode is a dtype, or
bf16 activations with `--quantize` weights; `int4-float` quantizes the float
weights at load (min-max per group of 32) instead of taking the GGUF's 4-bit bits.
Every row goes through the quantized kernels that decode steps use (the engine
multiplies steps of more than `quant.SMALL_BATCH` rows by a dense copy instead).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from tgi_mp.executor import quant
from tgi_mp.executor.packed import pack_model, packing_applies
from tgi_mp.executor.quant import quantize_model
from tgi_mp.executor.weights import load_model
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache
from tgi_mp.model_source import ModelConfig, load_model_config, resolve_model

TEXT = Path(__file__).parents[1] / "tests" / "data" / "shakespeare.txt"
MODES = {  # name -> (activation dtype, --quantize at load, quantize the float model after)
    "float32": (torch.float32, None, None),
    "bfloat16": (torch.bfloat16, None, None),
    "int8": (torch.bfloat16, "int8", None),
    "int4": (torch.bfloat16, "int4", None),
    "int4-float": (torch.bfloat16, None, "int4"),
}
_LOGIT_ROWS = 256  # positions per LM-head call: bounds the [rows, vocab] logits


def text_ids(limit: int | None = None) -> list[int]:
    from transformers import AutoTokenizer

    src = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    ids = tok(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    return ids[:limit] if limit else ids


@torch.inference_mode()
def window_nll(model: torch.nn.Module, cfg: ModelConfig, ids: list[int], dtype) -> float:
    """Summed negative log-likelihood of ids[1:] given the tokens before each."""
    bs, n = 16, len(ids)
    blocks = -(-n // bs)
    kv = allocate_kv_cache(cfg.num_layers, blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu")
    meta = AttentionMetadata.build(
        np.array([n]), np.array([0]), np.arange(blocks)[None, :], bs, "cpu"
    )
    tokens = torch.tensor(ids)
    hidden = model(tokens, meta.positions, kv, meta)
    total = 0.0
    for i in range(0, n - 1, _LOGIT_ROWS):
        rows = hidden[i : min(i + _LOGIT_ROWS, n - 1)]
        logp = model.compute_logits(rows).log_softmax(dim=-1)
        target = tokens[i + 1 : i + 1 + rows.shape[0]]
        total -= logp.gather(1, target[:, None]).sum().item()
    return total


def perplexity(mode: str, ids: list[int], window: int) -> tuple[float, float]:
    """(perplexity, seconds) of one mode over `ids`."""
    dtype, at_load, after = MODES[mode]
    src = resolve_model(None)
    cfg = load_model_config(src)
    model = load_model(src, cfg, dtype, "cpu", quantize=at_load, pack=after is None)
    if after is not None:  # quantized before packing, as load_model does
        quantize_model(model, after)
        if packing_applies(dtype, torch.device("cpu")):
            pack_model(model)
    quant.SMALL_BATCH = window  # the decode kernels for every row
    t0 = time.perf_counter()
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        nll += window_nll(model, cfg, chunk, dtype)
        scored += len(chunk) - 1
    return math.exp(nll / scored), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    ap.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    ap.add_argument("--tokens", type=int, default=None, help="score only the first N tokens")
    args = ap.parse_args()
    ids = text_ids(args.tokens)
    threads = torch.get_num_threads()
    print(f"{TEXT.name}: {len(ids)} tokens, windows of {args.window}, {threads} threads")
    print()
    print("| mode | weights | perplexity | vs bfloat16 | seconds |")
    print("|---|---|---|---|---|")
    results = {}
    for mode in args.modes.split(","):
        results[mode] = perplexity(mode, ids, args.window)
    base = results.get("bfloat16", (None,))[0]
    for mode, (ppl, secs) in results.items():
        dtype, at_load, after = MODES[mode]
        weights = at_load or after or str(dtype).removeprefix("torch.")
        ratio = f"{ppl / base - 1:+.2%}" if base else "-"
        print(f"| {mode} | {weights} | {ppl:.3f} | {ratio} | {secs:.0f} |")


if __name__ == "__main__":
    main()
