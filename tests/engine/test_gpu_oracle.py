"""On a GPU: the Triton backend (CUDA graphs on and off) against transformers' greedy
oracle in float32, and against the torch backend on the same GPU in bfloat16.

Needs CUDA: without a GPU the kernels are checked by tests/kernels in Triton's
interpreter and the engine by tests/executor/test_triton_model.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.engine.oracle import NEW_TOKENS, compare
from tests.engine.test_engine_oracle import _check, _run
from tests.engine.test_engine_oracle import cases as cases
from tgi_mp.ipc.messages import SamplingParams, SchedulerReady
from tgi_mp.launcher import Engine

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# bf16 logits of two correct kernels differ by a few hundredths: where the reference's
# two best logits are closer than this, either greedy pick is right.
BF16_NEAR_TIE = 0.25


def _tokens(cases, **opts: object) -> tuple[list[list[int]], SchedulerReady]:
    with Engine.start(None, device="cuda", max_batch_prefill_tokens=256, **opts) as engine:
        return _run(engine, cases, concurrent=True), engine.ready


def _greedy_with_margins(cases, **opts: object) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and, per token, the gap between the two best logprobs (= logits)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, top_n_tokens=2)

    async def one(client, prompt: list[int]) -> tuple[list[int], list[float]]:
        outs = [o async for o in client.generate(prompt, params)]
        return [o.token_id for o in outs], [o.top[0][1] - o.top[1][1] for o in outs]

    async def main() -> list[tuple[list[int], list[float]]]:
        client = engine.client()
        try:
            return await asyncio.gather(*(one(client, p) for p, _, _ in cases))
        finally:
            client.close()

    with Engine.start(None, device="cuda", max_batch_prefill_tokens=256, **opts) as engine:
        assert engine.ready.dtype == "bfloat16"
        runs = asyncio.run(main())
    return [t for t, _ in runs], [m for _, m in runs]


def test_float32_triton_with_and_without_graphs_is_the_oracle(cases) -> None:
    graphs, ready = _tokens(cases, dtype="float32", attention="triton")
    assert ready.attention_backend == "triton" and ready.device.startswith("cuda")
    _check("triton fp32, CUDA graphs", cases, graphs)
    # Not `eager == graphs`: a graph's bucket may split the keys differently (fp32
    # rounding), so each run answers to the oracle's near-tie rule on its own.
    eager, _ = _tokens(cases, dtype="float32", attention="triton", cuda_graphs=())
    _check("triton fp32, eager", cases, eager)


def test_bfloat16_triton_matches_torch_on_the_gpu(cases) -> None:
    reference, margins = _greedy_with_margins(cases, dtype="bfloat16", attention="torch")
    triton, _ = _tokens(cases, dtype="bfloat16", attention="triton")
    parted = 0
    for prompt, want, gaps, got in zip(cases, reference, margins, triton, strict=True):
        ok, n = compare(got, want, gaps, BF16_NEAR_TIE)
        assert ok, (
            f"prompt of {len(prompt[0])} tokens: triton {got[n]} vs torch {want[n]} "
            f"at new token {n}, where torch's two best logits are {gaps[n]:.3f} apart"
        )
        parted += n < NEW_TOKENS
    print(f"\n[gpu oracle] bf16 triton vs torch: {parted} of {len(cases)} part at near-ties")
