"""The ASGI app in-process, no engine: auth and CORS, which never reach the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from tgi_mp.frontend.app import App
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.model_source import resolve_model
from tgi_mp.tokenizer_export import export_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return export_tokenizer(resolve_model(None))


def call(app: App, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request through the ASGI interface: (status, headers, body)."""
    return asyncio.run(acall(app, method, path, body, headers))


async def acall(
    app: App, method: str, path: str, body: bytes = b"", headers: dict | None = None
) -> tuple[int, dict, bytes]:
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

    await app(scope, receive, send)
    start = sent[0]
    return (
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


def make_app(tmp_path, tokenizer_dir: str, **opts) -> App:
    cfg = FrontendConfig(
        ipc_root=str(tmp_path),
        tokenizer_dir=tokenizer_dir,
        model_id="m",
        **{"max_input_tokens": 4095, "max_total_tokens": 4096, **opts},
    )
    return App(cfg)


JSON = {"content-type": "application/json"}


def test_api_key_guards_generation_routes_only(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir, api_key="s3cret")
    body = msgspec.json.encode({"inputs": "hi"})
    for path in ("/generate", "/generate_stream", "/", "/tokenize"):
        status, _, content = call(app, "POST", path, body, JSON)
        # TGI answers an empty body; tgi-mp's is JSON, so every client can parse it.
        assert status == 401, path
        assert msgspec.json.decode(content) == {
            "error": "Invalid or missing API key",
            "error_type": "unauthorized",
        }
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
    assert status == 200 and headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
    assert headers["access-control-allow-headers"] == "content-type, authorization"
    # A browser SDK's own headers (the OpenAI SDKs send x-stainless-*) are let through.
    asked = "content-type, authorization, x-stainless-os, x-stainless-lang"
    _, headers, _ = call(
        listed,
        "OPTIONS",
        "/v1/chat/completions",
        headers={"origin": "https://a.example", "access-control-request-headers": asked},
    )
    assert headers["access-control-allow-headers"] == asked


def test_slow_streams_get_keepalive_comments(monkeypatch) -> None:
    """A stream with no event for a while (queued, prefilling) sends SSE comments, which
    clients skip; the events come through unchanged."""
    from tgi_mp.frontend import http

    monkeypatch.setattr(http, "SSE_KEEPALIVE_S", 0.05)
    sent: list[dict] = []

    async def events():
        await asyncio.sleep(0.3)
        yield {"token": 1}
        yield {"token": 2}

    async def receive() -> dict:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        sent.append(msg)

    asyncio.run(http.stream_sse(receive, send, [], "tgi", events()))
    body = b"".join(m.get("body", b"") for m in sent[1:])
    first = body.index(b"data:")
    assert body[:first].count(http.KEEPALIVE) >= 3
    assert body[first:] == b'data: {"token":1}\n\ndata: {"token":2}\n\n'


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
    new = {"/v1/tokenize", "/v1/detokenize", "/chat_tokenize", "/invocations", "/version"}
    assert new | {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])
    # Swagger UI's own files are served, so /docs works offline (no CDN in the page).
    status, headers, js = call(app, "GET", "/docs/swagger-ui-bundle.js")
    assert status == 200 and len(js) > 100_000 and "javascript" in headers["content-type"]
    assert b"https://" not in call(app, "GET", "/docs")[2]


