"""`/metrics`: TGI's Prometheus metrics, with TGI's names, types, labels and buckets.

TGI's exporter writes counters without a `_total` suffix, which prometheus-client
always adds, so this module keeps its own counters and histograms and writes the
text format itself. Request metrics live in the HTTP workers: each worker saves
a snapshot of its own after every request (a small msgpack file in the engine's
private directory, replaced atomically), and the worker that answers a scrape
adds up every worker's snapshot, so one scrape covers all of them. Engine
figures (queue, batch, KV blocks, prefix cache, step durations) come from the
scheduler at scrape time.
"""

from __future__ import annotations

import glob
import os
from bisect import bisect_left
from dataclasses import dataclass, field

import msgspec

from tgi_mp.ipc.messages import (
    DURATION_BUCKETS,
    EXECUTOR_TIMINGS,
    GAP_BUCKETS,
    SchedulerStats,
)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Snapshot(msgspec.Struct):
    """One worker's request metrics (histograms: bucket counts, sum, count)."""

    counters: dict[str, float] = {}
    failures: dict[str, float] = {}
    histograms: dict[str, tuple[list[int], float, int]] = {}
    # LoRA adapter name -> [requests, prompt tokens, generated tokens] (successful ones)
    adapters: dict[str, list[float]] = {}
    # "route status" -> responses (routes: `access.route_label`, a bounded set)
    responses: dict[str, float] = {}


@dataclass
class _Histogram:
    buckets: list[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, x: float) -> None:
        i = bisect_left(self.buckets, x)  # the first bucket with x <= its bound
        if i < len(self.counts):  # beyond the last: in +Inf (the count) only
            self.counts[i] += 1
        self.total += x
        self.n += 1


REQUEST_HISTOGRAMS = {
    "tgi_request_duration": "End-to-end request duration (s)",
    "tgi_request_validation_duration": "Validation and tokenization (s)",
    "tgi_request_queue_duration": "Queued until the first token (s)",
    "tgi_request_inference_duration": "First token until the end (s)",
    "tgi_request_mean_time_per_token_duration": "Inference time per generated token (s)",
    "tgi_request_input_length": "Prompt tokens",
    "tgi_request_generated_tokens": "Generated tokens",
    "tgi_request_max_new_tokens": "max_new_tokens asked for",
    # vLLM's two latency histograms (TGI has neither): what the dashboard's TTFT and
    # inter-token latency percentiles come from.
    "tgi_mp_time_to_first_token_seconds": "Request start until its first token (s)",
    "tgi_mp_inter_token_latency_seconds": "Time between two tokens of a sequence (s)",
}


# Per LoRA adapter (label `adapter`), successful requests only; base-model requests
# are the rest of `tgi_request_success`.
LORA_COUNTERS = {
    "tgi_mp_lora_requests": "Requests that succeeded, by LoRA adapter",
    "tgi_mp_lora_input_tokens": "Prompt tokens of those requests, by LoRA adapter",
    "tgi_mp_lora_generated_tokens": "Tokens generated for those requests, by LoRA adapter",
}


