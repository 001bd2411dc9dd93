"""The OpenAI-compatible API through the official `openai` SDK and LangChain, against
one real `tgi-mp serve` (bundled SmolLM2, float32) for the module."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import openai
import pytest
import torch
from langchain_openai import ChatOpenAI

from tests.engine.oracle import hf_model, tokenizer
from tests.frontend.server import Server
from tests.frontend.test_chat_template import CONVERSATIONS
from tests.frontend.test_server import _wait_until_idle, post

MODEL = "smollm2"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with Server(
        "--served-model-name",
        MODEL,
        "--max-batch-total-tokens",
        "8192",
        "--max-total-tokens",
        "2048",
    ) as s:
        yield s
        assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)


def greedy(client: openai.OpenAI, messages: list[dict], **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


# ---------------------------------------------------------------- correctness


@torch.inference_mode()
def transformers_chat(messages: list[dict], max_new_tokens: int) -> list[int]:
    ids = tokenizer().apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = hf_model().generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_greedy_chat_equals_transformers(client, messages) -> None:
    r = greedy(client, messages, max_tokens=24)
    prompt, want = transformers_chat(messages, 24)
    (choice,) = r.choices
    k = r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(prompt)
    assert choice.message.content == tokenizer().decode(want[:k], skip_special_tokens=True)
    if choice.finish_reason == "stop":  # ended on the end-of-turn token, as transformers did
        assert want[k - 1] == tokenizer().convert_tokens_to_ids("<|im_end|>")
    else:
        assert choice.finish_reason == "length" and k == 24


def test_chat_completion_fields(client) -> None:
    r = greedy(client, ASK, max_tokens=20)
    assert r.id.startswith("chatcmpl-") and len(r.id) > 20
    assert r.id != greedy(client, ASK, max_tokens=1).id
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.system_fingerprint.startswith("tgi-mp-") and r.created > 1_700_000_000
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert choice.logprobs is None
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0
    # Asked again, the prompt's whole blocks come from the prefix cache.
    again = greedy(client, ASK, max_tokens=20)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens == (u.prompt_tokens - 1) // 16 * 16


def test_chat_stream_with_usage(client) -> None:
    whole = greedy(client, ASK, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"] and finishes[-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # Without stream_options there is no usage chunk.
    plain = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=3, stream=True
        )
    )
    assert all(c.choices for c in plain)


def test_n_choices_and_seeds(client) -> None:
    def ask() -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=16, n=2, seed=11, temperature=1.0
        )

    r = ask()
    assert [c.index for c in r.choices] == [0, 1]
    texts = [c.message.content for c in r.choices]
    assert texts[0] != texts[1]  # sequence j draws with seed + j
    assert [c.message.content for c in ask().choices] == texts  # seeded: reproducible
    lengths = sum(len(tokenizer()(t)["input_ids"]) for t in texts)
    assert r.usage.completion_tokens >= lengths
    streamed = ["", ""]
    for chunk in client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=16, n=2, seed=11, temperature=1.0, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts


def test_logprobs_and_top_logprobs(client) -> None:
    r = greedy(client, ASK, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    visible = "".join(e.token for e in content if e.token != "<|im_end|>")
    assert visible == r.choices[0].message.content


def test_stop_strings_are_left_out(client) -> None:
    full = greedy(client, ASK, max_tokens=20).choices[0].message.content
    assert "." in full
    for stop in (".", ["Paris", "."]):
        r = greedy(client, ASK, max_tokens=20, stop=stop)
        want = full[: min(full.find(s) for s in ([stop] if isinstance(stop, str) else stop))]
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        chunks = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=20, stop=stop, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_logit_bias_and_penalties(client) -> None:
    paris = tokenizer()(" Paris")["input_ids"]
    assert len(paris) == 1
    r = greedy(client, ASK, max_tokens=3, logit_bias={str(paris[0]): 100})
    assert r.choices[0].message.content == " Paris Paris Paris"
    r = greedy(client, ASK, max_tokens=20, presence_penalty=1.5, frequency_penalty=0.5)
    assert r.choices[0].message.content  # applied by the engine (tested there); accepted here


def test_assistant_prefill_continues_the_message(client) -> None:
    messages = [*ASK, {"role": "assistant", "content": "The capital of France is"}]
    r = greedy(client, messages, max_tokens=3)
    assert r.choices[0].message.content.startswith(" Paris")


def test_async_client(server) -> None:
    async def run() -> tuple[str, str]:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)
        whole = await c.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=12
        )
        parts = []
        async for chunk in await c.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=12, stream=True
        ):
            parts.extend(ch.delta.content or "" for ch in chunk.choices)
        await c.close()
        return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed and "Paris" in whole


# ---------------------------------------------------------------- completions and models


def test_completions_with_prompt_lists_and_echo(server, client) -> None:
    prompts = ["The capital of France is", "Lighthouses are"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices, strict=True):
        native = post(
            server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 5}}
        ).json()["generated_text"]
        assert choice.text == native and choice.finish_reason == "length"
    n_prompt = sum(len(tokenizer()(p)["input_ids"]) for p in prompts)
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 10
    # Token-id prompts are the same prompts.
    ids = [tokenizer()(p)["input_ids"] for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]
    # echo, with logprobs of the prompt tokens too (the first has none).
    e = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    (choice,) = e.choices
    assert choice.text == prompts[0] + r.choices[0].text[: len(choice.text) - len(prompts[0])]
    lp = choice.logprobs
    n = len(ids[0])
    assert len(lp.tokens) == n + 3 and "".join(lp.tokens[:n]) == prompts[0]
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[n] and len(lp.top_logprobs[n]) == 2
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    # Streams: per-choice chunks, a finish chunk each.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True
        )
    )
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in r.choices]


def test_models(client) -> None:
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_errors_keep_the_server_serving(server, client) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model=MODEL, prompt="a", suffix="b")
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "bot", "content": "x"}])
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "Paris" in greedy(client, ASK, max_tokens=12).choices[0].message.content


# ---------------------------------------------------------------- LangChain


def test_langchain_chat_openai(server, client) -> None:
    llm = ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=16
    )
    want = greedy(client, ASK, max_tokens=16).choices[0].message.content
    answer = llm.invoke("What is the capital of France?")
    assert answer.content == want
    assert answer.response_metadata["finish_reason"] == "stop"
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert streamed == want


def test_dropped_chat_streams_and_requests_free_their_blocks(server) -> None:
    """Clients that leave a stream (n=2: both sequences) or a non-streamed answer
    abort their sequences; the KV cache is whole again afterwards."""
    body = {"messages": ASK, "max_tokens": 1500, "n": 2, "temperature": 1.0, "seed": 1}

    async def drop_stream(http: httpx.AsyncClient) -> None:
        async with http.stream(
            "POST", server.url + "/v1/chat/completions", json={**body, "stream": True}
        ) as resp:
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data:")
                if seen == 6:
                    return

    async def drop_answer(http: httpx.AsyncClient) -> None:
        with contextlib.suppress(httpx.TimeoutException):
            await http.post(
                server.url + "/v1/completions",
                json={"prompt": "Hi", "max_tokens": 1500},
                timeout=1.0,
            )

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            await asyncio.gather(*(drop_stream(http) for _ in range(4)), drop_answer(http))

    asyncio.run(main())
    # Unaborted, those 9 sequences of 1500 tokens would keep the engine busy for a minute.
    g = _wait_until_idle(server, timeout=10)
    assert g["tgi_batch_current_size"] == 0 and g["tgi_queue_size"] == 0
    assert g["tgi_mp_kv_blocks_free"] == g["tgi_mp_kv_blocks_total"], g


# ---------------------------------------------------------------- vLLM's request extras


def test_vllm_extras_ignore_eos_min_tokens_stop_token_ids(server, client) -> None:
    """Benchmark tools send these: EOS ignored runs to max_tokens; min_tokens holds the
    stop token ids back; a stop token id ends the answer (TGI's routes take them too)."""
    short = greedy(client, ASK, max_tokens=200)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 200
    long = greedy(
        client, ASK, max_tokens=short.usage.completion_tokens + 5, extra_body={"ignore_eos": True}
    )
    assert long.usage.completion_tokens == short.usage.completion_tokens + 5
    assert long.choices[0].finish_reason == "length"
    ids = tokenizer()(short.choices[0].message.content, add_special_tokens=False)["input_ids"]
    stop_id = ids[1]  # the answer's second token
    cut = greedy(client, ASK, max_tokens=50, extra_body={"stop_token_ids": [stop_id]})
    assert cut.usage.completion_tokens == 2 and cut.choices[0].finish_reason == "stop"
    held = greedy(
        client, ASK, max_tokens=50, extra_body={"stop_token_ids": [stop_id], "min_tokens": 6}
    )
    assert held.usage.completion_tokens >= 6
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}
    body["parameters"] |= {"ignore_eos": True, "min_tokens": 8}
    out = post(server, "/generate", body | {"parameters": {**body["parameters"], "details": True}})
    assert out.status_code == 200 and out.json()["details"]["generated_tokens"] == 8
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 4, "min_tokens": 5},
        timeout=60,
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "min_tokens"


