"""The real server over real HTTP: TGI's wire format, its validation, its clients.

One `tgi-mp serve` (bundled SmolLM2, float32) serves the whole module.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from text_generation import AsyncClient, Client

from tests.engine.oracle import (
    NEAR_TIE,
    TEXT,
    hf_model,
    reference_greedy,
    reference_logprobs,
    tokenizer,
)
from tests.frontend.server import Server

MAX_CONCURRENT = 64


@pytest.fixture(scope="module")
def server():
    with Server(
        "--max-concurrent-requests",
        str(MAX_CONCURRENT),
        "--max-batch-total-tokens",
        "16384",
        "--max-total-tokens",
        "2048",
        "--payload-limit",
        "100000",
    ) as s:
        yield s
        # Shutdown is clean: SIGTERM gives exit status 0.
        assert s.stop() == 0


def post(server: Server, path: str, body: object, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def healthy(server: Server) -> bool:
    return httpx.get(server.url + "/health", timeout=10).status_code == 200


def sse_events(text: str) -> list[dict]:
    return [
        json.loads(line[len("data:") :]) for line in text.splitlines() if line.startswith("data:")
    ]


# ---------------------------------------------------------------- correctness


def test_greedy_generate_equals_the_oracle(server) -> None:
    inputs = [TEXT[:160], TEXT[400:900], "The Eddystone lighthouse"]
    prompts = [tokenizer()(t, add_special_tokens=True)["input_ids"] for t in inputs]
    for text, prompt, (want, _) in zip(inputs, prompts, reference_greedy(prompts), strict=True):
        r = post(
            server,
            "/generate",
            {"inputs": text, "parameters": {"max_new_tokens": 24, "details": True}},
        )
        assert r.status_code == 200, r.text
        d = r.json()["details"]
        got = [t["id"] for t in d["tokens"]]
        assert got == want[: len(got)], (text, got, want)
        if d["finish_reason"] == "length":
            assert len(got) == 24
        assert d["generated_tokens"] == len(got) and d["seed"] is None
        assert r.headers["x-generated-tokens"] == str(len(got))
        assert r.headers["x-prompt-tokens"] == str(len(prompt))


def test_tgi_python_client(server) -> None:
    client = Client(server.url, timeout=120)
    r = client.generate("The history of the lighthouse", max_new_tokens=8)
    streamed = list(client.generate_stream("The history of the lighthouse", max_new_tokens=8))
    assert [e.token.id for e in streamed] == [t.id for t in r.details.tokens]
    assert streamed[-1].generated_text == r.generated_text
    assert "".join(e.token.text for e in streamed) == r.generated_text

    async def run_async() -> str:
        return (
            await AsyncClient(server.url, timeout=120).generate(
                "The history of the lighthouse", max_new_tokens=8
            )
        ).generated_text

    assert asyncio.run(run_async()) == r.generated_text


def test_stream_framing_and_final_event(server) -> None:
    r = post(
        server,
        "/generate_stream",
        {"inputs": "Keepers trimmed wicks", "parameters": {"max_new_tokens": 4, "details": True}},
    )
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-accel-buffering"] == "no"
    assert r.text.startswith("data: {") and r.text.endswith("\n\n")
    events = sse_events(r.text)
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"] == {
        "finish_reason": "length",
        "generated_tokens": 4,
        "seed": None,
        "input_length": len(tokenizer()("Keepers trimmed wicks")["input_ids"]),
    }
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)


def test_compat_root_route(server) -> None:
    body = {"inputs": "Solar panels", "parameters": {"max_new_tokens": 3}}
    plain = post(server, "/generate", body).json()
    r = post(server, "/", [body])  # one-element array, answered as a one-element array
    assert r.status_code == 200 and r.json() == [plain]
    stream = post(server, "/", {**body, "stream": True})
    assert sse_events(stream.text)[-1]["generated_text"] == plain["generated_text"]
    full = post(
        server,
        "/generate",
        {"inputs": "Solar panels", "parameters": {"max_new_tokens": 3, "return_full_text": True}},
    )
    assert full.json()["generated_text"] == "Solar panels" + plain["generated_text"]


def test_stop_sequence_stays_in_output(server) -> None:
    body = {"inputs": TEXT[:160], "parameters": {"max_new_tokens": 24, "details": True}}
    free = post(server, "/generate", body).json()
    words = free["generated_text"].split()
    assert len(words) >= 3
    stop = words[2]
    r = post(server, "/generate", {**body, "parameters": {**body["parameters"], "stop": [stop]}})
    out = r.json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert stop in out["generated_text"]
    assert free["generated_text"].startswith(out["generated_text"])
    assert out["details"]["generated_tokens"] < free["details"]["generated_tokens"]


def test_multibyte_text_streams_exactly(server) -> None:
    body = {"inputs": "Here are some emoji: 😀 😃 😄 😁", "parameters": {"max_new_tokens": 12}}
    events = sse_events(post(server, "/generate_stream", body).text)
    final = events[-1]["generated_text"]
    assert any(ord(c) > 0xFFFF for c in final), f"expected emoji in the output: {final!r}"
    texts = [e["token"]["text"] for e in events]
    assert "" in texts, "an emoji spans several tokens, whose first ones have no text yet"
    assert "".join(texts) == final
    assert post(server, "/generate", body).json()["generated_text"] == final


def test_sampling_is_seeded(server) -> None:
    body = {
        "inputs": "Storms could trap them",
        "parameters": {"max_new_tokens": 12, "do_sample": True, "seed": 42, "details": True},
    }
    a, b = post(server, "/generate", body).json(), post(server, "/generate", body).json()
    assert a == b and a["details"]["seed"] == 42
    # No `parameters` at all means sampling on, and max_new_tokens defaults to what is
    # left of max_total_tokens (2048): a 2040-token prompt leaves 8, bounding the test.
    r = post(server, "/", {"inputs": words(2040)})
    assert r.status_code == 200
    assert int(r.headers["x-generated-tokens"]) <= 8


def test_logprobs_and_top_tokens_match_transformers(server) -> None:
    text = TEXT[200:500]
    r = post(
        server,
        "/generate",
        {"inputs": text, "parameters": {"max_new_tokens": 10, "details": True, "top_n_tokens": 3}},
    ).json()["details"]
    prompt = tokenizer()(text)["input_ids"]
    ref = reference_logprobs(prompt, [t["id"] for t in r["tokens"]])
    assert len(r["top_tokens"]) == len(r["tokens"]) == 10
    for i, (tok, top) in enumerate(zip(r["tokens"], r["top_tokens"], strict=True)):
        assert abs(tok["logprob"] - float(ref[i, tok["id"]])) < 1e-4
        want = ref[i].topk(3)
        assert [t["id"] for t in top] == want.indices.tolist()
        for t, lp in zip(top, want.values.tolist(), strict=True):
            assert abs(t["logprob"] - lp) < 1e-4
            assert t["text"] == tokenizer().decode([t["id"]])
    # Streams carry the alternatives of each token; without top_n_tokens the key is absent.
    events = sse_events(
        post(
            server,
            "/generate_stream",
            {"inputs": text, "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}},
        ).text
    )
    assert all(len(e["top_tokens"]) == 2 for e in events)
    plain = sse_events(
        post(server, "/generate_stream", {"inputs": text, "parameters": {"max_new_tokens": 3}}).text
    )
    assert all("top_tokens" not in e for e in plain)
    assert (
        "top_tokens"
        not in post(
            server,
            "/generate",
            {"inputs": text, "parameters": {"max_new_tokens": 2, "details": True}},
        ).json()["details"]
    )


def test_prefill_details_are_empty_without_the_launcher_flag(server) -> None:
    # As TGI: decoder_input_details brings the details object, and `prefill` is filled
    # only under --enable-prefill-logprobs (tests/frontend/test_generation_params.py).
    r = post(
        server,
        "/generate",
        {
            "inputs": "Hello there",
            "parameters": {"max_new_tokens": 2, "decoder_input_details": True},
        },
    ).json()
    assert r["details"]["prefill"] == [] and len(r["details"]["tokens"]) == 2


def test_repetition_penalty_matches_transformers(server) -> None:
    import torch

    text = "List the colors: red, green, blue, red, green, blue, red,"
    prompt = tokenizer()(text)["input_ids"]
    with torch.inference_mode():
        ref = hf_model().generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.3,
            return_dict_in_generate=True,
            output_scores=True,
        )
    want = ref.sequences[0, len(prompt) :].tolist()
    margins = [float(sc[0].topk(2).values.diff().abs()) for sc in ref.scores]
    r = post(
        server,
        "/generate",
        {
            "inputs": text,
            "parameters": {"max_new_tokens": 16, "repetition_penalty": 1.3, "details": True},
        },
    ).json()
    got = [t["id"] for t in r["details"]["tokens"]]
    plain = post(
        server, "/generate", {"inputs": text, "parameters": {"max_new_tokens": 16, "details": True}}
    ).json()
    assert [t["id"] for t in plain["details"]["tokens"]] != got, "the penalty changes the text"
    for j, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            assert margins[j] < NEAR_TIE, (j, got, want)
            break


def same_generation(a: dict, b: dict) -> bool:
    """Same text and tokens; logprobs equal up to float rounding of batched matmuls."""
    ta, tb = a["details"]["tokens"], b["details"]["tokens"]
    return (
        a["generated_text"] == b["generated_text"]
        and [t["id"] for t in ta] == [t["id"] for t in tb]
        and all(abs(x["logprob"] - y["logprob"]) < 1e-4 for x, y in zip(ta, tb, strict=True))
        and a["details"]["finish_reason"] == b["details"]["finish_reason"]
    )


SEEDED = {
    "inputs": TEXT[:300],
    "parameters": {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "typical_p": 0.95,
        "seed": 1234,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.5,
        "details": True,
    },
}


def test_seeded_request_is_reproducible_alone_and_among_others(server) -> None:
    alone = post(server, "/generate", SEEDED).json()
    assert alone["details"]["seed"] == 1234

    async def crowd() -> dict:
        async with httpx.AsyncClient(timeout=300) as http:
            others = [
                http.post(
                    server.url + "/generate",
                    json={
                        "inputs": TEXT[i * 40 : i * 40 + 200],
                        "parameters": {"max_new_tokens": 20, "do_sample": i % 2 == 0},
                    },
                )
                for i in range(16)
            ]
            results = await asyncio.gather(
                *others[:8], http.post(server.url + "/generate", json=SEEDED), *others[8:]
            )
        assert all(r.status_code == 200 for r in results)
        return results[8].json()

    assert same_generation(asyncio.run(crowd()), alone)
    unseeded = post(
        server, "/generate", {**SEEDED, "parameters": {**SEEDED["parameters"], "seed": None}}
    ).json()
    assert unseeded["details"]["seed"] is not None


def test_seeded_request_is_reproducible_when_chunked(server) -> None:
    want = post(server, "/generate", SEEDED).json()
    assert len(tokenizer()(SEEDED["inputs"])["input_ids"]) > 40
    with Server("--max-batch-prefill-tokens", "16", "--max-batch-total-tokens", "4096") as small:
        assert same_generation(post(small, "/generate", SEEDED).json(), want)


# ---------------------------------------------------------------- simple routes


def test_info_health_tokenize_metrics(server) -> None:
    info = httpx.get(server.url + "/info").json()
    assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert info["max_concurrent_requests"] == MAX_CONCURRENT
    assert info["max_batch_total_tokens"] == 16384
    for path in ("/health", "/ping", "/"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.content == b""
    toks = post(server, "/tokenize", {"inputs": "My name is Olivier"}).json()
    assert "".join(t["text"] for t in toks) == "My name is Olivier"
    assert toks[1] == {"id": toks[1]["id"], "text": " name", "start": 2, "stop": 7}
    metrics = httpx.get(server.url + "/metrics").text
    assert "\ntgi_request_success " in metrics and "tgi_mp_kv_blocks_free" in metrics


# ---------------------------------------------------------------- errors


def words(n: int) -> str:
    """Text of exactly n tokens for this tokenizer ("word" and " word" are one token each)."""
    return "word" + " word" * (n - 1)


def _p(**params: object) -> dict:
    return {"inputs": "Hello", "parameters": params}


VALIDATION = [
    (_p(best_of=3), "`best_of` must be > 0 and <= 2. Given: 3"),
    (_p(best_of=2), "you must use sampling when `best_of` is > 1"),
    (_p(temperature=0), "`temperature` must be strictly positive"),
    (_p(repetition_penalty=0), "`repetition_penalty` must be strictly positive"),
    (_p(frequency_penalty=3), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (_p(top_p=1.0), "`top_p` must be > 0.0 and < 1.0"),
    (_p(typical_p=0), "`typical_p` must be > 0.0 and < 1.0"),
    (_p(typical_p=1.0), "`typical_p` must be > 0.0 and < 1.0"),
    (_p(top_k=0), "`top_k` must be strictly positive"),
    (_p(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    (_p(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
    (_p(best_of=2, do_sample=True, seed=1), "`seed` must not be set when `best_of` > 1"),
    (_p(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (_p(top_n_tokens=5, max_new_tokens=2), None),
    ({"inputs": ""}, "`inputs` cannot be empty"),
    (_p(truncate=0), "`truncate` must be strictly positive and less than 2047. Given: 0"),
    (
        _p(max_new_tokens=2048),
        "`inputs` tokens + `max_new_tokens` must be <= 2048. "
        "Given: 1 `inputs` tokens and 2048 `max_new_tokens`",
    ),
    (
        {"inputs": words(2100), "parameters": {"max_new_tokens": 1, "truncate": 2047}},
        None,
    ),  # truncation (keep the last 2047 tokens) makes an over-long prompt valid
    (
        {"inputs": words(2100), "parameters": {"max_new_tokens": 1}},
        "`inputs` tokens + `max_new_tokens` must be <= 2048. Given: 2100 `inputs` tokens and "
        "1 `max_new_tokens`",
    ),
    ({"inputs": words(2048)}, "`inputs` must have less than 2047 tokens. Given: 2048"),
    ({"inputs": words(2047), "parameters": {"max_new_tokens": 1}}, None),  # exactly at the limits
    (
        _p(adapter_id="my-lora"),
        "`adapter_id` 'my-lora' is not a loaded LoRA adapter (loaded: none)",
    ),
]


@pytest.mark.parametrize(("body", "message"), VALIDATION)
def test_validation_rules(server, body: dict, message: str | None) -> None:
    r = post(server, "/generate", body)
    if message is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 422, r.text
        assert r.json() == {
            "error": f"Input validation error: {message}",
            "error_type": "validation",
        }
        # Streams answer 200 with the error as an event; their own best_of rule comes first.
        s = post(server, "/generate_stream", body)
        want = r.json()
        if (body.get("parameters") or {}).get("best_of", 1) != 1:
            want = {
                "error": "Input validation error: `best_of` != 1 is not supported when "
                "streaming tokens",
                "error_type": "validation",
            }
        assert s.status_code == 200 and sse_events(s.text) == [want]
    assert healthy(server)


def test_stream_only_rules(server) -> None:
    for params, msg in [
        (
            {"best_of": 2, "do_sample": True},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ]:
        s = post(server, "/generate_stream", _p(**params))
        assert sse_events(s.text) == [
            {"error": f"Input validation error: {msg}", "error_type": "validation"}
        ]


@pytest.mark.parametrize(
    ("kwargs", "status", "prefix"),
    [
        (
            {"content": b'{"inputs": "x"}'},
            415,
            "Expected request with `Content-Type: application/json`",
        ),
        (
            {"content": b'{"inputs": ', "headers": {"content-type": "application/json"}},
            400,
            "Failed to parse the request body as JSON: ",
        ),
        (
            {"json": {"inputs": 5}},
            422,
            "Failed to deserialize the JSON body into the target type: ",
        ),
        (
            {"json": {"parameters": {}}},
            422,
            "Failed to deserialize the JSON body into the target type: ",
        ),
        (
            {"json": {"inputs": "x", "parameters": {"max_new_tokens": -1}}},
            422,
            "Failed to deserialize the JSON body into the target type: ",
        ),
        (
            {"json": {"inputs": "x" * 200_000}},
            413,
            "Failed to buffer the request body: length limit exceeded",
        ),
    ],
)
def test_transport_errors(server, kwargs: dict, status: int, prefix: str) -> None:
    r = httpx.post(server.url + "/generate", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    # axum's messages, in a JSON body (axum answers them as plain text)
    assert r.json()["error"].startswith(prefix) and r.json()["error_type"]
    assert healthy(server)


def test_unknown_route_and_method(server) -> None:
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.delete(server.url + "/generate").status_code == 405


def test_hostile_numbers_never_take_the_server_down(server) -> None:
    """Issue 15's reproducers against the running server, then a normal request."""
    # top_k beyond int32 killed the scheduler (an OverflowError building the plan): now it
    # keeps the whole vocabulary, as vLLM's clamp does, and sampling runs.
    body = {"prompt": "hi", "max_tokens": 4, "top_k": 3_000_000_000, "seed": 3}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    untruncated = post(server, "/v1/completions", {**body, "top_k": -1})
    assert untruncated.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    # A temperature too small to divide by is greedy, with real logprobs (was: NaNs).
    greedy = post(server, "/generate", _p(max_new_tokens=4, details=True))
    tiny = post(server, "/generate", _p(max_new_tokens=4, details=True, temperature=1e-40))
    want = [t["id"] for t in greedy.json()["details"]["tokens"]]
    got = tiny.json()["details"]["tokens"]
    assert [t["id"] for t in got] == want and all(t["logprob"] is not None for t in got)
    # Bad logit_bias keys and seeds beyond u64 are 422s, streamed or not (were 500s).
    for stream in (False, True):
        bad = {"prompt": "hi", "max_tokens": 2, "stream": stream}
        for bias in ({"²": 1}, {"99999999999999999999999": 1}):
            r = post(server, "/v1/completions", {**bad, "logit_bias": bias})
            assert r.status_code == 422 and r.json()["error"]["param"] == "logit_bias", r.text
    for path in ("/generate", "/generate_stream", "/"):
        r = post(server, path, _p(do_sample=True, seed=2**64 + 2**63))
        answer = r.json() if path != "/generate_stream" else sse_events(r.text)[0]
        assert answer["error_type"] == "validation", r.text
    r = post(server, "/generate", _p(max_new_tokens=3))  # the same server serves on
    assert r.status_code == 200 and r.json()["generated_text"]
    assert healthy(server)


