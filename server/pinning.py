"""Answers that stay the same on every replica and every retry.

A job's recommendation is pinned: its first answer is stored, and every later
launch of the job (on any replica, after any restart) gets that answer until
it is refreshed or expires, so the ranks of one job never run different
configs. A job's suggestions for one round are pinned the same way, one entry
per context, so that two replicas asked for the same round hand out the same
trials under the same suggestion ids. The first writer wins (`Store.pin`,
`Store.pin_entries`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from dynamiccl.schemas import Context, NcclConfig, RecommendResponse, Suggestion, SuggestionKind
from dynamiccl.server.learner import Pick
from dynamiccl.server.storage import Store


def _digest(*parts: object) -> str:
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _recommendation_key(fabric_id: str, job_id: str) -> str:
    return f"recommend|{fabric_id}|{job_id}"


def pinned_recommendation(store: Store, fabric_id: str, job_id: str) -> str | None:
    """The job's pinned answer, as JSON (None: none yet, or expired)."""
    return store.pinned(_recommendation_key(fabric_id, job_id))


def pin_recommendation(store: Store, fabric_id: str, job_id: str, answer: RecommendResponse,
                       replace: bool = False) -> str:
    """Pin `answer` for the job unless another is pinned already (or `replace`): the pinned JSON."""
    return store.pin(_recommendation_key(fabric_id, job_id), answer.model_dump_json(), replace=replace)


def suggestion_seed(fabric_id: str, job_id: str | None, round_index: int | None) -> int:
    """The same seed for the same job and round on every replica; a fresh one otherwise."""
    if job_id is None or round_index is None:
        return secrets.randbits(64)
    return int(_digest(fabric_id, job_id, round_index), 16)


def _fresh_ids(count: int) -> list[str]:
    """Random suggestion ids, read from the system in one call (a call per id, under 20
    concurrent requests, cost a fifth of a request's time)."""
    ids = secrets.token_hex(8 * count)
    return [f"s-{ids[16 * i:16 * i + 16]}" for i in range(count)]


def fresh_suggestions(contexts: Sequence[Context], picks: Sequence[Pick]) -> list[Suggestion]:
    """Unpinned suggestions, each with a random id."""
    return [Suggestion(context=context, config=pick.config, kind=pick.kind, suggestion_id=suggestion_id)
            for context, pick, suggestion_id in zip(contexts, picks, _fresh_ids(len(picks)))]


async def pinned_suggestions(store: Store, fabric_id: str, job_id: str, round_index: int,
                             contexts: Sequence[Context], picks: Sequence[Pick]) -> list[Suggestion]:
    """The round's suggestions as first pinned (these picks, under fresh ids, where none were):
    one pin per round, an entry per context, written with the pins of concurrent requests
    (`Store.apin_entries`). A request's own picks are returned as they are; only the entries
    another request pinned first are decoded."""
    entries = [f"{c.collective}:{c.nbytes}:{c.nranks}:{c.nnodes}" for c in contexts]
    ids = _fresh_ids(len(picks))
    proposals = [_encode(pick, suggestion_id) for pick, suggestion_id in zip(picks, ids)]
    stored = await store.apin_entries(f"suggest|{fabric_id}|{job_id}|{round_index}", dict(zip(entries, proposals)))
    suggestions = []
    for context, pick, suggestion_id, entry, proposal in zip(contexts, picks, ids, entries, proposals):
        if stored[entry] != proposal:
            pick, suggestion_id = _decode(stored[entry])
        suggestions.append(Suggestion(context=context, config=pick.config, kind=pick.kind,
                                      suggestion_id=suggestion_id))
    return suggestions


def _encode(pick: Pick, suggestion_id: str) -> str:
    """A pinned pick as 'algo|proto|nchannels|kind|suggestion id' ('' and 0: NCCL decides)."""
    config = pick.config
    return f"{config.algo or ''}|{config.proto or ''}|{config.nchannels or 0}|{pick.kind}|{suggestion_id}"


def _decode(text: str) -> tuple[Pick, str]:
    algo, proto, nchannels, kind, suggestion_id = text.split("|")
    config = NcclConfig(algo=algo or None, proto=proto or None, nchannels=int(nchannels) or None)
    return Pick(config, SuggestionKind(kind)), suggestion_id
