"""The OpenAPI 3 document of both APIs (TGI's and OpenAI's), generated from the msgspec
types the handlers decode and encode."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from tgi_mp.frontend.dashboard import Dashboard
from tgi_mp.frontend.openai_protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    Model,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tgi_mp.frontend.tgi_protocol import (
    ChatTokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    StreamResponse,
    TokenizeItem,
    Version,
)

_TYPES = [
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
    ErrorResponse,
    Info,
    TokenizeItem,
    ChatCompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    CompletionRequest,
    Completion,
    ErrorBody,
    Model,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ChatTokenizeResponse,
    Version,
    Dashboard,
]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_body(request: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(request)}}}


def _generation(ok: dict[str, Any], summary: str) -> dict[str, Any]:
    error = _ref("ErrorResponse")
    return {
        "post": {
            "summary": summary,
            "requestBody": _json_body("GenerateRequest"),
            "responses": {
                "200": ok,
                "422": _json(error, "Input validation error"),
                "424": _json(error, "Generation error"),
                "429": _json(error, "Model is overloaded"),
            },
        }
    }


def _openai(request: str, answer: str, chunk: str, summary: str) -> dict[str, Any]:
    """An OpenAI route: JSON, or server-sent events of `chunk` when `stream` is true."""
    error = _ref("ErrorBody")
    return {
        "post": {
            "summary": summary,
            "requestBody": _json_body(request),
            "responses": {
                "200": {
                    "description": "The answer, or its chunks as server-sent events",
                    "content": {
                        "application/json": {"schema": _ref(answer)},
                        "text/event-stream": {"schema": _ref(chunk)},
                    },
                },
                "400": _json(error, "Malformed JSON"),
                "422": _json(error, "Invalid request"),
                "424": _json(error, "Generation error"),
                "429": _json(error, "Model is overloaded"),
                "503": _json(error, "Shutting down"),
            },
        }
    }


def _paths(sse: dict[str, Any]) -> dict[str, Any]:
    return {**_tgi_paths(sse), **_openai_paths(), **_other_paths()}


@functools.cache
def documented_routes() -> frozenset[str]:
    """The paths the OpenAPI document lists."""
    return frozenset(_paths({}))


def _post(request: str, answer: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": _json_body(request),
            "responses": {
                "200": _json(_ref(answer), "The answer"),
                "422": _json(_ref("ErrorBody"), "Invalid request"),
            },
        }
    }


def _other_paths() -> dict[str, Any]:
    return {
        "/v1/tokenize": _post(
            "TokenizeRequest", "TokenizeResponse", "vLLM's tokenize: a prompt or chat to ids"
        ),
        "/v1/detokenize": _post("DetokenizeRequest", "DetokenizeResponse", "vLLM's detokenize"),
        "/chat_tokenize": _post(
            "ChatCompletionRequest", "ChatTokenizeResponse", "TGI's: a chat's templated prompt"
        ),
        "/invocations": {
            "post": {
                "summary": "SageMaker's route: chat (`messages`), completion (`prompt`) or "
                "TGI's `POST /` (`inputs`), by the body",
                "requestBody": {"required": True, "content": {"application/json": {}}},
                "responses": {"200": {"description": "As the route it stands for"}},
            }
        },
        "/version": {
            "get": {
                "summary": "The server's version",
                "responses": {"200": _json(_ref("Version"), "Version")},
            }
        },
    }


def _openai_paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": _openai(
            "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "OpenAI chat"
        ),
        "/v1/completions": _openai(
            "CompletionRequest", "Completion", "Completion", "OpenAI completions"
        ),
        "/v1/models": {
            "get": {
                "summary": "The served model (OpenAI's list)",
                "responses": {"200": _json(_ref("ModelList"), "Models")},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model",
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json(_ref("Model"), "The model"),
                    "404": _json(_ref("ErrorBody"), "No such model"),
                },
            }
        },
    }


def _tgi_paths(sse: dict[str, Any]) -> dict[str, Any]:
    return {
        "/generate": _generation(
            _json(_ref("GenerateResponse"), "Generated text"), "Generate tokens"
        ),
        "/generate_stream": _generation(sse, "Generate a stream of tokens"),
        "/": _generation(
            _json(
                {"type": "array", "items": _ref("GenerateResponse")},
                "Generated text (or events when `stream` is true)",
            ),
            "Generate tokens (compatibility route)",
        ),
        "/tokenize": _generation(
            _json({"type": "array", "items": _ref("TokenizeItem")}, "Tokens"), "Tokenize inputs"
        ),
        "/info": {
            "get": {
                "summary": "Model and limits",
                "responses": {"200": _json(_ref("Info"), "Info")},
            }
        },
        "/health": {
            "get": {
                "summary": "Health",
                "responses": {
                    "200": {"description": "Healthy"},
                    "503": _json(_ref("ErrorResponse"), "Unhealthy"),
                },
            }
        },
        "/dashboard": {
            "get": {
                "summary": "A live page of the server (polls /dashboard/data)",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
            }
        },
        "/dashboard/data": {
            "get": {
                "summary": "The dashboard's figures: rates and latency percentiles over "
                "the last seconds, engine state, server info (needs the API key when set)",
                "responses": {
                    "200": _json(_ref("Dashboard"), "Summary"),
                    "401": _json(_ref("ErrorResponse"), "No or wrong API key"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


@functools.cache
def openapi_document(version: str) -> bytes:
    _, components = msgspec.json.schema_components(
        _TYPES, ref_template="#/components/schemas/{name}"
    )
    sse = {
        "description": "Server-sent events, one per token",
        "content": {"text/event-stream": {"schema": _ref("StreamResponse")}},
    }
    doc = {
        "openapi": "3.0.3",
        "info": {
            "title": "tgi-mp",
            "version": version,
            "description": "Text Generation Inference's API, served by tgi-mp",
        },
        "paths": _paths(sse),
        "components": {"schemas": components},
    }
    return msgspec.json.encode(doc)


# Swagger UI from the `swagger-ui-bundle` package, served under /docs/: nothing is
# fetched from outside, so the page works on an offline cluster.
DOCS_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>tgi-mp API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/api-doc/openapi.json", dom_id: "#ui"});</script>
</body></html>"""
DOCS_ASSETS = {
    "swagger-ui.css": b"text/css; charset=utf-8",
    "swagger-ui-bundle.js": b"application/javascript; charset=utf-8",
}


@functools.cache
def docs_asset(name: str) -> bytes:
    import os

    import swagger_ui_bundle

    with open(os.path.join(swagger_ui_bundle.swagger_ui_path, name), "rb") as f:
        return f.read()
