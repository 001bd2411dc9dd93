"""A dead child process takes the engine down loudly and quickly, never into a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.frontend.server import tgi_mp_shm
from tgi_mp.frontend.engine_client import EngineError
from tgi_mp.ipc.messages import SamplingParams
from tgi_mp.launcher import Engine, EngineStartupError

LONG = SamplingParams(max_new_tokens=4000, ignore_eos=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("victim", ["executor0", "scheduler"])
def test_killed_child_fails_every_client(victim: str) -> None:
    assert_killing_is_loud(Engine.start(None, max_batch_total_tokens=8192), victim)


def assert_killing_is_loud(engine: Engine, victim: str) -> None:
    """SIGKILL `victim` mid-generation: every client fails within 10 s naming it, every
    process exits, the IPC directory is removed, and nothing appeared in /dev/shm (the
    plan ring every process maps is a memfd, gone with them)."""
    pids = [p.pid for p in engine.procs.values()]
    shm_before = set(tgi_mp_shm())
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            assert "memfd:tgi-mp-plan-ring" in f.read(), f"pid {pid} maps the plan ring"
    try:

        async def main() -> tuple[list[BaseException | None], float]:
            client = engine.client()
            started = asyncio.Event()
            outcome: list[BaseException | None] = []

            async def consume(prompt: list[int]) -> None:
                try:
                    async for _ in client.generate(prompt, LONG):
                        started.set()
                except EngineError as e:
                    outcome.append(e)
                    return
                outcome.append(None)

            tasks = [asyncio.create_task(consume([1, 2, 3 + i] * 10)) for i in range(4)]
            await asyncio.wait_for(started.wait(), 60)
            killed_at = time.monotonic()
            os.kill(engine.procs[victim].pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            elapsed = time.monotonic() - killed_at
            with pytest.raises(EngineError):  # and new requests are refused at once
                async for _ in client.generate([1, 2, 3], LONG):
                    pass
            client.close()
            return outcome, elapsed

        outcome, elapsed = asyncio.run(main())
        assert len(outcome) == 4 and all(isinstance(e, EngineError) for e in outcome), outcome
        assert victim in str(outcome[0]) and "SIGKILL" in str(outcome[0])
        assert elapsed < 10
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Reaped children are gone; a zombie would still answer kill(pid, 0).
        assert not any(_alive(pid) for pid in pids), "every tgi-mp process has exited"
        assert engine.failure is not None and victim in engine.failure
    finally:
        engine.shutdown()
    assert not os.path.exists(engine.endpoints.root), "the private IPC directory is removed"
    assert set(tgi_mp_shm()) == shm_before


def test_startup_failure_is_reported() -> None:
    # A KV cache far beyond memory makes the executor fail while allocating it.
    with pytest.raises(EngineStartupError, match=r"executor0 failed at start.*allocate"):
        Engine.start(None, max_batch_total_tokens=1 << 40, startup_timeout=120)


def test_a_refused_configuration_leaves_no_runtime_directory() -> None:
    import glob
    import tempfile

    pattern = os.path.join(tempfile.gettempdir(), "tgi-mp-*")
    before = set(glob.glob(pattern))
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        Engine.start(None, max_batch_size=0)
    assert set(glob.glob(pattern)) <= before
