"""Token ids to text, one token at a time, plus stop-sequence matching.

Incremental decoding keeps two offsets into the ids: text is decoded from
`prefix` and only the part after the `read` offset's text is new. A token
whose bytes end mid-character decodes to U+FFFD and is held back (its text
is "") until the character completes, so multi-byte UTF-8 split across
tokens (emoji, CJK, byte-fallback) comes out whole and exactly once. The
last few prompt tokens seed the window, so a SentencePiece tokenizer keeps
the leading space of the first generated word.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_CONTEXT = 5  # prompt tokens kept as decoding context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.num_context = self.read

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        text = decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end, what is still held back (an unfinished character), as it decodes."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        text = decode(self.ids[self.prefix :], skip_special_tokens=False)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def generated_text(self) -> str:
        """The whole generation, special tokens skipped (TGI's `generated_text`).

        Decoded after the prompt's last tokens, like the pieces, so it keeps a
        SentencePiece leading space (the pieces add up to it, and
        `inputs + generated_text` reads right with `return_full_text`).
        """
        decode = self.tokenizer.decode
        context = decode(self.ids[: self.num_context], skip_special_tokens=True)
        full = decode(self.ids, skip_special_tokens=True)
        if full.startswith(context):
            return full[len(context) :]
        # The prompt ended mid-character: fall back to the generation alone.
        return decode(self.ids[self.num_context :], skip_special_tokens=True)


class StopMatcher:
    """Finds the first stop string in the generated text as it grows.

    Only text that could complete a match is searched each time, so the cost
    per token does not grow with the length of the generation.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""

    def feed(self, delta: str) -> str | None:
        if not self.stops or not delta:
            return None
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        window = self.text[start:]
        return next((s for s in self.stops if s in window), None)


class StopTrimmer:
    """Text to show as it grows, without the stop string or what follows it (OpenAI's
    rule; TGI's native API keeps the stop string).

    A tail that could still become a stop string is held back until it cannot.
    """

    def __init__(self, stops: list[str], keep: bool = False) -> None:
        """`keep`: the stop string stays in the text (vLLM's `include_stop_str_in_output`)."""
        self.stops = [s for s in stops if s]
        self.keep = keep
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [(at, at + len(s)) for s in self.stops if (at := text.find(s)) >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            start, end = min(hits)
            return text[: end if self.keep else start]
        hold = max(
            (
                k
                for s in self.stops
                for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])
            ),
            default=0,
        )
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
