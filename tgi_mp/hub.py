"""`--model-id org/name` not in the local cache: download what serving needs from the
Hugging Face Hub, as TGI and vLLM do (`HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_CACHE`,
`--revision` honoured; `HF_HUB_OFFLINE=1` never downloads).

What is fetched: the config, tokenizer and chat-template files, and the weights in
one format: safetensors (with their index), else a repository's only GGUF. A repo
with several GGUFs, or pickle weights alone (`*.bin`), is refused with what to do.
A progress bar on a terminal, a log line per file otherwise (a container's logs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("tgi_mp.serve")

META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def endpoint() -> str | None:
    # Read at call time: huggingface_hub freezes HF_ENDPOINT when it is imported.
    return os.environ.get("HF_ENDPOINT") or None


def serving_files(model_id: str, files: list[str]) -> list[str]:
    """The repository files serving needs (top-level ones only)."""
    top = [f for f in files if "/" not in f]
    meta = [f for f in top if f in META_FILES]
    safetensors = [
        f for f in top if f.endswith(".safetensors") or f == "model.safetensors.index.json"
    ]
    if safetensors:
        return meta + safetensors
    ggufs = [f for f in top if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return meta + ggufs
    if ggufs:
        raise FileNotFoundError(
            f"{model_id} has several GGUF files ({', '.join(sorted(ggufs)[:6])}): download the "
            f"one you want (`huggingface-cli download {model_id} FILE`) and pass its path"
        )
    if any(f.endswith(".bin") for f in top):
        raise FileNotFoundError(
            f"{model_id} has only pickle weights (*.bin), which tgi-mp does not load: "
            "convert them to safetensors (transformers' `save_pretrained(safe_serialization=True)`)"
        )
    raise FileNotFoundError(f"{model_id} has no safetensors or GGUF weights to serve")


def download(model_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """The snapshot directory of `model_id` with `serving_files` in it."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi(endpoint=endpoint()).model_info(model_id, revision=revision)
    files = serving_files(model_id, [s.rfilename for s in info.siblings or []])
    log.info("downloading %s (%d files) from the Hugging Face Hub", model_id, len(files))
    t0 = time.monotonic()
    path = snapshot_download(
        model_id,
        revision=info.sha or revision,
        cache_dir=cache_dir,
        allow_patterns=files,
        endpoint=endpoint(),
        tqdm_class=None if sys.stderr.isatty() else _LogProgress,
    )
    log.info("downloaded %s in %.1fs to %s", model_id, time.monotonic() - t0, path)
    return Path(path)


class _LogProgress:
    """The files' progress as log lines (no terminal to draw a bar on): a tqdm stand-in
    for `snapshot_download`, which counts files with it."""

    def __init__(self, iterable=None, total: int | None = None, **_: object) -> None:
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        log.info("downloaded %d of %s files", self.n, self.total or "?")

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass
