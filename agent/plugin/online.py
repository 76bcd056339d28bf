"""Online tuning inside a running job: the agent appends one rules section per tuning round.

A job launched with `dynamiccl launch --mode plugin` hands its launch rules
(version 0: the job's pinned recommendation) to the agent, which writes them
into a file of its own in its rules directory (`OnlineJobs.rules_dir`, shared
with the node's jobs) and loads DynamICCL's tuner plugin on that file. The
agent rewrites no other file: no caller names a path. For round r = 0, 1, 2, ... the
agent asks the server `/v1/suggest` for the job's contexts with the job id and
`round=r`, turns the suggestions into exact-size rules placed before the
recommendation's, and appends them as

    # dynamiccl: version=r+1 from_call=(r+1)*ROUND_CALLS

Agreement between nodes. Every node runs its own agent and its own copy of
the file, and the ranks of a communicator must choose alike per call. So a
section depends only on what every node shares: the server's answer pinned
for (job, round, context), the version-0 rules (the job's pinned
recommendation), and `ROUND_CALLS`, a job-wide setting
(`$DYNAMICCL_ROUND_CALLS`, the same in every node's environment). Version and
from_call are functions of the round alone, contexts are sent in one
canonical order, and a node never skips a round: when the server does not
answer it publishes nothing and asks for the same round again later (the
pinned answer does not change with the asking time).

When to publish is local (each node watches its own plugin's reports):
round r is published once the busiest communicator has made
from_call - lead calls (lead: half a round by default). A longer round
leaves more time for a slow server or a slow node, at the cost of learning
less often. A node that publishes only after from_call has passed is late:
its ranks ran calls under older rules than their peers' (NCCL may hang on
such a mismatch). Being late is logged as a warning and counted
(`dynamiccl_agent_plugin_rounds_total{outcome="late"}`), and every late
switch the plugin itself reports is counted too
(`dynamiccl_agent_plugin_late_switches_total`): the cue to raise ROUND_CALLS.

Not covered by the agreement: the set of contexts is each agent's own record
of the job's workload. Every rank of a communicator issues the same
collectives, so the sets agree once the job's calls reach every agent
(a hook window); a context first seen between two nodes' publication moments
makes their sections differ for that context.

The plugin ignores a file over 4 MiB, so tuning a job stops (logged) when the
next section would grow the file past it; a round whose rules and suggestion
ids equal the previous section's is not published (both are deterministic).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from dynamiccl.agent.plugin.report import read_reports
from dynamiccl.agent.plugin.rules import RulesFile, Section, suggestion_rules, valid_suggestion_id
from dynamiccl.agent_api import MAX_RULES_BYTES, path_safe
from dynamiccl.client import ApiError, DynamicclClient
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.nccl.tuner_rules import RULE_COLLECTIVES
from dynamiccl.schemas import Context, Suggestion

log = logging.getLogger("dynamiccl.agent.online")

ROUND_CALLS_ENV = "DYNAMICCL_ROUND_CALLS"
DEFAULT_ROUND_CALLS = 10_000

Suggest = Callable[[Sequence[Context], str, int], list[Suggestion]]  # (contexts, job_id, round)


def round_from_call(round_: int, round_calls: int) -> int:
    """The call index from which round `round_`'s section is in force: a function of the round only."""
    return (round_ + 1) * round_calls


def round_version(round_: int) -> int:
    return round_ + 1  # version 0 is the launch's recommendation


class Outcome(StrEnum):
    published = "published"
    late = "late"  # published after from_call had passed on this node
    unchanged = "unchanged"
    no_workload = "no_workload"
    server_unavailable = "server_unavailable"
    file_full = "file_full"


@dataclass(frozen=True)
class PluginJob:
    job_id: str
    rules_file: Path
    round_calls: int


def canonical_contexts(contexts: Sequence[Context]) -> list[Context]:
    """The contexts the plugin can act on, deduplicated, in an order every node computes alike."""
    unique = {Context(collective=c.collective, nbytes=c.nbytes, nranks=c.nranks, nnodes=c.nnodes)
              for c in contexts if c.collective in RULE_COLLECTIVES}
    return sorted(unique, key=lambda c: (c.collective.value, c.nbytes, c.nranks, c.nnodes))


class OnlineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds = Counter("dynamiccl_agent_plugin_rounds", "Tuning rounds handled for plugin-mode jobs",
                              ["outcome"], registry=registry)
        self.late_switches = Counter(
            "dynamiccl_agent_plugin_late_switches",
            "Rule sections the tuner plugin saw only after their from_call (ranks may have disagreed)",
            registry=registry,
        )
        self.jobs = Gauge("dynamiccl_agent_plugin_jobs", "Plugin-mode jobs being tuned", registry=registry)


