"""`--model-id org/name` not in the local cache: download what serving needs from the
Hugging Face Hub, as TGI and vLLM do (`HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_CACHE`,
`--revision` honoured; `HF_HUB_OFFLINE=1` never downloads).

What is fetched: the config, tokenizer and chat-template files, and the weights in
one format: safetensors (with their index), else a repository's only GGUF. A repo
with several GGUFs, or pickle weights alone (`*.bin`), is refused with what to do.
A progress bar on a terminal, a log line per file otherwise (a container's logs).
"""

from __future__ import annotations

import io
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


def cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The snapshot directory of `repo_id` at `revision` (a ref or a commit) in the local
    cache, or None. Read from the cache's layout directly: huggingface_hub's offline
    lookup refuses a snapshot with only some of the repo's files, which is what a
    download of the serving files leaves."""
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    ref = root / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = root / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def has_weights(snapshot: Path) -> bool:
    """Whether a snapshot holds weights to serve (an interrupted download, or a config
    fetched alone by another tool, does not)."""
    return any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.gguf"))


def serving_files(model_id: str, files: list[str]) -> list[str]:
    """The repository files serving needs (top-level ones only)."""
    top = [f for f in files if "/" not in f]
    meta = [f for f in top if f in META_FILES]
    safetensors = [f for f in top if f.endswith(".safetensors")]
    if "model.safetensors.index.json" in top:  # the shards it names (not, say, Mistral's
        shards = [f for f in safetensors if f.startswith("model-")]  # consolidated copy)
        return [*meta, "model.safetensors.index.json", *(shards or safetensors)]
    if "model.safetensors" in top:
        return [*meta, "model.safetensors"]
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
        revision=revision,  # the ref as given, so the cache maps it (offline starts)
        cache_dir=cache_dir,
        allow_patterns=files,
        endpoint=endpoint(),
        tqdm_class=None if sys.stderr.isatty() else _log_progress(),
    )
    log.info("downloaded %s in %.1fs to %s", model_id, time.monotonic() - t0, path)
    return Path(path)


def _log_progress() -> type:
    """A tqdm that writes log lines (every 5 s and at the end) instead of drawing a bar."""
    from tqdm.auto import tqdm

    class LogProgress(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._logged = 0.0
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            now = time.monotonic()
            if now - self._logged >= 5.0 or (self.total and self.n >= self.total):
                self._logged = now
                log.info("download: %s", self.format_meter(**self.format_dict))
            return True

    return LogProgress
