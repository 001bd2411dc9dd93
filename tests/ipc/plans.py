"""A random but well-formed-in-shape `StepPlan`, for codec and transport tests."""

from __future__ import annotations

import numpy as np

from tgi_mp.ipc import messages as m


def random_plan(rng: np.random.Generator, b: int, tokens: int, step_id: int = 7) -> m.StepPlan:
    def ints(n: int, dtype: type = np.int32) -> np.ndarray:
        return rng.integers(0, 2**31 - 1, n).astype(dtype)

    def floats(n: int) -> np.ndarray:
        return rng.random(n, dtype=np.float32)

    return m.StepPlan(
        step_id=step_id,
        layout=m.BatchLayout(ints(b), ints(b), ints(tokens), ints(b), ints(3 * b)),
        sampling=m.SamplingColumns(
            sample=rng.random(b) < 0.5,
            temperature=floats(b),
            top_k=ints(b),
            top_p=floats(b),
            typical_p=floats(b),
            min_p=floats(b),
            seeds=ints(b, np.int64),
            sample_index=ints(b),
            top_n=ints(b),
            watermark=rng.random(b) < 0.5,
        ),
        penalties=m.PenaltyColumns(
            seq_ids=ints(b, np.int64),
            prompt_lens=ints(b),
            repetition=floats(b),
            frequency=floats(b),
            presence=floats(b),
            released=ints(b, np.int64),
            history_counts=ints(b),
            history_ids=ints(2 * b),
        ),
        prompt_logprobs=m.PromptLogprobColumns(ints(b), ints(2 * b), ints(b)),
        bias=m.LogitBiasColumns(ints(b), ints(2 * b), floats(2 * b)),
        grammar=m.GrammarColumns(ints(b)),
    )
