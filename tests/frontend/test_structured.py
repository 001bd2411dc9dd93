"""Structured output through the real clients (TGI's `text_generation`, huggingface_hub's
`InferenceClient`, the OpenAI SDK, LangChain) against one `tgi-mp serve` (bundled
SmolLM2, bf16): every constrained answer parses and validates, in every spelling of
the constraint. (Mixed with free requests in one batch: tests/engine/test_engine_oracle.py.)"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from huggingface_hub import InferenceClient
from langchain_openai import ChatOpenAI
from text_generation import Client
from text_generation.types import Grammar, GrammarType

from tests.frontend.server import Server

MODEL = "smollm2"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ORDER = {  # nested objects, an array, a pattern
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer"},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
    },
    "required": ["id", "items", "paid"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{4}"
ASK = [{"role": "user", "content": "Describe a person living in Europe as JSON."}]


@pytest.fixture(scope="module")
def server():
    # The fast dtype here (no oracle to follow): bf16 with native bf16, else float32.
    with Server(
        "--dtype", "auto", "--served-model-name", MODEL, "--max-batch-total-tokens", "8192"
    ) as s:  # fmt: skip
        yield s
        assert s.stop() == 0


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)


def _json(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ---------------------------------------------------------------- TGI's API


def test_tgi_client_json_and_regex_grammars(server) -> None:
    client = Client(server.url, timeout=120)
    for schema in (PERSON, ORDER):
        out = client.generate(
            "A record as JSON:",
            max_new_tokens=120,
            grammar=Grammar(type=GrammarType.Json, value=schema),
        )
        _json(out.generated_text, schema)
        assert out.details.finish_reason.value == "eos_token"  # the grammar completed
    # A string value holding the schema is TGI's other spelling; regex, streamed.
    out = client.generate(
        "Call me at",
        max_new_tokens=20,
        grammar=Grammar(type=GrammarType.Json, value=json.dumps(PERSON)),
    )
    _json(out.generated_text, PERSON)
    text = "".join(
        r.token.text
        for r in client.generate_stream(
            "My number is", max_new_tokens=20, grammar=Grammar(type=GrammarType.Regex, value=PHONE)
        )
        if not r.token.special
    )
    assert re.fullmatch(PHONE, text), text


def test_bad_grammars_are_422_and_the_server_keeps_serving(server) -> None:
    cases = [
        ({"type": "json", "value": {"type": "nonsense"}}, "grammar is not valid"),
        ({"type": "regex", "value": "([0-9]"}, "grammar is not valid"),
        ({"type": "yaml", "value": "x"}, "type must be one of"),
        ({"type": "json"}, "needs a `value`"),
    ]
    for grammar, message in cases:
        r = httpx.post(
            server.url + "/generate",
            json={"inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": grammar}},
            timeout=30,
        )
        assert r.status_code == 422 and message in r.json()["error"], (grammar, r.text)
        assert r.json()["error_type"] == "validation"
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "messages": ASK,
            "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
        timeout=30,
    )
    assert r.status_code == 422 and "Grammar and tools are mutually exclusive" in r.text
    ok = httpx.post(
        server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    )
    assert ok.status_code == 200


# ---------------------------------------------------------------- OpenAI's API and its clients


def test_openai_response_formats(oai) -> None:
    spellings = [
        {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        {"type": "json", "value": PERSON},  # TGI's
        {"type": "json_object", "value": PERSON},  # TGI's alias
        {"type": "json_schema", "value": PERSON},  # huggingface_hub's older one
    ]
    for fmt in spellings:
        answer = oai.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=80, response_format=fmt
        )
        _json(answer.choices[0].message.content, PERSON)
        assert answer.choices[0].finish_reason == "stop"
    # Any object: a small model may spend its budget inside one long string; what it
    # wrote is then a prefix of an object, and a complete answer is one.
    anything = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        temperature=0,
        max_tokens=80,
        response_format={"type": "json_object"},
    ).choices[0]
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict)
    else:
        assert anything.finish_reason == "length" and anything.message.content.startswith("{")


def test_completions_take_response_format_and_vllm_guided_extras(oai) -> None:
    def complete(**extra) -> str:
        r = oai.completions.create(
            model=MODEL, prompt="The answer is", max_tokens=24, temperature=0, extra_body=extra
        )
        return r.choices[0].text

    assert complete(guided_choice=["yes (sure)", "no"]) in ("yes (sure)", "no")
    assert re.fullmatch(PHONE, complete(guided_regex=PHONE))
    _json(complete(guided_json=PERSON, max_tokens=80), PERSON)
    _json(
        complete(
            response_format={"type": "json_schema", "json_schema": {"schema": PERSON}},
            max_tokens=80,
        ),
        PERSON,
    )
    assert re.fullmatch("(ab)+", complete(guided_grammar='start: ("ab")+'))


def test_huggingface_hub_and_langchain(server) -> None:
    hub = InferenceClient(base_url=server.url, timeout=120)
    answer = hub.chat_completion(
        ASK,
        max_tokens=80,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
    )
    _json(answer.choices[0].message.content, PERSON)

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        age: int = pydantic.Field(ge=0, le=120)

    llm = ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=80
    )
    person = llm.with_structured_output(Person, method="json_schema").invoke(ASK[0]["content"])
    assert isinstance(person, Person) and 0 <= person.age <= 120


# ---------------------------------------------------------------- tools

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two integers", "parameters": ADD},
    },
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _call(message) -> tuple[str, dict]:
    (call,) = message.tool_calls
    assert call.type == "function" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, {**SCHEMAS[call.function.name], "additionalProperties": False})
    return call.function.name, arguments


def _ask_weather(oai: openai.OpenAI, choice, **kw):
    """The weather question with both tools offered, greedy."""
    return oai.chat.completions.create(
        model=MODEL,
        messages=WEATHER_ASK,
        tools=TOOLS,
        tool_choice=choice,
        temperature=0,
        max_tokens=60,
        **kw,
    )


def test_tool_choice_required_named_auto_and_none(oai) -> None:
    def ask(choice):
        return _ask_weather(oai, choice).choices[0]

    required = ask("required")
    assert required.finish_reason == "tool_calls" and required.message.content is None
    assert _call(required.message)[0] in SCHEMAS
    named = ask({"type": "function", "function": {"name": "add"}})
    assert _call(named.message)[0] == "add" and named.finish_reason == "tool_calls"
    auto = ask("auto")  # a call, or text: either way well formed
    if auto.message.tool_calls:
        assert _call(auto.message)[0] in SCHEMAS and auto.finish_reason == "tool_calls"
    else:
        assert auto.message.content and not auto.message.content.lstrip().startswith("{")
    none = ask("none")
    assert none.message.tool_calls is None and none.message.content


def test_streamed_tool_calls_reassemble(oai) -> None:
    stream = _ask_weather(oai, "required", stream=True)
    ids, names, arguments, reasons = set(), [], "", []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                ids.add(call.id) if call.id else None
                names += [call.function.name] if call.function.name else []
                arguments += call.function.arguments or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert len(ids) == 1 and len(names) == 1 and reasons == ["tool_calls"]
    jsonschema.validate(json.loads(arguments), {**SCHEMAS[names[0]], "additionalProperties": False})


def test_tool_conversations_and_errors(server, oai) -> None:
    first = _ask_weather(oai, "required").choices[0].message
    call = first.tool_calls[0]
    history = [
        *WEATHER_ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = oai.chat.completions.create(
        model=MODEL, messages=history, temperature=0, max_tokens=20
    )
    assert answer.choices[0].message.content
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "messages": WEATHER_ASK,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        timeout=30,
    )
    assert r.status_code == 422 and "Tool with name nope not found" in r.json()["error"]["message"]


def test_hub_and_langchain_tools(server) -> None:
    hub = InferenceClient(base_url=server.url, timeout=120)
    out = hub.chat_completion(
        WEATHER_ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    )
    call = out.choices[0].message.tool_calls[0]
    arguments = call.function.arguments
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])

    class Add(pydantic.BaseModel):
        """Add two integers."""

        a: int
        b: int

    llm = ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60
    )
    message = llm.bind_tools([Add], tool_choice="required").invoke("What is 2 plus 3?")
    (call,) = message.tool_calls
    assert call["name"] == "Add" and Add(**call["args"])
    added = llm.with_structured_output(Add).invoke("What is 2 plus 3?")  # via a tool call
    assert isinstance(added, Add)
