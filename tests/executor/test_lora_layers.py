"""The LoRA projections against the formula, row by row: y = W x + s_a · B_a (A_a x) for
each token's adapter (or none), in float32 and in packed bf16, after slot swaps, and
through the static mask buffers a CUDA graph replays over."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from tests.executor.test_model import TINY, save_tiny
from tgi_mp.executor.lora import GROUPS, LoraAdapters, LoraLinear
from tgi_mp.executor.parallel import SINGLE
from tgi_mp.executor.weights import load_model
from tgi_mp.ipc.messages import LoraColumns
from tgi_mp.kernels.cpu_lora import LoraKernel
from tgi_mp.lora_source import check_adapter, projection_shapes
from tgi_mp.model_source import ModelConfig, load_model_config, resolve_model

RANKS = (4, 8)
TARGETS = (("q_proj", "v_proj", "down_proj"), ("q_proj", "k_proj", "gate_proj", "o_proj"))


def write_adapter(
    path: Path,
    mc: ModelConfig,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    seed: int,
    std: float,
) -> dict[str, torch.Tensor]:
    """A random PEFT LoRA adapter in PEFT's file layout (N(0, std) A and B) on `targets`
    of every layer; returns its tensors."""
    shapes = projection_shapes(mc)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(mc.num_layers):
        for module in targets:
            n_in, n_out = shapes[module]
            parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * std
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-lora-layers")
    save_tiny(LlamaConfig(**TINY), directory)
    source = resolve_model(str(directory))
    mc = load_model_config(source)
    specs, weights = [], []
    for a, (rank, targets) in enumerate(zip(RANKS, TARGETS, strict=True)):
        path = directory / f"lora{a}"
        weights.append(write_adapter(path, mc, rank, 3 * a + 2, targets, a, 0.2))
        specs.append(check_adapter(f"lora{a}", path, mc, None))
    return source, mc, tuple(specs), weights


def expected(base, x, layer, group, token_slots, resident, specs, weights, mc) -> torch.Tensor:
    """The formula in float32, token by token."""
    y = base(x).float()
    parent, subs = GROUPS[group]
    offsets = np.cumsum([0] + [projection_shapes(mc)[sub][1] for sub in subs])
    for t, slot in enumerate(token_slots):
        if slot < 0:
            continue
        a = resident[slot]
        for i, sub in enumerate(subs):
            key = f"base_model.model.model.layers.{layer}.{parent}.{sub}"
            if f"{key}.lora_A.weight" not in weights[a]:
                continue
            A, B = weights[a][f"{key}.lora_A.weight"], weights[a][f"{key}.lora_B.weight"]
            delta = specs[a].scale * (B @ (A @ x[t].float()))
            y[t, offsets[i] : offsets[i + 1]] += delta
    return y


# The C++ kernel is bf16-only; its plain loops run anywhere, its AVX512-BF16 code
# where the CPU has it (elsewhere the case runs the plain loops twice).
CASES = [
    (torch.float32, "masked", None),
    (torch.float32, "segments", None),
    (torch.bfloat16, "masked", None),
    (torch.bfloat16, "segments", None),
    (torch.bfloat16, "kernel", False),
    (torch.bfloat16, "kernel", True),
]


@pytest.mark.parametrize(("dtype", "mode", "fast"), CASES)
def test_every_projection_follows_the_formula(setup, dtype, mode: str, fast) -> None:
    source, mc, specs, weights = setup
    model = load_model(source, mc, dtype, "cpu")
    kernel = None if fast is None else LoraKernel(fast=fast)
    cpu = torch.device("cpu")
    lora = LoraAdapters(model, specs, 2, max(RANKS), mc, SINGLE, dtype, cpu, kernel)
    lora.state.force = mode
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    query_lens = np.array([2, 1, 3])
    gen = torch.Generator().manual_seed(9)
    # Slots loaded one way, then swapped (a reload zeroes what the old adapter left);
    # then one slot's tokens apart (segments: gathered rows, not a view).
    for rows, loads, resident in (
        ([-1, 0, 1], [0, 1], [0, 1]),
        ([-1, 0, 1], [1, 0], [1, 0]),
        ([1, -1, 1], [], [1, 0]),
    ):
        slots = np.arange(len(loads), dtype=np.int32)  # slot i <- adapter loads[i]
        cols = LoraColumns(np.array(rows, np.int32), slots, np.array(loads, np.int32))
        lora.apply(cols, query_lens)
        assert lora.state.mode == mode
        token_slots = np.repeat(cols.slots, query_lens)
        for layer, block in enumerate(model.model.layers):
            for group, (parent, _) in GROUPS.items():
                module = getattr(getattr(block, parent), group)
                assert isinstance(module, LoraLinear)
                x = torch.randn(6, module.group.a.shape[1], generator=gen).to(dtype)
                with torch.inference_mode():
                    got = module(x).float()
                    want = expected(
                        module.base, x, layer, group, token_slots, resident, specs, weights, mc
                    )
                torch.testing.assert_close(got, want, **tol)
    # No adapter row: the masks are off and the projections are the base ones.
    lora.apply(base_only(1), np.array([4]))
    qkv = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(4, mc.hidden_size, generator=gen).to(dtype)
    with torch.inference_mode():
        torch.testing.assert_close(qkv(x), qkv.base(x), atol=0, rtol=0)


def base_only(rows: int) -> LoraColumns:
    return LoraColumns(np.full(rows, -1, np.int32), np.empty(0, np.int32), np.empty(0, np.int32))


def test_static_masks_for_cuda_graphs(setup) -> None:
    """`to_static`: the step's masks in buffers that stay put, zeros on padding rows."""
    source, mc, specs, _ = setup
    model = load_model(source, mc, torch.float32, "cpu")
    lora = LoraAdapters(model, specs, 2, max(RANKS), mc, SINGLE, torch.float32, torch.device("cpu"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    x = torch.randn(8, mc.hidden_size)
    cols = LoraColumns(
        np.array([1, -1, 0], np.int32), np.array([0, 1], np.int32), np.array([0, 1], np.int32)
    )
    lora.state.force = "segments"  # eager by segment; `to_static` masks for the graph
    with torch.inference_mode():
        lora.apply(cols, np.ones(3, dtype=np.int64))
        eager = qkv(x[:3])
        lora.state.to_static(3, 8)
        static = {g: m.data_ptr() for g, m in lora.state.masks.items()}
        padded = qkv(x)
        torch.testing.assert_close(padded[:3], eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(padded[3:], qkv.base(x[3:]), atol=1e-6, rtol=0)
        lora.apply(base_only(2), np.ones(2, dtype=np.int64))
        lora.state.to_static(2, 8)  # a base-only step replays the same graph, masks zero
        assert {g: m.data_ptr() for g, m in lora.state.masks.items()} == static
        torch.testing.assert_close(qkv(x), qkv.base(x), atol=1e-6, rtol=0)
