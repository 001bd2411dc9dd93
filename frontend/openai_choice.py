"""One choice of an OpenAI answer: its sequence, the text its client sees (stop
strings left out), its logprobs; and the usage of several."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer

from tgi_mp.frontend.detokenizer import StopTrimmer
from tgi_mp.frontend.generation import Generation
from tgi_mp.frontend.openai_protocol import (
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tgi_mp.frontend.tgi_protocol import Token
from tgi_mp.frontend.validation import ValidRequest

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}

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
    echo: str = ""  # chat `echo`: text the answer starts with (not generated)

    def __post_init__(self) -> None:
        self.trimmer = StopTrimmer(self.v.stop, keep=self.v.include_stop_str)
        self.prompt_len = len(self.v.prompt_ids)

    def add(self, tok: Token) -> str:
        """The new visible text for this token (special tokens show nothing, unless
        `skip_special_tokens` is off)."""
        # The token that stopped the answer (EOS, a stop token id) is left out unless
        # asked for (vLLM's include_stop_str_in_output), as other special tokens are
        # unless skip_special_tokens is off.
        stopper = self.gen.finish_reason != "" and (
            tok.special or tok.id in self.v.params.stop_token_ids
        )
        hidden = stopper and not self.v.include_stop_str
        piece = "" if hidden or (tok.special and self.v.skip_special_tokens) else tok.text
        visible = self.trimmer.push(piece)
        if self.gen.finish_reason:
            visible += self.trimmer.flush()
        self.text.append(visible)
        if self.v.params.top_n_tokens or self.want_logprobs:
            top = self.gen.top_tokens[-1] if self.gen.top_tokens else []
            self.logprobs.append(
                TokenLogprob(
                    tok.text,
                    finite(tok.logprob),
                    list(tok.text.encode()),
                    [TopLogprob(t.text, finite(t.logprob), list(t.text.encode())) for t in top],
                )
            )
        return visible

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.gen.finish_reason, "length")

    def mean_logprob(self) -> float:
        return self.gen.mean_logprob()


def finite(x: float | None) -> float:
    return -9999.0 if x is None or x != x else x


def usage_of(choices: list[Choice], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt (its choices share it), completion tokens of every
    sequence generated."""
    prompt = sum(c.prompt_len for c in choices[::per_prompt])
    cached = sum(c.gen.cached_tokens for c in choices[::per_prompt])
    completion = sum(len(c.gen.tokens) for c in choices)
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def completion_logprobs(c: Choice, echo: bool) -> CompletionLogprobs:
    """The legacy logprobs object of a completion choice (with `echo`, the prompt's first)."""
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


def prompt_logprobs(c: Choice, tokenizer: Tokenizer) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` of a choice's prompt: null for the first token, then the
    prompt's own token and the most likely ones at each position, decoded alone."""
    ranks, tops = c.gen.prompt_tops or ([], [])
    ids = sorted({i for row in tops[1:] for i, _ in row})  # row 0 is unscored (ids -1)
    decoded = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    texts = dict(zip(ids, decoded, strict=True))
    out: PromptLogprobs = [None]
    for pos in range(1, len(c.gen.prefill)):
        own = c.gen.prefill[pos]
        lp = own.logprob if own.logprob is not None else float("-inf")
        entry = {str(own.id): PromptLogprob(lp, ranks[pos], own.text)}
        for rank, (i, top_lp) in enumerate(tops[pos], 1):
            entry.setdefault(str(i), PromptLogprob(top_lp, rank, texts[i]))
        out.append(entry)
    return out
