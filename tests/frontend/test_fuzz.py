"""Property-based fuzzing of every generation route, in-process over the ASGI app.

Requests are generated from the msgspec types the handlers decode (each field
with extreme numbers, wrong types, odd Unicode, huge strings, deep nesting),
merged into a valid request so that most of them reach the engine, a real one
(scheduler + executor processes on a tiny random-weight model). Properties:
no 5xx ever; every error body is JSON of its route's shape (TGI's
`{"error", "error_type"}`, OpenAI's `{"error": {"message", "type", "param",
"code"}}`), in a stream too; and a normal request right after still succeeds.

CI runs a bounded, derandomized pass; `pytest -m fuzz` runs a long one.
"""

from __future__ import annotations

import asyncio
import json
import types
import typing
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from tgi_mp.frontend.app import App
from tgi_mp.frontend.config import FrontendConfig
from tgi_mp.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from tgi_mp.frontend.tgi_protocol import GenerateParameters
from tgi_mp.launcher import Engine
from tgi_mp.model_source import resolve_model
from tgi_mp.tokenizer_export import export_tokenizer

VOCAB = 49152  # the bundled tokenizer's
MAX_TOTAL = 48  # every admitted request is short: the fuzz budget goes to inputs
PAYLOAD_LIMIT = 50_000


# ---------------------------------------------------------------- the app and its engine


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[App, asyncio.AbstractEventLoop]]:
    directory = tmp_path_factory.mktemp("fuzz-model")
    LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    ).to_json_file(str(directory / "config.json"))
    engine = Engine.start(str(directory), load_format="dummy", max_batch_total_tokens=1024)
    cfg = FrontendConfig(
        ipc_root=engine.endpoints.root,
        tokenizer_dir=export_tokenizer(resolve_model(None)),
        model_id="fuzz",
        vocab_size=VOCAB,
        max_input_tokens=MAX_TOTAL - 1,
        max_total_tokens=MAX_TOTAL,
        payload_limit=PAYLOAD_LIMIT,
        enable_prefill_logprobs=True,
        max_batch_total_tokens=1024,
    )
    the_app = App(cfg)
    loop = asyncio.new_event_loop()  # one loop for all: the engine client's receiver lives on
    try:
        yield the_app, loop
    finally:
        if the_app.client is not None:
            the_app.client.close()
            loop.run_until_complete(asyncio.sleep(0))  # the receiver task takes its cancel
        loop.close()
        engine.shutdown()


async def call(app: App, path: str, body: bytes, content_type: str) -> tuple[int, dict, bytes]:
    """One POST through the ASGI interface; the client stays connected until the end."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", content_type.encode())],
    }
    sent: list[dict] = []
    delivered = False
    never = asyncio.get_running_loop().create_future()

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await never  # no disconnect: cancelled when the handler is done with it

    async def send(msg: dict) -> None:
        sent.append(msg)

    await asyncio.wait_for(app(scope, receive, send), 120)
    start = sent[0]
    return (
        start["status"],
        {k.decode(): v.decode() for k, v in start["headers"]},
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


# ---------------------------------------------------------------- what the fuzzer sends

NUMBERS = [0, 1, -1, 2, 7, 2**31 - 1, 2**31, -(2**31) - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
NUMBERS += [2**64, 2**64 + 2**63, 10**30, -(10**30)]
FLOATS = [0.0, -0.0, 1e-45, 1e-40, 1e-6, 1e-5, 0.5, 0.9999999, 1.0, 1.0000001, 2.0, -2.0]
FLOATS += [-2.0000001, 100.0, 100.5, 3.4e38, 3.5e38, 1e308, -1e308]
ODD_TEXT = ["", " ", "\u0000", "\ud800", "\ufeff", "²", "١٢", "🚢" * 50, "a\nb", "<|im_end|>"]
ODD_TEXT += ["</s>", "\u202e", "x" * 3000, "é" * 10]

ints = st.one_of(st.sampled_from(NUMBERS), st.sampled_from(NUMBERS), st.integers(-5, 70))
floats = st.one_of(
    st.sampled_from(FLOATS), st.floats(-3.0, 3.0), st.floats(allow_nan=False, allow_infinity=False)
)
texts = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=30))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)


def values_of(annotation: Any) -> st.SearchStrategy:
    """Values for a field of this type: mostly of the type (its extremes first), sometimes
    anything at all."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return values_of(args[0])
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(values_of(a) for a in args))
    if origin is typing.Literal:
        return st.one_of(st.sampled_from(args), texts)
    if origin is list:
        return st.one_of(st.lists(values_of(args[0]), max_size=5), junk)
    if origin is dict:
        keys = st.one_of(texts, ints.map(str), st.sampled_from(["5", "²", "١٢", "49151"]))
        return st.one_of(st.dictionaries(keys, values_of(args[1]), max_size=4), junk)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return st.one_of(fields_of(annotation), junk)
    typed = {
        int: ints,
        float: st.one_of(floats, ints),
        str: texts,
        bool: st.booleans(),
        type(None): st.none(),
    }.get(annotation)
    return junk if typed is None else st.one_of(typed, typed, typed, junk)


