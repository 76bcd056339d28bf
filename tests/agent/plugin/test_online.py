"""Online tuning in plugin mode: rounds published as rule sections, agreement between nodes, attribution."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from polling import wait_until

from dynamiccl.agent.daemon.agent import Agent, AgentConfig
from dynamiccl.agent.daemon.app import create_app
from dynamiccl.agent.hook.table import CallKey, ConfigResolver, to_measurements
from dynamiccl.agent.plugin.driver import TunerLibrary
from dynamiccl.agent.plugin.online import (
    OnlineJobs,
    Outcome,
    PluginJob,
    RegistrationError,
    RoundPublisher,
    canonical_contexts,
)
from dynamiccl.agent.plugin.rules import expected_rule, parse_schedule
from dynamiccl.client import DynamicclClient
from dynamiccl.nccl.tuner_rules import TunerRule
from dynamiccl.schemas import Algo, Collective, Context, Fabric, Measurement, NcclConfig, Proto

AR, AG = Collective.allreduce, Collective.allgather
SMALL = Context(collective=AR, nbytes=4096, nranks=8, nnodes=1)
LARGE = Context(collective=AR, nbytes=1 << 20, nranks=8, nnodes=1)
GATHER = Context(collective=AG, nbytes=65536, nranks=8, nnodes=1)
BASE = "# launch\nallreduce,0,1073741824,ring,simple,-1,-1,-1\n"
BASE_RULE = TunerRule(collective=AR, min_bytes=0, max_bytes=1 << 30, algo=Algo.ring, proto=Proto.simple)
#: What the fake server suggests, picked by a hash of (job, round, context): pinned like the real one.
CHOICES = (
    NcclConfig(algo="tree", proto="ll", nchannels=2),
    NcclConfig(algo="ring", proto="ll128", nchannels=8),
    NcclConfig(algo="tree", proto="simple"),
    NcclConfig(algo="ring", proto="ll", nchannels=4),
    NcclConfig(),  # NCCL default: no rule
)


def pinned(job: str, round_: int, context: dict) -> tuple[NcclConfig, str]:
    key = json.dumps([job, round_, context], sort_keys=True).encode()
    digest = int(hashlib.sha256(key).hexdigest(), 16)
    return CHOICES[digest % len(CHOICES)], f"s-{round_}-{digest % 100000}"


class SuggestServer:
    """`/v1/suggest` pinned per (job, round, context); `down` refuses connections."""

    def __init__(self) -> None:
        self.down = False
        self.requests: list[dict] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path != "/v1/suggest":
            return httpx.Response(404, json={"detail": "no route"})
        body = json.loads(request.content)
        self.requests.append(body)
        suggestions = []
        for context in body["contexts"]:
            config, sid = pinned(body["job_id"], body["round"], context)
            suggestions.append({"context": context, "config": config.model_dump(mode="json"),
                                "kind": "explore", "suggestion_id": sid})
        return httpx.Response(200, json={"suggestions": suggestions})

    def client(self) -> DynamicclClient:
        return DynamicclClient("http://fake", attempts=1, transport=self.transport)


def node(server: SuggestServer, rules_dir: Path, contexts: list[Context], round_calls: int = 100) -> OnlineJobs:
    """One node's agent side: its online jobs with its own client, its own record of the job's contexts and
    its own rules directory, with job-7 registered on the launch rules BASE."""
    online = OnlineJobs(server.client(), "fab", lambda job: contexts, CollectorRegistry(), rules_dir=rules_dir)
    online.register("job-7", BASE, round_calls)
    return online


def write_report(path: Path, calls: int, late: int = 0, pid: int = 4242, version: int | None = 0) -> None:
    report = {"pid": pid, "time_unix_ms": int(time.time() * 1000), "comms": [
        {"ctx": 1, "comm_id": None, "nranks": 8, "nnodes": 1, "calls": calls, "version": version,
         "late": late, "finalized": False, "choices": []}]}
    Path(f"{path}.chosen.{pid}.json").write_text(json.dumps(report))


def expected_section_rules(round_: int, contexts: list[Context]) -> tuple[list[TunerRule], list[str]]:
    rules, ids = [], []
    for context in canonical_contexts(contexts):
        config, sid = pinned("job-7", round_, context.model_dump(mode="json", exclude_none=True))
        if config.algo is None:
            continue
        rules.append(TunerRule(collective=context.collective, min_bytes=context.nbytes, max_bytes=context.nbytes,
                               algo=config.algo, proto=config.proto, nchannels=config.nchannels,
                               nnodes=context.nnodes, nranks=context.nranks))
        ids.append(sid)
    return rules, ids


def test_rounds_0_to_2_become_sections_at_round_switch_points(tmp_path: Path) -> None:
    server = SuggestServer()
    publisher = node(server, tmp_path, [LARGE, GATHER, SMALL]).jobs()[0]
    path = publisher.job.rules_file
    for round_ in range(3):
        assert publisher.publish_round(round_) is Outcome.published
    sections = parse_schedule(path.read_text())
    assert [(s.version, s.from_call) for s in sections] == [(0, 0), (1, 100), (2, 200), (3, 300)]
    assert sections[0].rules == (BASE_RULE,)
    for round_, section in enumerate(sections[1:]):
        rules, ids = expected_section_rules(round_, [SMALL, LARGE, GATHER])
        assert list(section.rules) == [*rules, BASE_RULE]  # suggestions first, the launch's rules last
        assert list(section.suggestion_ids) == [*ids, None]
    assert [(r["job_id"], r["round"], r["fabric_id"]) for r in server.requests] == [
        ("job-7", 0, "fab"), ("job-7", 1, "fab"), ("job-7", 2, "fab")]
    # One canonical order whatever order the workload gave.
    assert [c["nbytes"] for c in server.requests[0]["contexts"]] == [65536, 4096, 1 << 20]
    assert publisher.next_round == 3


def test_a_round_is_published_when_due_and_a_late_one_is_flagged(tmp_path: Path) -> None:
    server = SuggestServer()
    online = node(server, tmp_path, [SMALL, LARGE])
    publisher = online.jobs()[0]
    path = publisher.job.rules_file
    write_report(path, calls=49)
    assert publisher.tick() == [] and len(parse_schedule(path.read_text())) == 1  # due at 100 - 50
    write_report(path, calls=50)
    assert publisher.tick() == [Outcome.published]
    write_report(path, calls=300, late=2)  # this node fell behind: rounds 1 and 2 are past their switch
    assert publisher.tick() == [Outcome.late, Outcome.late]
    assert [s.from_call for s in parse_schedule(path.read_text())] == [0, 100, 200, 300]
    metrics = online.metrics
    assert metrics.rounds.labels("published")._value.get() == 1
    assert metrics.rounds.labels("late")._value.get() == 2
    assert metrics.late_switches._value.get() == 2  # what the plugin itself reported


def test_server_down_publishes_nothing_and_the_round_follows_when_it_is_back(tmp_path: Path) -> None:
    server = SuggestServer()
    publisher = node(server, tmp_path, [SMALL]).jobs()[0]
    path = publisher.job.rules_file
    server.down = True
    write_report(path, calls=60)
    before = path.read_bytes()
    assert publisher.tick() == [Outcome.server_unavailable]
    assert path.read_bytes() == before and publisher.next_round == 0
    server.down = False
    assert publisher.tick() == [Outcome.published]
    assert [(s.version, s.from_call) for s in parse_schedule(path.read_text())] == [(0, 0), (1, 100)]


def test_two_nodes_write_byte_identical_files_at_different_times(tmp_path: Path) -> None:
    server = SuggestServer()
    a = node(server, tmp_path / "a", [SMALL, LARGE, GATHER]).jobs()[0]
    for round_ in range(3):
        a.publish_round(round_)
    # Node b sees the workload in another order, asks later, and misses round 1 the first time.
    b = node(server, tmp_path / "b", [GATHER, LARGE, SMALL]).jobs()[0]
    b.publish_round(0)
    server.down = True
    assert b.publish_round(1) is Outcome.server_unavailable
    server.down = False
    b.publish_round(1)
    b.publish_round(2)
    text = a.job.rules_file.read_bytes()
    assert text == b.job.rules_file.read_bytes()
    assert len(parse_schedule(text.decode())) == 4


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin re-reads the file and rewrites its report at every call."""
    monkeypatch.setenv("DYNAMICCL_TUNER_CHECK_CALLS", "1")
    monkeypatch.setenv("DYNAMICCL_TUNER_RELOAD_MS", "0")
    monkeypatch.setenv("DYNAMICCL_TUNER_REPORT_MS", "0")


