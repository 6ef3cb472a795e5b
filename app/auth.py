"""Bearer API keys. Each key is its own namespace: a job is visible only to the key that created it."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="an API key configured by the operator (DISTILL_API_KEYS)")

LOCAL_OWNER = "local"  # the one owner when no keys are configured (the server then binds loopback only)


def owner_of(key: str) -> str:
    """What the store records as owner: a hash, so the database never holds a usable key."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _owner_of_key(request: Request, scheme: str, presented: str) -> str | None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_OWNER
    if scheme.lower() != "bearer":
        return None
    # Compare against every key (no early exit) so timing says nothing about which key matched.
    matched = None
    for key in keys:
        if secrets.compare_digest(presented.encode(), key.encode()):
            matched = key
    return owner_of(matched) if matched is not None else None


def optional_owner(request: Request) -> str | None:
    """The caller's owner id, or None without a valid key (when keys are configured). Reads the header itself,
    so routes using it (/healthz) do not declare Bearer auth as required in the OpenAPI schema."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return _owner_of_key(request, scheme, presented.strip())


def current_owner(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    scheme, presented = (credentials.scheme, credentials.credentials) if credentials else ("", "")
    owner = _owner_of_key(request, scheme, presented)
    if owner is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key",
                            headers={"WWW-Authenticate": "Bearer"})
    return owner
