"""The simulated fabric: deterministic, noisy like real timings, with headroom over NCCL's choice."""

import math

import numpy as np
import pytest

from dynamiccl.nccl import InvalidConfig, candidate_configs
from dynamiccl.schemas import Context, NcclConfig
from dynamiccl.sim import PRESETS, SimulatedFabric, get_preset

SIZES = [1024 * 4**i for i in range(11)]


def contexts(preset):
    return [
        Context(collective=c, nbytes=s, nranks=n * preset.fabric.gpus_per_node, nnodes=n)
        for n in preset.node_counts for c in ("allreduce", "allgather", "reducescatter", "broadcast")
        for s in SIZES
    ]


def test_presets_cover_the_required_clusters():
    assert {"h100-ib-1n", "h100-ib-2n", "h100-ib-4n", "h100-ib-16n", "a100-ib-2n", "l40s-roce-2n",
            "h100-roce-4n"} <= set(PRESETS)
    with pytest.raises(KeyError, match="known: h100-ib-1n"):
        get_preset("tpu-pod")


def test_same_seed_same_measurements():
    preset, context = PRESETS["h100-ib-2n"], Context(collective="allreduce", nbytes=1 << 20, nranks=16, nnodes=2)
    first = [SimulatedFabric(preset, seed=3).run(context, NcclConfig()) for _ in range(2)]
    assert first[0] == first[1]
    assert SimulatedFabric(preset, seed=4).run(context, NcclConfig()) != first[0]


def test_noise_shrinks_with_the_calls_averaged_and_stragglers_are_rare_but_real():
    sim = SimulatedFabric(PRESETS["a100-ib-2n"], seed=0)
    context = Context(collective="allreduce", nbytes=1 << 24, nranks=16, nnodes=2)
    truth = sim.true_latency_us(context, NcclConfig())
    few = np.log([sim.run(context, NcclConfig(), count=1) / truth for _ in range(2000)])
    many = np.log([sim.run(context, NcclConfig(), count=100) / truth for _ in range(2000)])
    mad = lambda x: np.median(np.abs(x - np.median(x)))
    assert mad(many) < mad(few) / 2
    stragglers = np.mean(many > 0.25)
    assert 0.005 < stragglers < 0.08
    assert abs(np.median(many)) < 0.01


def test_invalid_configs_are_refused():
    sim = SimulatedFabric(PRESETS["l40s-roce-2n"])
    with pytest.raises(InvalidConfig):
        sim.run(Context(collective="allreduce", nbytes=1024, nranks=4, nnodes=1), NcclConfig(proto="ll128"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_oracle_never_loses_to_the_default_and_headroom_is_realistic(name):
    preset = PRESETS[name]
    sim = SimulatedFabric(preset)
    headroom = []
    for context in contexts(preset):
        best, best_us = sim.oracle(context)
        default_us = sim.true_latency_us(context, NcclConfig())
        assert best_us <= default_us
        assert best in candidate_configs(preset.fabric, context)
        headroom.append(default_us / best_us)
    headroom = np.array(headroom)
    assert np.mean(headroom > 1.05) > 0.15, "NCCL's choice leaves speed on the table on many contexts"
    assert headroom.max() < 1.6, "departures stay within what real clusters show"
    assert 1.02 < math.exp(np.mean(np.log(headroom))) < 1.2


def test_partial_configs_and_settings_mean_what_nccl_would_run():
    sim = SimulatedFabric(PRESETS["h100-ib-2n"])
    context = Context(collective="allreduce", nbytes=1 << 26, nranks=16, nnodes=2)
    resolved = sim.nccl.resolve(context, NcclConfig(algo="ring"))
    assert sim.true_latency_us(context, NcclConfig(algo="ring")) == sim.true_latency_us(context, resolved)
    assert sim.true_latency_us(context, NcclConfig()) == sim.true_latency_us(context, sim.default_config(context))
    env = {"NCCL_ALGO": "allreduce:Ring", "NCCL_PROTO": "allreduce:Simple"}
    assert sim.latency_under_env(context, env) == sim.true_latency_us(
        context, NcclConfig(algo="ring", proto="simple", nchannels=sim.nccl.default_channels(None, 2)))
    rules = "allreduce,0,1099511627776,ring,simple,8,-1,-1\n"
    assert sim.latency_under_rules(context, rules) == sim.true_latency_us(
        context, NcclConfig(algo="ring", proto="simple", nchannels=8))


def test_more_channels_than_the_links_take_stop_helping():
    sim = SimulatedFabric(PRESETS["h100-ib-4n"])
    context = Context(collective="allreduce", nbytes=1 << 30, nranks=32, nnodes=4)
    times = {n: sim.true_latency_us(context, NcclConfig(algo="ring", proto="simple", nchannels=n))
             for n in (2, 8, 16, 32, 64)}
    assert times[2] > times[8] > times[16], "a few channels cannot fill the NICs"
    assert times[64] > times[32], "past a point extra channels contend and slow the call"