@st.composite
def fields_of(draw: st.DrawFn, struct: type[msgspec.Struct]) -> dict:
    """A few of the struct's fields (few, so that a request often stays valid enough to
    reach the engine with one extreme value), now and then an unknown one too."""
    hints = typing.get_type_hints(struct, include_extras=True)
    names = draw(st.lists(st.sampled_from(sorted(hints)), min_size=1, max_size=2, unique=True))
    unknown = draw(st.dictionaries(texts, junk, max_size=1))
    return {**unknown, **{name: draw(values_of(hints[name])) for name in names}}


TGI_BASE = {"inputs": "Hello there", "parameters": {"max_new_tokens": 4}}
ROUTES = {
    "/generate": ("tgi", TGI_BASE, GenerateParameters),
    "/generate_stream": ("tgi", TGI_BASE, GenerateParameters),
    "/": ("tgi", {**TGI_BASE, "stream": False}, GenerateParameters),
    "/tokenize": ("tgi", TGI_BASE, GenerateParameters),
    "/v1/chat/completions": (
        "openai",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        ChatCompletionRequest,
    ),
    "/v1/completions": ("openai", {"prompt": "Hi", "max_tokens": 4}, CompletionRequest),
}


@st.composite
def requests(draw: st.DrawFn, path: str) -> tuple[bytes, str]:
    """(body, content type) for one request to `path`."""
    _, base, struct = ROUTES[path]
    kind = draw(st.sampled_from(["fields"] * 6 + ["junk", "deep", "huge", "bytes", "ctype"]))
    body: Any = json.loads(json.dumps(base))
    fuzzed = draw(fields_of(struct))
    if struct is GenerateParameters:  # the fields live under `parameters`; `inputs` too
        body["parameters"].update(fuzzed)
        if draw(st.booleans()):
            body.update(draw(fields_of_request()))
    else:
        body.update(fuzzed)
    if kind == "junk":
        body = draw(junk)
    elif kind == "huge":
        key = "inputs" if struct is GenerateParameters else next(iter(base))
        size = draw(st.sampled_from([2_000, 20_000, PAYLOAD_LIMIT + 1]))
        body[key] = draw(st.sampled_from(["a", "é", "🚢", " the"])) * size
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "deep":  # nesting beyond any decoder's recursion limit, under an unknown key
        depth = draw(st.sampled_from([900, 1100, 5000]))
        raw = b'{"junk": ' + b"[" * depth + b"]" * depth + b", " + raw[1:]
    elif kind == "bytes":
        raw = draw(st.one_of(st.binary(max_size=40), st.just(raw[: len(raw) // 2])))
    ctype = "application/json"
    if kind == "ctype":
        ctype = draw(st.sampled_from(["text/plain", "", "application/json; charset=utf-8"]))
    return raw, ctype


def fields_of_request() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {}, optional={"inputs": values_of(str), "parameters": junk, "stream": junk}
    )


# ---------------------------------------------------------------- what must hold


def assert_error_shape(shape: str, body: Any) -> None:
    if shape == "tgi":
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}, body
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str)
    else:
        assert isinstance(body, dict) and set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and isinstance(err["type"], str)


def check_answer(path: str, status: int, headers: dict, content: bytes) -> None:
    shape = ROUTES[path][0]
    # Never a 5xx; and never a 424 either: a request failed by the engine means bad input
    # got past validation. (429 cannot happen: one request at a time.)
    assert status in (200, 400, 413, 415, 422), (status, content[:500])
    if headers.get("content-type") == "text/event-stream":
        assert status == 200
        events = [e for e in content.split(b"\n\n") if e]
        assert all(e.startswith(b"data: ") for e in events), content[:500]
        payloads = [e[len(b"data: ") :] for e in events]
        if shape == "openai":
            assert payloads and payloads[-1] == b"[DONE]", content[-300:]
            payloads = payloads[:-1]
        decoded = [json.loads(p) for p in payloads]
        assert decoded, "an empty stream"
        for event in decoded:
            if "error" in event:  # and, as above, not the engine failing a request
                assert_error_shape(shape, event)
                kind = event["error_type"] if shape == "tgi" else event["error"]["type"]
                assert kind not in ("generation", "server_error", "internal"), event
        last = decoded[-1]
        if shape == "tgi":  # it ends with the final token, or with an error
            assert "error" in last or last["generated_text"] is not None, last
        return
    body = json.loads(content)  # always JSON, errors included
    if status >= 400:
        assert_error_shape(shape, body)


async def normal_request_succeeds(app: App) -> None:
    body = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).encode()
    status, _, content = await call(app, "/generate", body, "application/json")
    assert status == 200 and isinstance(json.loads(content)["generated_text"], str), content