def test_vllm_prompt_logprobs_are_transformers(server) -> None:
    """vLLM's `prompt_logprobs`: at each prompt position the prompt token's logprob and
    rank and the k most likely tokens, as transformers scores the prompt."""
    prompt = "The lighthouse keeper climbed the stairs"
    ids = tokenizer()(prompt)["input_ids"]
    with torch.inference_mode():
        ref = hf_model()(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    k = 3
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "prompt_logprobs": k},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    scores = r.json()["choices"][0]["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    for pos in range(1, len(ids)):
        row = ref[pos - 1]
        entry = {int(i): e for i, e in scores[pos].items()}
        own = entry[ids[pos]]
        assert own["logprob"] == pytest.approx(float(row[ids[pos]]), abs=2e-3)
        assert own["rank"] == int((row > row[ids[pos]]).sum()) + 1
        assert own["decoded_token"] == tokenizer().decode([ids[pos]])
        top = row.topk(k)
        for rank, (value, i) in enumerate(zip(top.values, top.indices, strict=True), 1):
            assert entry[int(i)]["logprob"] == pytest.approx(float(value), abs=2e-3)
            if int(i) != ids[pos]:
                assert entry[int(i)]["rank"] == rank
        assert set(entry) <= {ids[pos], *top.indices.tolist()}
    # Chat: one list for the answer (the templated prompt), 0 = the prompt's own only.
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 2, "prompt_logprobs": 0},
        timeout=60,
    )
    body = r.json()
    assert r.status_code == 200 and body["prompt_logprobs"][0] is None
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in greedy_json(server, ASK)  # only when asked for
    for extra, why in (({"stream": True}, "stream"), ({"prompt_logprobs": 6}, "<= 5")):
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "prompt_logprobs": 1} | extra,
            timeout=60,
        )
        error = r.json()["error"]
        assert r.status_code == 422 and error["param"] == "prompt_logprobs"
        assert why in error["message"]


