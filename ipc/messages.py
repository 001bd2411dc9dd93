"""Every message that crosses a process boundary in tgi-mp.

Five channels, one tagged union each (see `ipc.channels` for the sockets):

* frontend -> scheduler: `AddRequest`, `AbortRequest`, `GetStats`
* scheduler -> frontend: `TokenBatch`, `Error`, `SchedulerStats`
* scheduler -> executors (one broadcast): `StepPlan`, `StepMask`, `Shutdown`
* executor -> scheduler: `StepResult`, `ExecutorReady`, `ExecutorFailed`
* supervisor -> frontends (one broadcast): `EngineDead`, `ShuttingDown`
* scheduler -> supervisor: `SchedulerReady` (or `EngineDead`, at start)

Per-step messages are columnar: one numpy array per field, carried as
zero-copy ZeroMQ frames by `ipc.codec`, never one Python object per request.
Fields are only ever appended, so an older reader keeps working.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec
import numpy as np


class FinishReason(IntEnum):
    """Why a sequence stopped; values are stable on the wire."""

    LENGTH = 1  # max_new_tokens reached
    EOS = 2  # an end-of-sequence token was sampled
    STOP_SEQUENCE = 3  # a stop token id from the request was sampled
    ABORTED = 4  # the client went away or asked to stop
    ERROR = 5  # the engine failed this request


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What the engine needs to pick tokens; text-level options stay in the frontend."""

    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    do_sample: bool = False
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    typical_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    top_n_tokens: int = 0  # alternatives reported per generated token
    repetition_penalty: float = 1.0  # HF semantics, over prompt + generated tokens; 1.0 = off
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens; 0.0 = off
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens; 0.0 = off
    watermark: bool = False  # green-list bias (Kirchenbauer et al.), gamma/delta from the engine
    prefill_logprobs: bool = False  # report the logprob of every prompt token after the first
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # An llguidance grammar (JSON), compiled and checked by the frontend: every sampled
    # token must continue it; EOS is allowed where it accepts, and the request ends
    # when it can take no more tokens.
    grammar: str | None = None
    # The LoRA adapter the request runs with: an index into `EngineConfig.lora_adapters`
    # (resolved by the frontend from `adapter_id` or the OpenAI `model`); -1: none.
    adapter: int = -1
    # Until this many tokens are generated, EOS (unless ignore_eos) and the stop token ids
    # cannot be sampled (vLLM's `min_tokens`).
    min_tokens: int = 0
    # With prefill_logprobs, -1: only each prompt token's logprob (TGI's prefill details);
    # k >= 0: also its rank and the k most likely tokens there (vLLM's `prompt_logprobs`).
    prompt_top_k: int = -1


# ---------------------------------------------------------------- frontend -> scheduler


class AddRequest(msgspec.Struct, tag=True, array_like=True, gc=False):
    req_id: int  # unique per frontend socket; replies are routed by socket identity
    prompt: np.ndarray  # int32 token ids
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag=True, array_like=True, gc=False):
    req_ids: list[int]


class GetStats(msgspec.Struct, tag=True, array_like=True, gc=False):
    pass


FrontendMessage = AddRequest | AbortRequest | GetStats


# ---------------------------------------------------------------- scheduler -> frontend


class TokenBatch(msgspec.Struct, tag=True, array_like=True, gc=False):
    """New tokens of one step for every request of one frontend.

    `req_ids[i]` produced `token_ids[i]`. `finished` lists (req_id, reason) for
    requests that ended this step; an aborted or failed request may appear
    there without a token.
    """

    req_ids: np.ndarray  # int64
    token_ids: np.ndarray  # int32
    logprobs: np.ndarray  # float32
    finished: list[tuple[int, int]] = []
    num_cached_tokens: list[tuple[int, int]] = []  # (req_id, prompt tokens served from cache)
    # Rows aligned with token_ids, [n, max top_n], when any request asked for alternatives.
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    # (req_id, float32 [prompt length]) with the request's first token, for requests that
    # asked for prefill logprobs; entry 0 is NaN (the first token has no context).
    prompt_logprobs: list[tuple[int, np.ndarray]] = []
    # For those with prompt_top_k >= 0: (req_id, ranks int32 [prompt length], top ids int32
    # and logprobs float32 [prompt length, k]); row 0 is unscored (rank 0).
    prompt_tops: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []


class Error(msgspec.Struct, tag=True, array_like=True, gc=False):
    """A request the scheduler refused or failed; `req_id` -1 means all of them."""

    req_id: int
    message: str
    kind: str = "validation"


# Upper bounds of the duration histograms (TGI's: 0.0001 x 1.5^k s, k = 1..35).
DURATION_BUCKETS = [0.0001 * 1.5**k for k in range(1, 36)]
# The executor's gaps between steps are tens of microseconds to milliseconds.
GAP_BUCKETS = [0.00001 * 1.5**k for k in range(0, 30)]
# The executor timings reported with every step (rank 0's), in this order.
EXECUTOR_TIMINGS = ("idle", "plan_decode", "result_send")


class SchedulerStats(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Cumulative counters since start; times in seconds."""

    steps: int
    preemptions: int
    prefill_tokens: int
    decode_tokens: int
    waiting: int
    running: int
    blocks_free: int
    blocks_total: int
    schedule_time: float  # planning + applying results + emitting tokens
    step_time: float  # plan sent -> result received, as the scheduler sees it
    forward_time: float  # the executor's own share of step_time
    busy_time: float  # wall time of loop iterations that ran a step
    admitted_tokens: int = 0  # tokens of requests admitted (again, after preemption)
    cache_hit_tokens: int = 0  # of those, served from the prefix cache
    cached_blocks: int = 0  # blocks holding a cached prefix (in use or evictable)
    comm_time: float = 0.0  # of forward_time, rank 0's tensor-parallel all-reduces
    # Per EXECUTOR_TIMINGS name: (GAP_BUCKETS counts, sum, count).
    executor_timings: list[tuple[list[int], float, int]] = []
    # Steps by method (0: with prefill work, 1: decode only): count, forward seconds,
    # and forward durations per DURATION_BUCKETS bucket.
    forward_counts: list[int] = msgspec.field(default_factory=lambda: [0, 0])
    forward_sums: list[float] = msgspec.field(default_factory=lambda: [0.0, 0.0])
    forward_buckets: list[list[int]] = []
    # The same for whole steps as the scheduler sees them (plan sent -> tokens back).
    step_sums: list[float] = msgspec.field(default_factory=lambda: [0.0, 0.0])
    step_buckets: list[list[int]] = []
    admissions: dict[int, int] = {}  # steps that admitted n new requests, by n
    grammar_time: float = 0.0  # filling grammar masks (while the executors run the forward)
    spec_proposed_tokens: int = 0  # speculative decoding: proposals verified
    spec_accepted_tokens: int = 0  # of which the target model agreed with


SchedulerToFrontend = TokenBatch | Error | SchedulerStats


# ---------------------------------------------------------------- scheduler -> executors


class BatchLayout(msgspec.Struct, array_like=True, gc=False):
    """Which tokens the forward computes, and where their KV lives.

    Sequence i contributes `query_lens[i]` new tokens (a prefill chunk, or 1
    for decode) on top of `context_lens[i]` tokens already in its KV blocks.
    `input_ids` is the concatenation of every sequence's new tokens. Block
    tables are flattened: sequence i owns `block_counts[i]` entries.
    """

    query_lens: np.ndarray  # int32 [B]
    context_lens: np.ndarray  # int32 [B]
    input_ids: np.ndarray  # int32 [sum(query_lens)]
    block_counts: np.ndarray  # int32 [B]
    block_tables: np.ndarray  # int32 [sum(block_counts)]
    # Overlapped scheduling: sequence i's last input token is the one the previous step
    # sampled at row `input_from[i]` of its sampled tokens (-1: `input_ids` has it). The
    # scheduler planned this step before that token came back; each executor fills it in
    # from its own copy of the previous step's tokens. None: no row refers back.
    input_from: np.ndarray | None = None  # int32 [B]


class SamplingColumns(msgspec.Struct, array_like=True, gc=False):
    """How each row picks its token. Only rows with `sample` set produce one (a
    non-final prefill chunk does not). `sample_index[i]` is how many tokens the
    sequence generated before: it keys the random stream, so a seeded request
    samples identically whatever batch it lands in."""

    sample: np.ndarray  # bool [B]
    temperature: np.ndarray  # float32 [B]; 0 means greedy
    top_k: np.ndarray  # int32 [B]; 0 = off
    top_p: np.ndarray  # float32 [B]; 1 = off
    typical_p: np.ndarray  # float32 [B]; 1 = off
    min_p: np.ndarray  # float32 [B]; 0 = off
    seeds: np.ndarray  # int64 [B]
    sample_index: np.ndarray  # int32 [B]
    top_n: np.ndarray  # int32 [B]: alternatives to report for the sampled token
    watermark: np.ndarray  # bool [B]: bias the row's logits to its green list


class PenaltyColumns(msgspec.Struct, array_like=True, gc=False):
    """Repetition, frequency and presence penalties need each sequence's token history,
    which executors keep per `seq_ids` (unique in the scheduler) from the tokens they
    compute. A sequence at context 0 starts a fresh history (so a preempted one,
    recomputed, rebuilds its own); one that starts on a prefix-cache hit gets the
    `history_counts[i]` tokens it did not compute; `released` ends histories."""

    seq_ids: np.ndarray  # int64 [B]
    prompt_lens: np.ndarray  # int32 [B]: tokens at positions >= this are generated
    repetition: np.ndarray  # float32 [B]; 1 = off
    frequency: np.ndarray  # float32 [B]; 0 = off
    presence: np.ndarray  # float32 [B]; 0 = off
    released: np.ndarray  # int64: seq ids that finished since the last plan
    history_counts: np.ndarray  # int32 [B]
    history_ids: np.ndarray  # int32 [sum(history_counts)]


class PromptLogprobColumns(msgspec.Struct, array_like=True, gc=False):
    """Row i's first `counts[i]` positions each score the next prompt token; `targets`
    holds those tokens, rows concatenated."""

    counts: np.ndarray  # int32 [B]
    targets: np.ndarray  # int32 [sum(counts)]
    # Row i's prompt_top_k (-1: logprobs only). With any > -1, every scored position also
    # reports its target's rank and the most likely tokens (as many as any row asks).
    top_k: np.ndarray | None = None  # int32 [B]


class LogitBiasColumns(msgspec.Struct, array_like=True, gc=False):
    """Sparse: row i adds `values` to the logits of `ids`, its next `counts[i]` entries
    (rows concatenated)."""

    counts: np.ndarray  # int32 [B]
    ids: np.ndarray  # int32 [sum(counts)]
    values: np.ndarray  # float32 [sum(counts)]


class GrammarColumns(msgspec.Struct, array_like=True, gc=False):
    """The sampled rows whose token a grammar constrains. Their masks follow the plan in
    a `StepMask` (on GPUs filled while the forward runs); executors read it before
    sampling."""

    rows: np.ndarray  # int32 [G]: plan row indices, in the order of the mask's rows


def _no_grammar() -> GrammarColumns:
    return GrammarColumns(np.empty(0, np.int32))


class LoraColumns(msgspec.Struct, array_like=True, gc=False):
    """Which LoRA adapter slot each row runs with, and the adapters to load into slots
    first (the scheduler assigns slots: a slot is reloaded only when no running request
    uses it; executor/lora.py)."""

    slots: np.ndarray  # int32 [B]: the row's slot, -1 for the base model
    load_slots: np.ndarray  # int32 [L]
    load_adapters: np.ndarray  # int32 [L]: an index into EngineConfig.lora_adapters


class StepPlan(msgspec.Struct, tag=True, array_like=True, gc=False):
    """One forward pass over a flattened batch, self-contained: every column is per
    sequence (or ragged per token, with its counts), grouped by who reads it."""

    step_id: int
    layout: BatchLayout
    sampling: SamplingColumns
    penalties: PenaltyColumns
    prompt_logprobs: PromptLogprobColumns
    bias: LogitBiasColumns
    grammar: GrammarColumns = msgspec.field(default_factory=_no_grammar)
    # Speculative decoding: row i's input ends with `speculative[i]` proposed tokens
    # after its last real one (n-gram lookup; with a draft model, placeholders the
    # executors fill with its proposals); its sampled tokens are the proposals the
    # target accepts, plus one of its own. None: no proposals.
    speculative: np.ndarray | None = None  # int32 [B]
    lora: LoraColumns | None = None  # None: no adapter configured


class StepMask(msgspec.Struct, tag=True, array_like=True, gc=False):
    """The allowed next tokens of a plan's `grammar.rows`, in that order: bit `t % 32`
    of word `t // 32` of a row is set when token t may be sampled."""

    step_id: int
    bitmask: np.ndarray  # int32 [len(grammar.rows), ceil(vocab / 32)]


class Shutdown(msgspec.Struct, tag=True, array_like=True, gc=False):
    reason: str = ""


SchedulerToExecutor = StepPlan | StepMask | Shutdown


# ---------------------------------------------------------------- executor -> scheduler


class ExecutorReady(msgspec.Struct, tag=True, array_like=True, gc=False):
    rank: int
    num_blocks: int  # KV blocks this executor allocated
    block_size: int
    attention_backend: str
    dtype: str
    device: str
    max_batch_prefill_tokens: int  # the step's token budget on this device


class StepResult(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Tokens sampled for the rows of the plan with `sample` set, in plan order."""

    step_id: int
    token_ids: np.ndarray  # int32
    forward_time: float  # seconds spent in input prep + forward + sampling
    logprobs: np.ndarray | None = None  # float32, of each sampled token
    # With any top_n in the plan: [sampled rows, max top_n] ids and logprobs.
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None  # float32 [sum(plan.prompt_logprobs)]
    comm_time: float = 0.0  # of forward_time, seconds in tensor-parallel all-reduces
    # With proposals in the plan: tokens per sampled row (1 + proposals accepted), and
    # `token_ids` (logprobs, top-n) hold them row after row. None: one per sampled row.
    token_counts: np.ndarray | None = None  # int32 [sampled rows]
    # Rank 0 between steps: the gap from the end of the previous step's compute to the
    # start of this one's (sending that result, waiting for this plan, decoding it), and
    # two of its parts: decoding this plan, sending the previous result.
    idle_time: float = 0.0
    plan_decode_time: float = 0.0
    result_send_time: float = 0.0
    # With plan.prompt_logprobs.top_k > -1: each scored position's target rank (int32
    # [sum(counts)]) and its top_k tokens (int32 ids, float32 logprobs [sum(counts), k]).
    prompt_ranks: np.ndarray | None = None
    prompt_top_ids: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None


class ExecutorFailed(msgspec.Struct, tag=True, array_like=True, gc=False):
    rank: int
    message: str


ExecutorToScheduler = ExecutorReady | StepResult | ExecutorFailed


# ---------------------------------------------------------------- supervisor -> frontends


class EngineDead(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Published by the supervisor when a child process dies; every pending request fails."""

    message: str


class ShuttingDown(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Published by the supervisor when a SIGTERM's grace period is over: every request
    still in flight is answered that the server is shutting down (503), at once."""

    message: str


SupervisorEvent = EngineDead | ShuttingDown


# ---------------------------------------------------------------- scheduler -> supervisor


class SchedulerReady(msgspec.Struct, tag=True, array_like=True, gc=False):
    """Sent by the scheduler to the supervisor once every executor is ready."""

    num_blocks: int
    block_size: int
    max_batch_total_tokens: int
    attention_backend: str
    dtype: str
    device: str
    max_batch_prefill_tokens: int  # the step's token budget, resolved for the device


SupervisorMessage = EngineDead | SchedulerReady
