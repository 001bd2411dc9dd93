"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Requests are mapped onto the same validation and engine path as TGI's
`/generate`; answers, chunks and errors are shaped as OpenAI's, where TGI
departs from them (see the README): `top_p: 1.0` is accepted, ids are unique,
`finish_reason` is `stop` or `length`, stop strings are left out of the text,
`n` is honoured and `logit_bias` is an object map.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from tgi_mp.frontend import metrics
from tgi_mp.frontend.chat_template import ChatTemplate, TemplateError
from tgi_mp.frontend.detokenizer import StopTrimmer
from tgi_mp.frontend.engine_client import EngineError, RequestError
from tgi_mp.frontend.generation import Generation, report_success
from tgi_mp.frontend.http import (
    SSE_HEADERS,
    HTTPError,
    decode_json,
    read_body,
    respond,
    until_disconnect,
)
from tgi_mp.frontend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorDetail,
    Model,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    TextPart,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tgi_mp.frontend.protocol import GenerateParameters, Token
from tgi_mp.frontend.validation import (
    ValidationError,
    ValidRequest,
    build,
    check_parameters,
    encode,
    with_fresh_seed,
)

if TYPE_CHECKING:
    from tgi_mp.frontend.app import App

_json = msgspec.json.Encoder()
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# ---------------------------------------------------------------- errors


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> HTTPError:
    detail = ErrorDetail(message, _ERROR_TYPES.get(status, "server_error"), param, code)
    return HTTPError(status, _json.encode(ErrorBody(detail)), b"application/json")


def _invalid(e: ValidationError | TemplateError) -> HTTPError:
    """A 422 naming the parameter that the message names first, counted as TGI counts it."""
    metrics.failure("validation" if isinstance(e, ValidationError) else "template_error")
    found = re.search(r"`(\w+)`", str(e))
    prefix = "Template error: " if isinstance(e, TemplateError) else ""
    return openai_error(422, prefix + str(e), found.group(1) if found else None)


def as_openai(e: HTTPError) -> HTTPError:
    """An error raised by the shared (TGI-shaped) path, reshaped for a /v1 client."""
    if e.body.startswith(b'{"error":{'):
        return e
    message, code = e.body.decode(errors="replace"), None
    if e.content_type == b"application/json":
        with contextlib.suppress(msgspec.DecodeError, KeyError, TypeError):
            body = msgspec.json.decode(e.body)
            message, code = body["error"], body.get("error_type")
    if not message and e.status == 401:
        message = "Invalid or missing API key"
    elif not message and e.status == 404:
        message = "Not found"
    return openai_error(e.status, message, code=code)


# ---------------------------------------------------------------- requests -> engine


def _sampling(r: SamplingFields, max_tokens: int | None, top_n: int) -> GenerateParameters:
    """OpenAI's fields as TGI parameters (checked by TGI's rules), following OpenAI where
    TGI differs: temperature 0 is greedy, top_p 1.0 means off, stop may be one string."""
    if r.temperature is not None and r.temperature < 0:
        raise ValidationError("`temperature` must be >= 0.0")
    if r.top_p is not None and not 0.0 < r.top_p <= 1.0:
        raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
    greedy = r.temperature == 0.0
    return GenerateParameters(
        temperature=None if greedy else r.temperature,
        do_sample=not greedy,
        top_p=None if r.top_p in (None, 1.0) else r.top_p,
        top_k=None if r.top_k in (None, 0, -1) else r.top_k,  # vLLM's -1: off
        repetition_penalty=r.repetition_penalty,
        frequency_penalty=r.frequency_penalty,
        max_new_tokens=max_tokens,
        stop=[r.stop] if isinstance(r.stop, str) else list(r.stop or []),
        seed=None if r.seed is None else r.seed % (1 << 64),
        top_n_tokens=top_n,
        details=True,
    )


