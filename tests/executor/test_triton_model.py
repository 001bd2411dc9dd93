"""The model on the Triton attention backend (interpreted on the CPU): the logits of
transformers, the padded static-buffer decode path of the CUDA graphs, and whole
engines on `--attention triton` giving the tokens of `--attention torch`."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from tests.engine.test_tensor_parallel import generate
from tests.executor.test_model import BS, PROMPT, TINY, Runner, hf_logits, save_tiny
from tgi_mp.executor.cuda_graphs import DecodeGraphs
from tgi_mp.executor.weights import load_model
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.kernels.attention import AttentionMetadata
from tgi_mp.kernels.backends import TritonAttention
from tgi_mp.launcher import Engine
from tgi_mp.model_source import load_model_config, resolve_model

# Triton kernels on CPU tensors: the interpreter's job (a GPU host runs tests/kernels).
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (no GPU)"
)

EIGHT = SamplingParams(max_new_tokens=8, ignore_eos=True)  # interpreted Triton is slow
# 6 query heads on 2 KV heads (GQA ratio 3, like the bundled model), head_dim 32.
GQA3 = {**TINY, "hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tiny-gqa3")
    hf = save_tiny(LlamaConfig(**GQA3), directory)
    source = resolve_model(str(directory))
    cfg = load_model_config(source)
    ours = load_model(source, cfg, torch.float32, "cpu", attention=TritonAttention())
    return hf, cfg, ours, str(directory)


def test_prefill_chunks_mixed_batch_and_decode_match_transformers(tiny) -> None:
    hf, cfg, ours, _ = tiny
    runner = Runner(ours, cfg)
    other = PROMPT.flip(0)[:13]
    a = runner.step([PROMPT[:10]], [0], [0])
    b = []
    for p in range(10, 13):  # seq 0 decodes while seq 1 prefills in chunks: varlen kernel
        s = (p - 10) * 5
        out = runner.step([PROMPT[p : p + 1], other[s : s + 5]], [p, s], [0, 1])
        a.append(out[0])
        b.append(out[1])
    for p in range(13, len(PROMPT)):  # both decode: the split-KV decode kernel
        q = min(p, len(other) - 1)
        out = runner.step([PROMPT[p : p + 1], other[q : q + 1]], [p, q], [0, 2])
        a.append(out[0])
    torch.testing.assert_close(torch.cat(a), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(b), hf_logits(hf, other), atol=1e-4, rtol=0)


def test_padded_decode_path_of_cuda_graphs(tiny) -> None:
    """The graph runner's static buffers, run eagerly: 3 sequences padded to a bucket
    of 4 give transformers' logits, and the padding row writes no K/V anywhere."""
    hf, cfg, ours, _ = tiny
    runner = Runner(ours, cfg)
    prompts = [PROMPT[:7], PROMPT.flip(0)[:12], PROMPT[3:8]]
    width = len(runner.perm) // 4
    tables = np.stack([runner.perm[s * width : (s + 1) * width] for s in range(3)])
    graphs = DecodeGraphs(ours, runner.kv, (2, 4), width, BS, torch.device("cpu"), capture=False)
    # A previous, bigger step leaves stale rows in the static buffers: they must not leak.
    graphs.slot_mapping.fill_(5)
    graphs.seq_lens.fill_(9)
    runner.step([p[:-1] for p in prompts], [0, 0, 0], [0, 1, 2])  # last tokens: decoded
    got: list[list[torch.Tensor]] = [[], [], []]
    seqs = [p.tolist() for p in prompts]
    for _ in range(4):
        ids = np.array([s[-1] for s in seqs])
        ctx = np.array([len(s) - 1 for s in seqs])
        meta = AttentionMetadata.build(np.ones(3, dtype=np.int64), ctx, tables, BS, "cpu")
        before = [k.clone() for k, _ in runner.kv]
        assert graphs.fits(meta)
        with torch.inference_mode():
            hidden = graphs.run(meta, torch.from_numpy(ids))
            logits = ours.compute_logits(hidden)
        assert hidden.shape[0] == 3
        for (k, _), old in zip(runner.kv, before, strict=True):
            rows = (k != old).view(-1, k.shape[2] * k.shape[3]).any(1).nonzero().flatten()
            assert sorted(rows.tolist()) == sorted(meta.slot_mapping.tolist())
        for i in range(3):
            got[i].append(logits[i])
            seqs[i].append(int(logits[i].argmax()))
    for i, s in enumerate(seqs):
        want = hf_logits(hf, torch.tensor(s[:-1]))[-4:]
        torch.testing.assert_close(torch.stack(got[i]), want, atol=1e-4, rtol=0)


def test_engine_on_triton_gives_the_tokens_of_torch(tiny) -> None:
    """Whole engines (backend chosen by --attention, TRITON_INTERPRET=1 inherited):
    prompts alone and concurrent (prefill chunks beside decode rows), prefix hits."""
    _, _, _, directory = tiny
    rng = np.random.default_rng(3)
    shared = rng.integers(3, 256, 40).tolist()
    batch = [rng.integers(3, 256, n).tolist() for n in (1, 9, 33)] + [shared, [*shared, 7, 8]]
    results = {}
    for attention in ("torch", "triton"):
        with Engine.start(
            directory,
            attention=attention,
            dtype="float32",
            max_batch_total_tokens=2048,
            max_batch_prefill_tokens=48,
        ) as engine:
            assert engine.ready.attention_backend == attention
            assert engine.ready.device == "cpu" and engine.ready.dtype == "float32"
            results[attention] = generate(engine, batch, True, EIGHT)
            if attention == "torch":  # the reference is the same alone and together
                assert generate(engine, batch, False, EIGHT) == results["torch"]
    assert results["triton"] == results["torch"]
