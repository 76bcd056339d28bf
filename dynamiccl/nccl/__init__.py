"""The NCCL configuration space: validity rules, env and tuner-rule rendering."""

from dynamiccl.nccl.env import EnvSetting, parse_env, render_env
from dynamiccl.nccl.space import (
    CHANNEL_GRID,
    FabricTraits,
    GpuGeneration,
    InvalidConfig,
    candidate_configs,
    check_config,
    gpu_generation,
    is_valid,
    valid_algorithms,
    valid_protocols,
)
from dynamiccl.nccl.tuner_rules import TunerRule, applied_rule, first_match, parse_rules, render_rules

__all__ = [
    "CHANNEL_GRID",
    "EnvSetting",
    "FabricTraits",
    "GpuGeneration",
    "InvalidConfig",
    "TunerRule",
    "candidate_configs",
    "check_config",
    "applied_rule",
    "first_match",
    "gpu_generation",
    "is_valid",
    "parse_env",
    "parse_rules",
    "render_env",
    "render_rules",
    "valid_algorithms",
    "valid_protocols",
]
