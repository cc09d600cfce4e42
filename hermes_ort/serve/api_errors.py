"""The errors a client of the server gets, in OpenAI's shape: an HTTP status and the body
`{"error": {"message", "type", "param", "code"}}`. Pure Python: the app turns one into a response.

The official client (openai 3.60.0) retries 408, 409, 429 and every 5xx, twice by default, and
waits as the `Retry-After` header says when it is 1..120 s (over 120 s it does not retry): so an
overloaded server answers 503 with that header.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client gets: HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        """The JSON body, as OpenAI sends it (`param` and `code` are null when not set)."""
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """The response headers this error needs: `Retry-After` when the client should wait."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400: the request names something wrong; `param` is the field at fault."""
    return ApiError(400, message, param=param, code=code)


def not_found_model(name: str, served: str) -> ApiError:
    """404 for a `model` this server does not serve (OpenAI's message, then the served one)."""
    message = f"The model `{name}` does not exist; this server serves `{served}`."
    return ApiError(404, message, param="model", code="model_not_found")


def unauthorized() -> ApiError:
    """401: the bearer token is missing or is not the server's API key."""
    message = "Incorrect API key provided. Give the server's key as `Authorization: Bearer KEY`."
    return ApiError(401, message, code="invalid_api_key")


def too_large(limit_bytes: int) -> ApiError:
    """413: the request body is over the server's limit."""
    return ApiError(413, f"The request body is larger than {limit_bytes} bytes.")


def overloaded(retry_after_s: int) -> ApiError:
    """503: the queue is full; the client may retry after `retry_after_s`."""
    message = "The server is overloaded (its request queue is full); please retry later."
    return ApiError(
        503, message, type="server_error", code="overloaded", retry_after_s=retry_after_s
    )


def internal() -> ApiError:
    """500: something failed inside the server (the traceback goes to its log, not the client)."""
    message = "The server had an error while processing your request (see the server's log)."
    return ApiError(500, message, type="server_error")
