"""Grammar-constrained rows mixed into a batch with free ones (the engine, float32)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
from tokenizers import Tokenizer

from tgi_mp.frontend import grammar
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine
from tgi_mp.model_source import resolve_model
from tgi_mp.tokenizer_export import export_tokenizer

NEW = 24
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
        "required": ["n", "tag"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
]
PHONE = r"[0-9]{3}-[0-9]{4}"


def test_constrained_and_free_requests_share_a_batch() -> None:
    """16 at once, half constrained (three schemas and a regex), half free: every
    constrained answer is valid, every free one is what it is alone (greedy)."""
    tok = Tokenizer.from_file(f"{export_tokenizer(resolve_model(None))}/tokenizer.json")
    prompts = [
        tok.encode(f"Item {i} of the list is", add_special_tokens=False).ids for i in range(8)
    ]
    constraints = [grammar.from_tgi({"type": "json", "value": s}) for s in SCHEMAS]
    constraints.append(grammar.from_tgi({"type": "regex", "value": PHONE}))
    free = SamplingParams(max_new_tokens=NEW)

    with Engine.start(None, dtype="float32", max_batch_total_tokens=4096) as engine:

        async def main() -> tuple[list, list, list]:
            client = engine.client()

            async def run(prompt: list[int], params: SamplingParams) -> list[int]:
                return [o.token_id async for o in client.generate(prompt, params)]

            try:
                alone = [await run(p, free) for p in prompts]
                mixed = await asyncio.gather(
                    *(run(p, free) for p in prompts),
                    *(
                        run(p, SamplingParams(max_new_tokens=64, grammar=constraints[i % 4]))
                        for i, p in enumerate(prompts)
                    ),
                )
            finally:
                client.close()
            return alone, mixed[:8], mixed[8:]

        alone, mixed_free, constrained = asyncio.run(main())
    assert mixed_free == alone
    for i, ids in enumerate(constrained):
        text = tok.decode([t for t in ids if t not in (0, 1, 2)])
        if i % 4 == 3:
            assert re.fullmatch(PHONE, text), text
        else:
            jsonschema.validate(json.loads(text), SCHEMAS[i % 4])