def test_routes_deployments_expect(tmp_path, tokenizer_dir) -> None:
    """HEAD wherever GET works, 405 for a known route's wrong method, /version, and the
    tokenizer routes of TGI (`/chat_tokenize`) and vLLM (`/v1/tokenize`, `/v1/detokenize`)."""
    app = make_app(tmp_path, tokenizer_dir, vocab_size=49152)
    status, headers, body = call(app, "HEAD", "/info")
    assert status == 200 and body == b"" and headers["content-type"] == "application/json"
    assert call(app, "HEAD", "/nope")[0] == 404
    status, _, body = call(app, "GET", "/generate")
    assert status == 405 and msgspec.json.decode(body)["error_type"] == "method_not_allowed"
    assert call(app, "GET", "/invocations")[0] == 405
    assert msgspec.json.decode(call(app, "GET", "/version")[2]) == {"version": "0.1.0"}
    ask = {"messages": [{"role": "user", "content": "Hi"}]}
    status, _, body = call(app, "POST", "/chat_tokenize", msgspec.json.encode(ask), JSON)
    out = msgspec.json.decode(body)
    assert status == 200 and "Hi" in out["templated_text"]
    assert "".join(t["text"] for t in out["tokenize_response"]) == out["templated_text"]
    body = msgspec.json.encode({"prompt": "Hello world", "add_special_tokens": False})
    tokens = msgspec.json.decode(call(app, "POST", "/v1/tokenize", body, JSON)[2])
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 4096
    chat = msgspec.json.decode(call(app, "POST", "/v1/tokenize", msgspec.json.encode(ask), JSON)[2])
    assert chat["count"] == len(out["tokenize_response"])
    body = msgspec.json.encode({"tokens": tokens["tokens"]})
    assert msgspec.json.decode(call(app, "POST", "/v1/detokenize", body, JSON)[2]) == {
        "prompt": "Hello world"
    }
    status, _, body = call(app, "POST", "/v1/detokenize", b'{"tokens": [99999999]}', JSON)
    assert status == 422 and msgspec.json.decode(body)["error"]["param"] == "tokens"


# ---------------------------------------------------------------- OpenAI API errors

OPENAI_ERRORS = [
    # (path, body, status, param, message start)
    ("/v1/chat/completions", {"messages": []}, 422, "messages", "`messages` must not be empty"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        422,
        "messages",
        "`messages` has an unknown role 'wizard'",
    ),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages", "Failed to deserialize"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        422,
        "messages[0].content",
        "Failed to deserialize",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "n": 3},
        422,
        "n",
        "`n` must be >= 1 and <= 2. Given: 3",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "n": 0},
        422,
        "n",
        "Failed to deserialize",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        422,
        "temperature",
        "`temperature` must be >= 0.0",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        422,
        "top_logprobs",
        "`top_logprobs` requires `logprobs` to be true",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}},
        422,
        "logit_bias",
        "`logit_bias` keys must be token ids",
    ),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, 422, "suffix", "`suffix` is not"),
    ("/v1/completions", {"prompt": []}, 422, "prompt", "`prompt` must not be empty"),
    (
        "/v1/completions",
        {"prompt": ["a", "b", "c", "d", "e"]},
        422,
        None,
        "Number of prompts exceeds the maximum allowed batch size of 4",
    ),
    ("/v1/completions", {"prompt": [[1, 99999999]]}, 422, "prompt", "`prompt` token ids"),
    ("/v1/completions", {"prompt": "a", "best_of": 1, "n": 2}, 422, "best_of", "`best_of` must"),
    ("/v1/nothing", {}, 404, None, "Unknown route"),
    # Issue 15's reproducers: each was a 500 (or a 429) before.
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"²": 1}},
        422,
        "logit_bias",
        "`logit_bias` keys must be token ids",
    ),
    (
        "/v1/completions",
        {"prompt": "a", "logit_bias": {"99999999999999999999999": 1}},
        422,
        "logit_bias",
        "`logit_bias` keys must be token ids",
    ),
    (
        "/v1/completions",
        {"prompt": "a", "logit_bias": {"49152": 1}},
        422,
        "logit_bias",
        "`logit_bias` token ids must be >= 0 and < 49152",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "n": 1000},
        422,
        "n",
        "`n` must be >= 1 and <= 2. Given: 1000",
    ),
    ("/v1/completions", {"prompt": "a", "n": 1000}, 422, "n", "`n` must be >= 1 and <= 2"),
    ("/v1/completions", {"prompt": "a", "seed": 2**63}, 422, "seed", "Failed to deserialize"),
    ("/v1/completions", {"prompt": "a", "top_k": -2}, 422, "top_k", "`top_k` must be -1"),
    (
        "/v1/completions",
        {"prompt": "a", "temperature": 1e39},
        422,
        "temperature",
        "Failed to deserialize",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
        422,
        "messages",
        "`messages`[1] has role `tool` but no `tool_call_id`",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]},
            ]
        },
        422,
        "messages[1].tool_calls[0]",
        "Failed to deserialize",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        422,
        "messages",
        "`messages`[0] has `tool_calls` but role 'user'",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "message"), OPENAI_ERRORS)