def greedy_json(server, messages: list[dict]) -> dict:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200
    return r.json()


def test_vllm_extras_stop_strings_special_tokens_and_templates(client) -> None:
    full = greedy(client, ASK, max_tokens=20).choices[0].message.content
    kept = greedy(
        client, ASK, max_tokens=20, stop=".", extra_body={"include_stop_str_in_output": True}
    )
    assert kept.choices[0].message.content == full[: full.find(".") + 1]
    ended = greedy(client, ASK, max_tokens=200)
    text = ended.choices[0].message.content
    eos = tokenizer().eos_token
    assert ended.choices[0].finish_reason == "stop" and eos not in text
    special = {"skip_special_tokens": False}
    assert (
        greedy(client, ASK, max_tokens=200, extra_body=special).choices[0].message.content == text
    )
    special["include_stop_str_in_output"] = True  # the EOS that stopped it, as text
    shown = greedy(client, ASK, max_tokens=200, extra_body=special)
    assert shown.choices[0].message.content == text + eos
    # The final assistant message: continued (default), echoed, or a new turn after it.
    prefix = [*ASK, {"role": "assistant", "content": "The capital of France is"}]
    cont = greedy(client, prefix, max_tokens=3).choices[0].message.content
    echoed = greedy(client, prefix, max_tokens=3, extra_body={"echo": True})
    assert echoed.choices[0].message.content == "The capital of France is" + cont
    new_turn = greedy(client, prefix, max_tokens=3, extra_body={"continue_final_message": False})
    assert new_turn.choices[0].message.content != cont
    with pytest.raises(openai.UnprocessableEntityError):
        greedy(client, ASK, max_tokens=3, extra_body={"continue_final_message": True})
    # Template kwargs reach the template (an unknown one is ignored by it).
    r = greedy(
        client, ASK, max_tokens=3, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert r.choices[0].message.content


def test_invocations_routes_by_the_body(server) -> None:
    """SageMaker's `/invocations`: chat, completion or TGI's `POST /`, by the body."""

    def invoke(body: dict) -> dict | list:
        r = httpx.post(f"{server.url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    chat = invoke({"messages": ASK, "max_tokens": 3, "temperature": 0})
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 3
    done = invoke({"prompt": "The sea", "max_tokens": 3, "temperature": 0})
    assert done["object"] == "text_completion"
    tgi = invoke({"inputs": "The sea", "parameters": {"max_new_tokens": 3}})
    assert isinstance(tgi, list) and "generated_text" in tgi[0]
    head = httpx.head(f"{server.url}/health", timeout=10)  # through granian too
    assert head.status_code == 200 and head.content == b""


def test_a_huge_prompt_does_not_stall_other_streams(server) -> None:
    """A 1.9 MB prompt is tokenized in a validation thread (its GIL-free call), so a
    stream served by the same worker keeps getting tokens meanwhile."""
    import itertools
    import threading
    import time

    text = ("The history of the lighthouse begins long before electric lamps. " * 30000)[:1_900_000]
    arrivals: list[float] = []

    def stream() -> None:
        body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 80}}
        with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.perf_counter())

    reader = threading.Thread(target=stream)
    reader.start()
    while len(arrivals) < 3:
        time.sleep(0.01)
    start = time.perf_counter()
    r = httpx.post(f"{server.url}/generate", json={"inputs": text}, timeout=120)
    end = time.perf_counter()
    reader.join()
    assert r.status_code == 422, r.text  # too long, found once it was tokenized
    took = end - start
    assert took > 0.3, "the prompt must take a while to validate, or this shows nothing"
    during = [b - a for a, b in itertools.pairwise(arrivals) if b > start and a < end]
    assert len(during) >= 2 and max(during) < took / 2, (took, during)