def fuzz(app_and_loop: tuple[App, asyncio.AbstractEventLoop], path: str, examples: int) -> None:
    app, loop = app_and_loop

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # a fixed seed: CI sees the same requests every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(path))
    def one(request: tuple[bytes, str]) -> None:
        raw, ctype = request

        async def main() -> None:
            check_answer(path, *(await call(app, path, raw, ctype)))
            await normal_request_succeeds(app)

        loop.run_until_complete(main())

    one()


WRONG_TYPES: list[Any] = [None, True, "5", [], {}, [1], {"a": 1}, 1.5]


def extremes_of(annotation: Any) -> list[Any]:
    """The boundary values of a field's type (and values of the wrong types)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return extremes_of(args[0])
    if origin in (typing.Union, types.UnionType):
        values = [v for a in args if a is not type(None) for v in extremes_of(a)]
        return list({json.dumps(v): v for v in values}.values())  # once each
    if origin is list:
        return [[v] for v in extremes_of(args[0])[:12]] + [[]]
    if origin is dict:
        keys = ["5", "-1", "²", "١٢", " 5", "5.0", "49151", "49152", str(2**64), "9" * 30, ""]
        return [{k: 1} for k in keys] + [{"5": v} for v in extremes_of(args[1])]
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return [{}, {"role": "user"}, {"id": 1}]
    return {
        int: NUMBERS,
        float: FLOATS + NUMBERS[4:],
        str: ODD_TEXT,
        bool: [True, False],
        type(None): [None],
    }.get(annotation, [])


def boundary_requests(path: str) -> list[bytes]:
    """A valid request with one field at one extreme, for every field and extreme."""
    _, base, struct = ROUTES[path]
    bases = [base]
    if struct is GenerateParameters:  # greedy, and sampling (seeds matter only then)
        bases.append({**base, "parameters": {**base["parameters"], "do_sample": True}})
    out = []
    for name, annotation in typing.get_type_hints(struct, include_extras=True).items():
        for value in extremes_of(annotation) + WRONG_TYPES:
            for b in bases:
                body = json.loads(json.dumps(b))
                (body["parameters"] if struct is GenerateParameters else body)[name] = value
                out.append(json.dumps(body).encode())
    return out


@pytest.mark.parametrize("path", list(ROUTES))
def test_every_field_at_every_extreme(app, path: str) -> None:
    the_app, loop = app

    async def main() -> None:
        for i, raw in enumerate(boundary_requests(path)):
            answer = await call(the_app, path, raw, "application/json")
            try:
                check_answer(path, *answer)
            except AssertionError as e:
                raise AssertionError(f"{path} {raw.decode()[:300]}") from e
            assert the_app.client is None or not the_app.client.dead, raw
            if i % 50 == 0:
                await normal_request_succeeds(the_app)
        await normal_request_succeeds(the_app)

    loop.run_until_complete(main())


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzz_every_route(app, path: str) -> None:
    fuzz(app, path, examples=60)


@pytest.mark.fuzz
@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzz_every_route_long(app, path: str) -> None:
    fuzz(app, path, examples=3000)
