"""The server's errors: an HTTP status with OpenAI's error object, and the pipeline's errors turned into them."""

from __future__ import annotations

from nanopali.errors import NanopaliError
from nanopali.serve.images import ImageAccessError


class ServerError(Exception):
    """An HTTP error answered in OpenAI's error format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers


class as_http_errors:
    """Turn the pipeline's NanopaliErrors into 400s (403 for an image the server may not read)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, ImageAccessError):
            raise ServerError(403, str(error), "permission_error") from None
        if isinstance(error, NanopaliError):
            raise ServerError(400, str(error)) from None
        return False
