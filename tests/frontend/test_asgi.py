"""The ASGI app in-process, no engine: auth and CORS, which never reach the engine."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from tgi_mp.frontend.app import App
from tgi_mp.frontend.protocol import FrontendConfig
from tgi_mp.model_source import resolve_model
from tgi_mp.tokenizer_export import export_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return export_tokenizer(resolve_model(None))


def call(app: App, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request through the ASGI interface: (status, headers, body)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return (
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


def make_app(tmp_path, tokenizer_dir: str, **opts) -> App:
    cfg = FrontendConfig(
        ipc_root=str(tmp_path), tokenizer_dir=tokenizer_dir, model_id="m", eos_token_ids=[2], **opts
    )
    return App(cfg)


JSON = {"content-type": "application/json"}


def test_api_key_guards_generation_routes_only(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir, api_key="s3cret")
    body = msgspec.json.encode({"inputs": "hi"})
    for path in ("/generate", "/generate_stream", "/", "/tokenize"):
        status, _, content = call(app, "POST", path, body, JSON)
        assert (status, content) == (401, b""), path
        status, _, _ = call(app, "POST", path, body, {**JSON, "authorization": "Bearer wrong"})
        assert status == 401
    status, _, content = call(
        app, "POST", "/tokenize", body, {**JSON, "authorization": "bearer S3CRET"}
    )  # case-insensitive
    assert status == 200 and msgspec.json.decode(content)[0]["text"] == "hi"
    assert call(app, "GET", "/info")[0] == 200  # not guarded


def test_tokenize_reports_byte_offsets(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir)
    text = "café 🚢 naïve 北京"
    status, _, body = call(app, "POST", "/tokenize", msgspec.json.encode({"inputs": text}), JSON)
    items = msgspec.json.decode(body)
    raw = text.encode()
    assert status == 200 and items[0]["start"] == 0 and items[-1]["stop"] == len(raw)
    starts = [it["start"] for it in items]
    assert starts == sorted(starts)  # in order (pieces of one character share its span)
    assert all(it["text"] == raw[it["start"] : it["stop"]].decode() for it in items)
    assert max(it["stop"] for it in items) == len(raw)


def test_cors(tmp_path, tokenizer_dir) -> None:
    anyone = make_app(tmp_path, tokenizer_dir)
    assert call(anyone, "GET", "/info")[1]["access-control-allow-origin"] == "*"
    listed = make_app(tmp_path, tokenizer_dir, cors_allow_origin=["https://a.example"])
    ok = call(listed, "GET", "/info", headers={"origin": "https://a.example"})[1]
    assert ok["access-control-allow-origin"] == "https://a.example"
    other = call(listed, "GET", "/info", headers={"origin": "https://b.example"})[1]
    assert "access-control-allow-origin" not in other
    status, headers, _ = call(
        listed, "OPTIONS", "/generate", headers={"origin": "https://a.example"}
    )
    assert status == 200 and headers["access-control-allow-methods"] == "GET, POST"
    assert headers["access-control-allow-headers"] == "content-type"


def test_openapi_document(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir)
    status, _, body = call(app, "GET", "/api-doc/openapi.json")
    doc = msgspec.json.decode(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/generate", "/generate_stream", "/", "/tokenize", "/info", "/health"} <= set(
        doc["paths"]
    )
    params = doc["components"]["schemas"]["GenerateParameters"]["properties"]
    assert {"max_new_tokens", "temperature", "top_p", "stop", "details", "seed"} <= set(params)
    assert call(app, "GET", "/docs")[1]["content-type"].startswith("text/html")
