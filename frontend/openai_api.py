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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from tokenizers import Tokenizer

from tgi_mp.frontend import errors, tools
from tgi_mp.frontend.chat_template import ChatTemplate
from tgi_mp.frontend.generation import check_complete, count_success, fan_out
from tgi_mp.frontend.http import (
    Headers,
    Receive,
    Scope,
    Send,
    decode_json,
    read_body,
    respond_json,
    stream_sse,
    until_disconnect,
)
from tgi_mp.frontend.openai_choice import (
    Choice,
    completion_logprobs,
    prompt_logprobs,
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
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    FunctionDelta,
    Model,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    ToolCallDelta,
)
from tgi_mp.frontend.openai_requests import (
    chat_prompt,
    chat_text,
    chat_tools,
    check_n,
    completion_prompts,
    copies,
    sampling_parameters,
    with_extras,
)
from tgi_mp.frontend.validation import build, check_parameters, encode

if TYPE_CHECKING:
    from tgi_mp.frontend.app import App

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DONE = b"[DONE]"  # the last event of every OpenAI stream


class OpenAIRoutes:
    def __init__(self, app: App) -> None:
        self.app = app
        cfg = app.cfg
        self.model = cfg.served_model_name or cfg.model_id
        self.fingerprint = f"tgi-mp-{cfg.version}-{cfg.dtype}"
        self.created = int(time.time())
        self.template = ChatTemplate.load(cfg.tokenizer_dir)
        self.routes = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/tokenize": self._tokenize,
            "/v1/detokenize": self._detokenize,
        }
        # The base model, then each LoRA adapter as a model of its own (as vLLM lists them).
        self.models = {self.model: Model(self.model, "model", self.created, "tgi-mp")}
        for name in cfg.lora_adapters:
            self.models[name] = Model(name, "model", self.created, "tgi-mp", self.model)

    def chat_text(self, req: ChatCompletionRequest) -> str:
        """A chat request's prompt text (TGI's `/chat_tokenize`), tools included."""
        return chat_text(req, self.template, chat_tools(req, self.app.cfg))

    def _model_of(self, choices: list[Choice]) -> str:
        """The `model` of an answer: the adapter it ran with, else the served model."""
        adapter = choices[0].v.params.adapter
        return self.app.cfg.lora_adapters[adapter] if adapter >= 0 else self.model

    async def handle(self, scope: Scope, receive: Receive, send: Send, cors: Headers) -> None:
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/v1/models":
            await respond_json(send, ModelList("list", list(self.models.values())), cors)
            return
        if method == "GET" and path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if name not in self.models:
                raise errors.model_not_found(name)
            await respond_json(send, self.models[name], cors)
            return
        if path not in self.routes:
            raise errors.not_found(method, path)
        if method != "POST":
            raise errors.method_not_allowed(method, path, "POST")
        self.app.check_key(scope)
        body = await read_body(scope, receive, self.app.cfg.payload_limit)
        await self.post(scope, path, body, receive, send, cors)

    async def post(
        self, scope: Scope, path: str, body: bytes, receive: Receive, send: Send, cors: Headers
    ) -> None:
        await self.routes[path](scope, body, receive, send, cors)

    # ------------------------------------------------------------ vLLM's tokenizer routes

    async def _tokenize(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, cors: Headers
    ) -> None:
        """vLLM's `/tokenize` (here `/v1/tokenize`: TGI owns `/tokenize`): a prompt, or
        chat messages through the template, to token ids."""
        req = decode_json(scope, body, TokenizeRequest)
        if req.messages is not None:
            chat = ChatCompletionRequest(
                messages=req.messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                chat_template_kwargs=req.chat_template_kwargs,
            )
            ids = await self.app.off_loop(chat_prompt, chat, self.template, self.app.tokenizer)
        elif req.prompt is not None:
            ids = await self.app.off_loop(
                encode, self.app.tokenizer, req.prompt, req.add_special_tokens
            )
        else:
            raise errors.invalid("`prompt` or `messages` is required", "prompt")
        out = TokenizeResponse(len(ids), self.app.cfg.max_total_tokens, ids)
        await respond_json(send, out, cors)

    async def _detokenize(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, cors: Headers
    ) -> None:
        req = decode_json(scope, body, DetokenizeRequest)
        vocab = self.app.cfg.vocab_size
        if vocab and any(not 0 <= i < vocab for i in req.tokens):
            raise errors.invalid(f"`tokens` must be >= 0 and < {vocab}", "tokens")
        text = self.app.tokenizer.decode(req.tokens, skip_special_tokens=False)
        await respond_json(send, DetokenizeResponse(text), cors)

    # ------------------------------------------------------------ chat

    async def _chat(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, cors: Headers
    ) -> None:
        t0 = time.perf_counter()
        req = decode_json(scope, body, ChatCompletionRequest)
        choices, callable_tools = await self.app.validated(self._chat_choices, req)
        self.app.permit(len(choices))
        t_valid = time.perf_counter()
        answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._chat_events(answer_id, choices, usage, callable_tools)
            await stream_sse(
                receive, send, cors, "openai", _counted(scope, t0, t_valid, choices, events), DONE
            )
            return
        if not await self._run(receive, choices):
            return
        out = ChatCompletion(
            id=answer_id,
            object="chat.completion",
            created=int(time.time()),
            model=self._model_of(choices),
            system_fingerprint=self.fingerprint,
            choices=[
                ChatChoice(
                    c.index,
                    message,
                    ChoiceLogprobs(c.logprobs) if req.logprobs else None,
                    finish_reason,
                )
                for c in choices
                for message, finish_reason in [_message(c, callable_tools)]
            ],
            usage=usage_of(choices, len(choices)),
        )
        if req.prompt_logprobs is not None:  # one prompt: every choice scored it alike
            out.prompt_logprobs = prompt_logprobs(choices[0], self.app.tokenizer)
        count_success(scope, t0, t_valid, _runs(choices))
        await respond_json(send, out, cors)

    def _chat_choices(self, req: ChatCompletionRequest) -> tuple[list[Choice], tools.Tools | None]:
        """The checked request as its `n` sequences (run in a validation thread; the
        caller then takes their permits: a request never allowed is a 422, not a 429
        that clients retry)."""
        cfg = self.app.cfg
        check_n(req.n, req.n, cfg.max_best_of)
        if req.top_logprobs and not req.logprobs:
            raise errors.invalid("`top_logprobs` requires `logprobs` to be true", "top_logprobs")
        if (req.top_logprobs or 0) > cfg.max_top_n_tokens:
            raise errors.invalid(
                f"`top_logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. "
                f"Given: {req.top_logprobs}",
                "top_logprobs",
            )
        callable_tools = chat_tools(req, cfg)
        ids = chat_prompt(req, self.template, self.app.tokenizer, callable_tools)
        max_tokens = req.max_completion_tokens or req.max_tokens
        p = sampling_parameters(req, max_tokens, req.top_logprobs or 0)
        v = with_extras(req, build(ids, p, cfg, check_parameters(p, cfg)), cfg)
        if callable_tools is not None:
            params = msgspec.structs.replace(v.params, grammar=callable_tools.grammar)
            v = dataclasses.replace(v, params=params)
        # vLLM's `echo`: the answer starts with the final message it continues.
        last = req.messages[-1]
        echo = _text(last.content) if req.echo and last.role == "assistant" else ""
        choices = [
            Choice(i, one, self.app.special_ids, want_logprobs=req.logprobs, echo=echo)
            for i, one in enumerate(copies(v, req.n, req.seed))
        ]
        return choices, callable_tools

    async def _chat_events(
        self,
        answer_id: str,
        choices: list[Choice],
        include_usage: bool,
        callable_tools: tools.Tools | None = None,
    ) -> AsyncIterator[ChatCompletionChunk]:
        created, model = int(time.time()), self._model_of(choices)

        def chunk(parts: list[ChatChunkChoice], usage: Any = msgspec.UNSET) -> ChatCompletionChunk:
            if include_usage and usage is msgspec.UNSET:
                usage = None  # every chunk says `usage: null` until the last one
            return ChatCompletionChunk(
                answer_id,
                "chat.completion.chunk",
                created,
                model,
                self.fingerprint,
                parts,
                usage,
            )

        calls = [tools.CallStream(callable_tools.auto) for _ in choices] if callable_tools else []
        for c in choices:  # the role comes once per choice, first
            yield chunk([ChatChunkChoice(c.index, Delta("assistant", c.echo), None, None)])
        async for i, tok in fan_out(self.app.tokens, _runs(choices)):
            c = choices[i]
            visible = c.add(tok)
            logprobs = ChoiceLogprobs(c.logprobs[-1:]) if c.want_logprobs else None
            delta = Delta(content=visible) if not calls else _call_delta(calls[i].feed(visible))
            if c.gen.finish_reason and calls:
                delta = _merge(delta, _call_delta(calls[i].end()))
            if delta != Delta() or logprobs is not None:
                yield chunk([ChatChunkChoice(c.index, delta, logprobs, None)])
            if c.gen.finish_reason:
                reason = c.finish_reason
                if calls and calls[i].mode == "arguments" and reason == "stop":
                    reason = "tool_calls"
                yield chunk([ChatChunkChoice(c.index, Delta(), None, reason)])
        if include_usage:
            yield chunk([], usage_of(choices, len(choices)))

    # ------------------------------------------------------------ completions

    async def _completions(
        self, scope: Scope, body: bytes, receive: Receive, send: Send, cors: Headers
    ) -> None:
        t0 = time.perf_counter()
        req = decode_json(scope, body, CompletionRequest)
        choices, texts = await self.app.validated(self._completion_choices, req)
        self.app.permit(len(choices))
        t_valid = time.perf_counter()
        answer_id = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._completion_events(answer_id, choices, usage, texts, req.echo)
            await stream_sse(
                receive, send, cors, "openai", _counted(scope, t0, t_valid, choices, events), DONE
            )
            return
        if not await self._run(receive, choices):
            return
        best_of = len(choices) // len(texts)
        out = Completion(
            id=answer_id,
            object="text_completion",
            created=int(time.time()),
            model=self._model_of(choices),
            system_fingerprint=self.fingerprint,
            choices=_best_completions(req, choices, texts, self.app.tokenizer),
            usage=usage_of(choices, best_of),
        )
        count_success(scope, t0, t_valid, _runs(choices))
        await respond_json(send, out, cors)

    def _completion_choices(self, req: CompletionRequest) -> tuple[list[Choice], list[str]]:
        """The checked request as its sequences (`best_of` per prompt), and the prompts'
        texts. Sequence j of prompt i is choice i * best_of + j."""
        cfg = self.app.cfg
        best_of = req.best_of or req.n
        if req.suffix is not None:
            raise errors.invalid("`suffix` is not supported by this server", "suffix")
        if best_of < req.n:
            raise errors.invalid(f"`best_of` must be >= `n`. Given: {best_of} < {req.n}", "best_of")
        if req.stream and best_of > req.n:
            raise errors.invalid("`best_of` must equal `n` when streaming", "best_of")
        check_n(req.n, best_of, cfg.max_best_of)
        if (req.logprobs or 0) > cfg.max_top_n_tokens:
            raise errors.invalid(
                f"`logprobs` must be >= 0 and <= {cfg.max_top_n_tokens}. Given: {req.logprobs}",
                "logprobs",
            )
        prompts = completion_prompts(req, cfg, self.app.tokenizer)
        max_tokens = (
            req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        p = sampling_parameters(req, max_tokens, req.logprobs or 0)
        sampling = check_parameters(p, cfg)
        valid = [with_extras(req, build(ids, p, cfg, sampling), cfg) for ids, _ in prompts]
        if req.echo and req.logprobs is not None:  # echo with logprobs scores the prompt too
            valid = [
                dataclasses.replace(
                    v, params=msgspec.structs.replace(v.params, prefill_logprobs=True)
                )
                for v in valid
            ]
        want_logprobs = req.logprobs is not None
        choices = [
            Choice(i * best_of + j, one, self.app.special_ids, want_logprobs=want_logprobs)
            for i, v in enumerate(valid)
            for j, one in enumerate(copies(v, best_of, req.seed))
        ]
        return choices, [text for _, text in prompts]

    async def _completion_events(
        self,
        answer_id: str,
        choices: list[Choice],
        include_usage: bool,
        prompt_texts: list[str],
        echo: bool,
    ) -> AsyncIterator[Completion]:
        created, model = int(time.time()), self._model_of(choices)
        n = len(choices) // len(prompt_texts)

        def chunk(parts: list[CompletionChoice], usage: Any = msgspec.UNSET) -> Completion:
            if include_usage and usage is msgspec.UNSET:
                usage = None
            return Completion(
                answer_id, "text_completion", created, model, self.fingerprint, parts, usage
            )

        if echo:
            for c in choices:
                yield chunk([CompletionChoice(c.index, prompt_texts[c.index // n], None, None)])
        async for i, tok in fan_out(self.app.tokens, _runs(choices)):
            c = choices[i]
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

    async def _run(self, receive: Receive, choices: list[Choice]) -> bool:
        """Runs every choice to its end; False when the client left first (all aborted)."""

        async def consume() -> None:
            async for i, tok in fan_out(self.app.tokens, _runs(choices)):
                choices[i].add(tok)

        if not await until_disconnect(receive, consume()):
            return False
        check_complete(_runs(choices), stream=False)
        return True


def _runs(choices: list[Choice]) -> list[tuple[Any, Any]]:
    return [(c.v, c.gen) for c in choices]


async def _counted(
    scope: Scope, t0: float, t_valid: float, choices: list[Choice], events: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    """A stream's events; once they are all out, the request is complete and counted."""
    async with contextlib.aclosing(events) as it:
        async for event in it:
            yield event
    check_complete(_runs(choices), stream=True)
    count_success(scope, t0, t_valid, _runs(choices))


def _best_completions(
    req: CompletionRequest, choices: list[Choice], texts: list[str], tokenizer: Tokenizer
) -> list[CompletionChoice]:
    """Of each prompt's `best_of` sequences, the `n` of best mean logprob, renumbered."""
    best_of = len(choices) // len(texts)
    echo_logprobs = req.echo and req.logprobs is not None
    kept: list[CompletionChoice] = []
    for i, prompt_text in enumerate(texts):
        group = choices[i * best_of : (i + 1) * best_of]
        best = sorted(group, key=lambda c: c.mean_logprob(), reverse=True)[: req.n]
        for j, c in enumerate(sorted(best, key=lambda c: c.index)):
            text = "".join(c.text)
            logprobs = completion_logprobs(c, echo_logprobs) if req.logprobs is not None else None
            if req.echo:
                text = prompt_text + text
            kept.append(CompletionChoice(i * req.n + j, text, logprobs, c.finish_reason))
            if req.prompt_logprobs is not None:
                kept[-1].prompt_logprobs = prompt_logprobs(c, tokenizer)
    return kept


def _text(content: str | list | None) -> str:
    """A message's content as text (content parts joined)."""
    if isinstance(content, list):
        return "".join(getattr(part, "text", "") for part in content)
    return content or ""


def _message(c: Choice, callable_tools: tools.Tools | None) -> tuple[AssistantMessage, str]:
    """A whole answer: text, or the call the tools' grammar made it (OpenAI's shape)."""
    text = c.echo + "".join(c.text)
    call = None
    if callable_tools is not None and (not callable_tools.auto or text.lstrip()[:1] == "{"):
        call = tools.parse_call(text)
    if call is None:
        return AssistantMessage("assistant", text), c.finish_reason
    function = FunctionCall(name=call[0], arguments=call[1])
    message = AssistantMessage(
        "assistant", None, [ToolCall(id=tools.call_id(), type="function", function=function)]
    )
    return message, "tool_calls"


def _call_delta(part: tuple[str, tuple[str, str] | None, str]) -> Delta:
    """A `CallStream` step as a delta: text, a call's start (id, name) and arguments."""
    content, start, arguments = part
    delta = Delta(content=content or None)
    if start is not None:
        function = FunctionDelta(name=start[1], arguments=arguments)
        delta.tool_calls = [ToolCallDelta(0, function, id=start[0], type="function")]
    elif arguments:
        delta.tool_calls = [ToolCallDelta(0, FunctionDelta(arguments=arguments))]
    return delta


def _merge(a: Delta, b: Delta) -> Delta:
    """Two deltas of one step as one (content joined, argument fragments joined)."""
    content = ((a.content or "") + (b.content or "")) or None
    if a.tool_calls and b.tool_calls:
        first = a.tool_calls[0]
        first.function.arguments += b.tool_calls[0].function.arguments
        return Delta(content=content, tool_calls=a.tool_calls)
    return Delta(content=content, tool_calls=a.tool_calls or b.tool_calls)
