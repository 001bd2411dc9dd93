"""Incremental detokenization and stop matching, on byte-level BPE and SentencePiece-style
(Metaspace + byte fallback) tokenizers."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tgi_mp.frontend.detokenizer import IncrementalDetokenizer, StopMatcher
from tgi_mp.model_source import resolve_model
from tgi_mp.tokenizer_export import export_tokenizer

CORPUS = [
    "The lighthouse keeper climbed the stairs at dusk.",
    "灯台守は夕暮れに階段を上った。 北京是中国的首都。",
    "Emoji too: 😀 🚢 🌊 and accents: café, naïve, Zürich.",
] * 20


def sentencepiece_like() -> Tokenizer:
    """A Llama/Mistral-style tokenizer: ▁ for spaces, characters outside the vocabulary
    as <0xNN> byte tokens that are part of the model's vocabulary (as in Llama's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], limit_alphabet=40)
    tok.train_from_iterator(CORPUS[:1], trainer)  # English only: CJK, emoji, accents are bytes
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(
        decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ).__getstate__()
    )
    out = Tokenizer.from_str(json.dumps(spec))
    assert out.decode(out.encode("café 🚢").ids) == "café 🚢"
    return out


@pytest.fixture(scope="module", params=["byte-level BPE", "sentencepiece"])
def tokenizer(request) -> Tokenizer:
    if request.param == "sentencepiece":
        return sentencepiece_like()
    return Tokenizer.from_file(export_tokenizer(resolve_model(None)) + "/tokenizer.json")


@pytest.mark.parametrize("text", [*CORPUS[:3], " leading space", "a\n\nb  c"])
def test_pieces_add_up_to_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Prompt words here:").ids
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(i) for i in ids]
    pieces[-1] += detok.flush()
    assert "".join(pieces) == detok.generated_text()
    assert "\ufffd" not in "".join(pieces)
    # The generated text reads as it would after the prompt (leading space kept).
    whole = tokenizer.decode(prompt + ids)
    assert whole.endswith("".join(pieces))


def test_random_word_sequences_never_lose_text(tokenizer: Tokenizer) -> None:
    # What a model emits: valid text, its characters split across tokens at random
    # places (each word encoded alone, then concatenated).
    rng = random.Random(0)
    words = [*" ".join(CORPUS[:3]).split(), "🚢🌊", "北京", "naïve"]
    for _ in range(30):
        ids = []
        for w in rng.choices(words, k=12):
            ids += tokenizer.encode(w, add_special_tokens=False).ids
        detok = IncrementalDetokenizer(tokenizer, [])
        pieces = [detok.add(i) for i in ids]
        pieces[-1] += detok.flush()
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)
        assert "".join(pieces) == detok.generated_text()


def test_split_multibyte_character_is_held_back() -> None:
    tok = sentencepiece_like()
    ids = tok.encode("🚢").ids
    assert len(ids) > 1, "the emoji must be byte tokens for this test"
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1].strip() == "🚢"


def test_stop_matcher_across_pieces() -> None:
    m = StopMatcher(["end of", "XYZ"])
    assert m.feed("the e") is None
    assert m.feed("nd o") is None
    assert m.feed("f it") == "end of"
    assert StopMatcher([]).feed("anything") is None
    assert StopMatcher(["b"]).feed("abc") == "b"
