"""Multi-LoRA against transformers + PEFT: a tiny random Llama with two random adapters
(different ranks, targets and scalings), each alone and mixed with the base model in
one batch, with fewer slots than adapters, and with two shards. (The bundled model
runs through the HTTP server in tests/frontend/test_lora_server.py.)"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.engine.oracle import compare
from tests.executor.test_model import TINY, save_tiny
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine

NEW = 12
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, PEFT LoraConfig arguments): the second has another rank, rsLoRA, fewer targets.
ADAPTERS = {
    "alpha": dict(r=8, lora_alpha=16, target_modules=ALL),
    "beta": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True
    ),
}


def make_adapters(base: torch.nn.Module, directory: Path, specs: dict, std: float = 0.3) -> dict:
    """Saves one PEFT adapter per spec with random A and B (PEFT would start B at 0);
    returns name -> directory."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, (name, kw) in enumerate(specs.items()):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * std / p.shape[-1] ** 0.5)
        out[name] = directory / name
        model.save_pretrained(out[name])
    return out


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the margin between the two best logits at each."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, margins = [], []
    for _ in range(n):
        logits = out.logits[0, -1].double()
        top = logits.topk(2).values
        tokens.append(int(logits.argmax()))
        margins.append(float(top[0] - top[1]))
        out = model(
            torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True
        )
    return tokens, margins


def references(base: torch.nn.Module, dirs: dict, prompts: list[list[int]], n: int) -> dict:
    """name (None: the base model) -> [(tokens, margins) per prompt], from PEFT."""
    from peft import PeftModel

    names = list(dirs)
    model = PeftModel.from_pretrained(
        copy.deepcopy(base), str(dirs[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    model.eval()
    out = {}
    for name in names:
        model.set_adapter(name)
        out[name] = [greedy(model, p, n) for p in prompts]
    with model.disable_adapter():
        out[None] = [greedy(model, p, n) for p in prompts]
    return out


def run(engine: Engine, jobs: list[tuple[list[int], int]], concurrent: bool) -> list[list[int]]:
    """Greedy tokens for each (prompt, adapter index)."""

    async def main() -> list[list[int]]:
        client = engine.client()

        async def one(prompt: list[int], adapter: int) -> list[int]:
            params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, adapter=adapter)
            return [o.token_id async for o in client.generate(prompt, params)]

        try:
            if concurrent:
                return await asyncio.gather(*(one(p, a) for p, a in jobs))
            return [await one(p, a) for p, a in jobs]
        finally:
            client.close()

    return asyncio.run(main())


def check(label: str, got: list[list[int]], want: list[tuple[list[int], list[float]]]) -> None:
    for i, (tokens, (ref, margins)) in enumerate(zip(got, want, strict=True)):
        ok, n = compare(tokens, ref, margins)
        assert ok, f"{label} #{i}: diverges at {n}: engine {tokens} vs PEFT {ref}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, dict, dict, list[list[int]]]:
    directory = tmp_path_factory.mktemp("tiny-lora")
    save_tiny(LlamaConfig(**TINY), directory)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    dirs = make_adapters(base, directory / "adapters", ADAPTERS)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 17, 40)]
    refs = references(base, dirs, prompts, NEW)
    for name in dirs:  # the adapters matter (else the comparisons prove nothing)
        assert [t for t, _ in refs[name]] != [t for t, _ in refs[None]], name
    return str(directory), dirs, refs, prompts


def spec(dirs: dict) -> str:
    return ",".join(f"{name}={path}" for name, path in dirs.items())


def test_each_adapter_alone_and_all_mixed_in_one_batch(tiny) -> None:
    directory, dirs, refs, prompts = tiny
    names = list(dirs)
    # The same prompt under each adapter and the base model, all at once: the prefix
    # cache (on) must keep their KV apart.
    mixed = [(p, a) for p in prompts for a in (-1, 0, 1)]
    want_mixed = [refs[names[a] if a >= 0 else None][prompts.index(p)] for p, a in mixed]
    with Engine.start(
        directory, dtype="float32", lora_adapters=spec(dirs), max_batch_total_tokens=2048
    ) as engine:
        for a, name in enumerate(names):
            check(f"{name} alone", run(engine, [(p, a) for p in prompts], False), refs[name])
        check("base alone", run(engine, [(p, -1) for p in prompts], False), refs[None])
        check("mixed", run(engine, mixed, True), want_mixed)
        check("mixed again (cached prefixes)", run(engine, mixed, True), want_mixed)


def test_one_slot_for_two_adapters_swaps_them(tiny) -> None:
    """--max-loras 1: requests of the other adapter wait for the slot, then run right."""
    directory, dirs, refs, prompts = tiny
    names = list(dirs)
    jobs = [(p, a) for p in prompts for a in (0, 1)]
    with Engine.start(
        directory,
        dtype="float32",
        lora_adapters=spec(dirs),
        max_loras=1,
        max_batch_total_tokens=2048,
    ) as engine:
        got = run(engine, jobs, True)
    check("one slot", got, [refs[names[a]][prompts.index(p)] for p, a in jobs])


def test_two_shards_split_the_adapters_like_the_weights(tiny) -> None:
    directory, dirs, refs, prompts = tiny
    names = list(dirs)
    jobs = [(p, a) for p in prompts for a in (-1, 0, 1)]
    with Engine.start(
        directory,
        dtype="float32",
        num_shards=2,
        lora_adapters=spec(dirs),
        max_batch_total_tokens=2048,
    ) as engine:
        got = run(engine, jobs, True)
    check(
        "two shards", got, [refs[names[a] if a >= 0 else None][prompts.index(p)] for p, a in jobs]
    )
