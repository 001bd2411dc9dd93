"""A random but well-formed-in-shape `StepPlan`, for codec and transport tests."""

from __future__ import annotations

import numpy as np

from tgi_mp.ipc import messages as m


def random_plan(rng: np.random.Generator, b: int, tokens: int, step_id: int = 7) -> m.StepPlan:
    def ints(n: int, dtype: type = np.int32) -> np.ndarray:
        return rng.integers(0, 2**31 - 1, n).astype(dtype)

    return m.StepPlan(
        step_id=step_id,
        query_lens=ints(b),
        context_lens=ints(b),
        input_ids=ints(tokens),
        block_counts=ints(b),
        block_tables=ints(3 * b),
        sample=rng.random(b) < 0.5,
        temperature=rng.random(b, dtype=np.float32),
        top_k=ints(b),
        top_p=rng.random(b, dtype=np.float32),
        seeds=ints(b, np.int64),
        sample_index=ints(b),
        typical_p=rng.random(b, dtype=np.float32),
        min_p=rng.random(b, dtype=np.float32),
        top_n=ints(b),
        seq_ids=ints(b, np.int64),
        prompt_lens=ints(b),
        repetition_penalty=rng.random(b, dtype=np.float32),
        frequency_penalty=rng.random(b, dtype=np.float32),
        presence_penalty=rng.random(b, dtype=np.float32),
        released=ints(b, np.int64),
        watermark=rng.random(b) < 0.5,
        prompt_logprobs=ints(b),
        prompt_targets=ints(2 * b),
        bias_counts=ints(b),
        bias_ids=ints(2 * b),
        bias_values=rng.random(2 * b, dtype=np.float32),
        history_counts=ints(b),
        history_ids=ints(2 * b),
    )
