"""Generation parameters that need their own server flags: prefill logprobs
(`--enable-prefill-logprobs`, prompts chunked by a small prefill budget), best_of
and the watermark. One `tgi-mp serve` for the module."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from text_generation import Client

from tests.engine.oracle import TEXT, hf_model, reference_logprobs, tokenizer
from tests.frontend.server import Server
from tests.frontend.test_server import post, sse_events
from tgi_mp.executor.watermark import score_text

CHUNK = 48  # prefill budget: every prompt here longer than this is computed in chunks


@pytest.fixture(scope="module")
def server():
    with Server(
        "--enable-prefill-logprobs",
        "--max-batch-prefill-tokens",
        str(CHUNK),
        "--max-batch-total-tokens",
        "8192",
        "--max-total-tokens",
        "2048",
    ) as s:
        yield s
        assert s.stop() == 0


@torch.inference_mode()
def prompt_reference(prompt: list[int]) -> list[float]:
    """transformers' logprob of each prompt token after the first, given those before it."""
    logp = hf_model()(torch.tensor([prompt])).logits[0].double().log_softmax(-1)
    return [float(logp[k - 1, prompt[k]]) for k in range(1, len(prompt))]


def test_prefill_logprobs_match_transformers_through_chunks(server) -> None:
    texts = [TEXT[:700], TEXT[1000:1200], "Lighthouses"]
    prompts = [tokenizer()(t)["input_ids"] for t in texts]
    assert len(prompts[0]) > 2 * CHUNK

    async def ask(text: str, decoder_input_details: bool) -> dict:
        body = {
            "inputs": text,
            "parameters": {"max_new_tokens": 3, "decoder_input_details": decoder_input_details},
        }
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.post(server.url + "/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def crowd() -> list[dict]:  # each prompt with and without, all at once
        return await asyncio.gather(*(ask(t, flag) for flag in (True, False) for t in texts))

    answers = asyncio.run(crowd())
    for text, prompt, with_details, plain in zip(
        texts, prompts, answers[:3], answers[3:], strict=True
    ):
        assert "details" not in plain
        d = with_details["details"]  # decoder_input_details alone brings the details object
        assert [t["id"] for t in d["prefill"]] == prompt
        assert d["prefill"][0]["logprob"] is None
        for tok, want in zip(d["prefill"][1:], prompt_reference(prompt), strict=True):
            assert abs(tok["logprob"] - want) < 1e-4, (text, tok, want)
        assert [t["text"] for t in d["prefill"]] == [tokenizer().decode([i]) for i in prompt]
        generated = [t["id"] for t in d["tokens"]]
        ref = reference_logprobs(prompt, generated)
        for i, tok in enumerate(d["tokens"]):
            assert abs(tok["logprob"] - float(ref[i, tok["id"]])) < 1e-4


def test_best_of_returns_the_best_mean_logprob_and_the_others(server) -> None:
    params = {"best_of": 2, "do_sample": True, "max_new_tokens": 8, "top_n_tokens": 2}
    r = post(server, "/generate", {"inputs": "My favourite colour is", "parameters": params})
    assert r.status_code == 200, r.text
    assert "details" not in r.json()
    params |= {"details": True, "return_full_text": True}
    body = {"inputs": "My favourite colour is", "parameters": params}
    for _ in range(3):
        r = post(server, "/generate", body).json()
        d = r["details"]
        (other,) = d["best_of_sequences"]
        assert r["generated_text"].startswith("My favourite colour is")
        assert other["generated_text"].startswith("My favourite colour is")
        assert d["seed"] != other["seed"] and d["seed"] is not None
        assert other["generated_tokens"] == len(other["tokens"]) == len(other["top_tokens"])
        assert len(d["top_tokens"]) == len(d["tokens"])

        def mean(tokens: list[dict]) -> float:
            return sum(t["logprob"] for t in tokens) / len(tokens)

        assert mean(d["tokens"]) >= mean(other["tokens"])
        assert list(d) == [
            "finish_reason",
            "generated_tokens",
            "seed",
            "prefill",
            "tokens",
            "best_of_sequences",
            "top_tokens",
        ]


def test_tgi_client_parses_best_of_and_prefill(server) -> None:
    client = Client(server.url, timeout=120)
    r = client.generate("Lighthouses", max_new_tokens=4, best_of=2, do_sample=True)
    assert len(r.details.best_of_sequences) == 1
    other = r.details.best_of_sequences[0]
    # Sampled, so EOS may come early; the count must still match the tokens and the reason.
    assert other.generated_tokens == len(other.tokens)
    if other.generated_tokens < 4:
        assert other.finish_reason == "eos_token" and other.tokens[-1].special
    else:
        assert other.generated_tokens == 4 and other.finish_reason == "length"
    r = client.generate("Lighthouses guide ships", max_new_tokens=2, decoder_input_details=True)
    prompt = tokenizer()("Lighthouses guide ships")["input_ids"]
    assert [t.id for t in r.details.prefill] == prompt
    assert r.details.prefill[0].logprob is None and r.details.prefill[1].logprob < 0


def test_watermarked_text_is_detected_and_plain_text_is_not(server) -> None:
    async def generate(seed: int, watermark: bool, stream: bool = False) -> str:
        params = {"max_new_tokens": 120, "do_sample": True, "seed": seed, "watermark": watermark}
        body = {"inputs": "Once upon a time", "parameters": params}
        # Five 120-token requests at once: on a busy machine they take minutes, not seconds.
        async with httpx.AsyncClient(timeout=540) as c:
            r = await c.post(
                server.url + ("/generate_stream" if stream else "/generate"), json=body
            )
        assert r.status_code == 200, r.text
        return sse_events(r.text)[-1]["generated_text"] if stream else r.json()["generated_text"]

    seeds = (1, 2)

    async def everything() -> list[str]:
        kinds = [(True, False), (False, False)]  # marked, plain; and one marked stream
        runs = [generate(s, w, st) for w, st in kinds for s in seeds]
        return await asyncio.gather(*runs, generate(seeds[0], True, True))

    texts = asyncio.run(everything())
    marked, plain, streamed = texts[:2], texts[2:4], texts[4]
    assert streamed == marked[0]  # the stream of a watermarked request is the same text
    for m, p in zip(marked, plain, strict=True):
        z_marked = score_text(m, tokenizer(), gamma=0.5).z
        z_plain = score_text(p, tokenizer(), gamma=0.5).z
        print(f"watermark z: marked {z_marked:.2f}, plain {z_plain:.2f}")
        assert z_marked > 4.0, (z_marked, m)
        assert z_plain < 4.0, (z_plain, p)
