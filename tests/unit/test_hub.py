"""`--model-id org/name` downloads from the Hub: against a local HTTP server standing in
for it (`HF_ENDPOINT` on 127.0.0.1), so the real download path runs; then offline from
the cache; and the repositories it refuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tests.executor.test_model import TINY, save_tiny
from tgi_mp.hub import serving_files
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine
from tgi_mp.model_source import resolve_model

SHA = "1234567890abcdef1234567890abcdef12345678"


class FakeHub:
    """The Hub's model-info and file routes for repos made of local directories."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos, self.requests = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append(path)
                for repo, files in hub.repos.items():
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        tree = [
                            {"type": "file", "path": f, "size": len(d), "oid": _oid(d)}
                            for f, d in files.items()
                        ]
                        return self.send(json.dumps(tree).encode(), body, "application/json")
                    if path.startswith(f"/api/models/{repo}"):
                        info = {
                            "id": repo,
                            "sha": SHA,
                            "siblings": [{"rfilename": f} for f in files],
                        }
                        return self.send(json.dumps(info).encode(), body, "application/json")
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        name = path[len(prefix) :].split("/", 1)[1]
                        if name in files:
                            return self.send(files[name], body, "application/octet-stream")
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def send(self, data: bytes, body: bool, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", f'"{_oid(data)}"')
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch):
    model = tmp_path / "tiny"
    save_tiny(LlamaConfig(**TINY), model)
    repo = files_of(model) | {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"x"}
    fake = FakeHub(
        {
            "org/tiny": repo,
            "org/ggufs": {"config.json": b"{}", "a.Q4_0.gguf": b"", "a.Q8_0.gguf": b""},
            "org/pickles": {"config.json": b"{}", "pytorch_model.bin": b""},
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield fake
    fake.close()


def test_a_hub_id_is_downloaded_then_served_offline(hub, monkeypatch) -> None:
    source = resolve_model("org/tiny")
    got = sorted(p.name for p in Path(source.path).iterdir())
    assert got == ["config.json", "generation_config.json", "model.safetensors"]  # no .bin
    assert any(r.startswith("/org/tiny/resolve/") for r in hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    with Engine.start("org/tiny", dtype="float32", max_batch_total_tokens=512) as engine:
        client = engine.client()

        async def two() -> list[int]:
            params = SamplingParams(max_new_tokens=2, ignore_eos=True)
            return [o.token_id async for o in client.generate([1, 5, 9], params)]

        try:
            assert len(asyncio.run(two())) == 2
        finally:
            client.close()
    assert hub.requests == [], "offline: the cache only"


def test_what_is_refused(hub, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="several GGUF files"):
        resolve_model("org/ggufs")
    with pytest.raises(FileNotFoundError, match="only pickle weights"):
        resolve_model("org/pickles")
    with pytest.raises(FileNotFoundError, match="not on the Hub"):
        resolve_model("org/missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE forbids"):
        resolve_model("org/other")


def test_serving_files() -> None:
    index = "model.safetensors.index.json"
    files = ["config.json", "model-1.safetensors", index, "consolidated.safetensors", "x.bin"]
    assert serving_files("r", [*files, "a/b.json"]) == ["config.json", index, "model-1.safetensors"]
    assert serving_files("r", ["tokenizer.json", "m.gguf"]) == ["tokenizer.json", "m.gguf"]


def test_a_cached_config_without_weights_is_completed(hub, tmp_path) -> None:
    """A snapshot left with a config alone (another tool, a cut download) is not taken
    as the model: the weights are fetched."""
    from huggingface_hub import hf_hub_download

    hf_hub_download("org/tiny", "config.json", cache_dir=str(tmp_path / "cache"), endpoint=hub.url)
    source = resolve_model("org/tiny")
    assert (Path(source.path) / "model.safetensors").is_file()