def test_the_plugin_makes_the_same_choice_per_call_on_every_node(
        tmp_path: Path, library: Path, plugin_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    server = SuggestServer()
    contexts = [SMALL, LARGE]
    publishers = [node(server, tmp_path / name, contexts, round_calls=10).jobs()[0] for name in ("a", "b")]
    paths = [publisher.job.rules_file for publisher in publishers]
    tuner = TunerLibrary(library, version=5)
    decisions: list[list[tuple]] = []
    for path, publisher in zip(paths, publishers):
        monkeypatch.setenv("NCCL_TUNER_CONFIG_FILE", str(path))
        made = []
        with tuner.communicator(8, 1) as comm:
            for call in range(50):
                if call in (2, 13, 24):  # each node publishes while the job runs, a round ahead
                    publisher.publish_round(publisher.next_round)
                context = contexts[call % 2]
                decision = comm.choose(context.collective, context.nbytes)
                made.append((decision.algo, decision.proto, decision.nchannels))
        decisions.append(made)
    assert decisions[0] == decisions[1]
    sections = parse_schedule(paths[0].read_text())
    assert [s.from_call for s in sections] == [0, 10, 20, 30]
    expected = []
    for call in range(50):
        rule = expected_rule(sections, call, contexts[call % 2])
        expected.append((rule.algo, rule.proto, rule.nchannels))
    assert decisions[0] == expected
    assert len(set(decisions[0])) > 2  # the rounds did change what ran


def test_measurements_carry_the_config_the_plugin_reported(
        tmp_path: Path, library: Path, plugin_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    server = SuggestServer()
    publisher = node(server, tmp_path, [LARGE], round_calls=40).jobs()[0]
    path = publisher.job.rules_file
    publisher.publish_round(0)  # in force from call 40
    suggested = parse_schedule(path.read_text())[1]
    monkeypatch.setenv("NCCL_TUNER_CONFIG_FILE", str(path))
    env = {"NCCL_TUNER_PLUGIN": str(library), "NCCL_TUNER_CONFIG_FILE": str(path),
           "NCCL_ALGO": "allreduce:tree", "NCCL_PROTO": "allreduce:LL"}  # the env is not what runs
    resolver = ConfigResolver.from_env(env)
    assert resolver.plugin is not None
    key = CallKey(AR, LARGE.nbytes, 8, 1, True)
    gloo = CallKey(AR, LARGE.nbytes, 8, 1, False)

    def window(comm, calls: int) -> tuple[list[dict], int]:
        for _ in range(calls):
            comm.choose(AR, LARGE.nbytes)
        return to_measurements({key: [calls, calls * 1e-4], gloo: [1, 1e-3]}, resolver, "job-7")

    with TunerLibrary(library, version=5).communicator(8, 1) as comm:
        first, skipped = window(comm, 10)  # calls 0-9: no earlier report to compare with
        assert skipped == 1 and [m["config"] for m in first] == [{}]  # only the gloo cell
        out, skipped = window(comm, 10)  # calls 10-19 under the launch's rules
        assert skipped == 0
        assert out[0]["config"] == {"algo": "ring", "proto": "simple"} and "suggestion_id" not in out[0]
        assert window(comm, 10)[1] == 1  # calls 20-29: the switch at 40 is within a window's pace
        assert window(comm, 20)[1] == 1  # calls 30-49 straddle the switch
        out, skipped = window(comm, 10)  # calls 50-59 under round 0
    rule = suggested.rules[0]
    assert skipped == 0 and rule.min_bytes == LARGE.nbytes
    assert out[0]["config"] == rule.config.model_dump(mode="json", exclude_none=True)
    assert out[0]["suggestion_id"] == suggested.suggestion_ids[0]
    assert out[0]["count"] == 10 and out[0]["job_id"] == "job-7"


class Routes:
    """The agent's server: suggest from SuggestServer, the rest (fabrics, batches) from FakeServer."""

    def __init__(self, suggest: SuggestServer, rest) -> None:
        self.suggest, self.rest = suggest, rest
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/suggest":
            return self.suggest.handle(request)
        return self.rest.handle(request)


def test_the_agent_keeps_a_registered_jobs_rules_in_its_own_file_and_tunes_it_until_unregistered(
        tmp_path: Path, fake_server) -> None:
    server = SuggestServer()
    fabric = Fabric(gpu="cpu", gpus_per_node=1, intra_node="pcie", inter_node="none", nics_per_node=0)
    config = AgentConfig(server="http://fake", fabric_id="cpu-test", fabric=fabric, spool_dir=tmp_path / "spool",
                         window_s=0.1, max_backoff_s=0.1, online_interval_s=0.02, rules_dir=tmp_path / "rules")
    agent = Agent(config, transport=Routes(server, fake_server).transport)
    with TestClient(create_app(agent)) as client:
        measurement = Measurement(context=LARGE, config=NcclConfig(), latency_us=50.0, count=3, source="torch")
        body = {"job_id": "job-7", "measurements": [measurement.model_dump(mode="json", exclude_none=True)]}
        assert client.post("/local/v1/measurements", json=body).status_code == 202
        refused = client.post("/local/v1/plugin/register",
                              json={"job_id": "job-7", "rules": "not a rule\n", "round_calls": 10})
        assert refused.status_code == 422 and "not a rules file" in refused.text
        assert list((tmp_path / "rules").iterdir()) == [], "nothing is left of a refused registration"
        old_style = client.post("/local/v1/plugin/register",
                                json={"job_id": "job-7", "rules_file": "/etc/passwd.rules", "round_calls": 10})
        assert old_style.status_code == 422, "no caller names the file the agent writes"
        answer = client.post("/local/v1/plugin/register", json={"job_id": "job-7", "rules": BASE, "round_calls": 10})
        assert answer.status_code == 201 and answer.json()["next_round"] == 0
        path = Path(answer.json()["rules_file"])
        assert path.parent == tmp_path / "rules" and path.read_text() == BASE
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o1777, "jobs write their plugin's reports beside it"
        write_report(path, calls=5)
        wait_until(lambda: len(parse_schedule(path.read_text())) == 2)
        assert server.requests[0]["contexts"] == [LARGE.model_dump(mode="json")]
        assert client.post("/local/v1/plugin/unregister", json={"rules_file": str(path)}).status_code == 200
        assert not path.exists(), "the agent removes its file when the job ends"
        assert client.post("/local/v1/plugin/unregister", json={"rules_file": str(path)}).status_code == 404
        assert b'dynamiccl_agent_plugin_rounds_total{outcome="published"} 1.0' in client.get("/metrics").content


def test_a_rules_directory_the_agent_cannot_write_refuses_the_registration(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    online = OnlineJobs(SuggestServer().client(), "fab", lambda job: [], CollectorRegistry(), rules_dir=blocked)
    with pytest.raises(RegistrationError, match="cannot write into its rules directory"):
        online.register("job-7", BASE, 100)


def test_a_fresh_publisher_resumes_after_the_last_published_round(tmp_path: Path) -> None:
    server = SuggestServer()
    publisher = node(server, tmp_path, [SMALL]).jobs()[0]
    publisher.publish_round(0)
    path = publisher.job.rules_file
    again = RoundPublisher(PluginJob("job-7", path, 100), lambda *a: [], lambda: [SMALL])
    assert again.next_round == 1  # an agent restarted mid-job never republishes or skips a round
    assert os.path.getsize(path) > len(BASE)
