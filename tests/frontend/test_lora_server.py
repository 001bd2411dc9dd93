"""LoRA through `tgi-mp serve` on the bundled model: TGI's `adapter_id`, OpenAI's
`model`, `/v1/models`, the 422 for an unknown adapter and the per-adapter metrics,
with greedy tokens equal to transformers + PEFT on the same adapters."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.engine.oracle import compare, hf_model, tokenizer
from tests.engine.test_lora import make_adapters, references
from tests.frontend.server import Server

NEW = 12
ADAPTERS = {
    "support": dict(r=16, lora_alpha=32, target_modules="all-linear"),
    "terse": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
}
TEXTS = [
    "The lighthouse keeper climbed the stairs and",
    "Write a short note to a friend about the weather:",
    "In 1822 the French physicist Augustin Fresnel designed",
]
GREEDY = {"max_new_tokens": NEW, "details": True, "do_sample": False}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    base = hf_model()
    dirs = make_adapters(base, tmp_path_factory.mktemp("adapters"), ADAPTERS, std=0.5)
    prompts = [tokenizer()(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    refs = references(base, dirs, prompts, NEW)
    for name in dirs:
        assert [t for t, _ in refs[name]] != [t for t, _ in refs[None]], name
    spec = ",".join(f"{name}={path}" for name, path in dirs.items())
    with Server("--lora-adapters", spec, "--max-batch-total-tokens", "4096") as server:
        yield server, refs


def generate(server: Server, text: str, adapter: str | None) -> dict:
    params = {**GREEDY, **({"adapter_id": adapter} if adapter else {})}
    r = httpx.post(
        f"{server.url}/generate", json={"inputs": text, "parameters": params}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()


def check(label: str, out: dict, ref: tuple[list[int], list[float]]) -> None:
    got = [t["id"] for t in out["details"]["tokens"]]
    want, margins = ref
    assert len(got) == NEW or out["details"]["finish_reason"] == "eos_token", label
    ok, n = compare(got, want[: len(got)], margins[: len(got)])
    assert ok, f"{label}: diverges at {n}: server {got} vs PEFT {want}"


def test_adapter_id_mixed_in_one_batch_follows_peft(lora) -> None:
    server, refs = lora
    for name in (None, "support", "terse"):  # each alone first
        check(f"{name or 'base'} alone", generate(server, TEXTS[0], name), refs[name][0])
    jobs = [(i, name) for i in range(len(TEXTS)) for name in (None, "support", "terse")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: generate(server, TEXTS[job[0]], job[1]), jobs))
    for (i, name), out in zip(jobs, outs, strict=True):
        check(f"{name or 'base'} #{i}", out, refs[name][i])


def test_openai_model_names_the_adapter(lora) -> None:
    server, _ = lora
    want = generate(server, TEXTS[0], "terse")["generated_text"]
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "terse", "prompt": TEXTS[0], "max_tokens": NEW, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "terse"
    assert r.json()["choices"][0]["text"] == want
    base = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tgi", "prompt": TEXTS[0], "max_tokens": NEW, "temperature": 0},
        timeout=120,
    ).json()
    assert base["choices"][0]["text"] == generate(server, TEXTS[0], None)["generated_text"]
    assert base["model"] != "terse"
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in models][1:] == ["support", "terse"]
    assert {m["parent"] for m in models[1:]} == {models[0]["id"]}
    assert httpx.get(f"{server.url}/v1/models/support").json()["id"] == "support"


def test_unknown_adapter_is_422_and_the_server_serves_on(lora) -> None:
    server, refs = lora
    r = httpx.post(
        f"{server.url}/generate",
        json={"inputs": "hi", "parameters": {"adapter_id": "nope"}},
        timeout=60,
    )
    assert r.status_code == 422
    assert r.json() == {
        "error": "Input validation error: `adapter_id` 'nope' is not a loaded LoRA adapter "
        "(loaded: support, terse)",
        "error_type": "validation",
    }
    check("after the 422", generate(server, TEXTS[1], "support"), refs["support"][1])


def test_metrics_count_each_adapter(lora) -> None:
    server, _ = lora

    def counts() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {
            line.split('"')[1]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("tgi_mp_lora_requests{")
        }

    before = counts()
    out = generate(server, TEXTS[2], "terse")
    after = counts()
    assert after["terse"] == before.get("terse", 0) + 1
    assert after.get("support", 0) == before.get("support", 0)
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE tgi_mp_lora_generated_tokens counter" in text
    assert len(out["details"]["tokens"]) > 0