def _extras(r: SamplingFields, v: ValidRequest) -> ValidRequest:
    """The knobs TGI's API lacks, checked and set on the engine parameters."""
    if r.presence_penalty is not None and not -2.0 <= r.presence_penalty <= 2.0:
        raise ValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    if r.min_p is not None and not 0.0 <= r.min_p <= 1.0:
        raise ValidationError("`min_p` must be >= 0.0 and <= 1.0")
    bias: list[tuple[int, float]] = []
    for key, value in (r.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise ValidationError(f"`logit_bias` keys must be token ids. Given: {key!r}")
        if not -100.0 <= value <= 100.0:
            raise ValidationError(f"`logit_bias` values must be >= -100 and <= 100. Given: {value}")
        bias.append((int(key), float(value)))
    params = msgspec.structs.replace(
        v.params,
        presence_penalty=r.presence_penalty or 0.0,
        min_p=r.min_p or 0.0,
        logit_bias=tuple(bias),
    )
    return dataclasses.replace(v, params=params)


def _check_n(n: int, best_of: int, cfg_max: int) -> None:
    if best_of > cfg_max:
        name = "best_of" if best_of > n else "n"
        raise ValidationError(f"`{name}` must be >= 1 and <= {cfg_max}. Given: {best_of}")


def _check_ids(ids: list[int], vocab: int) -> None:
    if vocab and any(not 0 <= i < vocab for i in ids):
        raise ValidationError(f"`prompt` token ids must be >= 0 and < {vocab}")


def _copies(v: ValidRequest, count: int, seed: int | None) -> list[ValidRequest]:
    """`count` sequences of one prompt: seeded ones get seed, seed + 1, ... (reproducible),
    others their own random seeds; greedy ones are the same request again."""
    if v.seed is None:
        return [v] * count
    if seed is None:
        return [v, *(with_fresh_seed(v) for _ in range(count - 1))]
    return [with_fresh_seed(v, seed + j) for j in range(count)]


# ---------------------------------------------------------------- one choice


@dataclass
class Choice:
    """One sequence of an answer: its request, what it produced, what its client sees."""

    index: int
    v: ValidRequest
    special_ids: set[int]
    gen: Generation = field(default_factory=Generation)
    trimmer: StopTrimmer = field(init=False)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    want_logprobs: bool = False
    prompt_len: int = 0
    valid_at: float = field(default_factory=time.perf_counter)  # made right after validation

    def __post_init__(self) -> None:
        self.trimmer = StopTrimmer(self.v.stop)
        self.prompt_len = len(self.v.prompt_ids)

    def add(self, tok: Token) -> str:
        """The new visible text for this token (special tokens show nothing)."""
        piece = "" if tok.special else tok.text
        visible = self.trimmer.push(piece)
        if self.gen.finish_reason:
            visible += self.trimmer.flush()
        self.text.append(visible)
        if self.v.params.top_n_tokens or self.want_logprobs:
            top = self.gen.top_tokens[-1] if self.gen.top_tokens else []
            self.logprobs.append(
                TokenLogprob(
                    tok.text,
                    _finite(tok.logprob),
                    list(tok.text.encode()),
                    [TopLogprob(t.text, _finite(t.logprob), list(t.text.encode())) for t in top],
                )
            )
        return visible

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.gen.finish_reason, "length")

    def mean_logprob(self) -> float:
        return self.gen.mean_logprob()


def _finite(x: float | None) -> float:
    return -9999.0 if x is None or x != x else x


