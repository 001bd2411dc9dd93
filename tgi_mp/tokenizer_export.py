"""Gives the frontend a `tokenizer.json` it can load with plain `tokenizers`.

The frontend never imports torch, and transformers does, so the launcher
does the conversion (a GGUF's tokenizer lives in its metadata) once and
caches the result, keyed by the model file's path, size and mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil

from tgi_mp.model_source import ModelSource


def _cache_dir(source: ModelSource) -> str:
    path = source.gguf_path if source.kind == "gguf" else source.path
    st = os.stat(path)
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(root, "tgi-mp", "tokenizers", key)


def export_tokenizer(source: ModelSource, tokenizer_config_path: str | None = None) -> str:
    """A directory holding tokenizer.json (and tokenizer_config.json) for this model."""
    if source.kind == "hf" and os.path.exists(os.path.join(source.path, "tokenizer.json")):
        out = source.path
    else:
        out = _cache_dir(source)
        if not os.path.exists(os.path.join(out, "tokenizer.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            tmp = f"{out}.tmp{os.getpid()}"
            tok.save_pretrained(tmp)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    if tokenizer_config_path:  # the user's override (chat template) goes beside a copy
        copy = _cache_dir(source) + "-override"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(out, copy)
        shutil.copy(tokenizer_config_path, os.path.join(copy, "tokenizer_config.json"))
        for name in ("chat_template.jinja", "chat_template.json"):  # the override decides
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(copy, name))
        out = copy
    return out