class RoundPublisher:
    """Publishes one job's tuning rounds into its rules file, in order, each exactly once."""

    def __init__(self, job: PluginJob, suggest: Suggest, contexts: Callable[[], Sequence[Context]],
                 lead_calls: int | None = None, metrics: OnlineMetrics | None = None) -> None:
        if job.round_calls < 1:
            raise ValueError("round_calls must be >= 1")
        self.job = job
        self._suggest = suggest
        self._contexts = contexts
        self.lead_calls = job.round_calls // 2 if lead_calls is None else lead_calls
        self._metrics = metrics
        self.rules = RulesFile(job.rules_file)
        last = self.rules.sections[-1].version if self.rules.sections else 0
        self.next_round = last  # version r+1 is round r: an agent restarted mid-job resumes after it
        self.done = False
        self._late_seen = 0

    @property
    def base(self) -> Section | None:
        """The launch's section (version 0), carried under every round's suggestions."""
        first = self.rules.sections[0] if self.rules.sections else None
        return first if first is not None and first.version == 0 else None

    def publish_round(self, round_: int, calls_seen: int = 0) -> Outcome:
        """Ask the server for round `round_` and append its section; what happened."""
        contexts = canonical_contexts(self._contexts())
        if not contexts:
            return self._count(Outcome.no_workload)
        try:
            suggestions = self._suggest(contexts, self.job.job_id, round_)
        except (ApiError, httpx.HTTPError, ValueError) as error:
            log.warning("job %s round %d: no suggestions (%s): its rules stay as they are",
                        self.job.job_id, round_, error)
            return self._count(Outcome.server_unavailable)
        if [s.context for s in suggestions] != contexts:
            log.warning("job %s round %d: the server's suggestions do not answer the contexts asked",
                        self.job.job_id, round_)
            return self._count(Outcome.server_unavailable)
        return self._append(round_, suggestions, calls_seen)

    def _append(self, round_: int, suggestions: list[Suggestion], calls_seen: int) -> Outcome:
        pairs = suggestion_rules(suggestions)
        base = self.base
        rules = [rule for rule, _ in pairs] + list(base.rules if base else ())
        ids = [s.suggestion_id for _, s in pairs] + [base.suggestion_id(i) if base else None
                                                      for i in range(len(rules) - len(pairs))]
        ids = [sid if sid and valid_suggestion_id(sid) else None for sid in ids]
        last = self.rules.sections[-1] if self.rules.sections else None
        if last is not None and last.rules == tuple(rules) and last.suggestion_ids == (tuple(ids) if any(ids) else ()):
            self.next_round = round_ + 1
            return self._count(Outcome.unchanged)
        from_call = round_from_call(round_, self.job.round_calls)
        try:
            self.rules.publish(rules, from_call, version=round_version(round_), suggestion_ids=ids,
                               max_bytes=MAX_RULES_BYTES)
        except InvalidConfig as error:
            log.warning("job %s: tuning stops at round %d: %s", self.job.job_id, round_, error)
            self.done = True
            return self._count(Outcome.file_full)
        self.next_round = round_ + 1
        if calls_seen >= from_call:
            log.warning("job %s round %d published late: a communicator of this node is at call %d, past "
                        "from_call %d; raise $%s", self.job.job_id, round_, calls_seen, from_call,
                        ROUND_CALLS_ENV)
            return self._count(Outcome.late)
        log.info("job %s round %d: %d rules from call %d", self.job.job_id, round_, len(rules), from_call)
        return self._count(Outcome.published)

    def tick(self) -> list[Outcome]:
        """Publish every round now due on this node, in order; stop at the first that fails."""
        reports = read_reports(self.job.rules_file)
        calls_seen = max((comm.calls for report in reports for comm in report.comms), default=0)
        self._count_late_switches(sum(comm.late for report in reports for comm in report.comms))
        outcomes = []
        while not self.done and calls_seen >= round_from_call(self.next_round, self.job.round_calls) - self.lead_calls:
            before = self.next_round
            outcomes.append(self.publish_round(self.next_round, calls_seen))
            if self.next_round == before:
                break
        return outcomes

    def _count_late_switches(self, late: int) -> None:
        # Report files of exited processes vanish with the job only, so the sum only grows within one.
        if late > self._late_seen:
            log.warning("job %s: the tuner plugin saw %d rules section(s) after their from_call; raise $%s",
                        self.job.job_id, late - self._late_seen, ROUND_CALLS_ENV)
            if self._metrics is not None:
                self._metrics.late_switches.inc(late - self._late_seen)
            self._late_seen = late

    def _count(self, outcome: Outcome) -> Outcome:
        if self._metrics is not None:
            self._metrics.rounds.labels(outcome.value).inc()
        return outcome



