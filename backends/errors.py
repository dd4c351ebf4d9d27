"""Our exception tree. Every foreign error (torch, httpx, libp2p...) is mapped into it
at the edge where it happens, so the layers above only ever see these.

`status` is the HTTP status an API layer should answer with; `code` is a stable
machine-readable name; `retryable` tells the manager whether another backend (or a
later try) may succeed where this one failed.
"""

from __future__ import annotations


class InferenceError(Exception):
    status: int = 500
    code: str = "internal_error"
    error_type: str = "server_error"  # OpenAI's error "type" field
    retryable: bool = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(InferenceError):
    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class ContextWindowExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(InferenceError):
    status = 404
    code = "model_not_found"
    error_type = "invalid_request_error"


class UnsupportedTaskError(InvalidRequestError):
    code = "unsupported_task"


class OverloadedError(InferenceError):
    """The node refuses more work right now; the client should retry after a pause."""

    status = 429
    code = "overloaded"
    error_type = "rate_limit_error"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailableError(InferenceError):
    """No backend can take the request now (none registered, all down, or starting)."""

    status = 503
    code = "backend_unavailable"
    retryable = True


class BackendFailedError(InferenceError):
    """A backend accepted the request and then failed while serving it."""

    status = 502
    code = "backend_failed"
    retryable = True


class DeadlineExceededError(InferenceError):
    status = 504
    code = "deadline_exceeded"
    retryable = False


class ShuttingDownError(BackendUnavailableError):
    code = "shutting_down"
    retryable = False  # the whole node is going away, not one backend


_BY_CODE: dict[str, type[InferenceError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        ContextWindowExceededError,
        ModelNotFoundError,
        UnsupportedTaskError,
        OverloadedError,
        BackendUnavailableError,
        BackendFailedError,
        DeadlineExceededError,
        ShuttingDownError,
    )
}


KNOWN_CODES = frozenset(_BY_CODE)


def error_from_code(code: str, message: str, retry_after_s: float | None = None) -> InferenceError:
    """Our error for a code another p2p-node (or our own protocol) reported; unknown codes
    are a failure of the backend that sent them."""
    cls = _BY_CODE.get(code, BackendFailedError)
    if cls is OverloadedError:
        return OverloadedError(message, retry_after_s=retry_after_s or 1.0)
    return cls(message)
