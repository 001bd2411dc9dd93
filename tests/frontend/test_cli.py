"""`tgi-mp serve` flag checks happen before anything loads, with TGI's messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tgi_mp.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--max-input-tokens", "10", "--max-total-tokens", "10"],
            "`max_input_tokens` must be < `max_total_tokens`",
        ),
        (
            ["--max-batch-total-tokens", "100", "--max-batch-prefill-tokens", "200"],
            "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`",
        ),
        (
            [
                "--max-batch-total-tokens",
                "100",
                "--max-total-tokens",
                "200",
                "--max-batch-prefill-tokens",
                "50",
            ],
            "`max_total_tokens` must be <= `max_batch_total_tokens`",
        ),
        (["--num-shard", "2"], "it has 9 attention heads, 3 KV heads and an MLP of 1536"),
    ],
)
def test_invalid_flag_combinations_fail_at_once(args: list[str], message: str) -> None:
    r = serve(*args)
    assert r.returncode != 0 and message in r.stderr


def test_env_var_form_is_read() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tgi_mp.cli", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAX_INPUT_TOKENS": "10", "MAX_TOTAL_TOKENS": "10"},
    )
    assert r.returncode != 0 and "`max_input_tokens` must be < `max_total_tokens`" in r.stderr


def test_help_explains_flags() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tgi_mp.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for flag in ("--model-id", "--max-total-tokens", "--frontend-workers", "MAX_TOTAL_TOKENS"):
        assert flag in r.stdout


def test_frontend_and_scheduler_never_import_torch() -> None:
    code = (
        "import sys, tgi_mp.frontend.app, tgi_mp.frontend.main, tgi_mp.scheduler.main; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_no_process_outlives_a_killed_server(tmp_path) -> None:
    import json
    import signal
    import time

    import httpx
    import psutil

    from tests.frontend.server import Server, runtime_of, tgi_mp_shm

    shm_before = set(tgi_mp_shm())
    # TGI launcher flags a deployment passes start it as they are (tgi_mp/tgi_flags.py).
    tgi = ["--max-input-length", "1000", "--sharded", "false", "--usage-stats", "off"]
    tgi += ["--validation-workers", "2", "--prometheus-port", "9000"]
    log = tmp_path / "server.log"
    server = Server("--max-batch-total-tokens", "8192", "--json-output", *tgi, log=log)
    try:
        assert httpx.get(f"{server.url}/info").json()["max_input_tokens"] == 1000
        # One logging set-up everywhere: the HTTP workers' lines are JSON too, with an
        # access line per request carrying its id (echoed on the response).
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
        r = httpx.post(f"{server.url}/generate", json=body, headers={"x-request-id": "req-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        assert len(httpx.get(f"{server.url}/health").headers["x-request-id"]) == 32
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        hit = [
            x for x in lines if x.get("request_id") == "req-42" and x["logger"] == "tgi_mp.access"
        ]
        assert hit and hit[0]["status"] == 200 and hit[0]["route"] == "/generate"
        assert hit[0]["tokens_out"] == 2 and hit[0]["process"] == "frontend"
        assert {x["process"] for x in lines} >= {"serve", "scheduler", "executor0", "frontend"}
        family = psutil.Process(server.proc.pid).children(recursive=True)
        runtime, ring_users = runtime_of(family)
        assert os.path.isdir(runtime) and len(ring_users) == 2
        names = " ".join(" ".join(p.cmdline()) for p in family)
        for part in ("executor.main", "scheduler.main", "frontend.main"):
            assert part in names
        assert len(family) >= 4, "executor, scheduler, granian and a granian worker"
        server.proc.send_signal(signal.SIGKILL)  # no chance to clean up
        server.proc.wait()
        deadline = time.monotonic() + 10
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
            assert time.monotonic() < deadline, [p.pid for p in family if p.is_running()]
            time.sleep(0.1)
        # Nothing of it is left either: the ring was a memfd, gone with its last mapper,
        # and the scheduler (told by SIGTERM, not SIGKILL) removed the runtime directory.
        assert set(tgi_mp_shm()) == shm_before
        assert not os.path.exists(runtime), "the runtime directory went with the server"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "env", "want"),
    [
        ([], {}, {"prefix_caching": True, "kv_cache_fraction": 0.2, "kv_cache_memory": None}),
        ([], {"PREFIX_CACHING": "0"}, {"prefix_caching": False}),
        (["--prefix-caching", "false"], {}, {"prefix_caching": False}),
        (
            ["--kv-cache-fraction", "0.5", "--waiting-served-ratio", "0.3"],
            {"MAX_WAITING_TOKENS": "7"},
            {"kv_cache_fraction": 0.5, "waiting_served_ratio": 0.3, "max_waiting_tokens": 7},
        ),
        (
            [],
            {},
            {
                "device": "auto",
                "dtype": "auto",
                "attention": "auto",
                "cuda_graphs": (1, 2, 4, 8, 16, 32, 64, 128),
                "cuda_memory_fraction": 0.95,
            },
        ),
        (
            ["--attention", "triton", "--device", "cuda", "--dtype", "float16"],
            {"CUDA_GRAPHS": "0", "CUDA_MEMORY_FRACTION": "0.8"},
            {
                "attention": "triton",
                "device": "cuda",
                "dtype": "float16",
                "cuda_graphs": (),
                "cuda_memory_fraction": 0.8,
            },
        ),
        (["--cuda-graphs", "4,1"], {}, {"cuda_graphs": (1, 4)}),
        ([], {}, {"quantize": None}),
        ([], {"QUANTIZE": "int8"}, {"quantize": "int8"}),
    ],
)
def test_engine_options_reach_the_engine(monkeypatch, args, env, want) -> None:
    from click.testing import CliRunner

    from tgi_mp import cli
    from tgi_mp.launcher import Engine, EngineStartupError

    seen: dict = {}

    def fake_start(*a: object, **opts: object) -> Engine:
        seen.update(opts)
        raise EngineStartupError("stop here")

    monkeypatch.setattr(Engine, "start", fake_start)
    result = CliRunner(env=env).invoke(cli.main, ["serve", *args])
    assert result.exit_code == 1, result.output
    assert {k: seen[k] for k in want} == want


def test_bad_cuda_graphs_is_a_usage_error() -> None:
    from click.testing import CliRunner

    from tgi_mp import cli

    result = CliRunner().invoke(cli.main, ["serve", "--cuda-graphs", "1,two"])
    assert result.exit_code == 2 and "--cuda-graphs takes comma-separated" in result.output


def test_unsupported_quantization_is_refused_naming_what_is() -> None:
    from click.testing import CliRunner

    from tgi_mp import cli

    result = CliRunner().invoke(cli.main, ["serve", "--quantize", "gptq"])
    assert result.exit_code == 2, result.output
    assert "'gptq' is not one of 'int8', 'int4', 'gguf'" in result.output, result.output


def test_quantize_gguf_needs_a_gguf_model(tmp_path) -> None:
    from tgi_mp.config import EngineConfig
    from tgi_mp.model_source import ModelSource, load_model_config, resolve_model

    bundled = resolve_model(None)
    hf = ModelSource(kind="hf", path=str(tmp_path), gguf_file=None, model_id="some/float-model")
    with pytest.raises(ValueError, match="--quantize gguf keeps a GGUF file's 4-bit weights"):
        EngineConfig(hf, load_model_config(bundled), str(tmp_path), quantize="gguf")
    EngineConfig(bundled, load_model_config(bundled), str(tmp_path), quantize="gguf")


def launcher(*args: str) -> subprocess.CompletedProcess:
    script = os.path.join(os.path.dirname(sys.executable), "text-generation-launcher")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=60)


def test_text_generation_launcher_is_tgi_mp_serve() -> None:
    r = launcher("--help")
    assert r.returncode == 0 and "--lora-adapters" in r.stdout and "--sharded" in r.stdout
    assert "-p, --port" in r.stdout  # TGI's short flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-cache-dtype", "fp8_e4m3fn"], "--kv-cache-dtype: an fp8 KV cache is not supported"),
        (["--ngrok"], "ngrok tunnels are not supported"),
        (["--sharded", "true"], "`sharded` is true but `num_shard` <= 1"),
        (["--sharded", "false", "--num-shard", "2"], "`sharded` is false but `num_shard` != 1"),
        (["--rope-scaling", "dynamic", "--rope-factor", "2"], "dynamic (NTK-aware) is not"),
        (["--rope-scaling", "linear"], "--rope-scaling linear needs --rope-factor"),
        (["--max-input-length", "9", "--max-input-tokens", "9"], "give one"),
        (["--max-input-length", "10", "--max-total-tokens", "10"], "must be < `max_total_tokens`"),
    ],
)
def test_tgi_launcher_flags_map_or_are_refused_at_once(args: list[str], message: str) -> None:
    r = launcher(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


def test_tgi_launcher_flags_map_onto_options(monkeypatch) -> None:
    from tgi_mp import tgi_flags
    from tgi_mp.options import split

    given = {"model_id": None}
    o = split(given)
    o["engine"].setdefault("num_shards", 1)
    values = {"rope_factor": 4.0, "disable_custom_kernels": True, "huggingface_hub_cache": "/c"}
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    tgi_flags.apply(values, o)
    assert o["engine"]["rope_factor"] == 4.0 and o["engine"]["attention"] == "torch"
    assert os.environ["HF_HUB_CACHE"] == "/c"
