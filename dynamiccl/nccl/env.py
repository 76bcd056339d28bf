"""Process-wide NCCL environment: rendering a setting and parsing it back.

`NCCL_ALGO` and `NCCL_PROTO` use the per-collective syntax of NCCL 2.24 and
newer (`allreduce:tree;allgather:ring`); the channel count is pinned with
`NCCL_MIN_NCHANNELS` = `NCCL_MAX_NCHANNELS`, and point-to-point operations
take `NCCL_P2P_NCHANNELS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.schemas import MAX_CHANNELS, MIN_CHANNELS, Algo, Collective, Proto

#: NCCL's own spelling of each algorithm and protocol (it parses them case-insensitively).
ALGO_ENV_NAMES: dict[Algo, str] = {
    Algo.ring: "Ring",
    Algo.tree: "Tree",
    Algo.nvls: "NVLS",
    Algo.nvls_tree: "NVLSTree",
    Algo.collnet_direct: "CollnetDirect",
    Algo.collnet_chain: "CollnetChain",
    Algo.pat: "PAT",
}
PROTO_ENV_NAMES: dict[Proto, str] = {Proto.ll: "LL", Proto.ll128: "LL128", Proto.simple: "Simple"}

_ALGO_BY_ENV_NAME = {name.lower(): algo for algo, name in ALGO_ENV_NAMES.items()}
_ALGO_BY_ENV_NAME.update({algo.value: algo for algo in Algo})
_PROTO_BY_ENV_NAME = {name.lower(): proto for proto, name in PROTO_ENV_NAMES.items()}
#: Collectives NCCL_ALGO / NCCL_PROTO can name (point-to-point has neither knob).
ENV_COLLECTIVES = tuple(c for c in Collective if not c.is_p2p)


@dataclass(frozen=True)
class EnvSetting:
    """One process-wide NCCL setting; anything absent is left to NCCL."""

    algos: Mapping[Collective, Algo] = field(default_factory=dict)
    protos: Mapping[Collective, Proto] = field(default_factory=dict)
    nchannels: int | None = None
    p2p_nchannels: int | None = None

    def __post_init__(self) -> None:
        for name in ("nchannels", "p2p_nchannels"):
            value = getattr(self, name)
            if value is not None and not MIN_CHANNELS <= value <= MAX_CHANNELS:
                raise InvalidConfig(f"{name} must be {MIN_CHANNELS} to {MAX_CHANNELS}, got {value}")
        for mapping in (self.algos, self.protos):
            for coll in mapping:
                if coll.is_p2p:
                    raise InvalidConfig(f"{coll.value} is point-to-point: it has no algorithm or protocol")


def _render_per_collective(choices: Mapping[Collective, Algo | Proto], names: Mapping) -> str:
    ordered = [c for c in ENV_COLLECTIVES if c in choices]
    return ";".join(f"{c.value}:{names[choices[c]]}" for c in ordered)


def render_env(setting: EnvSetting) -> dict[str, str]:
    env: dict[str, str] = {}
    if setting.algos:
        env["NCCL_ALGO"] = _render_per_collective(setting.algos, ALGO_ENV_NAMES)
    if setting.protos:
        env["NCCL_PROTO"] = _render_per_collective(setting.protos, PROTO_ENV_NAMES)
    if setting.nchannels is not None:
        env["NCCL_MIN_NCHANNELS"] = env["NCCL_MAX_NCHANNELS"] = str(setting.nchannels)
    if setting.p2p_nchannels is not None:
        env["NCCL_P2P_NCHANNELS"] = str(setting.p2p_nchannels)
    return env


def _parse_per_collective(variable: str, text: str, lookup: Mapping[str, Algo | Proto]) -> dict:
    """Parse `coll:name;coll:name`; a single name without `coll:` applies to every collective."""
    choices: dict = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        colls_text, sep, name = part.rpartition(":")
        if not sep:
            colls = list(ENV_COLLECTIVES)
        else:
            try:
                colls = [Collective(colls_text.strip().lower())]
            except ValueError:
                raise InvalidConfig(f"{variable}: unknown collective {colls_text!r}") from None
        value = name.strip().lower()
        if "," in value or value.startswith("^"):
            raise InvalidConfig(f"{variable}: lists and exclusions ({name!r}) are not one setting")
        if value not in lookup:
            raise InvalidConfig(f"{variable}: unknown name {name!r}")
        for coll in colls:
            if coll.is_p2p:
                raise InvalidConfig(f"{variable}: {coll.value} is point-to-point")
            choices[coll] = lookup[value]
    return choices


def _parse_channels(env: Mapping[str, str], variable: str) -> int | None:
    if variable not in env:
        return None
    try:
        return int(env[variable])
    except ValueError:
        raise InvalidConfig(f"{variable}: not an integer: {env[variable]!r}") from None


def parse_env(env: Mapping[str, str]) -> EnvSetting:
    """Read back a setting rendered by `render_env` (other variables are ignored)."""
    low, high = _parse_channels(env, "NCCL_MIN_NCHANNELS"), _parse_channels(env, "NCCL_MAX_NCHANNELS")
    if low != high:
        raise InvalidConfig(f"NCCL_MIN_NCHANNELS ({low}) and NCCL_MAX_NCHANNELS ({high}) differ")
    return EnvSetting(
        algos=_parse_per_collective("NCCL_ALGO", env.get("NCCL_ALGO", ""), _ALGO_BY_ENV_NAME),
        protos=_parse_per_collective("NCCL_PROTO", env.get("NCCL_PROTO", ""), _PROTO_BY_ENV_NAME),
        nchannels=low,
        p2p_nchannels=_parse_channels(env, "NCCL_P2P_NCHANNELS"),
    )
