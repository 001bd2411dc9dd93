"""Grammar bitmasks in the logits pipeline: only allowed tokens are sampled, and the
reported logprobs are those of the constrained distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgi_mp.executor.logits import BANNED, LogitsPipeline, RowInputs
from tgi_mp.executor.sampler import SamplingTensors
from tgi_mp.kernels.cpu_logits import CpuLogits

VOCAB = 100
BANNED_F32 = float(torch.tensor(BANNED, dtype=torch.float32))


def _bitmask(allowed: list[list[int]]) -> np.ndarray:
    bits = np.zeros((len(allowed), (VOCAB + 31) // 32 * 32), dtype=np.uint8)
    for row, ids in enumerate(allowed):
        bits[row, ids] = 1
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "bias"])
def test_masked_rows_sample_only_allowed_tokens(kernel: bool) -> None:
    pipeline = LogitsPipeline(VOCAB, torch.device("cpu"), 0.25, 2.0)
    if not kernel:  # the general path (other devices; a CPU with no C++ compiler)
        pipeline._cpu = None
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = 50.0  # row 1's favourite, which its grammar forbids
    allowed = [[3, 8, 99], [5, 6]]  # for rows 1 and 2; row 0 is free
    free_choice = int(logits[0].argmax())
    sampling = SamplingTensors(
        temperature=torch.tensor([0.0, 0.0, 1.0]),
        top_k=torch.zeros(3, dtype=torch.int64),
        top_p=torch.ones(3),
        typical_p=torch.ones(3),
        min_p=torch.zeros(3),
        seeds=torch.arange(3),
        sample_index=torch.zeros(3, dtype=torch.int64),
    )
    inputs = RowInputs(sampling, top_n=2)
    inputs.allowed = (torch.tensor([1, 2]), _bitmask(allowed))
    tokens, logprobs, top_ids, _ = pipeline(logits.clone(), inputs)
    assert int(tokens[0]) == free_choice  # untouched
    assert int(tokens[1]) == max(allowed[0], key=lambda t: float(logits[1, t]))
    assert int(tokens[2]) in allowed[1]
    want = torch.log_softmax(logits[1, allowed[0]], 0).max()
    assert torch.isclose(logprobs[1], want, atol=1e-5)  # normalised over the allowed ones
    assert set(top_ids[2].tolist()) == set(allowed[1])


def test_bits_unpack_the_same_on_every_device_path() -> None:
    pipeline = LogitsPipeline(VOCAB, torch.device("cpu"), 0.25, 2.0)
    mask = _bitmask([[0, 31, 32, 63, 64, 99], [5]])
    shifted = ((torch.from_numpy(mask)[:, :, None] >> pipeline._bits) & 1).view(2, -1) == 0
    bias = pipeline.grammar_bias(mask)
    assert torch.equal(bias < 0, shifted) and bias.unique().tolist() == [-BANNED_F32, 0.0]
    assert bias[0, [0, 31, 32, 63, 64, 99]].tolist() == [0.0] * 6


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("vocab", [100, 49152, 49159])
def test_the_cpu_kernel_bans_exactly_what_the_bias_does(vocab: int, avx512: bool) -> None:
    # Random masks with all-allowed, all-banned and mixed words, over a vocabulary
    # that is (or is not) a multiple of 32, on some rows of a larger batch; the
    # kernel's in-place write must give the bias path's logits bit for bit.
    gen = np.random.default_rng(0)
    words = (vocab + 31) // 32
    mask = gen.integers(-(2**31), 2**31, size=(5, words), dtype=np.int64).astype(np.int32)
    mask[:, ::7] = -1
    mask[:, 1::7] = 0
    rows = torch.tensor([6, 0, 3, 7, 2])
    logits = 10 * torch.randn(8, vocab, generator=torch.Generator().manual_seed(1))
    pipeline = LogitsPipeline(vocab, torch.device("cpu"), 0.25, 2.0)
    want = logits.clone()
    want.index_add_(0, rows, pipeline.grammar_bias(mask)[:, :vocab])
    got = logits.clone()
    kernels = CpuLogits(BANNED)
    if not avx512:
        kernels.fast = 0
    elif not kernels.fast:
        pytest.skip("no AVX-512 here")
    kernels.mask(got, rows, mask)
    assert torch.equal(got, want)
    assert (got == -BANNED_F32).any() and (got != -BANNED_F32).any()
