"""Bearer-token auth for /v1: tokens from a file or the environment, compared in constant time."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from fastapi import HTTPException, Request, status

TOKENS_ENV = "DYNAMICCL_TOKENS"


def load_tokens(path: Path | None = None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """name -> token, from `path` (one per line, optionally `name:token`, `#` comments) and from
    DYNAMICCL_TOKENS (comma separated, same syntax). Unnamed tokens are named token-1, token-2..."""
    lines: list[str] = []
    if path is not None:
        lines += path.read_text().splitlines()
    lines += env.get(TOKENS_ENV, "").split(",")
    tokens: dict[str, str] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, token = line.rpartition(":")
        if not sep:
            name = f"token-{len(tokens) + 1}"
        tokens[name.strip() or f"token-{len(tokens) + 1}"] = token.strip()
    return tokens


class TokenAuth:
    """FastAPI dependency: the caller's token name, or None when the API is open."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def __call__(self, request: Request) -> str | None:
        if not self._tokens:
            return None
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            matched = None
            for name, token in self._tokens:  # compare against all: timing reveals nothing
                if secrets.compare_digest(candidate, token):
                    matched = name
            if matched is not None:
                return matched
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="a valid bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
