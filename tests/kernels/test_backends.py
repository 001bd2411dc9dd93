"""`--attention`: what each choice gives on this machine, and clear refusals."""

from __future__ import annotations

import os

import pytest
import torch

from tests.engine.test_tensor_parallel import tiny_dir  # noqa: F401 - a module fixture
from tgi_mp.kernels.attention import AttentionMetadata
from tgi_mp.kernels.backends import (
    AttentionBackend,
    BackendUnavailable,
    TritonAttention,
    select_backend,
    self_check,
)
from tgi_mp.launcher import Engine, EngineStartupError

CPU = torch.device("cpu")
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter"
)


def test_auto_and_torch_on_the_cpu() -> None:
    backend, why = select_backend("auto", CPU, torch.float32, 16)
    assert backend.name == "torch" and why.startswith("auto on cpu; cpu: ")
    assert select_backend("torch", CPU, torch.float32, 16)[0].name == "torch"


@interpreted
def test_triton_on_the_cpu_only_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, why = select_backend("triton", CPU, torch.float32, 16)  # conftest: interpreter
    assert backend.name == "triton" and "self-check max error" in why
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="Triton kernels need a CUDA device"):
        select_backend("triton", CPU, torch.float32, 16)


def test_flash_attn_refused_with_the_reason() -> None:
    with pytest.raises(BackendUnavailable, match="--attention flash-attn: flash-attn needs a CUDA"):
        select_backend("flash-attn", CPU, torch.float32, 16)
    with pytest.raises(ValueError, match="--attention must be one of"):
        select_backend("sdpa", CPU, torch.float32, 16)


@interpreted
def test_self_check_rejects_a_wrong_backend() -> None:
    class Wrong(AttentionBackend):
        name = "wrong"

        def attend(
            self,
            q: torch.Tensor,
            k_cache: torch.Tensor,
            v_cache: torch.Tensor,
            meta: AttentionMetadata,
            scale: float,
        ) -> torch.Tensor:
            return super().attend(q, k_cache, v_cache, meta, scale * 1.01)

    class WrongDecode(TritonAttention):
        """Right on mixed steps, wrong on all-decode ones (the split-KV path)."""

        name = "wrong-decode"

        def attend(
            self,
            q: torch.Tensor,
            k_cache: torch.Tensor,
            v_cache: torch.Tensor,
            meta: AttentionMetadata,
            scale: float,
        ) -> torch.Tensor:
            out = super().attend(q, k_cache, v_cache, meta, scale)
            return out * 1.01 if meta.all_decode else out

    assert self_check(AttentionBackend(), CPU, torch.float32, 16) == 0.0
    assert self_check(TritonAttention(), CPU, torch.float16, 16) < 3e-2
    with pytest.raises(BackendUnavailable, match="wrong failed its self-check"):
        self_check(Wrong(), CPU, torch.float32, 16)
    with pytest.raises(BackendUnavailable, match="wrong-decode failed its self-check"):
        self_check(WrongDecode(), CPU, torch.float32, 16)


def test_engine_refuses_an_impossible_backend_at_start(tiny_dir: str) -> None:  # noqa: F811
    with pytest.raises(EngineStartupError, match="flash-attn needs a CUDA device"):
        Engine.start(tiny_dir, attention="flash-attn", max_batch_total_tokens=256)