def test_openai_errors_are_openai_shaped(
    tmp_path, tokenizer_dir, path, body, status, param, message
) -> None:
    app = make_app(tmp_path, tokenizer_dir, vocab_size=49152)
    got, headers, content = call(app, "POST", path, msgspec.json.encode(body), JSON)
    err = msgspec.json.decode(content)["error"]
    assert got == status, content
    assert headers["content-type"] == "application/json"
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"].startswith(message), err
    assert err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_openai_auth_and_missing_template(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir, api_key="k")
    chat = msgspec.json.encode({"messages": [{"role": "user", "content": "hi"}]})
    status, _, content = call(app, "POST", "/v1/chat/completions", chat, JSON)
    assert status == 401
    assert msgspec.json.decode(content)["error"]["type"] == "authentication_error"
    # A tokenizer without a chat template: chat answers a clear 422, completions still work.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((Path(tokenizer_dir) / "tokenizer.json").read_bytes())
    (bare / "tokenizer_config.json").write_text("{}")
    app = make_app(tmp_path, str(bare))
    status, _, content = call(app, "POST", "/v1/chat/completions", chat, JSON)
    err = msgspec.json.decode(content)["error"]
    assert status == 422 and err["message"].startswith("Template error: this model has no chat")
    status, _, content = call(app, "GET", "/v1/models")
    assert status == 200 and msgspec.json.decode(content)["data"][0]["id"] == "m"
    status, _, content = call(app, "GET", "/v1/models/m")
    assert status == 200 and msgspec.json.decode(content)["id"] == "m"
    status, _, content = call(app, "GET", "/v1/models/other")
    assert status == 404 and msgspec.json.decode(content)["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- issue 15's reproducers

POST_ROUTES = ["/generate", "/generate_stream", "/", "/tokenize"]


@pytest.mark.parametrize("path", [*POST_ROUTES, "/v1/chat/completions", "/v1/completions"])
def test_deeply_nested_json_is_a_400_on_every_route(tmp_path, tokenizer_dir, path) -> None:
    app = make_app(tmp_path, tokenizer_dir)
    body = b'{"inputs": "x", "prompt": "x", "junk": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, headers, content = call(app, "POST", path, body, JSON)
    assert status == 400 and headers["content-type"] == "application/json"
    err = msgspec.json.decode(content)["error"]
    message = err["message"] if path.startswith("/v1/") else err
    assert message == "Failed to parse the request body as JSON: the JSON is nested too deeply"


@pytest.mark.parametrize(
    ("seed", "accepted"), [(2**64 - 1, True), (2**64, False), (2**64 + 2**63, False)]
)
def test_tgi_seeds_are_u64(tmp_path, tokenizer_dir, seed: int, accepted: bool) -> None:
    from tgi_mp.frontend.errors import ApiError
    from tgi_mp.frontend.tgi_protocol import GenerateRequest
    from tgi_mp.frontend.validation import validate

    app = make_app(tmp_path, tokenizer_dir)
    app._start()
    body = f'{{"inputs": "x", "parameters": {{"seed": {seed}, "do_sample": true}}}}'.encode()
    req = msgspec.json.decode(body, type=GenerateRequest)
    if accepted:
        assert validate(req, app.cfg, app.tokenizer).params.seed == seed - 2**64  # same bits
    else:
        with pytest.raises(ApiError, match="`seed` must be >= 0 and <= 1844674407"):
            validate(req, app.cfg, app.tokenizer)
        status, _, content = call(app, "POST", "/generate", body, JSON)
        assert status == 422 and msgspec.json.decode(content)["error_type"] == "validation"


def test_tiny_temperatures_are_greedy_and_top_k_beyond_the_vocabulary_is_off(
    tmp_path, tokenizer_dir
) -> None:
    from tgi_mp.frontend.tgi_protocol import GenerateParameters, GenerateRequest
    from tgi_mp.frontend.validation import validate

    app = make_app(tmp_path, tokenizer_dir, vocab_size=49152)
    app._start()

    def params(**p):
        req = GenerateRequest(inputs="x", parameters=GenerateParameters(**p))
        return validate(req, app.cfg, app.tokenizer).params

    assert not params(do_sample=True, temperature=1e-40).do_sample
    assert params(do_sample=True, temperature=1e-5).do_sample
    assert params(top_k=2**31 - 1).top_k == 0 and params(top_k=49151).top_k == 49151


def test_disable_grammar_support_refuses_every_spelling(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir, disable_grammar_support=True)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tgi = {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": schema}}}
    chat = {"messages": [{"role": "user", "content": "x"}]}
    cases = [
        ("/generate", tgi, None),
        (
            "/v1/chat/completions",
            {**chat, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("/v1/completions", {"prompt": "x", "guided_regex": "[0-9]+"}, "guided_regex"),
    ]
    for path, body, param in cases:
        status, _, content = call(app, "POST", path, msgspec.json.encode(body), JSON)
        error = msgspec.json.decode(content)
        assert status == 422, (path, content)
        if param is None:  # TGI's shape
            want = "Input validation error: grammar is not supported"
            assert error == {"error": want, "error_type": "validation"}
        else:
            assert error["error"]["message"] == "grammar is not supported"
            assert error["error"]["param"] == param


def test_requests_being_validated_hold_their_permits(tmp_path, tokenizer_dir) -> None:
    """Validation runs in threads, so the concurrency check counts the requests still
    being validated: with one permit, a request arriving while a huge prompt is being
    tokenized is a 429, not a second request in flight."""
    app = make_app(tmp_path, tokenizer_dir, max_concurrent_requests=1, payload_limit=3_000_000)
    huge = msgspec.json.encode({"inputs": "lighthouse keepers and their lamps " * 60_000})
    small = msgspec.json.encode({"inputs": "Hi"})

    async def both() -> tuple:
        first = asyncio.create_task(acall(app, "POST", "/generate", huge, JSON))
        await asyncio.sleep(0.05)  # the huge one is in its validation thread now
        second = await acall(app, "POST", "/generate", small, JSON)
        return await first, second

    first, second = asyncio.run(both())
    assert first[0] == 422  # too long, once tokenized
    assert second[0] == 429 and msgspec.json.decode(second[2])["error_type"] == "overloaded"


def test_dashboard_page_is_open_and_its_figures_need_the_key(tmp_path, tokenizer_dir) -> None:
    app = make_app(tmp_path, tokenizer_dir, api_key="s3cret", num_shards=2)
    status, headers, page = call(app, "GET", "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/dashboard/data" in page and b"<script>" in page  # no figures in the page
    assert call(app, "GET", "/dashboard/data")[0] == 401
    app.client.dead = "no engine in this test"  # answers at once, without engine figures
    status, _, body = call(
        app, "GET", "/dashboard/data", headers={"authorization": "Bearer s3cret"}
    )
    d = msgspec.json.decode(body)
    assert status == 200 and d["engine"] is None
    assert d["info"]["model_id"] == "m" and d["info"]["num_shards"] == 2
    assert d["info"]["max_total_tokens"] == 4096