class Metrics:
    def __init__(self) -> None:
        self.directory: str | None = None
        self.configure(None, 4095, 4096)

    def configure(
        self, directory: str | None, max_input: int, max_total: int, adapters: list[str] = ()
    ) -> None:
        """Buckets of the length histograms follow the server's limits, as TGI's."""
        self.directory = directory
        self.adapter_names = list(adapters)
        self.adapters = {name: [0.0, 0.0, 0.0] for name in adapters}
        length = [max_input / 100 * k for k in range(1, 101)]
        total = [max_total / 100 * k for k in range(1, 101)]
        self.counters = {"tgi_request_count": 0.0, "tgi_request_success": 0.0}
        self.failures: dict[str, float] = {}
        self.responses: dict[str, float] = {}
        self.histograms = {
            name: _Histogram(
                DURATION_BUCKETS
                if name.endswith(("duration", "seconds"))
                else length
                if name == "tgi_request_input_length"
                else total
            )
            for name in REQUEST_HISTOGRAMS
        }

    # ------------------------------------------------------------ recording

    def success(
        self,
        duration: float,
        validation: float,
        queue: float,
        input_tokens: int,
        generated: int,
        max_new_tokens: int,
        adapter: int = -1,
    ) -> None:
        inference = max(duration - validation - queue, 0.0)
        if adapter >= 0:
            counts = self.adapters[self.adapter_names[adapter]]
            counts[0] += 1
            counts[1] += input_tokens
            counts[2] += generated
        h = self.histograms
        self.counters["tgi_request_count"] += 1
        self.counters["tgi_request_success"] += 1
        h["tgi_request_duration"].observe(duration)
        h["tgi_request_validation_duration"].observe(validation)
        h["tgi_request_queue_duration"].observe(queue)
        h["tgi_request_inference_duration"].observe(inference)
        h["tgi_request_mean_time_per_token_duration"].observe(inference / max(generated, 1))
        h["tgi_request_input_length"].observe(input_tokens)
        h["tgi_request_generated_tokens"].observe(generated)
        h["tgi_request_max_new_tokens"].observe(max_new_tokens)
        h["tgi_mp_time_to_first_token_seconds"].observe(validation + queue)
        self._save()  # before the answer is complete: a scrape after it counts it

    def token_gap(self, seconds: float) -> None:
        """The time since the sequence's previous token."""
        self.histograms["tgi_mp_inter_token_latency_seconds"].observe(seconds)

    def failure(self, err: str) -> None:
        self.counters["tgi_request_count"] += 1
        self.failures[err] = self.failures.get(err, 0.0) + 1
        self._save()

    def response(self, route: str, status: int) -> None:
        """The end of every HTTP request (after its answer was sent)."""
        key = f"{route} {status}"
        self.responses[key] = self.responses.get(key, 0.0) + 1
        self._save()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            dict(self.counters),
            dict(self.failures),
            {k: (list(h.counts), h.total, h.n) for k, h in self.histograms.items()},
            {k: list(v) for k, v in self.adapters.items()},
            dict(self.responses),
        )

    def _save(self) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"worker-{os.getpid()}.msgpack")
        with open(path + ".tmp", "wb") as f:
            f.write(msgspec.msgpack.encode(self.snapshot()))
        os.replace(path + ".tmp", path)

    def all_workers(self) -> Snapshot:
        """This worker's live figures plus every other worker's last snapshot."""
        total = self.snapshot()
        if self.directory is None:
            return total
        own = f"worker-{os.getpid()}.msgpack"
        for path in glob.glob(os.path.join(self.directory, "worker-*.msgpack")):
            if os.path.basename(path) == own:
                continue
            try:
                with open(path, "rb") as f:
                    other = msgspec.msgpack.decode(f.read(), type=Snapshot)
            except (OSError, msgspec.DecodeError):
                continue
            for k, v in other.counters.items():
                total.counters[k] = total.counters.get(k, 0.0) + v
            for k, v in other.failures.items():
                total.failures[k] = total.failures.get(k, 0.0) + v
            for k, v in other.responses.items():
                total.responses[k] = total.responses.get(k, 0.0) + v
            for k, v in other.adapters.items():
                mine = total.adapters.setdefault(k, [0.0] * len(v))
                total.adapters[k] = [a + b for a, b in zip(mine, v, strict=True)]
            for k, (counts, s, n) in other.histograms.items():
                if k in total.histograms and len(counts) == len(total.histograms[k][0]):
                    mine = total.histograms[k]
                    merged = [a + b for a, b in zip(mine[0], counts, strict=True)]
                    total.histograms[k] = (merged, mine[1] + s, mine[2] + n)
        return total

    # ------------------------------------------------------------ exposition

    def render(self, stats: SchedulerStats | None, in_flight: int, block_size: int) -> bytes:
        snap = self.all_workers()
        text = _Text()
        text.counter(
            "tgi_request_count", "Requests received", snap.counters.get("tgi_request_count", 0.0)
        )
        text.counter(
            "tgi_request_success",
            "Requests that succeeded",
            snap.counters.get("tgi_request_success", 0.0),
        )
        text.family("tgi_request_failure", "counter", "Requests that failed, by error type")
        for err in sorted(snap.failures):
            text.lines.append(f'tgi_request_failure{{err="{err}"}} {snap.failures[err]!r}')
        for name, help_ in REQUEST_HISTOGRAMS.items():
            text.histogram(
                name, help_, self.histograms[name].buckets, [("", snap.histograms[name])]
            )
        for i, (name, help_) in enumerate(LORA_COUNTERS.items()):
            if snap.adapters:
                text.family(name, "counter", help_)
            for adapter in sorted(snap.adapters):
                text.lines.append(f'{name}{{adapter="{adapter}"}} {snap.adapters[adapter][i]!r}')
        text.family("tgi_mp_http_responses", "counter", "HTTP responses, by route and status")
        for key in sorted(snap.responses):
            route, status = key.rsplit(" ", 1)
            text.lines.append(
                f'tgi_mp_http_responses{{route="{route}",status="{status}"}} '
                f"{snap.responses[key]!r}"
            )
        text.gauge("tgi_mp_http_in_flight", "Requests this HTTP worker is serving", in_flight)
        if stats is not None:
            _engine_metrics(text, stats, block_size)
        return ("\n".join(text.lines) + "\n").encode()


