"""Shared by the engine tests: the bundled model, test prompts, and transformers' greedy answer."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch

from tgi_mp.model_source import resolve_model

if TYPE_CHECKING:
    from tgi_mp.ipc.messages import SchedulerStats
    from tgi_mp.launcher import Engine

NEW_TOKENS = 24  # per prompt: 8 prompts x 24 greedy tokens (suite time; 32 added little)
NEAR_TIE = 1e-4  # where the reference's two best logits are this close, either pick is right

TEXT = (
    "The history of the lighthouse begins long before electric lamps. Ancient sailors relied on "
    "fires lit on hilltops to find safe harbour at night, and the Pharos of Alexandria, finished "
    "around 280 BC, stood for centuries as one of the wonders of the world. Medieval towers "
    "burned wood, coal or tallow candles, and their keepers often lived in isolation for months. "
    "In 1822 the French physicist Augustin Fresnel designed a lens made of concentric rings of "
    "glass prisms, which bent scattered light into a single powerful beam visible for more than "
    "twenty miles. Within a few decades Fresnel lenses were installed along the coasts of Europe "
    "and North America. Keepers trimmed wicks, wound clockwork that rotated the lens, polished "
    "brass and logged the weather. Storms could trap them for weeks; some kept gardens in "
    "baskets of soil carried from the mainland, others raised goats on rocky islands. The "
    "arrival of electricity changed the work entirely. By the middle of the twentieth century "
    "automatic lamp changers, fog detectors and radio beacons made resident keepers "
    "unnecessary, and one by one the stations were automated. Today satellite navigation guides "
    "most ships, yet many lighthouses still shine, maintained by coast guards or by volunteers "
    "who restore the old towers as museums. Visitors climb narrow spiral stairs to the lantern "
    "room, look out across the water, and imagine the nights when a single flame was all that "
    "stood between a ship and the rocks. Engineers who study these buildings admire how they "
    "survived centuries of wind and waves: granite blocks dovetailed together like a puzzle, "
    "foundations cut into the living rock, and walls that taper as they rise so that the sea "
    "spends its force against a curved face. The Eddystone lighthouse off Plymouth was rebuilt "
    "four times; its third tower, built by John Smeaton in 1759, pioneered hydraulic lime, a "
    "mortar that sets under water, and it stood until the rock beneath it began to crack. "
    "Smeaton's tower was then taken down and rebuilt on the Hoe in Plymouth, where it still "
    "welcomes visitors. In Scotland the Stevenson family designed most of the country's "
    "lighthouses over four generations, and the writer Robert Louis Stevenson was expected to "
    "join the family trade before he chose literature instead. His stories of islands, "
    "shipwrecks and buried treasure owe something to the nights he spent on those remote "
    "stations with his father, listening to the wind and watching the beam sweep across the "
    "dark. Modern lighthouses use light-emitting diodes that consume a fraction of the power of "
    "the old lamps and last for years without attention. Solar panels and batteries keep many "
    "of them running far from any grid. Some countries have switched off lights that ships no "
    "longer need, while others keep them as a backup in case satellite signals fail. Sailors "
    "still say there is nothing quite like the sight of a familiar light after a long passage: "
    "a steady rhythm of flashes that tells them exactly where they are and that home is near. "
)

PROMPT_LENGTHS = [1, 6, 23, 64, 130, 257, 431, 640]


def model_paths() -> tuple[str, str]:
    src = resolve_model(None)
    return src.path, src.gguf_file


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    path, gguf = model_paths()
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf)


def prompts() -> list[list[int]]:
    """Prompts of the lengths above, each cut from the text at a different offset.

    The text is ~600 tokens, so the longest prompt repeats part of it.
    """
    ids = tokenizer()(TEXT * 3, add_special_tokens=False)["input_ids"]
    out = []
    for i, n in enumerate(PROMPT_LENGTHS):
        start = (i * 37) % (len(ids) - n)
        out.append(ids[start : start + n])
    return out


@functools.cache
def hf_model():
    """transformers' model of the bundled GGUF, float32 (loaded once per process)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    path, gguf = model_paths()
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def reference_logprobs(prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at each generated position: [len(generated), V]."""
    ids = torch.tensor([prompt + generated])
    logits = hf_model()(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    return logits.double().log_softmax(-1)


def reference_greedy(prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and, per position, the margin between its two best logits
    (each prompt's computed once per process: several test modules share prompts)."""
    return [_greedy(tuple(p)) for p in prompts]


@functools.cache
@torch.inference_mode()
def _greedy(prompt: tuple[int, ...]) -> tuple[list[int], list[float]]:
    model = hf_model()
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, margins = [], []
    for _ in range(NEW_TOKENS):
        logits = out.logits[0, -1].double()
        top = logits.topk(2).values
        tok = int(logits.argmax())
        tokens.append(tok)
        margins.append(float(top[0] - top[1]))
        out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, margins


def compare(
    got: list[int], want: list[int], margins: list[float], near_tie: float = NEAR_TIE
) -> tuple[bool, int]:
    """(agrees, positions compared). A mismatch is allowed only at a near-tie, and ends there."""
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            return margins[j] < near_tie, j
    return True, len(want)


async def engine_stats(engine: Engine) -> SchedulerStats:
    """The scheduler's counters, through a client of its own."""
    client = engine.client()
    try:
        return await client.stats()
    finally:
        client.close()
