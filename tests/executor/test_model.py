"""Our Llama-family model and loaders against Hugging Face transformers (float32 CPU)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tgi_mp.executor.parallel import TensorParallel
from tgi_mp.executor.quant import GroupQuantized, Int4Linear
from tgi_mp.executor.weights import Slicer, _gguf_tensors, load_model
from tgi_mp.kernels.attention import AttentionMetadata, allocate_kv_cache
from tgi_mp.model_source import (
    DEFAULT_GGUF_FILE,
    ModelConfig,
    ModelSource,
    load_model_config,
    resolve_model,
)

BS = 4
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}
VARIANTS = {
    "llama_tied": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama_untied_bias": lambda: LlamaConfig(
        **TINY, tie_word_embeddings=False, attention_bias=True
    ),
    "llama3_rope": lambda: LlamaConfig(**TINY, rope_parameters=LLAMA3),
    "linear_rope": lambda: LlamaConfig(
        **TINY, rope_parameters={"rope_type": "linear", "factor": 2.0}
    ),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
}
PROMPT = torch.tensor(
    [1, 17, 200, 33, 5, 99, 254, 7, 7, 42, 150, 3, 88, 61, 0, 129, 77, 18, 240, 9, 11]
)


# ----------------------------------------------------------------- helpers


def save_tiny(hf_config: object, directory: Path, shard: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF inits biases at 0 and norms at 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(
        directory, safe_serialization=True, max_shard_size="100KB" if shard else "50GB"
    )
    return model


class Runner:
    """Drives our model through the paged cache like the executor will."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int = 64) -> None:
        self.model, self.cfg = model, cfg
        dtype = next(model.parameters()).dtype
        self.kv = allocate_kv_cache(
            cfg.num_layers, num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, dtype, "cpu"
        )
        # each sequence owns a scrambled run of blocks
        self.perm = np.random.default_rng(1).permutation(num_blocks).astype(np.int32)

    def step(
        self, chunks: list[torch.Tensor], ctx: list[int], seq_ids: list[int]
    ) -> list[torch.Tensor]:
        """One forward over several sequences' new tokens; logits for every new token."""
        width = len(self.perm) // 4
        tables = np.stack([self.perm[s * width : (s + 1) * width] for s in seq_ids])
        meta = AttentionMetadata.build(
            np.array([len(c) for c in chunks]), np.array(ctx), tables, BS, "cpu"
        )
        with torch.inference_mode():
            hidden = self.model(torch.cat(chunks), meta.positions, self.kv, meta)
            logits = self.model.compute_logits(hidden)
        return list(logits.split([len(c) for c in chunks]))


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids[None]).logits[0].float()


# ----------------------------------------------------------- tiny models


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp(request.param)
    sharded = request.param == "llama_untied_bias"  # exercise the index file
    hf = save_tiny(VARIANTS[request.param](), directory, shard=sharded)
    assert (directory / "model.safetensors.index.json").is_file() == sharded
    source = resolve_model(str(directory))
    cfg = load_model_config(source)
    return hf, cfg, load_model(source, cfg, torch.float32, "cpu"), source


def test_tiny_one_prefill(tiny) -> None:
    hf, cfg, ours, _ = tiny
    (logits,) = Runner(ours, cfg).step([PROMPT], [0], [0])
    torch.testing.assert_close(logits, hf_logits(hf, PROMPT), atol=1e-5, rtol=0)


def test_tiny_chunked_prefill(tiny) -> None:
    hf, cfg, ours, _ = tiny
    runner, got, at = Runner(ours, cfg), [], 0
    for n in (6, 8, 7):  # chunk edges fall mid-block
        got += runner.step([PROMPT[at : at + n]], [at], [0])
        at += n
    torch.testing.assert_close(torch.cat(got), hf_logits(hf, PROMPT), atol=1e-5, rtol=0)


def test_tiny_prefill_then_decode(tiny) -> None:
    hf, cfg, ours, _ = tiny
    runner = Runner(ours, cfg)
    got = runner.step([PROMPT[:9]], [0], [0])
    got += [runner.step([PROMPT[p : p + 1]], [p], [0])[0] for p in range(9, len(PROMPT))]
    torch.testing.assert_close(torch.cat(got), hf_logits(hf, PROMPT), atol=1e-5, rtol=0)


