"""Model registry: HF architecture name -> our implementation."""

from __future__ import annotations

import torch
from torch import nn

from tgi_mp.executor.models.llama import LlamaForCausalLM
from tgi_mp.executor.parallel import SINGLE, TensorParallel
from tgi_mp.kernels.backends import TORCH_ATTENTION, AttentionBackend
from tgi_mp.model_source import ModelConfig

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # bias flags come from the config
}


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    tp: TensorParallel = SINGLE,
    attention: AttentionBackend = TORCH_ATTENTION,
) -> nn.Module:
    """An eval-mode model with UNINITIALISED weights, for a loader to fill.

    Built on the meta device and then given real storage, so a large model does
    not spend seconds in random init that the checkpoint overwrites anyway.
    """
    if cfg.architecture not in MODELS:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; have {sorted(MODELS)}")
    with torch.device("meta"):
        model = MODELS[cfg.architecture](cfg, tp, attention)
    # Inference only: no parameter requires grad, whatever mode the caller runs in.
    return model.to(dtype=dtype).to_empty(device=device).requires_grad_(False).eval()
