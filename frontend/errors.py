"""One error type for both HTTP APIs (the idea of TGI's `InferError`).

An `ApiError` knows its HTTP status, TGI's `error_type`, OpenAI's `type`,
`param` and `code`, and its message; it renders itself as TGI's
`{"error", "error_type"}` or OpenAI's `{"error": {"message", "type", "param",
"code"}}`. It is counted in `tgi_request_failure{err}` when it is answered,
which happens once per request, in `ApiError.render`.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from tgi_mp.frontend import metrics
from tgi_mp.frontend.engine_client import RequestError, ShuttingDownError
from tgi_mp.frontend.openai_protocol import ErrorBody, ErrorDetail
from tgi_mp.frontend.tgi_protocol import ErrorResponse

Api = Literal["tgi", "openai"]
_json = msgspec.json.Encoder()

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """What a request is answered instead of its result."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str,
        *,
        param: str | None = None,
        code: str | None = None,
        failure: str | None = None,
        tgi_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message  # as OpenAI clients read it
        self.tgi_message = message if tgi_message is None else tgi_message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.failure = failure  # the `err` label it counts under; None: not a request failure
        self.headers: list[tuple[bytes, bytes]] = []  # added to the response (e.g. Allow)

    def render(self, api: Api) -> bytes:
        """The JSON body for a client of `api`; counts the failure (call it once)."""
        if self.failure is not None:
            metrics.failure(self.failure)
        if api == "tgi":
            return _json.encode(ErrorResponse(self.tgi_message, self.error_type))
        kind = _OPENAI_TYPES.get(self.status, "server_error")
        return _json.encode(ErrorBody(ErrorDetail(self.message, kind, self.param, self.code)))


# ---------------------------------------------------------------- request failures


def invalid(message: str, param: str | None = None) -> ApiError:
    """422: a request field breaks a rule (`param` names it for OpenAI clients)."""
    return ApiError(
        422,
        message,
        "validation",
        param=param,
        failure="validation",
        tgi_message=f"Input validation error: {message}",
    )


def template(message: str) -> ApiError:
    return ApiError(422, f"Template error: {message}", "template_error", failure="template")


def overloaded() -> ApiError:
    return ApiError(
        429, "Model is overloaded", "overloaded", code="overloaded", failure="overloaded"
    )


def generation(message: str) -> ApiError:
    """424: the engine failed this request."""
    msg = f"Request failed during generation: {message}"
    return ApiError(424, msg, "generation", failure="generation")


def incomplete(stream: bool) -> ApiError:
    """The engine's answer ended before the request's final token."""
    message = "Incomplete generation stream" if stream else "Incomplete generation"
    error_type = "incomplete_generation_stream" if stream else "incomplete_generation"
    return ApiError(500, message, error_type, failure="incomplete")


def shutting_down(message: str) -> ApiError:
    """503: the grace period of a SIGTERM ended before this request did."""
    return ApiError(503, message, "shutting_down", code="shutting_down", failure="shutting_down")


def internal(e: Exception) -> ApiError:
    """A bug, answered rather than left as a dropped connection (and logged by the caller)."""
    return ApiError(500, f"Internal error: {type(e).__name__}", "internal")


# ---------------------------------------------------------------- refused before a handler

# axum's messages (TGI answers them as plain text; tgi-mp as JSON, with its own error_type).


def payload_too_large() -> ApiError:
    msg = "Failed to buffer the request body: length limit exceeded"
    return ApiError(413, msg, "payload_too_large", code="payload_too_large")


def unsupported_media_type() -> ApiError:
    msg = "Expected request with `Content-Type: application/json`"
    return ApiError(415, msg, "unsupported_media_type", code="unsupported_media_type")


def malformed_json(detail: str) -> ApiError:
    msg = f"Failed to parse the request body as JSON: {detail}"
    return ApiError(400, msg, "invalid_json", code="invalid_json")


_FIELD_PATH = re.compile(r"at `\$\.([^`]+)`")


def wrong_json_types(detail: str) -> ApiError:
    """422 from the decoder; msgspec's message ends with the field's path, the `param`."""
    found = _FIELD_PATH.search(detail)
    return ApiError(
        422,
        f"Failed to deserialize the JSON body into the target type: {detail}",
        "validation",
        param=found.group(1) if found else None,
        code="validation",
    )


def unauthorized() -> ApiError:
    return ApiError(401, "Invalid or missing API key", "unauthorized")


def not_found(method: str, path: str) -> ApiError:
    return ApiError(404, f"Unknown route {method} {path}", "not_found")


def method_not_allowed(method: str, path: str, allow: str) -> ApiError:
    e = ApiError(405, f"Method {method} is not allowed on {path}", "method_not_allowed")
    e.headers = [(b"allow", allow.encode())]
    return e


def model_not_found(name: str) -> ApiError:
    msg = f"The model `{name}` does not exist."
    return ApiError(404, msg, "not_found", param="model", code="model_not_found")


def from_engine(e: Exception) -> ApiError:
    """How the engine's answer for one request reaches its client."""
    if isinstance(e, RequestError):  # refused by the scheduler (e.g. beyond the KV capacity)
        return invalid(str(e))
    if isinstance(e, ShuttingDownError):
        return shutting_down(str(e))
    return generation(str(e))