def test_tiny_mixed_batch(tiny) -> None:
    """Two prompts in one step stream, one decoding while the other prefills."""
    hf, cfg, ours, _ = tiny
    other = PROMPT.flip(0)[:13]
    runner = Runner(ours, cfg)
    a, b = runner.step([PROMPT[:10]], [0], [0]), []
    for p in range(10, 13):  # seq 0 decodes while seq 1 prefills 13 tokens in chunks of 5,5,3
        s = (p - 10) * 5
        out = runner.step([PROMPT[p : p + 1], other[s : s + 5]], [p, s], [0, 1])
        a.append(out[0])
        b.append(out[1])
    torch.testing.assert_close(torch.cat(a), hf_logits(hf, PROMPT[:13]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(b), hf_logits(hf, other), atol=1e-5, rtol=0)


def test_tiny_bfloat16(tiny) -> None:
    _, cfg, ours, source = tiny
    bf16 = load_model(source, cfg, torch.bfloat16, "cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    (lo,) = Runner(bf16, cfg).step([PROMPT], [0], [0])
    (hi,) = Runner(ours, cfg).step([PROMPT], [0], [0])
    assert lo.dtype == torch.float32
    assert (lo - hi).abs().max() < 0.05 * hi.abs().max() + 1e-2


def test_tiny_config(tiny) -> None:
    hf, cfg, _, _ = tiny
    assert cfg.architecture == hf.config.architectures[0]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    assert cfg.eos_token_ids == [2] and cfg.bos_token_id == 1
    assert cfg.attention_bias == (
        cfg.architecture == "Qwen2ForCausalLM" or hf.config.attention_bias
    )


# --------------------------------------------------------- bundled GGUF


@pytest.fixture(scope="module")
def smollm():
    source = resolve_model(None)
    cfg = load_model_config(source)
    ours = load_model(source, cfg, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    return source, cfg, ours, hf.eval()


def test_gguf_weights_equal_transformers(smollm) -> None:
    _, cfg, ours, hf = smollm
    params = dict(ours.named_parameters())
    q, kv, inter = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    fused = {
        "q_proj": ("qkv_proj", 0, q),
        "k_proj": ("qkv_proj", q, kv),
        "v_proj": ("qkv_proj", q + kv, kv),
        "gate_proj": ("gate_up_proj", 0, inter),
        "up_proj": ("gate_up_proj", inter, inter),
    }
    state = hf.state_dict()
    assert len(state) == len(params) + 3 * cfg.num_layers + 1  # q/k/v, gate/up split; tied lm_head
    for name, ref in state.items():
        if name == "lm_head.weight":
            mine = params["model.embed_tokens.weight"]
        elif (proj := name.split(".")[-2]) in fused:
            target, start, rows = fused[proj]
            mine = params[name.replace(proj, target)][start : start + rows]
        else:
            mine = params[name]
        assert torch.equal(mine, ref), name


def test_gguf_logits_match_transformers(smollm) -> None:
    _, cfg, ours, hf = smollm
    ids = torch.randint(0, cfg.vocab_size, (41,), generator=torch.Generator().manual_seed(0))
    runner = Runner(ours, cfg)
    got = runner.step([ids[:33]], [0], [0])[0][-1]  # prefill, then decodes (batched path)
    for p in range(33, 41):
        got = runner.step([ids[p : p + 1]], [p], [0])[0][-1]
    ref = hf_logits(hf, ids)[-1]
    assert (got - ref).abs().max() < 1e-3
    assert got.argmax() == ref.argmax()


def test_gguf_config(smollm) -> None:
    source, cfg, _, hf = smollm
    assert source.kind == "gguf" and source.gguf_file == DEFAULT_GGUF_FILE
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.vocab_size == hf.config.vocab_size and cfg.tie_word_embeddings
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == hf.config.rms_norm_eps and cfg.eos_token_ids == [2]


def test_gguf_bfloat16(smollm) -> None:
    source, cfg, ours, _ = smollm
    bf16 = load_model(source, cfg, torch.bfloat16, "cpu")
    ids = torch.arange(100, 140)
    lo, hi = (
        Runner(bf16, cfg).step([ids], [0], [0])[0][-1],
        Runner(ours, cfg).step([ids], [0], [0])[0][-1],
    )
    assert torch.cosine_similarity(lo, hi, dim=0) > 0.99
    assert hi.argmax() in lo.topk(5).indices


# ------------------------------------------------------------- resolving


def test_resolve_paths(tmp_path: Path) -> None:
    default = resolve_model(None)
    assert Path(default.path, DEFAULT_GGUF_FILE).is_file() and default.kind == "gguf"
    by_file = resolve_model(default.gguf_path)
    assert (by_file.kind, by_file.path, by_file.gguf_file) == (
        "gguf",
        default.path,
        DEFAULT_GGUF_FILE,
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_resolve_from_offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    save_tiny(VARIANTS["llama_tied"](), snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model("org/tiny")
    assert source == ModelSource("hf", str(snapshot), None, "org/tiny")
    assert load_model_config(source).architecture == "LlamaForCausalLM"
    with pytest.raises(FileNotFoundError, match="'org/absent'"):
        resolve_model("org/absent")
    shutil.rmtree(snapshot)
    with pytest.raises(FileNotFoundError, match="org/tiny"):
        resolve_model("org/tiny")


def test_model_source_never_imports_torch(tmp_path: Path) -> None:
    # the launcher, scheduler and frontend use it and must stay torch-free
    code = (
        "import sys; from tgi_mp.model_source import load_model_config, resolve_model; "
        "load_model_config(resolve_model(None)); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_gguf_int4_takes_the_shipped_bits(smollm) -> None:
    """--quantize int4 on the Q4_1 GGUF: every projection is packed from the file's own
    blocks, so its values are the float load's (dequantised by gguf) exactly."""
    source, cfg, ours, _ = smollm
    q4 = load_model(source, cfg, torch.float32, "cpu", quantize="int4")
    params = dict(ours.named_parameters())
    linears = {n: m for n, m in q4.named_modules() if isinstance(m, Int4Linear)}
    assert len(linears) == 4 * cfg.num_layers
    for name, module in linears.items():
        assert torch.equal(module.dense, params[f"{name}.weight"]), name


def test_gguf_shipped_4bit_shares_match_the_float_shares() -> None:
    """This rank's rows / columns of each 4-bit tensor, in HF's q/k row order, are the
    float path's slices of the same tensor (3-way tensor parallel)."""
    source = resolve_model(None)
    cfg = load_model_config(source)
    slicer = Slicer(TensorParallel(1, 3))  # rank 1 of 3: every cut starts past 0
    _, floats = _gguf_tensors(source.gguf_path, cfg, slicer)
    _, shipped = _gguf_tensors(source.gguf_path, cfg, slicer, keep_4bit=True)
    kinds = set()
    # The file's first 40 tensors (a few layers, every projection kind): the lazy
    # readers dequantise no further, which keeps the test short.
    for (name, ref), (same, got) in itertools.islice(zip(floats, shipped, strict=True), 40):
        assert name == same
        if isinstance(got, GroupQuantized):
            assert got.shape == tuple(ref.shape), name
            torch.testing.assert_close(got.dequantize(), ref, rtol=0, atol=1e-6)
            kinds.add(name.split(".")[-2])
        else:
            assert torch.equal(got, ref), name
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_pre_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    config = LlamaConfig(**TINY).to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"pre-quantized checkpoint \(gptq\) is not supported"):
        load_model_config(resolve_model(str(tmp_path)))


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model_config(resolve_model(str(tmp_path)))


def test_dummy_weights_from_a_config_alone(tmp_path: Path) -> None:
    LlamaConfig(**TINY).to_json_file(str(tmp_path / "tiny.json"))
    source = resolve_model(str(tmp_path / "tiny.json"))
    assert source.kind == "hf" and source.config_file == "tiny.json"
    cfg = load_model_config(source)
    a = load_model(source, cfg, torch.float32, "cpu", dummy=True)
    b = load_model(source, cfg, torch.float32, "cpu", dummy=True)
    params = dict(a.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert torch.equal(params["model.norm.weight"], torch.ones(cfg.hidden_size))
    assert 0.015 < float(params["model.embed_tokens.weight"].std()) < 0.025
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_the_llama_8b_benchmark_config() -> None:
    path = Path(__file__).resolve().parents[2] / "perf" / "configs" / "llama-3.1-8b.json"
    cfg = load_model_config(resolve_model(str(path)))
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.vocab_size == 128256 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.eos_token_ids == [128001, 128008, 128009]
