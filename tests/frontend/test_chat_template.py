"""Chat templates rendered as transformers' `apply_chat_template` renders them."""

from __future__ import annotations

import json

import pytest

from tests.engine.oracle import tokenizer
from tests.frontend.test_asgi import tokenizer_dir  # noqa: F401 (a fixture)
from tgi_mp.frontend.chat_template import ChatTemplate
from tgi_mp.frontend.errors import ApiError

CONVERSATIONS = [
    [{"role": "user", "content": "What is a lighthouse?"}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why do lighthouses flash?"},
    ],
    [
        {"role": "user", "content": "Name a famous lighthouse."},
        {"role": "assistant", "content": "The Eddystone lighthouse."},
        {"role": "user", "content": "Where is it?"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_bundled_template_matches_transformers(tokenizer_dir, messages) -> None:  # noqa: F811
    ours = ChatTemplate.load(tokenizer_dir).render(messages)
    assert ours == tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_final_assistant_message_is_continued(tokenizer_dir) -> None:  # noqa: F811
    messages = [*CONVERSATIONS[0], {"role": "assistant", "content": "A lighthouse is"}]
    ours = ChatTemplate.load(tokenizer_dir).render(messages)
    want = tokenizer().apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours == want and ours.endswith("A lighthouse is")


JINJA_FEATURES = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ raise_exception('no tools here') }}{% endif %}"
    "[{{ m['role'] | upper }}] {{ m['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}{{ {'k': 'é'} | tojson }}"
)


def test_template_sources_helpers_and_errors(tmp_path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "eos_token": "</s>",
                "chat_template": [{"name": "default", "template": JINJA_FEATURES}],
            }
        )
    )
    t = ChatTemplate.load(str(tmp_path))
    text = t.render([{"role": "user", "content": " hi "}])
    assert text == '<s>[USER] hi</s>\n[ASSISTANT] {"k": "é"}'
    with pytest.raises(ApiError, match="no tools here"):
        t.render([{"role": "tool", "content": "x"}])
    # chat_template.jinja wins over the config's template.
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert ChatTemplate.load(str(tmp_path)).render([{"role": "user", "content": "a"}]) == "a!"
    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ApiError, match="no chat template"):
        ChatTemplate.load(str(empty)).render([{"role": "user", "content": "a"}])
