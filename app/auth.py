"""Credentials: bearer tokens with scopes, Basic for the stream forwarder, a secret in the query
for Caesar (which sends no auth header). Every comparison runs in constant time. With no
credentials configured the service is open (and only ever listens on loopback then).
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable

from fastapi import Request

from app.errors import Forbidden, Unauthorized
from app.settings import Settings

SCOPES = ("ingest", "read", "admin")

READ_COOKIE = "gzx_read"
"""The dashboard's cookie (Secure, HttpOnly, SameSite=Strict; set by POST /login in
`app.api_query`): it carries a token, and is accepted for the `read` scope only, never for
writes."""


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Authenticator:
    """Checks a request's credential against the configured ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = settings.token_scopes()
        self.open = not settings.has_credentials

    def scopes_of_bearer(self, request: Request) -> frozenset[str] | None:
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return None
        found: frozenset[str] | None = None
        for token, scopes in self.tokens.items():
            if _equal(credential.strip(), token):  # no early exit: time does not depend on which
                found = scopes
        if found is None:
            raise Unauthorized("unknown bearer token", field="authorization")
        return found

    def scopes_of_token(self, credential: str) -> frozenset[str] | None:
        """The scopes of a token, compared with every configured one in constant time."""
        found: frozenset[str] | None = None
        for token, scopes in self.tokens.items():
            if _equal(credential, token):
                found = scopes
        return found

    def scopes_of_cookie(self, request: Request) -> frozenset[str] | None:
        """The scopes of the dashboard's read cookie (None when there is no cookie)."""
        credential = request.cookies.get(READ_COOKIE)
        if not credential:
            return None
        found = self.scopes_of_token(credential)
        if found is None:
            raise Unauthorized("the dashboard's cookie holds an unknown token", field="cookie")
        return found

    def require(self, scope: str) -> Callable[[Request], None]:
        """A FastAPI dependency: the request needs a bearer token with `scope` (admin has all)."""

        def check(request: Request) -> None:
            if self.open:
                return
            scopes = self.scopes_of_bearer(request)
            if scopes is None and scope == "read":  # the dashboard's cookie: reads only
                scopes = self.scopes_of_cookie(request)
            if scopes is None:
                raise Unauthorized("a bearer token is required", field="authorization")
            if scope not in scopes and "admin" not in scopes:
                raise Forbidden(f"this route needs the {scope!r} scope", field="authorization")

        return check

    def require_kinesis(self, request: Request) -> None:
        """The stream forwarder's HTTP Basic credentials, or a bearer token with `ingest`."""
        if self.open:
            return
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "basic" and self.settings.kinesis_password:
            try:
                user, _, password = base64.b64decode(credential).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise Unauthorized("malformed Basic credentials", field="authorization") from None
            user_ok = _equal(user, self.settings.kinesis_username or "")
            password_ok = _equal(password, self.settings.kinesis_password)
            if user_ok and password_ok:
                return
            raise Unauthorized("wrong Basic credentials", field="authorization")
        self.require("ingest")(request)

    def require_caesar(self, request: Request) -> None:
        """Caesar's secret, carried in the URL query as `secret=`."""
        if self.open:
            return
        given = request.query_params.get("secret")
        expected = self.settings.caesar_secret
        if given is None or expected is None or not _equal(given, expected):
            raise Unauthorized("missing or wrong secret", field="secret")
