"""Signing in to the review page with a tenant's API key, and CSRF tokens for its forms.

The key itself is the sign-in: it is kept in a cookie the page's scripts cannot read
(HttpOnly) and that other sites' pages do not send (SameSite=Strict), and every request
checks it against the store, so a revoked key signs out at once and any server that shares
the store accepts it. Every form post carries a CSRF token:
- signed in: HMAC(key, purpose), which only the holder of the key can compute;
- the sign-in form itself: a random value in a cookie and in the form (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.responses import Response

from onthejob.serve.http import Principal, ServerContext

KEY_COOKIE = "otj_review_key"
SIGNIN_COOKIE = "otj_review_signin"
COOKIE_PATH = "/review"
MAX_AGE_S = 8 * 3600
_PURPOSE = b"onthejob review page csrf v1"


def csrf_for_key(key: str) -> str:
    """The CSRF token of a signed-in page: the same for every form of one key."""
    return hmac.new(key.encode("utf-8"), _PURPOSE, hashlib.sha256).hexdigest()


def tokens_match(sent: str | None, expected: str | None) -> bool:
    if not sent or not expected:
        return False
    return hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8"))


def signed_in(ctx: ServerContext, request: Request) -> tuple[Principal, str] | None:
    """(the caller, its key) when the cookie holds a valid, unrevoked key; else None."""
    key = request.cookies.get(KEY_COOKIE)
    if not key:
        return None
    found = ctx.store.authenticate(key)
    return (Principal(*found), key) if found else None


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_key_cookie(response: Response, request: Request, key: str) -> None:
    response.set_cookie(KEY_COOKIE, key, max_age=MAX_AGE_S, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=_secure(request))


def clear_key_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(KEY_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=_secure(request))


def new_signin_token() -> str:
    return secrets.token_urlsafe(24)


def set_signin_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(SIGNIN_COOKIE, token, max_age=3600, path=COOKIE_PATH, httponly=True,
                        samesite="strict", secure=_secure(request))
