"""The errors gzx raises, and the one table that maps them to HTTP status codes.

    GzxError
     +-- InputError           422  bad input; `field` names the offending field (dotted path)
     |    +-- PayloadTooLarge 413  body, batch or mark count over a configured limit
     +-- NotFound             404  no such workflow, subject, volunteer or export
     +-- Conflict             409  the request contradicts stored state
     +-- Unauthorized         401  no credential, or a wrong one
     +-- Forbidden            403  a valid credential without the needed scope
     +-- Unavailable          503  the database (or another dependency) is down; retry later

Code below the HTTP edge raises these; `app.api` turns them into responses with `HTTP_STATUS`.
"""

from __future__ import annotations


class GzxError(Exception):
    """Base class of every error gzx raises on purpose."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        body = {"error": type(self).__name__, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InputError(GzxError):
    """The input is malformed; `field` is the dotted path of the offending value."""


class PayloadTooLarge(InputError):
    """The body, batch or number of marks exceeds a configured limit."""


class NotFound(GzxError):
    """The named resource does not exist."""


class Conflict(GzxError):
    """The request contradicts what is stored."""


class Unauthorized(GzxError):
    """No credential was given, or it is not one we know."""


class Forbidden(GzxError):
    """The credential lacks the scope this route needs."""


class Unavailable(GzxError):
    """A dependency (the database) is down; the client should retry."""


HTTP_STATUS: dict[type[GzxError], int] = {
    PayloadTooLarge: 413,
    InputError: 422,
    NotFound: 404,
    Conflict: 409,
    Unauthorized: 401,
    Forbidden: 403,
    Unavailable: 503,
}


def http_status(error: GzxError) -> int:
    """The HTTP status for `error`: the entry of its nearest class in HTTP_STATUS."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