_metrics = Metrics()
configure = _metrics.configure
success = _metrics.success
failure = _metrics.failure
token_gap = _metrics.token_gap
response = _metrics.response
all_workers = _metrics.all_workers
render = _metrics.render


class _Text:
    """Prometheus' text format, written family by family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

    def gauge(self, name: str, help_: str, value: float) -> None:
        self.family(name, "gauge", help_)
        self.lines.append(f"{name} {float(value)!r}")

    def counter(self, name: str, help_: str, value: float) -> None:
        self.family(name, "counter", help_)
        self.lines.append(f"{name} {float(value)!r}")

    def histogram(self, name: str, help_: str, buckets: list[float], series: list) -> None:
        """One family; `series` is [(label text or "", (bucket counts, sum, count))]."""
        self.family(name, "histogram", help_)
        for label, (counts, total, n) in series:
            cumulative = 0
            sep = "," if label else ""
            for b, c in zip(buckets, counts, strict=True):
                cumulative += c
                self.lines.append(f'{name}_bucket{{{label}{sep}le="{b:.6g}"}} {cumulative}')
            self.lines.append(f'{name}_bucket{{{label}{sep}le="+Inf"}} {n}')
            labels = f"{{{label}}}" if label else ""
            self.lines.append(f"{name}_sum{labels} {total!r}")
            self.lines.append(f"{name}_count{labels} {n}")


def _engine_metrics(text: _Text, stats: SchedulerStats, block_size: int) -> None:
    """What the scheduler reports: queue, batch, steps, KV blocks, prefix cache."""
    used = stats.blocks_total - stats.blocks_free
    text.gauge("tgi_queue_size", "Requests waiting in the scheduler", stats.waiting)
    text.gauge("tgi_batch_current_size", "Requests running in the scheduler", stats.running)
    text.gauge(
        "tgi_batch_current_max_tokens", "KV tokens held by the running batch", used * block_size
    )
    text.gauge(
        "tgi_batch_max_total_tokens", "KV cache capacity in tokens", stats.blocks_total * block_size
    )
    sizes = list(range(1, 1025))  # TGI's buckets: 1..1024, step 1
    admitted = (
        [stats.admissions.get(n, 0) for n in sizes],
        float(sum(n * c for n, c in stats.admissions.items())),
        sum(stats.admissions.values()),
    )
    text.histogram(
        "tgi_batch_next_size",
        "Requests admitted by a step that admitted any",
        [float(n) for n in sizes],
        [("", admitted)],
    )
    _step_metrics(text, stats)
    text.gauge("tgi_mp_kv_blocks_free", "Free KV blocks (incl. unused cached)", stats.blocks_free)
    text.gauge("tgi_mp_kv_blocks_used", "KV blocks held by requests", used)
    text.gauge("tgi_mp_kv_blocks_total", "KV blocks", stats.blocks_total)
    text.counter("tgi_mp_preemptions", "Requests preempted since start", stats.preemptions)
    text.counter(
        "tgi_mp_spec_proposed_tokens",
        "Speculative decoding: proposed tokens verified since start",
        stats.spec_proposed_tokens,
    )
    text.counter(
        "tgi_mp_spec_accepted_tokens",
        "Speculative decoding: proposed tokens the model agreed with since start",
        stats.spec_accepted_tokens,
    )
    text.gauge(
        "tgi_mp_spec_acceptance_rate",
        "Accepted / proposed tokens since start (0 before any proposal)",
        stats.spec_accepted_tokens / stats.spec_proposed_tokens
        if stats.spec_proposed_tokens
        else 0.0,
    )
    text.counter(
        "tgi_mp_prefix_cache_admitted_tokens",
        "Tokens of requests admitted since start (again after a preemption)",
        stats.admitted_tokens,
    )
    text.counter(
        "tgi_mp_prefix_cache_hit_tokens",
        "Admitted tokens served from the prefix cache since start",
        stats.cache_hit_tokens,
    )
    text.gauge(
        "tgi_mp_prefix_cache_hit_rate",
        "hit tokens / admitted tokens since start",
        stats.cache_hit_tokens / max(stats.admitted_tokens, 1),
    )
    text.gauge(
        "tgi_mp_prefix_cache_blocks", "KV blocks holding a cached prefix", stats.cached_blocks
    )
    text.counter("tgi_mp_scheduler_steps", "Steps run since start", stats.steps)
    text.counter(
        "tgi_mp_scheduler_time_seconds",
        "Scheduler time (planning, cache, results) since start",
        stats.schedule_time,
    )
    text.counter(
        "tgi_mp_ipc_time_seconds",
        "Step time outside the executors' forward (plan broadcast, results) since start",
        max(stats.step_time - stats.forward_time, 0.0),
    )


def _step_metrics(text: _Text, stats: SchedulerStats) -> None:
    """Steps by method (prefill: any prompt work; decode): counts and durations."""
    methods = list(enumerate(("prefill", "decode")))
    for name, help_ in (
        ("tgi_batch_inference_count", "Forward passes, by method"),
        ("tgi_batch_inference_success", "Forward passes that succeeded, by method"),
    ):
        text.family(name, "counter", help_)
        for i, method in methods:
            text.lines.append(f'{name}{{method="{method}"}} {stats.forward_counts[i]}')
    for name, help_, buckets, sums in (
        (
            "tgi_batch_inference_duration",
            "One step as the scheduler sees it: plan sent to tokens back (s), by method",
            stats.step_buckets,
            stats.step_sums,
        ),
        (
            "tgi_batch_forward_duration",
            "Executor time of one step (s), by method",
            stats.forward_buckets,
            stats.forward_sums,
        ),
    ):
        series = [
            (f'method="{m}"', (buckets[i], sums[i], stats.forward_counts[i])) for i, m in methods
        ]
        text.histogram(name, help_, DURATION_BUCKETS, series)
    helps = {
        "idle": "Executor (rank 0) gap between steps: end of one step's compute to the "
        "start of the next (result sent, plan waited for and decoded), including time "
        "with nothing to do (s)",
        "plan_decode": "Executor (rank 0) time decoding a step plan (s)",
        "result_send": "Executor (rank 0) time sending a step's result (s)",
    }
    for name, timing in zip(EXECUTOR_TIMINGS, stats.executor_timings, strict=False):
        text.histogram(f"tgi_mp_executor_{name}_seconds", helps[name], GAP_BUCKETS, [("", timing)])
