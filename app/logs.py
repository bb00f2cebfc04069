"""Logging that never prints a secret: Caesar's `secret=` in a URL query is redacted.

Caesar carries its credential in the query string (it sends no auth header), and uvicorn's access
log prints the full path with the query. `install_redaction()` puts a filter on that logger (and
gzx's own) which rewrites `secret=...` to `secret=[redacted]` in the message and its arguments,
keeping the arguments' shape (uvicorn's access formatter unpacks them).
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "[redacted]"
_SECRET = re.compile(r"((?:^|[?&\s])secret=)[^&\s\"']*", re.IGNORECASE)
LOGGERS = ("uvicorn.access", "uvicorn.error", "gzx")


def redact(text: str) -> str:
    """`text` with the value of every `secret=` query parameter replaced."""
    return _SECRET.sub(rf"\g<1>{REDACTED}", text)


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrites `secret=...` in a record's message and arguments; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_value(v) for k, v in record.args.items()}
        return True


def install_redaction() -> None:
    """Put the filter on uvicorn's loggers and gzx's (once each; uvicorn's logging config keeps
    logger filters when it configures itself later)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
