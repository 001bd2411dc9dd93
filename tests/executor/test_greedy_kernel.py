"""The CPU's greedy pass (`kernels/cpu_logits.cpp`): the first argmax and its
log-softmax of each row, as torch's `argmax` and `log_softmax` give them, and the
logits pipeline taking it for all-greedy steps only."""

from __future__ import annotations

import pytest
import torch

from tests.executor.test_sampler import _columns as sampling_columns
from tgi_mp.executor.logits import BANNED, LogitsPipeline, RowInputs
from tgi_mp.executor.sampler import SamplingTensors, sample
from tgi_mp.kernels.cpu_logits import CpuLogits


def _kernels(avx512: bool) -> CpuLogits:
    kernels = CpuLogits(BANNED)
    if not avx512:
        kernels.fast = 0
    elif not kernels.fast:
        pytest.skip("no AVX-512 here")
    return kernels


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("vocab", [5, 100, 49152, 49159])
def test_greedy_rows_equal_argmax_and_log_softmax(vocab: int, avx512: bool) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = 8 * torch.randn(7, vocab, generator=gen)
    logits[1, vocab // 3] = logits[1, 2 * vocab // 3] = logits[1].max() + 1  # a tie
    logits[2, -1] = logits[2].max() + 1  # the maximum in the last, maybe tail, entry
    logits[3, : vocab // 2] = -BANNED  # grammar-banned entries
    logits[4] = 0.0  # all equal: the first
    view = torch.zeros(7, vocab + 9)[:, 3 : vocab + 3]  # rows with a stride of their own
    view.copy_(logits)
    tokens, logprobs = _kernels(avx512).greedy(view)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    want = logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want, rtol=1e-5, atol=1e-6)


def _columns(temperature: list[float]) -> SamplingTensors:
    columns = sampling_columns(len(temperature))
    columns.temperature = torch.tensor(temperature)
    return columns


@pytest.mark.parametrize(
    ("temperature", "top_n"), [([0.0] * 4, 0), ([0.0, 0.0, 0.7, 0.0], 0), ([0.0] * 4, 2)]
)
def test_the_pipeline_takes_it_for_all_greedy_steps_alone(temperature, top_n) -> None:
    pipeline = LogitsPipeline(300, torch.device("cpu"), 0.25, 2.0)
    logits = 5 * torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    calls = []
    greedy = pipeline._cpu.greedy
    pipeline._cpu.greedy = lambda x: calls.append(1) or greedy(x)
    tokens, logprobs, top_ids, _ = pipeline(logits.clone(), RowInputs(_columns(temperature), top_n))
    want_tokens, want_logprobs, want_top, _ = sample(logits.clone(), _columns(temperature), top_n)
    assert len(calls) == (top_n == 0 and not any(temperature))
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-6)
    assert (top_ids is None) == (want_top is None)
