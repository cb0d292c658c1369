"""Errors as OpenAI's clients expect them: ``{"error": {"message", "type", "param", "code"}}``.

Each engine refusal maps to one status (runtime/errors.py says which); FastAPI's own errors
(validation, unknown routes, unreadable bodies) are rewritten into the same shape, with 400
where FastAPI would answer 422.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.errors import AdapterBusy, EngineClosed, QueueFull, RequestError, UnknownAdapter

MAX_MESSAGE_CHARS = 1000

# status -> OpenAI's error type
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
          503: "server_error"}


class APIError(Exception):
    """An error answer: status, one-line message, the request field at fault, a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    message = " ".join(str(message).split())  # one line, whatever the cause held
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}}


def from_engine(e: Exception, retry_after_s: int = 1) -> APIError:
    """The answer to an engine refusal (one of ENGINE_ERRORS; TypeError for anything else)."""
    if isinstance(e, RequestError):
        return APIError(400, str(e), e.param, "invalid_value")
    if isinstance(e, UnknownAdapter):
        return APIError(404, f"the model {e.name!r} does not exist: {e}", "model", "model_not_found")
    if isinstance(e, AdapterBusy):
        return APIError(409, str(e), None, "adapter_busy")
    if isinstance(e, QueueFull):
        return APIError(503, f"the server is busy: {e}; retry later", None, "queue_full", {"Retry-After": str(retry_after_s)})
    if isinstance(e, EngineClosed):
        return APIError(503, f"the server is shutting down: {e}", None, "shutting_down")
    raise TypeError(f"not an engine refusal: {type(e).__name__}")


ENGINE_ERRORS = (RequestError, UnknownAdapter, AdapterBusy, QueueFull, EngineClosed)


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every error the app can raise, answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif e.status_code == 400:  # FastAPI's body parser failed other than on bad JSON syntax (e.g. nesting too deep)
            message = "the body is not valid JSON (it could not be parsed)"
        else:
            message = e.detail if isinstance(e.detail, str) else str(e.detail)
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return APIError(e.status_code, message, None, code, getattr(e, "headers", None)).response()

    for kind in ENGINE_ERRORS:
        app.add_exception_handler(kind, lambda request, e: from_engine(e, retry_after_s).response())

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error").response()


# Parts of a pydantic error location that name a union member or a validator, not a field.
_NOT_FIELDS = {"str", "int", "float", "bool", "list", "dict", "none", "ChatMessage", "StreamOptions"}


def validation_error(errors) -> APIError:
    """pydantic's complaint about the first bad field, on one line naming it:
    ``temperature: Input should be a valid number``. A union's members' complaints are joined."""
    groups: dict[str, list[str]] = {}
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        loc = [p for p in loc if p not in _NOT_FIELDS and not any(c in p for c in "[](") and not p.startswith("function-")]
        if error.get("type") == "json_invalid":
            return APIError(400, "the body is not valid JSON", None, "invalid_json")
        if error.get("type") in ("model_attributes_type", "dict_type", "model_type") and not loc:
            return APIError(400, "the body must be a JSON object (with Content-Type: application/json)", None, "invalid_value")
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field (this server does not support it)"
        messages = groups.setdefault(".".join(loc), [])
        if message not in messages:
            messages.append(message)
    if not groups:
        return APIError(400, "invalid request", None, "invalid_value")
    param, messages = next(iter(groups.items()))
    more = f" (and {len(groups) - 1} more fields)" if len(groups) > 1 else ""
    return APIError(400, f"{param + ': ' if param else ''}{', or '.join(messages)}{more}", param or None, "invalid_value")
