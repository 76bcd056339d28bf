"""Rendering a process-wide env and per-size tuner rules, and parsing both back."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamiccl.nccl import EnvSetting, InvalidConfig, TunerRule, first_match, parse_env, parse_rules, render_env, render_rules
from dynamiccl.nccl.env import ENV_COLLECTIVES, channel_variables, read_env
from dynamiccl.nccl.tuner_rules import RULE_COLLECTIVES
from dynamiccl.schemas import Algo, Collective, Context, Proto

channels = st.none() | st.integers(1, 64)
env_settings = st.builds(
    EnvSetting,
    algos=st.dictionaries(st.sampled_from(ENV_COLLECTIVES), st.sampled_from(list(Algo))),
    protos=st.dictionaries(st.sampled_from(ENV_COLLECTIVES), st.sampled_from(list(Proto))),
    nchannels=channels,
    p2p_nchannels=channels,
)


@st.composite
def tuner_rules(draw):
    low = draw(st.integers(0, 1 << 40))
    return TunerRule(
        collective=draw(st.sampled_from(RULE_COLLECTIVES)),
        min_bytes=low,
        max_bytes=draw(st.integers(low, 1 << 41)),
        algo=draw(st.sampled_from(list(Algo))),
        proto=draw(st.sampled_from(list(Proto))),
        nchannels=draw(channels),
        nnodes=draw(st.none() | st.integers(1, 1024)),
        nranks=draw(st.none() | st.integers(1, 8192)),
        num_pipe_ops=draw(st.none() | st.integers(1, 8)),
        reg_buff=draw(st.sampled_from([None, 0, 1])),
    )


@given(env_settings)
def test_env_round_trips(setting):
    assert parse_env(render_env(setting)) == setting


@given(st.lists(tuner_rules(), max_size=20))
def test_tuner_rules_round_trip(rules):
    assert parse_rules(render_rules(rules)) == rules


def test_env_uses_nccl_per_collective_syntax_spelling_and_cta_names():
    setting = EnvSetting(
        algos={Collective.allgather: Algo.ring, Collective.allreduce: Algo.nvls_tree},
        protos={Collective.allreduce: Proto.simple},
        nchannels=16,
    )
    assert render_env(setting) == render_env(setting, "2.28.9") == {
        "NCCL_ALGO": "allreduce:NVLSTree;allgather:Ring",
        "NCCL_PROTO": "allreduce:Simple",
        "NCCL_MIN_CTAS": "16",
        "NCCL_MAX_CTAS": "16",
    }


@pytest.mark.parametrize(("version", "names"), [
    ("2.16.5", ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS")),
    ("2.17.1", ("NCCL_MIN_CTAS", "NCCL_MAX_CTAS")),
    ("2.32.6+cuda13.0", ("NCCL_MIN_CTAS", "NCCL_MAX_CTAS")),
    ("unknown", ("NCCL_MIN_CTAS", "NCCL_MAX_CTAS")),
])
def test_channel_variables_follow_the_fabrics_nccl_version(version, names):
    assert channel_variables(version) == names
    rendered = render_env(EnvSetting(nchannels=8), version)
    assert rendered == dict.fromkeys(names, "8") and parse_env(rendered) == EnvSetting(nchannels=8)


def test_a_default_setting_renders_nothing():
    assert render_env(EnvSetting()) == {}


def test_a_bare_name_applies_to_every_collective():
    setting = parse_env({"NCCL_PROTO": "ll128"})
    assert set(setting.protos) == set(ENV_COLLECTIVES)


def test_users_lists_and_exclusions_are_read_as_what_nccl_may_choose_from():
    env = read_env({"NCCL_ALGO": "ring,tree;allgather:^nvls,pat", "NCCL_PROTO": "^LL128"})
    assert env.algos[Collective.allreduce] == {Algo.ring, Algo.tree}
    assert env.algos[Collective.allgather] == set(Algo) - {Algo.nvls, Algo.pat}
    assert env.protos[Collective.broadcast] == {Proto.ll, Proto.simple}
    with pytest.raises(InvalidConfig, match="NCCL_ALGO leaves allreduce a choice"):
        env.setting()


def test_both_channel_spellings_are_read_and_the_tighter_bounds_win():
    env = read_env({"NCCL_MIN_NCHANNELS": "4", "NCCL_MAX_NCHANNELS": "32", "NCCL_MAX_CTAS": "16", "NCCL_MIN_CTAS": "2"})
    assert (env.min_channels, env.max_channels) == (4, 16) and env.pinned_channels is None
    assert [env.clamp_channels(n) for n in (1, 8, 64)] == [4, 8, 16]
    assert read_env({"NCCL_MIN_CTAS": "8", "NCCL_MAX_CTAS": "8"}).pinned_channels == 8


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NCCL_ALGO": "allreduce:butterfly"}, "unknown name 'butterfly'"),
        ({"NCCL_ALGO": "allmagic:ring"}, "unknown collective"),
        ({"NCCL_ALGO": "allreduce:tree,ring"}, "leaves allreduce a choice"),
        ({"NCCL_PROTO": "^LL"}, "NCCL_PROTO leaves .* a choice \\(ll128,simple\\)"),
        ({"NCCL_ALGO": "alltoall:ring"}, "point-to-point"),
        ({"NCCL_MIN_CTAS": "8", "NCCL_MAX_CTAS": "16"}, "a range"),
        ({"NCCL_MIN_CTAS": "32", "NCCL_MAX_NCHANNELS": "16"}, "above the maximum"),
        ({"NCCL_MIN_NCHANNELS": "many", "NCCL_MAX_NCHANNELS": "many"}, "not an integer"),
        ({"NCCL_MAX_CTAS": "0"}, "at least 1"),
        ({"NCCL_MIN_NCHANNELS": "65", "NCCL_MAX_NCHANNELS": "65"}, "1 to 64"),
    ],
)
def test_env_that_is_not_one_setting_is_refused_saying_why(env, message):
    with pytest.raises(InvalidConfig, match=message):
        parse_env(env)


def test_rule_file_matches_nccl_example_format():
    text = render_rules([
        TunerRule(Collective.allreduce, 0, 65535, Algo.tree, Proto.ll, None, 2, 16),
        TunerRule(Collective.allreduce, 65536, 1 << 30, Algo.ring, Proto.simple, 16),
    ])
    lines = text.splitlines()
    assert lines[0].startswith("#")
    assert lines[1] == "allreduce,0,65535,tree,ll,-1,2,16,-1,-1"
    assert lines[2] == "allreduce,65536,1073741824,ring,simple,16,-1,-1,-1,-1"


def test_rules_parse_comments_blank_lines_and_short_rows():
    rules = parse_rules("# header\n\nallgather,0,100,ring,ll128,4,-1,-1  # tail comment\n")
    assert rules == [TunerRule(Collective.allgather, 0, 100, Algo.ring, Proto.ll128, 4)]


def test_first_matching_rule_wins():
    rules = parse_rules("allreduce,0,1000,tree,ll,-1,2,-1\nallreduce,0,99999,ring,simple,-1,-1,-1\n")
    call = Context(collective="allreduce", nbytes=500, nranks=16, nnodes=2)
    assert first_match(rules, call).algo is Algo.tree
    assert first_match(rules, call.model_copy(update={"nnodes": 4})).algo is Algo.ring
    assert first_match(rules, call.model_copy(update={"collective": "allgather"})) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allreduce,0,100,ring", "line 1: expected 8 to 10"),
        ("alltoall,0,100,ring,simple,-1,-1,-1", "no rules for alltoall"),
        ("allreduce,100,0,ring,simple,-1,-1,-1", "empty"),
        ("allreduce,0,x,ring,simple,-1,-1,-1", "max_bytes is not an integer"),
        ("allreduce,0,100,butterfly,simple,-1,-1,-1", "unknown algorithm"),
        ("allreduce,0,100,ring,fast,-1,-1,-1", "unknown protocol"),
        ("allreduce,0,100,ring,simple,99,-1,-1", "channels"),
        ("# ok\nallreduce,0,100,ring,simple,-1,0,-1", "line 2: nnodes"),
        ("allreduce,-1,100,ring,simple,-1,-1,-1", "min_bytes must be a byte count"),
    ],
)
def test_malformed_rules_are_refused_with_the_line(text, message):
    with pytest.raises(InvalidConfig, match=message):
        parse_rules(text)