class RegistrationError(ValueError):
    """A registration the agent refuses (the launcher runs the job with its launch rules)."""


class OnlineJobs:
    """The agent's plugin-mode jobs, each with its publisher, ticked by one thread.

    Jobs are keyed by rules file: two launchers of one job on a node have
    two files, each fed the same pinned sections. The files live in
    `rules_dir`, created by the agent and removed when their job is
    unregistered. The directory is shared with the node's jobs, whose plugin
    writes its reports beside each file: it is sticky and world-writable
    (as /tmp), so a job cannot remove or replace another's files.
    """

    def __init__(self, client: DynamicclClient, fabric_id: str, contexts: Callable[[str], Sequence[Context]],
                 registry: CollectorRegistry, rules_dir: Path, interval_s: float = 1.0,
                 on_unknown_fabric: Callable[[], None] | None = None) -> None:
        self.rules_dir = rules_dir
        self._client = client
        self._fabric_id = fabric_id
        self._contexts = contexts
        self._on_unknown_fabric = on_unknown_fabric
        self.metrics = OnlineMetrics(registry)
        self.interval_s = interval_s
        self._jobs: dict[Path, RoundPublisher] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynamiccl-online", daemon=True)

    def suggest(self, contexts: Sequence[Context], job_id: str, round_: int) -> list[Suggestion]:
        try:
            return self._client.suggest(self._fabric_id, contexts, job_id=job_id, round=round_)
        except ApiError as error:
            if error.status_code == 404 and self._on_unknown_fabric is not None:
                self._on_unknown_fabric()
            raise

    def register(self, job_id: str, rules: str, round_calls: int) -> RoundPublisher:
        """Write the job's launch rules into a new file of the rules directory and tune it."""
        try:
            path = self._new_rules_file(job_id, rules)
        except OSError as error:
            raise RegistrationError(f"the agent cannot write into its rules directory {self.rules_dir}: "
                                    f"{error.strerror}") from None
        job = PluginJob(job_id=job_id, rules_file=path, round_calls=round_calls)
        try:
            publisher = RoundPublisher(job, self.suggest, lambda: self._contexts(job.job_id),
                                       metrics=self.metrics)
        except (OSError, UnicodeDecodeError, InvalidConfig, ValueError) as error:
            path.unlink(missing_ok=True)
            raise RegistrationError(f"the rules are not a rules file: {error}") from None
        with self._lock:
            self._jobs[path] = publisher
            self.metrics.jobs.set(len(self._jobs))
        log.info("job %s: online tuning of %s, rounds of %d calls, from round %d",
                 job.job_id, path, job.round_calls, publisher.next_round)
        return publisher

    def _new_rules_file(self, job_id: str, rules: str) -> Path:
        self.rules_dir.mkdir(parents=True, exist_ok=True)
        if stat.S_IMODE(self.rules_dir.stat().st_mode) != 0o1777:
            os.chmod(self.rules_dir, 0o1777)
        fd, name = tempfile.mkstemp(prefix=f"dynamiccl-{path_safe(job_id)}-", suffix=".rules", dir=self.rules_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)  # the job's NCCL reads it, whoever runs it
            handle.write(rules if rules.endswith("\n") or not rules else rules + "\n")
        return Path(name)

    def unregister(self, rules_file: Path) -> bool:
        """Stop tuning the job of this file and remove the file; False when it is not registered."""
        with self._lock:
            publisher = self._jobs.pop(rules_file, None)
            self.metrics.jobs.set(len(self._jobs))
        if publisher is not None:
            rules_file.unlink(missing_ok=True)
            log.info("job %s: online tuning stopped after round %d", publisher.job.job_id,
                     publisher.next_round - 1)
        return publisher is not None

    def jobs(self) -> list[RoundPublisher]:
        with self._lock:
            return list(self._jobs.values())

    def tick(self) -> None:
        for publisher in self.jobs():
            if not publisher.job.rules_file.exists():  # the job ended without saying so
                self.unregister(publisher.job.rules_file)
                continue
            try:
                publisher.tick()
            except OSError as error:  # e.g. the job's directory went away: keep the others going
                log.warning("job %s: cannot publish into %s: %s", publisher.job.job_id,
                            publisher.job.rules_file, error)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()
