"""Bearer-token auth for /v1: tokens with scopes, from a file or the environment, compared in
constant time.

Scopes: `agent` (post measurements, suggest, recommend, register a fabric), `read` (GET endpoints,
recommend) and `admin` (everything, including changing a registered fabric). A token without
scopes gets `agent` and `read`, which is what every token could do before scopes existed.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from fastapi import HTTPException, Request, status

TOKENS_ENV = "DYNAMICCL_TOKENS"
TOKENS_FILE_ENV = "DYNAMICCL_TOKENS_FILE"


class Scope(StrEnum):
    agent = "agent"
    read = "read"
    admin = "admin"


DEFAULT_SCOPES = frozenset({Scope.agent, Scope.read})


@dataclass(frozen=True)
class Token:
    secret: str = field(repr=False)
    scopes: frozenset[Scope] = DEFAULT_SCOPES


@dataclass(frozen=True)
class Caller:
    """Who made a request: the token's name (None when the API is open) and its scopes."""

    name: str | None
    scopes: frozenset[Scope]

    def allows(self, needed: Iterable[Scope]) -> bool:
        """True when the caller holds one of `needed` (admin holds every scope)."""
        return Scope.admin in self.scopes or not self.scopes.isdisjoint(needed)


OPEN = Caller(None, frozenset(Scope))


class TokenFileError(ValueError):
    """A token line that cannot be read; the message names the line, never the secret."""


def parse_scopes(text: str, where: str) -> frozenset[Scope]:
    names = [s.strip().lower() for s in text.replace("+", ",").split(",") if s.strip()]
    unknown = [n for n in names if n not in Scope.__members__]
    if unknown:
        raise TokenFileError(f"{where}: unknown scope(s) {', '.join(unknown)} (known: agent, read, admin)")
    return frozenset(Scope(n) for n in names) or DEFAULT_SCOPES


def load_tokens(path: Path | None = None, env: Mapping[str, str] = os.environ) -> dict[str, Token]:
    """name -> Token, from `path` (one per line: `token`, `name:token` or `name:token:scopes`
    with scopes separated by `,` or `+`; `#` comments) and from DYNAMICCL_TOKENS (entries
    separated by commas, so scopes there are joined with `+`). Unnamed tokens are named
    token-1, token-2..."""
    lines: list[tuple[str, str]] = []
    if path is not None:
        lines += [(f"{path} line {i}", line) for i, line in enumerate(path.read_text().splitlines(), 1)]
    lines += [(f"{TOKENS_ENV} entry {i}", entry) for i, entry in enumerate(env.get(TOKENS_ENV, "").split(","), 1)]
    tokens: dict[str, Token] = {}
    for where, line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(":")]
        if len(fields) > 3:
            raise TokenFileError(f"{where}: expected token, name:token or name:token:scopes")
        if len(fields) == 1:
            fields.insert(0, "")
        name, secret = fields[0] or f"token-{len(tokens) + 1}", fields[1]
        if not secret:
            raise TokenFileError(f"{where}: empty token")
        scopes = parse_scopes(fields[2], where) if len(fields) == 3 else DEFAULT_SCOPES
        tokens[name] = Token(secret, scopes)
    return tokens


#: A token name an issued token may have: a node's name (Kubernetes node names fit).
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def issue_tokens(path: Path, names: Sequence[str], scopes: frozenset[Scope] = frozenset({Scope.agent})) -> dict[str, str]:
    """A new random token for each name, appended to the tokens file at `path` (created readable by
    its owner only): name -> token. One identity per agent: a name the file already holds, or one
    given twice, is refused (TokenFileError) and nothing is written."""
    bad = [name for name in names if not TOKEN_NAME_RE.match(name)]
    if bad:
        raise TokenFileError(f"not a token name (letters, digits, '.', '_', '-'): {', '.join(map(repr, bad))}")
    held = set(load_tokens(path, env={})) if path.exists() else set()
    taken = sorted(held.intersection(names) | {name for name in names if names.count(name) > 1})
    if taken:
        raise TokenFileError(f"{', '.join(taken)}: already in {path} or named twice; one token per agent")
    issued = {name: secrets.token_urlsafe(32) for name in names}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as tokens_file:
        tokens_file.writelines(f"{name}:{token}:{'+'.join(sorted(scopes))}\n" for name, token in issued.items())
    return issued


class TokenAuth:
    """Finds the caller of a request: `OPEN` when no tokens are configured, else the matching
    token's name and scopes; a missing or unknown token is 401."""

    def __init__(self, tokens: Mapping[str, str | Token]) -> None:
        self._tokens = [
            (name, token if isinstance(token, Token) else Token(token)) for name, token in tokens.items()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def __call__(self, request: Request) -> Caller:
        if not self._tokens:
            return OPEN
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            matched = None
            for name, token in self._tokens:  # compare against all: timing reveals nothing
                if secrets.compare_digest(candidate, token.secret.encode()):
                    matched = Caller(name, token.scopes)
            if matched is not None:
                return matched
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="a valid bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require(caller: Caller, needed: frozenset[Scope], action: str) -> None:
    """403 unless the caller holds one of `needed`."""
    if not caller.allows(needed):
        held = ", ".join(sorted(caller.scopes)) or "none"
        wanted = " or ".join(sorted(needed))
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"token {caller.name!r} may not {action}: needs scope {wanted} (has {held})",
        )
