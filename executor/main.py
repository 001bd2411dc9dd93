"""Executor process: holds one shard of the model and runs the step plans it is sent.

Usage (by the supervisor only): python -m tgi_mp.executor.main CONFIG RANK PARENT_PID
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import zmq

from tgi_mp.config import EngineConfig
from tgi_mp.ipc.channels import Endpoints, ExecutorChannels
from tgi_mp.ipc.messages import (
    ExecutorFailed,
    ExecutorReady,
    Shutdown,
    StepMask,
    StepPlan,
    StepResult,
)
from tgi_mp.process import bind_to_parent, exit_on_sigterm, setup_logging


def run(cfg: EngineConfig, rank: int) -> int:
    log = setup_logging(f"executor{rank}")
    ctx = zmq.Context()
    ch = ExecutorChannels(ctx, Endpoints(cfg.ipc_root), cfg.plan_ring, rank)
    if cfg.plan_ring is not None:
        os.close(cfg.plan_ring.fd)  # mapped: the mapping keeps the ring alive
    linger = 0
    try:
        from tgi_mp.executor.runner import ModelRunner  # torch import: after sockets are up

        runner = ModelRunner(cfg, rank)
        ch.results.send(
            ExecutorReady(
                rank,
                runner.num_blocks,
                cfg.block_size,
                runner.attention.name,
                runner.dtype_name,
                str(runner.device),
                runner.step_tokens,
            )
        )
        ended = time.perf_counter()  # the last step's compute (its result then sent)
        send_time = 0.0
        while True:
            plan = ch.plan.recv()
            if isinstance(plan, Shutdown):
                log.info("shutting down: %s", plan.reason)
                return 0
            t0 = time.perf_counter()
            idle = t0 - ended  # the last result sent, this plan waited for and decoded
            comm0 = runner.tp.comm_time
            out = runner.step(plan, lambda plan=plan: _read_mask(ch, plan))
            if rank != 0 and len(plan.grammar.rows):  # the broadcast's next message is it
                _read_mask(ch, plan)
            ch.plan.release()  # this step's arrays are read: their ring slots may be reused
            ended = time.perf_counter()
            if rank == 0:
                elapsed = ended - t0
                ch.results.send(
                    StepResult(
                        plan.step_id,
                        out.tokens,
                        elapsed,
                        out.logprobs,
                        out.top_ids,
                        out.top_logprobs,
                        out.prompt_logprobs,
                        runner.tp.comm_time - comm0,
                        out.counts,
                        idle,
                        ch.plan.decode_time,
                        send_time,
                        *(out.prompt_tops or (None, None, None)),
                    )
                )
                send_time = time.perf_counter() - ended
    except SystemExit:
        raise
    except BaseException as e:  # report, then die loudly: the supervisor takes it from there
        log.error("executor %d failed:\n%s", rank, traceback.format_exc())
        ch.results.send(ExecutorFailed(rank, f"{type(e).__name__}: {e}"))
        linger = 2000
        return 1
    finally:
        ch.close(linger)
        ctx.term()


def _read_mask(ch: ExecutorChannels, plan: StepPlan):
    """The grammar bitmask the scheduler sends right after a plan with constrained rows."""
    msg = ch.plan.recv()
    if not isinstance(msg, StepMask) or msg.step_id != plan.step_id:
        raise RuntimeError(f"expected the grammar mask of step {plan.step_id}, got {msg!r:.80}")
    return msg.bitmask


def main() -> None:
    path, rank, parent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bind_to_parent(parent)
    exit_on_sigterm()
    sys.exit(run(EngineConfig.load(path), rank))


if __name__ == "__main__":
    main()