def test_overload_answers_429(server) -> None:
    # A continuation of prose: greedy decoding does not reach EOS for a long while.
    long = {"inputs": TEXT[:600], "parameters": {"max_new_tokens": 1000}}

    async def main() -> tuple[int, dict, list[dict]]:
        async with httpx.AsyncClient(timeout=120) as http:
            streams = []
            for _ in range(MAX_CONCURRENT):
                cm = http.stream("POST", server.url + "/generate_stream", json=long)
                resp = await cm.__aenter__()
                streams.append((cm, resp))
            # Every one of them is admitted and producing. (Keep the line iterators:
            # dropping one closes its stream.)
            lines = [resp.aiter_lines() for _, resp in streams]
            for it in lines:
                await it.__anext__()
            r = await http.post(server.url + "/generate", json=_p(max_new_tokens=2))
            s = await http.post(server.url + "/generate_stream", json=_p(max_new_tokens=2))
            for cm, _ in streams:
                await cm.__aexit__(None, None, None)
        return r.status_code, r.json(), sse_events(s.text)

    status, body, events = asyncio.run(main())
    assert status == 429 and body == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert events == [body]
    _wait_until_idle(server)


def _engine_gauges(server: Server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in (
            "tgi_queue_size",
            "tgi_batch_current_size",
            "tgi_mp_kv_blocks_free",
            "tgi_mp_kv_blocks_total",
        ):
            out[name] = float(value)
    return out


def _wait_until_idle(server: Server, timeout: float = 60) -> dict[str, float]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        g = _engine_gauges(server)
        idle = g["tgi_queue_size"] == 0 and g["tgi_batch_current_size"] == 0
        if (idle and g["tgi_mp_kv_blocks_free"] == g["tgi_mp_kv_blocks_total"]) or (
            time.monotonic() > deadline
        ):
            return g
        time.sleep(0.2)


def test_dropped_streams_free_their_blocks(server) -> None:
    body = {"inputs": "The keeper wrote in the log:", "parameters": {"max_new_tokens": 40}}

    async def one(http: httpx.AsyncClient, drop: bool) -> int:
        async with http.stream("POST", server.url + "/generate_stream", json=body) as resp:
            events = 0
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events += 1
                    if drop and events == 3:
                        return -1  # leaving the block closes the connection mid-stream
                    if json.loads(line[5:]).get("generated_text") is not None:
                        return events
        return events

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i % 2 == 0) for i in range(50)))

    results = asyncio.run(main())
    assert results.count(-1) == 25
    completed = [n for n in results if n != -1]
    assert len(completed) == 25 and all(n >= 1 for n in completed)
    g = _wait_until_idle(server)
    assert g["tgi_queue_size"] == 0 and g["tgi_batch_current_size"] == 0
    assert g["tgi_mp_kv_blocks_free"] == g["tgi_mp_kv_blocks_total"], g


def test_abandoned_generate_requests_are_aborted(server) -> None:
    long = {"inputs": TEXT[:600], "parameters": {"max_new_tokens": 1000}}

    async def main() -> list[bool]:
        async with httpx.AsyncClient(timeout=3) as http:  # give up long before the end

            async def one() -> bool:
                try:
                    await http.post(server.url + "/generate", json=long)
                except httpx.ReadTimeout:
                    return True
                return False

            return await asyncio.gather(*(one() for _ in range(4)))

    assert all(asyncio.run(main()))
    g = _wait_until_idle(server, timeout=30)
    assert g["tgi_batch_current_size"] == 0 and g["tgi_queue_size"] == 0
    assert g["tgi_mp_kv_blocks_free"] == g["tgi_mp_kv_blocks_total"], g
