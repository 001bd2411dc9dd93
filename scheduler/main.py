"""Scheduler process: the one place that decides what the executors compute.

Usage (by the supervisor only): python -m tgi_mp.scheduler.main CONFIG PARENT_PID

The loop: take in requests and aborts, plan a step, broadcast it to every
executor, wait for rank 0's sampled tokens (taking in new requests
meanwhile), apply them, and send each frontend its requests' tokens.
"""

from __future__ import annotations

import bisect
import os
import signal
import sys
import time
from collections import defaultdict

import numpy as np
import zmq

from tgi_mp.config import EngineConfig
from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Endpoints, SchedulerChannels
from tgi_mp.process import bind_to_parent, exit_on_sigterm, setup_logging
from tgi_mp.scheduler.admission import RequestRejected
from tgi_mp.scheduler.grammar import Grammars, read_tokenizer
from tgi_mp.scheduler.scheduler import Scheduler, SchedulerConfig
from tgi_mp.scheduler.step_plan import Output

log = setup_logging("scheduler")


class ExecutorDied(RuntimeError):
    pass


class SchedulerProcess:
    def __init__(self, cfg: EngineConfig, ch: SchedulerChannels) -> None:
        self.cfg = cfg
        self.ch = ch
        self.poller = zmq.Poller()
        self.poller.register(ch.frontend.sock, zmq.POLLIN)
        self.poller.register(ch.results.sock, zmq.POLLIN)
        self.core: Scheduler | None = None
        self.times = defaultdict(float)  # schedule / step / forward / busy seconds
        # Forward durations by method (prefill, decode): counts, sums, histogram buckets.
        self.forward_counts = [0, 0]
        self.forward_sums = [0.0, 0.0]
        self.forward_buckets = [[0] * len(m.DURATION_BUCKETS) for _ in range(2)]
        self.step_sums = [0.0, 0.0]
        self.step_buckets = [[0] * len(m.DURATION_BUCKETS) for _ in range(2)]
        self._last_result_at = 0.0
        # Rank 0's gaps between steps (m.EXECUTOR_TIMINGS): bucket counts, sums, counts.
        self.gap_buckets = [[0] * len(m.GAP_BUCKETS) for _ in m.EXECUTOR_TIMINGS]
        self.gap_sums = [0.0] * len(m.EXECUTOR_TIMINGS)
        self.gap_counts = [0] * len(m.EXECUTOR_TIMINGS)

    def wait_for_executors(self) -> m.SchedulerReady:
        n, timeout_ms = self.cfg.num_shards, int(self.cfg.startup_timeout * 1000)
        self.ch.wait_for_subscribers(n, timeout_ms)
        ready: list[m.ExecutorReady] = []
        while len(ready) < n:
            if not self.ch.results.sock.poll(timeout_ms):
                raise TimeoutError(f"{len(ready)} of {n} executors ready in time")
            msg = self.ch.results.recv()
            if isinstance(msg, m.ExecutorFailed):
                raise ExecutorDied(f"executor{msg.rank} failed at start: {msg.message}")
            ready.append(msg)
        num_blocks = min(r.num_blocks for r in ready)
        step_tokens = min(r.max_batch_prefill_tokens for r in ready)
        mc = self.cfg.model_config
        self.core = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=self.cfg.block_size,
                max_batch_prefill_tokens=step_tokens,
                max_batch_size=self.cfg.max_batch_size,
                eos_token_ids=frozenset(mc.eos_token_ids),
                vocab_size=mc.vocab_size,
                prefix_caching=self.cfg.prefix_caching,
                waiting_served_ratio=self.cfg.waiting_served_ratio,
                max_waiting_tokens=self.cfg.max_waiting_tokens,
                speculate=self.cfg.speculate,
                speculate_ngram_max=self.cfg.speculate_ngram_max,
                speculate_ngram_min=self.cfg.speculate_ngram_min,
                speculate_max_batch=self.cfg.speculate_max_batch,
                speculate_draft=self.cfg.draft_model is not None,
                lora_adapters=len(self.cfg.lora_adapters),
                lora_slots=self.cfg.lora_slots,
            ),
            grammars=Grammars(
                read_tokenizer(self.cfg.tokenizer_dir), mc.vocab_size, mc.eos_token_ids
            ),
        )
        r0 = ready[0]
        return m.SchedulerReady(
            num_blocks,
            r0.block_size,
            num_blocks * r0.block_size,
            r0.attention_backend,
            r0.dtype,
            r0.device,
            step_tokens,
        )

    # ------------------------------------------------------------ the loop

    def serve_forever(self) -> None:
        """With overlap, step N+1 is planned and sent before step N's tokens are back:
        the executors go from one forward to the next without waiting for us, and we
        apply N's tokens (and send N+1's grammar masks, which need them) meanwhile."""
        overlap = self.cfg.overlap_scheduling
        inflight = None  # the step sent whose tokens are not back yet
        while True:
            self._drain_frontend(block_ms=0)
            t0 = time.perf_counter()
            step, ended = self.core.schedule()
            self._emit(ended)
            if step is not None:
                self.ch.plan.send(step.plan)
                step.sent_at = time.perf_counter()
                if inflight is None:
                    self._send_masks(step)
            planning = time.perf_counter() - t0
            self.times["schedule"] += planning
            self.times["busy"] += planning
            completed = inflight is not None
            if completed:
                self._complete(inflight)
                if step is not None:  # its masks follow the tokens they depend on
                    self._send_masks(step)
            inflight = step
            if inflight is not None and not overlap:
                self._complete(inflight)
                inflight = None
            if step is None and not completed:
                # Idle (what was waiting on the step in flight is planned next time
                # round); or waiting for grammar matchers, then check again soon.
                self._drain_frontend(block_ms=5 if self.core.building_matchers() else 1000)

    def _send_masks(self, step) -> None:
        if len(step.plan.grammar.rows):  # filled while the executors run the forward
            self.ch.plan.send(self._masks(step))

    def _complete(self, step) -> None:
        """Waits for `step`'s tokens and applies them. Its step time runs from when the
        executors could start it (sent, or the previous step's tokens back if later)."""
        result = self._wait_for_result(step.plan.step_id)
        t2 = time.perf_counter()
        started = max(step.sent_at, self._last_result_at)
        self._last_result_at = t2
        tops = None
        if result.prompt_ranks is not None:
            tops = (result.prompt_ranks, result.prompt_top_ids, result.prompt_top_logprobs)
        outputs = self.core.update(
            step, result.token_ids, result.prompt_logprobs, result.token_counts, tops
        )
        self._emit(outputs, result)
        t3 = time.perf_counter()
        self.times["schedule"] += t3 - t2
        self.times["step"] += t2 - started
        self.times["forward"] += result.forward_time
        self.times["comm"] += result.comm_time
        self._observe_step(step.decode_only, result, t2 - started)
        self._observe_gaps(result)
        self.times["busy"] += t3 - t2

    def _masks(self, step) -> m.StepMask:
        t0 = time.perf_counter()
        matchers = [step.reqs[i].matcher for i in step.plan.grammar.rows]
        mask = m.StepMask(step.plan.step_id, self.core.grammars.masks(matchers))
        self.times["grammar"] += time.perf_counter() - t0
        return mask

    def _observe_step(self, decode_only: bool, result: m.StepResult, step_time: float) -> None:
        """Per method (0: prefill work in the step, 1: decode only): counts, sums, buckets."""
        method = int(decode_only)
        self.forward_counts[method] += 1
        self.forward_sums[method] += result.forward_time
        self.step_sums[method] += step_time
        for buckets, seconds in (
            (self.forward_buckets[method], result.forward_time),
            (self.step_buckets[method], step_time),
        ):
            for i, bound in enumerate(m.DURATION_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
                    break

    def _observe_gaps(self, result: m.StepResult) -> None:
        gaps = (result.idle_time, result.plan_decode_time, result.result_send_time)
        for i, seconds in enumerate(gaps):
            self.gap_sums[i] += seconds
            self.gap_counts[i] += 1
            k = bisect.bisect_left(m.GAP_BUCKETS, seconds)  # the first bound >= seconds
            if k < len(m.GAP_BUCKETS):  # else only +Inf (the count) takes it
                self.gap_buckets[i][k] += 1

    def _wait_for_result(self, step_id: int) -> m.StepResult:
        while True:
            events = dict(self.poller.poll())
            if self.ch.frontend.sock in events:
                self._drain_frontend(block_ms=0)
            if self.ch.results.sock in events:
                msg = self.ch.results.recv()
                if isinstance(msg, m.ExecutorFailed):
                    raise ExecutorDied(f"executor{msg.rank} failed: {msg.message}")
                if isinstance(msg, m.StepResult) and msg.step_id == step_id:
                    return msg
                log.warning("unexpected message from an executor: %r", msg)

    def _drain_frontend(self, block_ms: int) -> None:
        sock = self.ch.frontend.sock
        if block_ms and not sock.poll(block_ms):
            return
        while sock.poll(0):
            frontend, msg = self.ch.frontend.recv_routed()
            if isinstance(msg, m.AddRequest):
                try:
                    self.core.add(msg, frontend)
                except RequestRejected as e:
                    self.ch.frontend.send(m.Error(msg.req_id, str(e)), frontend)
                except Exception as e:  # a request that breaks admission fails alone
                    log.exception("request %d could not be admitted", msg.req_id)
                    error = m.Error(msg.req_id, f"{type(e).__name__}: {e}", "generation")
                    self.ch.frontend.send(error, frontend)
            elif isinstance(msg, m.AbortRequest):
                for req_id in msg.req_ids:
                    self.core.abort(frontend, req_id)
            elif isinstance(msg, m.GetStats):
                self.ch.frontend.send(self._stats(), frontend)

    def _emit(self, outputs: list[Output], result: m.StepResult | None = None) -> None:
        """One TokenBatch per frontend that has news this step."""
        if not outputs:
            return
        by_frontend: dict[bytes, list[Output]] = defaultdict(list)
        for out in outputs:
            if out.error is not None:  # failed by the engine: an Error, not a token
                self.ch.frontend.send(
                    m.Error(out.req.req_id, out.error, "generation"), out.req.frontend
                )
                continue
            by_frontend[out.req.frontend].append(out)
        for frontend, outs in by_frontend.items():
            with_token = [o for o in outs if o.token >= 0]
            # Each token's columns are its row of the step's result arrays.
            rows = np.array([o.row for o in with_token], dtype=np.int64)
            tokens, logprobs = np.empty(0, np.int32), np.empty(0, np.float32)
            if result is not None:  # else the news are requests that ended between steps
                tokens, logprobs = result.token_ids[rows], result.logprobs[rows]
            batch = m.TokenBatch(
                req_ids=np.array([o.req.req_id for o in with_token], dtype=np.int64),
                token_ids=tokens,
                logprobs=logprobs,
                finished=[(o.req.req_id, int(o.finish)) for o in outs if o.finish is not None],
                num_cached_tokens=[
                    (o.req.req_id, o.req.num_cached) for o in with_token if o.req.num_generated == 1
                ],
                prompt_logprobs=[
                    (o.req.req_id, o.prompt_logprobs)
                    for o in with_token
                    if o.prompt_logprobs is not None
                ],
                prompt_tops=[
                    (o.req.req_id, *o.prompt_tops) for o in with_token if o.prompt_tops is not None
                ],
            )
            if result is not None and result.top_ids is not None:
                batch.top_ids, batch.top_logprobs = result.top_ids[rows], result.top_logprobs[rows]
            self.ch.frontend.send(batch, frontend)

    def _stats(self) -> m.SchedulerStats:
        core, t = self.core, self.times
        return m.SchedulerStats(
            steps=core.stats.steps,
            preemptions=core.stats.preemptions,
            prefill_tokens=core.stats.prefill_tokens,
            decode_tokens=core.stats.decode_tokens,
            waiting=len(core.waiting),
            running=len(core.running),
            blocks_free=core.pool.num_free,
            blocks_total=core.pool.num_blocks,
            schedule_time=t["schedule"],
            grammar_time=t["grammar"],
            step_time=t["step"],
            forward_time=t["forward"],
            busy_time=t["busy"],
            admitted_tokens=core.stats.admitted_tokens,
            cache_hit_tokens=core.stats.cache_hit_tokens,
            cached_blocks=core.pool.num_cached,
            comm_time=t["comm"],
            forward_counts=self.forward_counts,
            forward_sums=self.forward_sums,
            forward_buckets=self.forward_buckets,
            step_sums=self.step_sums,
            step_buckets=self.step_buckets,
            admissions=core.stats.admissions,
            spec_proposed_tokens=core.stats.spec_proposed_tokens,
            spec_accepted_tokens=core.stats.spec_accepted_tokens,
            executor_timings=list(
                zip(self.gap_buckets, self.gap_sums, self.gap_counts, strict=True)
            ),
        )


def run(cfg: EngineConfig) -> int:
    ctx = zmq.Context()
    ch = SchedulerChannels(ctx, Endpoints(cfg.ipc_root), cfg.plan_ring)
    if cfg.plan_ring is not None:
        os.close(cfg.plan_ring.fd)  # mapped: the mapping keeps the ring alive
    proc = SchedulerProcess(cfg, ch)
    linger = 0
    terminated = False
    try:
        ready = proc.wait_for_executors()
        log.info(
            "ready: %d KV blocks of %d tokens (%d tokens), attention %s, %s",
            ready.num_blocks,
            ready.block_size,
            ready.max_batch_total_tokens,
            ready.attention_backend,
            ready.dtype,
        )
        ch.supervisor.send(ready)
        proc.serve_forever()
    except SystemExit:
        terminated = True
        raise
    except (ExecutorDied, TimeoutError) as e:
        log.error("%s", e)
        # The supervisor tells every client, naming the root cause: an executor's error
        # may only be the echo of a peer's death (a broken all-reduce).
        ch.supervisor.send(m.EngineDead(str(e)))
        linger = 2000
        return 1
    finally:
        ch.plan.send(m.Shutdown("scheduler exiting"))  # one write reaches every executor
        ch.close(linger)
        ctx.term()
        if terminated:
            # Told to stop: by the supervisor's teardown (which removes the runtime
            # directory too, after us) or by its death (kill -9; we alone of its children
            # get SIGTERM rather than SIGKILL, so that the directory goes with us).
            Endpoints(cfg.ipc_root).remove()
    return 0


def main() -> None:
    path, parent = sys.argv[1], int(sys.argv[2])
    bind_to_parent(parent, signal.SIGTERM)
    exit_on_sigterm()
    sys.exit(run(EngineConfig.load(path)))


if __name__ == "__main__":
    main()
