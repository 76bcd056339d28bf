"""Process-wide NCCL environment: rendering a setting, and reading any environment as NCCL does.

`NCCL_ALGO` and `NCCL_PROTO` use the per-collective syntax of NCCL 2.24 and
newer (`allreduce:tree;allgather:ring`). The channel count is pinned with
`NCCL_MIN_CTAS` = `NCCL_MAX_CTAS` from NCCL 2.17 on (and where the version is
not known), with the older `NCCL_MIN_NCHANNELS` / `NCCL_MAX_NCHANNELS` below
it; point-to-point operations take `NCCL_P2P_NCHANNELS`.

`read_env` reads what a user may have written too: lists (`ring,tree`),
exclusions (`^nvls`), either channel spelling (where both are set the lower
maximum and the higher minimum win), as the set of choices NCCL is left with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

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
#: The first NCCL that reads NCCL_MIN_CTAS / NCCL_MAX_CTAS (and deprecates the NCHANNELS names).
CTAS_SINCE = (2, 17)
CHANNEL_VARIABLES = (("NCCL_MIN_CTAS", "NCCL_MAX_CTAS"), ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS"))

Choice = TypeVar("Choice", Algo, Proto)


@dataclass(frozen=True)
class EnvSetting:
    """One process-wide NCCL setting, the kind DynamICCL writes; anything absent is left to NCCL."""

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


def nccl_version_tuple(version: str | None) -> tuple[int, ...] | None:
    """`2.28.9` -> (2, 28, 9); None where it is absent or not a version."""
    try:
        return tuple(int(part) for part in (version or "").split("+")[0].split(".")) or None
    except ValueError:
        return None


def channel_variables(nccl_version: str | None = None) -> tuple[str, str]:
    """The (min, max) channel variables this NCCL reads: the CTA names unless it predates 2.17."""
    version = nccl_version_tuple(nccl_version)
    return CHANNEL_VARIABLES[1] if version is not None and version < CTAS_SINCE else CHANNEL_VARIABLES[0]


def _render_per_collective(choices: Mapping[Collective, Algo | Proto], names: Mapping) -> str:
    ordered = [c for c in ENV_COLLECTIVES if c in choices]
    return ";".join(f"{c.value}:{names[choices[c]]}" for c in ordered)


def render_env(setting: EnvSetting, nccl_version: str | None = None) -> dict[str, str]:
    """The variables that put `setting` in force on this NCCL version (None: a current NCCL)."""
    env: dict[str, str] = {}
    if setting.algos:
        env["NCCL_ALGO"] = _render_per_collective(setting.algos, ALGO_ENV_NAMES)
    if setting.protos:
        env["NCCL_PROTO"] = _render_per_collective(setting.protos, PROTO_ENV_NAMES)
    if setting.nchannels is not None:
        low, high = channel_variables(nccl_version)
        env[low] = env[high] = str(setting.nchannels)
    if setting.p2p_nchannels is not None:
        env["NCCL_P2P_NCHANNELS"] = str(setting.p2p_nchannels)
    return env


@dataclass(frozen=True)
class NcclEnv:
    """What an environment leaves NCCL to choose from; a collective absent from `algos` / `protos`
    has every algorithm / protocol enabled."""

    algos: Mapping[Collective, frozenset[Algo]] = field(default_factory=dict)
    protos: Mapping[Collective, frozenset[Proto]] = field(default_factory=dict)
    min_channels: int | None = None
    max_channels: int | None = None
    p2p_nchannels: int | None = None

    @property
    def pinned_channels(self) -> int | None:
        return self.min_channels if self.min_channels is not None and self.min_channels == self.max_channels else None

    def clamp_channels(self, channels: int) -> int:
        """NCCL's own count for a call, within the environment's bounds."""
        if self.max_channels is not None:
            channels = min(channels, self.max_channels)
        return max(channels, self.min_channels or 1)

    def setting(self) -> EnvSetting:
        """The one config per collective this environment pins, or InvalidConfig saying what is
        a choice left to NCCL (a list, an exclusion, a channel range)."""
        def single(variable: str, choices: Mapping[Collective, frozenset[Choice]]) -> dict[Collective, Choice]:
            for coll, enabled in choices.items():
                if len(enabled) != 1:
                    names = ",".join(sorted(c.value for c in enabled)) or "nothing"
                    raise InvalidConfig(f"{variable} leaves {coll.value} a choice ({names}), not one setting")
            return {coll: next(iter(enabled)) for coll, enabled in choices.items()}

        if self.min_channels != self.max_channels:
            raise InvalidConfig(f"the channel bounds ({self.min_channels} to {self.max_channels}) are a range, "
                                "not one setting")
        return EnvSetting(algos=single("NCCL_ALGO", self.algos), protos=single("NCCL_PROTO", self.protos),
                          nchannels=self.pinned_channels, p2p_nchannels=self.p2p_nchannels)


def _parse_names(variable: str, text: str, lookup: Mapping[str, Choice]) -> frozenset[Choice]:
    """`a,b` enables those; `^a,b` enables all but those."""
    text = text.strip()
    exclude = text.startswith("^")
    names = [name.strip().lower() for name in text.removeprefix("^").split(",")]
    unknown = [name for name in names if name not in lookup]
    if unknown or not names:
        raise InvalidConfig(f"{variable}: unknown name {(unknown or [''])[0]!r} "
                            f"(known: {', '.join(sorted(set(str(v.value) for v in lookup.values())))})")
    named = frozenset(lookup[name] for name in names)
    return frozenset(lookup.values()) - named if exclude else named


def _parse_per_collective(variable: str, text: str, lookup: Mapping[str, Choice]) -> dict[Collective, frozenset[Choice]]:
    """`[coll:]names;[coll:]names`: a part without `coll:` applies to every collective; later
    parts override earlier ones for the collectives they name."""
    choices: dict[Collective, frozenset[Choice]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        colls_text, sep, names = part.rpartition(":")
        if not sep:
            colls = list(ENV_COLLECTIVES)
        else:
            try:
                colls = [Collective(colls_text.strip().lower())]
            except ValueError:
                raise InvalidConfig(f"{variable}: unknown collective {colls_text!r}") from None
        enabled = _parse_names(variable, names, lookup)
        for coll in colls:
            if coll.is_p2p:
                raise InvalidConfig(f"{variable}: {coll.value} is point-to-point")
            choices[coll] = enabled
    return choices


def _parse_count(env: Mapping[str, str], variable: str) -> int | None:
    if not env.get(variable, "").strip():
        return None
    try:
        value = int(env[variable])
    except ValueError:
        raise InvalidConfig(f"{variable}: not an integer: {env[variable]!r}") from None
    if value < 1:
        raise InvalidConfig(f"{variable}: must be at least 1, got {value}")
    return value


def read_env(env: Mapping[str, str]) -> NcclEnv:
    """What NCCL is left to choose from under `env` (other variables are ignored)."""
    lows = [v for v in (_parse_count(env, low) for low, _ in CHANNEL_VARIABLES) if v is not None]
    highs = [v for v in (_parse_count(env, high) for _, high in CHANNEL_VARIABLES) if v is not None]
    low, high = max(lows, default=None), min(highs, default=None)
    if low is not None and high is not None and low > high:
        raise InvalidConfig(f"the minimum channel count ({low}) is above the maximum ({high})")
    return NcclEnv(
        algos=_parse_per_collective("NCCL_ALGO", env.get("NCCL_ALGO", ""), _ALGO_BY_ENV_NAME),
        protos=_parse_per_collective("NCCL_PROTO", env.get("NCCL_PROTO", ""), _PROTO_BY_ENV_NAME),
        min_channels=low,
        max_channels=high,
        p2p_nchannels=_parse_count(env, "NCCL_P2P_NCHANNELS"),
    )


def parse_env(env: Mapping[str, str]) -> EnvSetting:
    """The one setting `env` pins (what `render_env` wrote), or InvalidConfig saying why it is not one."""
    return read_env(env).setting()