async def _tokens(app: App, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Token]]:
    """The tokens of every choice, interleaved as they come. An error in one cancels
    (so aborts) the others and propagates; so does leaving the loop early."""
    queue: asyncio.Queue[tuple[Choice, Token | BaseException | None]] = asyncio.Queue()

    async def feed(c: Choice) -> None:
        try:
            async for tok in app.tokens(c.v, c.gen):
                queue.put_nowait((c, tok))
            queue.put_nowait((c, None))
        except Exception as e:
            queue.put_nowait((c, e))

    tasks = [asyncio.ensure_future(feed(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            c, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _engine_error(e: Exception) -> HTTPError:
    if isinstance(e, RequestError):
        metrics.failure("validation")
        return openai_error(422, str(e))
    metrics.failure("generation")
    return openai_error(424, f"Request failed during generation: {e}")


# ---------------------------------------------------------------- the routes


class OpenAIRoutes:
    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.cfg
        self.model = cfg.served_model_name or cfg.model_id
        self.fingerprint = f"tgi-mp-{cfg.version}-{cfg.dtype}"
        self.created = int(time.time())
        self.template = ChatTemplate.load(cfg.tokenizer_dir)

    async def handle(self, scope: dict, receive: Any, send: Any, cors: list) -> None:
        try:
            await self._route(scope, receive, send, cors)
        except HTTPError as e:
            e = as_openai(e)
            await respond(send, e.status, e.body, e.content_type, cors)

    async def _route(self, scope: dict, receive: Any, send: Any, cors: list) -> None:
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/v1/models":
            models = ModelList("list", [Model(self.model, "model", self.created, "tgi-mp")])
            await respond(send, 200, _json.encode(models), headers=cors)
            return
        if method == "GET" and path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name != self.model:
                raise openai_error(
                    404, f"The model `{name}` does not exist.", "model", "model_not_found"
                )
            model = Model(self.model, "model", self.created, "tgi-mp")
            await respond(send, 200, _json.encode(model), headers=cors)
            return
        routes: dict[str, Callable] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
        }
        if path not in routes:
            raise openai_error(404, f"Unknown route {method} {path}")
        if method != "POST":
            raise openai_error(405, f"Method {method} is not allowed on {path}")
        if not self.app.authorized(scope):
            raise openai_error(401, "Invalid or missing API key")
        body = await read_body(scope, receive, self.app.cfg.payload_limit)
        await routes[path](scope, body, receive, send, cors)

    # ------------------------------------------------------------ chat

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise ValidationError("`messages` must not be empty")
        messages = []
        for m in req.messages:
            if m.role not in CHAT_ROLES:
                raise ValidationError(
                    f"`messages` has an unknown role {m.role!r} (expected one of "
                    f"{', '.join(sorted(CHAT_ROLES))})"
                )
            content = m.content
            if isinstance(content, list):
                if any(not isinstance(part, TextPart) for part in content):
                    raise ValidationError("`messages` has image content; this model reads text")
                content = "".join(part.text for part in content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        if req.tools and req.tool_choice != "none":
            raise ValidationError("`tools` are not supported by this server yet")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise ValidationError("`response_format` other than text is not supported yet")
        text = self.template.render(messages)  # the template places BOS itself
        return encode(self.app.tokenizer, text, add_special_tokens=False)

    async def _chat(self, scope: dict, body: bytes, receive: Any, send: Any, cors: list) -> None:
        t0 = time.perf_counter()
        req = decode_json(scope, body, ChatCompletionRequest)
        cfg = self.app.cfg
        self.app.permit(req.n)
        try:
            _check_n(req.n, req.n, cfg.max_best_of)
            if req.top_logprobs and not req.logprobs:
                raise ValidationError("`top_logprobs` requires `logprobs` to be true")
            if (req.top_logprobs or 0) > cfg.max_top_n_tokens:
                raise ValidationError(
                    f"`top_logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. "
                    f"Given: {req.top_logprobs}"
                )
            ids = self._chat_prompt(req)
            p = _sampling(req, req.max_completion_tokens or req.max_tokens, req.top_logprobs or 0)
            v = _extras(req, build(ids, p, cfg, check_parameters(p, cfg)))
        except (ValidationError, TemplateError) as e:
            raise _invalid(e) from e
        choices = [
            Choice(i, one, self.app.special_ids, want_logprobs=req.logprobs)
            for i, one in enumerate(_copies(v, req.n, req.seed))
        ]
        answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            await self._stream(
                scope,
                receive,
                send,
                cors,
                t0,
                choices,
                self._chat_events(answer_id, choices, include_usage),
            )
            return
        if not await self._run(receive, choices):
            return
        out = ChatCompletion(
            id=answer_id,
            object="chat.completion",
            created=int(time.time()),
            model=self.model,
            system_fingerprint=self.fingerprint,
            choices=[
                ChatChoice(
                    c.index,
                    AssistantMessage("assistant", "".join(c.text)),
                    ChoiceLogprobs(c.logprobs) if req.logprobs else None,
                    c.finish_reason,
                )
                for c in choices
            ],
            usage=_usage(choices, len(choices)),
        )
        _count(scope, t0, choices)
        await respond(send, 200, _json.encode(out), headers=cors)

    async def _chat_events(
        self, answer_id: str, choices: list[Choice], include_usage: bool
    ) -> AsyncIterator[Any]:
        created = int(time.time())

        def chunk(parts: list[ChatChunkChoice], usage: Any = msgspec.UNSET) -> ChatCompletionChunk:
            if include_usage and usage is msgspec.UNSET:
                usage = None  # every chunk says `usage: null` until the last one
            return ChatCompletionChunk(
                answer_id,
                "chat.completion.chunk",
                created,
                self.model,
                self.fingerprint,
                parts,
                usage,
            )

        for c in choices:  # the role comes once per choice, first
            yield chunk([ChatChunkChoice(c.index, Delta("assistant", ""), None, None)])
        async for c, tok in _tokens(self.app, choices):
            visible = c.add(tok)
            logprobs = ChoiceLogprobs(c.logprobs[-1:]) if c.want_logprobs else None
            if visible or logprobs is not None:
                yield chunk([ChatChunkChoice(c.index, Delta(content=visible), logprobs, None)])
            if c.gen.finish_reason:
                yield chunk([ChatChunkChoice(c.index, Delta(), None, c.finish_reason)])
        if include_usage:
            yield chunk([], _usage(choices, len(choices)))

    # ------------------------------------------------------------ completions

    def _prompts(self, req: CompletionRequest) -> list[tuple[list[int], str]]:
        """Each prompt's token ids and text (ids given as a prompt are decoded)."""
        prompt, cfg = req.prompt, self.app.cfg
        if isinstance(prompt, str):
            prompts: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            prompts = [prompt]  # one prompt of token ids
        elif all(isinstance(x, str) for x in prompt) or all(isinstance(x, list) for x in prompt):
            prompts = list(prompt)
        else:
            raise ValidationError(
                "`prompt` must be a string, a list of strings, a list of token ids, or a "
                "list of lists of token ids"
            )
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ValidationError("`prompt` must not be empty")
        if len(prompts) > cfg.max_client_batch_size:
            raise ValidationError(
                "Number of prompts exceeds the maximum allowed batch size of "
                f"{cfg.max_client_batch_size}"
            )
        out = []
        for x in prompts:
            if isinstance(x, str):
                out.append((encode(self.app.tokenizer, x, add_special_tokens=True), x))
            else:
                _check_ids(x, cfg.vocab_size)
                out.append((list(x), self.app.tokenizer.decode(x, skip_special_tokens=False)))
        return out

    async def _completions(
        self, scope: dict, body: bytes, receive: Any, send: Any, cors: list
    ) -> None:
        t0 = time.perf_counter()
        req = decode_json(scope, body, CompletionRequest)
        cfg = self.app.cfg
        best_of = req.best_of or req.n
        try:
            if req.suffix is not None:
                raise ValidationError("`suffix` is not supported by this server")
            if best_of < req.n:
                raise ValidationError(f"`best_of` must be >= `n`. Given: {best_of} < {req.n}")
            if req.stream and best_of > req.n:
                raise ValidationError("`best_of` must equal `n` when streaming")
            _check_n(req.n, best_of, cfg.max_best_of)
            if (req.logprobs or 0) > cfg.max_top_n_tokens:
                raise ValidationError(
                    f"`logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {req.logprobs}"
                )
            prompts = self._prompts(req)
            self.app.permit(len(prompts) * best_of)
            max_tokens = (
                req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
            )
            p = _sampling(req, max_tokens, req.logprobs or 0)
            sampling = check_parameters(p, cfg)
            valid = [_extras(req, build(ids, p, cfg, sampling)) for ids, _ in prompts]
        except ValidationError as e:
            raise _invalid(e) from e
        echo_logprobs = req.echo and req.logprobs is not None
        if echo_logprobs:  # echo with logprobs scores the prompt too
            valid = [
                dataclasses.replace(
                    v, params=msgspec.structs.replace(v.params, prefill_logprobs=True)
                )
                for v in valid
            ]
        # Sequence j of prompt i is choice i * n + j (OpenAI's numbering); with best_of > n
        # the n best of each prompt's best_of sequences are kept.
        choices = [
            Choice(
                i * best_of + j, one, self.app.special_ids, want_logprobs=req.logprobs is not None
            )
            for i, v in enumerate(valid)
            for j, one in enumerate(_copies(v, best_of, req.seed))
        ]
        answer_id = f"cmpl-{uuid.uuid4().hex}"
        texts = [text for _, text in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._completion_events(answer_id, choices, include_usage, texts, req.echo)
            await self._stream(scope, receive, send, cors, t0, choices, events)
            return
        if not await self._run(receive, choices):
            return
        kept: list[CompletionChoice] = []
        for i in range(len(valid)):
            group = choices[i * best_of : (i + 1) * best_of]
            best = sorted(group, key=lambda c: c.mean_logprob(), reverse=True)[: req.n]
            for j, c in enumerate(sorted(best, key=lambda c: c.index)):
                text = "".join(c.text)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(c, echo_logprobs)
                if req.echo:
                    text = texts[i] + text
                kept.append(CompletionChoice(i * req.n + j, text, logprobs, c.finish_reason))
        out = Completion(
            id=answer_id,
            object="text_completion",
            created=int(time.time()),
            model=self.model,
            system_fingerprint=self.fingerprint,
            choices=kept,
            usage=_usage(choices, best_of),
        )
        _count(scope, t0, choices)
        await respond(send, 200, _json.encode(out), headers=cors)

    def _completion_logprobs(self, c: Choice, echo: bool) -> CompletionLogprobs:
        tokens, lps, tops = [], [], []
        if echo:
            for t in c.gen.prefill:
                tokens.append(t.text)
                lps.append(t.logprob)
                tops.append(None)
        for entry in c.logprobs:
            tokens.append(entry.token)
            lps.append(entry.logprob)
            tops.append({t.token: t.logprob for t in entry.top_logprobs})
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return CompletionLogprobs(tokens, lps, tops, offsets)

    async def _completion_events(
        self,
        answer_id: str,
        choices: list[Choice],
        include_usage: bool,
        prompt_texts: list[str],
        echo: bool,
    ) -> AsyncIterator[Any]:
        created = int(time.time())
        n = len(choices) // len(prompt_texts)

        def chunk(parts: list[CompletionChoice], usage: Any = msgspec.UNSET) -> Completion:
            if include_usage and usage is msgspec.UNSET:
                usage = None
            return Completion(
                answer_id, "text_completion", created, self.model, self.fingerprint, parts, usage
            )

        if echo:
            for c in choices:
                yield chunk([CompletionChoice(c.index, prompt_texts[c.index // n], None, None)])
        async for c, tok in _tokens(self.app, choices):
            visible = c.add(tok)
            logprobs = None
            if c.want_logprobs:
                e = c.logprobs[-1]
                top = {t.token: t.logprob for t in e.top_logprobs}
                logprobs = CompletionLogprobs([e.token], [e.logprob], [top], [0])
            if visible or logprobs is not None:
                yield chunk([CompletionChoice(c.index, visible, logprobs, None)])
            if c.gen.finish_reason:
                yield chunk([CompletionChoice(c.index, "", None, c.finish_reason)])
        if include_usage:
            yield chunk([], _usage(choices, n))

    # ------------------------------------------------------------ running

    async def _run(self, receive: Any, choices: list[Choice]) -> bool:
        """Runs every choice to its end; False when the client left first (all aborted)."""

        async def consume() -> None:
            async for c, tok in _tokens(self.app, choices):
                c.add(tok)

        try:
            if not await until_disconnect(receive, consume()):
                metrics.failure("dropped")
                return False
        except (RequestError, EngineError) as e:
            raise _engine_error(e) from e
        if not all(c.gen.finish_reason for c in choices):
            metrics.failure("incomplete_generation")
            raise openai_error(500, "Incomplete generation")
        return True

    async def _stream(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        cors: list,
        t0: float,
        choices: list[Choice],
        events: AsyncIterator[Any],
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + cors})

        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        async def produce() -> None:
            try:
                async with contextlib.aclosing(events) as it:
                    async for event in it:
                        await body(b"data: " + _json.encode(event) + b"\n\n")
                if not all(c.gen.finish_reason for c in choices):
                    metrics.failure("incomplete_generation")
                    raise openai_error(500, "Incomplete generation stream")
                _count(scope, t0, choices)
            except (RequestError, EngineError) as e:
                await body(b"data: " + as_openai(_engine_error(e)).body + b"\n\n")
            except HTTPError as e:  # errors arrive as an event, then [DONE]
                await body(b"data: " + as_openai(e).body + b"\n\n")
            await body(b"data: [DONE]\n\n", more=False)

        if not await until_disconnect(receive, produce()):
            metrics.failure("dropped")


def _usage(choices: list[Choice], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (its choices share it), completion tokens of every
    sequence generated."""
    prompt = sum(c.prompt_len for c in choices[::per_prompt])
    cached = sum(c.gen.cached_tokens for c in choices[::per_prompt])
    completion = sum(len(c.gen.tokens) for c in choices)
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def _count(scope: dict, t0: float, choices: list[Choice]) -> None:
    first = choices[0]
    report_success(
        scope,
        t0,
        first.valid_at,
        min(c.gen.queue_time for c in choices),
        first.prompt_len,
        sum(len(c.gen.tokens) for c in choices),
        first.v.params.max_new_tokens,
    )
