"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Requests are mapped onto the same validation and engine path as TGI's
`/generate`; answers, chunks and errors are shaped as OpenAI's, where TGI
departs from them (see the README): `top_p: 1.0` is accepted, ids are unique,
`finish_reason` is `stop` or `length`, stop strings are left out of the text,
`n` is honoured and `logit_bias` is an object map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from tgi_mp.frontend import metrics
from tgi_mp.frontend.chat_template import ChatTemplate, TemplateError
from tgi_mp.frontend.engine_client import EngineError, RequestError
from tgi_mp.frontend.http import (
    SSE_HEADERS,
    HTTPError,
    decode_json,
    read_body,
    respond,
    until_disconnect,
)
from tgi_mp.frontend.openai_choice import (
    Choice,
    completion_logprobs,
    count_success,
    engine_error,
    interleaved_tokens,
    usage_of,
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
    Model,
    ModelList,
)
from tgi_mp.frontend.openai_requests import (
    as_openai,
    chat_prompt,
    check_n,
    completion_prompts,
    copies,
    invalid,
    openai_error,
    sampling_parameters,
    with_extras,
)
from tgi_mp.frontend.validation import (
    ValidationError,
    build,
    check_parameters,
)

if TYPE_CHECKING:
    from tgi_mp.frontend.app import App

_json = msgspec.json.Encoder()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

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

    async def _chat(self, scope: dict, body: bytes, receive: Any, send: Any, cors: list) -> None:
        t0 = time.perf_counter()
        req = decode_json(scope, body, ChatCompletionRequest)
        cfg = self.app.cfg
        try:
            check_n(req.n, req.n, cfg.max_best_of)  # a request never allowed is a 422, not a 429
        except ValidationError as e:
            raise invalid(e) from e
        self.app.permit(req.n)
        try:
            if req.top_logprobs and not req.logprobs:
                raise ValidationError("`top_logprobs` requires `logprobs` to be true")
            if (req.top_logprobs or 0) > cfg.max_top_n_tokens:
                raise ValidationError(
                    f"`top_logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. "
                    f"Given: {req.top_logprobs}"
                )
            ids = chat_prompt(req, self.template, self.app.tokenizer)
            p = sampling_parameters(
                req, req.max_completion_tokens or req.max_tokens, req.top_logprobs or 0
            )
            v = with_extras(req, build(ids, p, cfg, check_parameters(p, cfg)), cfg.vocab_size)
        except (ValidationError, TemplateError) as e:
            raise invalid(e) from e
        choices = [
            Choice(i, one, self.app.special_ids, want_logprobs=req.logprobs)
            for i, one in enumerate(copies(v, req.n, req.seed))
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
            usage=usage_of(choices, len(choices)),
        )
        count_success(scope, t0, choices)
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
        async for c, tok in interleaved_tokens(self.app, choices):
            visible = c.add(tok)
            logprobs = ChoiceLogprobs(c.logprobs[-1:]) if c.want_logprobs else None
            if visible or logprobs is not None:
                yield chunk([ChatChunkChoice(c.index, Delta(content=visible), logprobs, None)])
            if c.gen.finish_reason:
                yield chunk([ChatChunkChoice(c.index, Delta(), None, c.finish_reason)])
        if include_usage:
            yield chunk([], usage_of(choices, len(choices)))

    # ------------------------------------------------------------ completions

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
            check_n(req.n, best_of, cfg.max_best_of)
            if (req.logprobs or 0) > cfg.max_top_n_tokens:
                raise ValidationError(
                    f"`logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {req.logprobs}"
                )
            prompts = completion_prompts(req, cfg, self.app.tokenizer)
            self.app.permit(len(prompts) * best_of)
            max_tokens = (
                req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
            )
            p = sampling_parameters(req, max_tokens, req.logprobs or 0)
            sampling = check_parameters(p, cfg)
            valid = [
                with_extras(req, build(ids, p, cfg, sampling), cfg.vocab_size) for ids, _ in prompts
            ]
        except ValidationError as e:
            raise invalid(e) from e
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
            for j, one in enumerate(copies(v, best_of, req.seed))
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
                    logprobs = completion_logprobs(c, echo_logprobs)
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
            usage=usage_of(choices, best_of),
        )
        count_success(scope, t0, choices)
        await respond(send, 200, _json.encode(out), headers=cors)

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
        async for c, tok in interleaved_tokens(self.app, choices):
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
            yield chunk([], usage_of(choices, n))

    # ------------------------------------------------------------ running

    async def _run(self, receive: Any, choices: list[Choice]) -> bool:
        """Runs every choice to its end; False when the client left first (all aborted)."""

        async def consume() -> None:
            async for c, tok in interleaved_tokens(self.app, choices):
                c.add(tok)

        try:
            if not await until_disconnect(receive, consume()):
                metrics.failure("dropped")
                return False
        except (RequestError, EngineError) as e:
            raise engine_error(e) from e
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
                count_success(scope, t0, choices)
            except (RequestError, EngineError) as e:
                await body(b"data: " + as_openai(engine_error(e)).body + b"\n\n")
            except HTTPError as e:  # errors arrive as an event, then [DONE]
                await body(b"data: " + as_openai(e).body + b"\n\n")
            await body(b"data: [DONE]\n\n", more=False)

        if not await until_disconnect(receive, produce()):
            metrics.failure("dropped")
