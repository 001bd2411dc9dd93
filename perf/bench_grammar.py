"""What grammar constraints cost: compiling a schema, a constrained decode step, TTFT.

    python perf/bench_grammar.py                 # bundled model, the default dtype
    python perf/bench_grammar.py --concurrency 32 --new-tokens 48

1. Compile: a 20-property JSON schema through the frontend's checks (JSON-schema
   meta-validation, llguidance's compiler and validator), then the scheduler's side
   (a matcher on the model's tokenizer, the first mask), best of 5.
2. Steps: `--concurrency` requests decoding `--new-tokens` tokens each, all free, then
   all JSON-constrained (an array of records longer than the budget, so no row ends
   early), alternately for `--rounds` rounds (medians reported), same prompts,
   through the engine (scheduler + executor processes, no HTTP). Reported per step
   from the scheduler's counters: the wait from the masks sent to the tokens back,
   the executor's own time (input prep, forward, masking, sampling), the masks' fill
   (after the plan went out, while the forward runs) and the scheduler's whole share
   (planning, masks, applying tokens). On a CPU the mask threads share the cores with
   the forward; on a GPU they overlap it.
3. TTFT of a request whose schema was never seen against one seen just before.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
from tokenizers import Tokenizer

from tgi_mp.frontend import grammar
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine
from tgi_mp.model_source import load_model_config, resolve_model
from tgi_mp.scheduler.grammar import Grammars, read_tokenizer
from tgi_mp.tokenizer_export import export_tokenizer

WIDE = {
    "type": "object",
    "properties": {
        f"field_{i}": [
            {"type": "string", "maxLength": 12},
            {"type": "integer"},
            {"type": "boolean"},
            {"enum": ["red", "green", "blue"]},
        ][i % 4]
        for i in range(20)
    },
    "required": [f"field_{i}" for i in range(20)],
    "additionalProperties": False,
}
# Records, more of them than the token budget holds: no row ends early.
RECORDS = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "Rome", "Oslo"]},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    },
}


def compile_times(tokenizer_dir: str) -> tuple[float, float]:
    """(frontend compile + checks, matcher + first mask) seconds, best of 5."""
    mc = load_model_config(resolve_model(None))
    grammars = Grammars(read_tokenizer(tokenizer_dir), mc.vocab_size, mc.eos_token_ids)
    grammars.compile(grammar.from_tgi({"type": "regex", "value": "x"})).result()  # tokenizer
    frontend, scheduler = [], []
    for i in range(5):
        schema = {**WIDE, "description": f"run {i}"}  # a schema never seen before
        t0 = time.perf_counter()
        compiled = grammar.from_tgi({"type": "json", "value": schema})
        t1 = time.perf_counter()
        matcher = grammars.compile(compiled).result()
        grammars.masks([matcher])
        t2 = time.perf_counter()
        frontend.append(t1 - t0)
        scheduler.append(t2 - t1)
    grammars.close()
    return min(frontend), min(scheduler)


def decode_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    async def main():
        client = engine.client()
        try:
            before = await client.stats()

            async def one(prompt: list[int]) -> int:
                return sum([1 async for _ in client.generate(prompt, params)])

            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(p) for p in prompts))
            elapsed = time.perf_counter() - t0
            after = await client.stats()
        finally:
            client.close()
        steps = after.steps - before.steps
        return {
            "tok/s": sum(counts) / elapsed,
            "step ms": (after.step_time - before.step_time) / steps * 1e3,
            "mask ms": (after.grammar_time - before.grammar_time) / steps * 1e3,
            "plan ms": (after.schedule_time - before.schedule_time) / steps * 1e3,
            "forward ms": (after.forward_time - before.forward_time) / steps * 1e3,
            "steps": steps,
        }

    return asyncio.run(main())


def ttft(engine: Engine, prompt: list[int], compiled: str) -> float:
    async def main() -> float:
        client = engine.client()
        try:
            t0 = time.perf_counter()
            async for _ in client.generate(
                prompt, SamplingParams(max_new_tokens=1, grammar=compiled)
            ):
                return time.perf_counter() - t0
        finally:
            client.close()
        raise RuntimeError("no token")

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    source = resolve_model(None)
    tokenizer_dir = export_tokenizer(source)
    tok = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")

    front, sched = compile_times(tokenizer_dir)
    print("| 20-property schema | ms |")
    print("|---|---|")
    print(f"| frontend: meta-validation + llguidance compile + validate | {front * 1e3:.2f} |")
    print(f"| scheduler: matcher on the tokenizer + first mask | {sched * 1e3:.2f} |")
    print()

    prompts = [
        tok.encode(f"Record {i} of the archive, as JSON:", add_special_tokens=False).ids
        for i in range(args.concurrency)
    ]
    n = args.new_tokens
    free = SamplingParams(max_new_tokens=n, ignore_eos=True)
    constrained = SamplingParams(
        max_new_tokens=n, grammar=grammar.from_tgi({"type": "json", "value": RECORDS})
    )
    with Engine.start(None, dtype=args.dtype, max_batch_total_tokens=16384) as engine:
        decode_run(engine, prompts[:4], free)  # warm-up
        # Alternating rounds, medians: this machine's speed drifts by more than the
        # difference measured.
        rounds: dict[str, list[dict]] = {"free": [], "JSON-constrained": []}
        for _ in range(args.rounds):
            rounds["free"].append(decode_run(engine, prompts, free))
            rounds["JSON-constrained"].append(decode_run(engine, prompts, constrained))
        runs = {
            name: {key: float(np.median([r[key] for r in rs])) for key in rs[0]}
            for name, rs in rounds.items()
        }
        print(
            f"{engine.ready.dtype}, concurrency {args.concurrency}, {n} new tokens each, "
            f"medians of {args.rounds} alternating rounds"
        )
        print()
        print(
            "| requests | output tok/s | plan sent -> tokens back, ms | executor's own ms "
            "| mask fill ms | planning + masks + update ms | steps |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, r in runs.items():
            cells = [f"{r['tok/s']:.1f}", f"{r['step ms']:.2f}", f"{r['forward ms']:.2f}"]
            cells += [f"{r['mask ms']:.2f}", f"{r['plan ms']:.2f}"]
            print(f"| {name} | {' | '.join(cells)} | {r['steps']:.0f} |")
        whole = {name: r["plan ms"] + r["step ms"] for name, r in runs.items()}
        print()
        print(
            f"whole step (scheduler's share + plan sent -> tokens back): constrained "
            f"{whole['JSON-constrained'] / whole['free'] - 1:+.1%} vs free; output tok/s "
            f"{runs['JSON-constrained']['tok/s'] / runs['free']['tok/s'] - 1:+.1%}"
        )
        print()
        prompt = prompts[0]
        seen = grammar.from_tgi({"type": "json", "value": WIDE})
        ttft(engine, prompt, seen)
        times = {"seen before": [], "never seen": []}
        for i in range(5):
            times["seen before"].append(ttft(engine, prompt, seen))
            fresh = {**WIDE, "description": f"fresh {i}"}
            times["never seen"].append(
                ttft(engine, prompt, grammar.from_tgi({"type": "json", "value": fresh}))
            )
        print("| schema | TTFT p50 ms |")
        print("|---|---|")
        for name, values in times.items():
            print(f"| {name} | {np.median(values) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
