"""What `/generate` answers: the best of `best_of` runs, its details, timing headers;
and what a finished request counts in the metrics."""

from __future__ import annotations

import os
import time

from tgi_mp.frontend.generation import Generation, report_success
from tgi_mp.frontend.protocol import BestOfSequence, Details, GenerateRequest, GenerateResponse
from tgi_mp.frontend.validation import ValidRequest


def compute_type() -> bytes:
    """TGI's `x-compute-type` header: what the deployment says it runs on."""
    return os.environ.get("COMPUTE_TYPE", "cpu").encode()


def full_text(req: GenerateRequest, v: ValidRequest, text: str) -> str:
    return req.inputs + text if v.return_full_text else text


def generate_response(
    req: GenerateRequest, runs: list[ValidRequest], gens: list[Generation]
) -> tuple[int, GenerateResponse]:
    """The index of the run with the best mean logprob and the answer built from it;
    with details, the other runs are its `best_of_sequences`."""
    best = max(range(len(gens)), key=lambda i: gens[i].mean_logprob())
    v, gen = runs[best], gens[best]
    details = None
    if v.details:
        others = [
            BestOfSequence(
                full_text(req, r, g.text),
                g.finish_reason,
                len(g.tokens),
                r.seed,
                g.prefill,
                g.tokens,
                g.top_tokens,
            )
            for i, (r, g) in enumerate(zip(runs, gens, strict=True))
            if i != best
        ]
        details = Details(
            gen.finish_reason,
            len(gen.tokens),
            v.seed,
            gen.prefill,
            gen.tokens,
            others,
            gen.top_tokens,
        )
    return best, GenerateResponse(full_text(req, v, gen.text), details)


def timing_headers(
    req: GenerateRequest, v: ValidRequest, gen: Generation, t0: float, t_valid: float
) -> list[tuple[bytes, bytes]]:
    """TGI's `x-*` headers of a finished request that arrived at `t0` and was
    validated at `t_valid` (perf_counter seconds)."""
    total = time.perf_counter() - t0
    inference = total - (t_valid - t0) - gen.queue_time
    n = max(len(gen.tokens), 1)

    def ms(seconds: float) -> bytes:
        return str(int(seconds * 1000)).encode()

    return [
        (b"x-compute-type", compute_type()),
        (b"x-compute-time", f"{total:.6f}".encode()),
        (b"x-compute-characters", str(len(req.inputs)).encode()),
        (b"x-total-time", ms(total)),
        (b"x-validation-time", ms(t_valid - t0)),
        (b"x-queue-time", ms(gen.queue_time)),
        (b"x-inference-time", ms(inference)),
        (b"x-time-per-token", ms(inference / n)),
        (b"x-prompt-tokens", str(len(v.prompt_ids)).encode()),
        (b"x-generated-tokens", str(len(gen.tokens)).encode()),
    ]


def count_success(scope: dict, v: ValidRequest, gen: Generation, t0: float, t_valid: float) -> None:
    """A finished `/generate` or `/generate_stream` request in the metrics (and trace)."""
    report_success(
        scope,
        t0,
        t_valid,
        gen.queue_time,
        len(v.prompt_ids),
        len(gen.tokens),
        v.params.max_new_tokens,
    )
