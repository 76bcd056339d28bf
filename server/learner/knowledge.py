"""What the server knows about one fabric, kept current from the store.

The store is the only source of truth (replicas share it), so each replica
reads new measurements incrementally by id and folds them into per-cell
statistics. A worker thread refits the surrogate in the background; a request
that must see what was posted before it (`catch_up`, "reading your own
writes") folds the new rows in itself and re-judges only the contexts they
touched, against the current surrogate. A suggestion, which the surrogate
steers, also waits (briefly) for the refit where the surrogate has not seen a
good share of the evidence: a client that posts and asks at once, round after
round, would otherwise explore by its first rounds' model. Requests read an
immutable snapshot.

The trust model
---------------
A *source* is the token name of the client that posted a measurement, or its
job id where the API is open (there anyone may claim any job id: open mode
trusts every client). Only *trusted* cells are evidence for a recommendation,
for transfer to neighbouring sizes and similar fabrics, and for the surrogate:

* a cell that at least two sources agree on, and a third of those that
  report on its context, and that they outnumber two to one those that
  found it slower, is trusted (`Cell.corroborated`): colluders below a third
  of a context's sources cannot confirm each other before others check
  (NCCL's default, the baseline that is never itself recommended, needs two
  that outnumber those that found it slower: its location is their median,
  which a slower minority, a straggler's sample or a liar's, cannot move);
* a cell measured by one source is trusted when that source is the only one
  that has reported on the context at all: nobody else measures it, so its
  consistent evidence (the default measured `guard.MIN_DEFAULT_SAMPLES`
  times, the config `guard.MIN_SAMPLES`) decides, as a single job's own
  measurements should;
* a cell measured by one source on a context others report on too is
  unconfirmed until a second source agrees (suggest sends its best configs
  back to the fleet, so one does); NCCL's cost model confirms nothing;
* a cell another source contradicts (found slower beyond noise) is contested
  and never trusted, however many accomplices repeat the claim (a lone
  straggler contests too, until the next samples outvote it);
* a source whose claims others keep refuting is not listened to at all
  (`distrusted_sources`);
* what a fabric with the same hardware measured stands in for this fabric's
  own measurements (in the surrogate at `TRANSFER_WEIGHT`; as a cell's
  evidence, wider by how far the two fabrics' measurements of the same cells
  differ (`transfer_spread`), until this fabric has `guard.MIN_SAMPLES` of
  its own) only while the two agree where both measured the same cells
  (`behaves_alike`): the same GPUs and links need not behave the same, and a
  fabric's own evidence outranks a twin's;
* verified in use: a config that a source ran (twice or more) and found
  slower than NCCL's default, against its own measurements of the default
  where it has them, is withdrawn (`slower_in_use`): not recommended again,
  whatever others measured, until the evidence changes; a job that applied
  it gets the default at its next plugin round or launch.

Any source's measurement of a pair at a size, trusted or not, says the pair was tried there
(`Snapshot.explored`), so a fleet does not repeat one agent's trial: a liar can keep the server
from trying a pair nobody else measured at a size, which leaves NCCL's choice in force there.

So one source can decide the recommendations of contexts only it reports on
(its own job's calls; with per-agent tokens, its node's), and can keep NCCL's
default in force where it contradicts others; it cannot get a config
recommended on a context another source measures, nor make others run a
config they found slower.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from dynamiccl.nccl.space import candidate_configs, gpu_generation
from dynamiccl.schemas import DEFAULT_CONFIG, Context, Fabric, NcclConfig
from dynamiccl.server.learner.base import Decision, Estimate
from dynamiccl.server.learner.prior import NcclPrior
from dynamiccl.server.learner.guard import MIN_GAIN, MIN_SAMPLES, decide
from dynamiccl.server.learner.policy import NOVEL_STD, Plan, plan
from dynamiccl.server.learner.stats import (
    DEFAULT_KEY,
    DEFAULT_NOISE,
    Cell,
    CellKey,
    ContextKey,
    Stragglers,
    cell_key,
    distrusted_sources,
    pooled_noise,
    slower_in_use,
)
from dynamiccl.server.learner.surrogate import Example, ResidualModel, pair_family
from dynamiccl.server.storage.base import Store

log = logging.getLogger(__name__)

#: Weight of a cell measured on a fabric with the same hardware, when learning another.
TRANSFER_WEIGHT = 0.3
#: Fabrics with the same hardware are taken to behave alike until their own measurements of the
#: same cells say otherwise: a cell disagrees when the two locations differ by more than this
#: (log scale, 5%) and more than noise explains (`DISAGREE_SIGMAS` standard errors) ...
ALIKE_TOLERANCE = math.log(1.05)
DISAGREE_SIGMAS = 2.5
#: ... and a fabric stops learning from another once this share of the cells both measured twice
#: or more (and at least MIN_DISAGREEING of them) disagree.
MAX_DISAGREEING_SHARE = 0.25
MIN_DISAGREEING = 3
#: Extra spread (log scale) of evidence transferred from another fabric, before the two fabrics'
#: measurements of the same cells tell (`transfer_spread`), where it weighs as TRANSFER_STD_CELLS
#: cells both measured.
TRANSFER_STD = 0.05
TRANSFER_STD_CELLS = 20
#: A fabric not read from the store for this long is refreshed in the background (other
#: replicas may have ingested).
STALE_AFTER_S = 5.0
READ_PAGE = 50_000
#: Least spread of the surrogate where a cell has samples of its own: the model was fit to
#: those samples, so as a prior for them it must not outweigh them (nor be surer than they are:
#: a lone sample, perhaps a straggler's, calls for a second look however well the model echoes it).
MODEL_STD_WITH_DATA = 0.05
#: A fabric is refit at most this often, in multiples of its last refit's duration: under a
#: stream of batches, refits take a bounded share of the CPU and requests keep theirs.
REFIT_SPACING = 3.0
MIN_REFIT_INTERVAL_S = 0.2
#: The surrogate is behind when the fabric holds this many cells it was not fit on, and this
#: share more than it was fit on: its refit then skips the spacing, and a suggestion that took
#: such evidence in waits for it (REFIT_WAIT_S). Each such refit needs the cells to have grown by
#: the share, so they are few over a fabric's life; re-measuring known cells never sets one off.
UNFITTED_CELLS = 20
UNFITTED_SHARE = 0.1
#: The longest such a suggestion waits for that refit (a fabric of 500 contexts refits in about a
#: second): past it, it is answered with the surrogate it has, and a later request finds the
#: refit done.
REFIT_WAIT_S = 0.5
#: Contexts whose decisions a snapshot remembers (bounds memory under many distinct contexts).
MEMO_LIMIT = 20_000
#: How often a fabric's old measurements are compacted, when the server keeps them for a bounded
#: time (`KnowledgeBase(retention_s=...)`).
COMPACT_EVERY_S = 3600.0
#: Recently requested contexts each new snapshot is computed for before it is swapped in.
RECENT_LIMIT = 4_000
#: NOVEL_STD weighs as much as this many (algorithm, protocol) pairs a fabric measured, in what
#: it learns of how far NCCL's model is off there (`model_error`).
NOVEL_STD_PAIRS = 4
#: A claim is corroborated by at least a third of the sources that report on its context (and
#: two): colluders below that share cannot confirm each other's claims before others check them.
QUORUM_SHARE_INVERSE = 3


def hardware_signature(fabric: Fabric) -> tuple:
    """Fabrics with the same signature are expected to behave alike (`behaves_alike` checks)."""
    return (
        gpu_generation(fabric.gpu),
        fabric.gpus_per_node,
        fabric.intra_node,
        fabric.inter_node,
        fabric.nics_per_node,
        fabric.sharp,
    )


@dataclass(frozen=True)
class CellSummary:
    location: float
    std_error: float
    n: int
    mean_nbytes: int
    sources: int
    trusted: bool
    withdrawn: bool = False  # faster by the evidence, slower where a source ran it: not recommended


def model_error(prior: NcclPrior, cells: dict[CellKey, CellSummary]) -> float:
    """How far (log scale) NCCL's model is off on a fabric for the (algorithm, protocol) pairs
    it has not measured yet, judged by those it has: the error of the model's prediction of each
    trusted cell measured twice or more, relative to the default of its context (what decides
    whether a config is worth running), as a root mean square per pair, and over pairs, with
    NOVEL_STD as NOVEL_STD_PAIRS pairs more. A fabric whose NCCL the model describes well spends
    fewer trials on what the model rates slow; one it describes badly, more."""
    errors: dict[tuple, list[float]] = defaultdict(list)
    for (context_key, config_key), summary in cells.items():
        default = cells.get((context_key, DEFAULT_KEY))
        if (config_key == DEFAULT_KEY or default is None or summary.n < 2 or default.n < 2
                or not (summary.trusted and default.trusted)):
            continue
        context, config = _representative((context_key, config_key), summary.mean_nbytes)
        predicted = prior.log_time(context, config) - prior.log_time(context, DEFAULT_CONFIG)
        resolved = prior.resolve(context, config)
        errors[(resolved.algo, resolved.proto)].append(summary.location - default.location - predicted)
    squares = [math.fsum(e * e for e in pair) / len(pair) for pair in errors.values()]
    return math.sqrt((math.fsum(squares) + NOVEL_STD_PAIRS * NOVEL_STD**2) / (len(squares) + NOVEL_STD_PAIRS))


def _repeated(summary: CellSummary | None) -> bool:
    """Measured twice or more and trusted: evidence that may stand for other sizes and fabrics."""
    return summary is not None and summary.n >= 2 and summary.trusted


def _shared_cells(own: dict[CellKey, CellSummary],
                  other: dict[CellKey, CellSummary]) -> Iterator[tuple[CellSummary, CellSummary]]:
    """(this fabric's, the other's) summaries of each cell both measured twice or more, trusted."""
    for key, theirs in other.items():
        mine = own.get(key)
        if _repeated(mine) and _repeated(theirs):
            yield mine, theirs


def behaves_alike(own: dict[CellKey, CellSummary], other: dict[CellKey, CellSummary]) -> bool:
    """Whether a fabric's measurements agree with another's where both measured the same cell
    (twice or more, trusted): the same hardware need not mean the same fabric (topology, firmware,
    other jobs' traffic), so what another fabric measured is transferred only while they agree."""
    shared = disagreeing = 0
    for mine, theirs in _shared_cells(own, other):
        shared += 1
        gap = abs(mine.location - theirs.location)
        disagreeing += gap > ALIKE_TOLERANCE + DISAGREE_SIGMAS * math.hypot(mine.std_error, theirs.std_error)
    return disagreeing < MIN_DISAGREEING or disagreeing <= MAX_DISAGREEING_SHARE * shared


def transfer_spread(own: dict[CellKey, CellSummary], other: dict[CellKey, CellSummary]) -> float:
    """How far (log scale) another fabric's cell is off as evidence for this fabric's: the spread of
    the two fabrics' differences on the cells both measured (twice or more, trusted), beyond what
    their standard errors explain, with TRANSFER_STD as TRANSFER_STD_CELLS cells more. A twin whose
    measurements match this fabric's lends evidence nearly as good as its own; one that departs, less."""
    excess = [(mine.location - theirs.location) ** 2 - mine.std_error**2 - theirs.std_error**2
              for mine, theirs in _shared_cells(own, other)]
    prior = TRANSFER_STD_CELLS * TRANSFER_STD**2
    return math.sqrt((prior + max(math.fsum(excess), 0.0)) / (TRANSFER_STD_CELLS + len(excess)))


def lent_cells(own: dict[CellKey, CellSummary], other: dict[CellKey, CellSummary]) -> dict[CellKey, CellSummary]:
    """Another fabric's cells as evidence for this one: standard errors widened by `transfer_spread`."""
    spread = transfer_spread(own, other)
    return {key: replace(summary, std_error=math.hypot(summary.std_error, spread)) for key, summary in other.items()}


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of a fabric's knowledge; safe to read from any request thread."""

    prior: NcclPrior
    cells: dict[CellKey, CellSummary]
    donor_cells: dict[CellKey, CellSummary]
    model: ResidualModel
    noise: float
    measurements_seen: int
    distrusted: frozenset[str] = frozenset()
    withdrawn: int = 0  # cells withdrawn from recommendation (slower where a source ran them)
    last_id: int = 0  # the id of the last stored measurement taken in
    #: The `pair_family` of every cell this fabric measured, trusted or not (a claim not yet
    #: confirmed still says the pair was tried there), and of a similar fabric's trusted cells:
    #: where none is, NCCL's model alone speaks for a pair at that size (`Estimate.novel`).
    #: Judged on the evidence, not on the surrogate's rows, so it is current after a catch-up.
    explored: frozenset[tuple] = frozenset()
    stragglers: Stragglers = Stragglers()
    novel_std: float = NOVEL_STD
    _memo: dict = field(default_factory=dict, compare=False, repr=False)
    _plans: dict = field(default_factory=dict, compare=False, repr=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def decisions(self, contexts: Sequence[Context]) -> list[Decision]:
        """The guard's decision for each context over all its candidate configs. Computed once per
        snapshot and context (misses in one batched model call) and then looked up by the
        context's plain key: a snapshot never changes, so neither do its answers, and a request
        for decisions already made is dictionary reads."""
        keys = [context.key() for context in contexts]
        memo = self._memo
        try:  # decided already (the common case): plain reads, no lock
            return [memo[key] for key in keys]
        except KeyError:
            pass
        with self._memo_lock:  # one thread computes, concurrent requests for the same wait
            missing = {key: context for key, context in zip(keys, contexts) if key not in self._memo}
            if len(self._memo) + len(missing) > MEMO_LIMIT:
                self._memo.clear()
                self._plans.clear()
            if missing:
                asked = [(context.plain(), candidate_configs(self.prior.fabric, context)) for context in missing.values()]
                for (context, candidates), estimates in zip(asked, self.estimates(asked)):
                    self._memo[context.key()] = decide(context, candidates, estimates)
            return [self._memo[key] for key in keys]

    def plans(self, contexts: Sequence[Context]) -> list[tuple[Decision, Plan]]:
        """Each context's decision and what to try next there (`policy.plan`), made once per
        snapshot like the decision: a suggestion is then one draw among equally valuable trials."""
        decisions = self.decisions(contexts)
        plans = self._plans
        try:
            return [(decision, plans[decision.context.key()]) for decision in decisions]
        except KeyError:
            pass
        with self._memo_lock:
            for decision in decisions:
                key = decision.context.key()
                if key not in self._plans:
                    self._plans[key] = plan(decision.estimates, self.novel_std)
            return [(decision, self._plans[decision.context.key()]) for decision in decisions]

    def estimates(self, requests: Sequence[tuple[Context, Sequence[NcclConfig]]]) -> list[list[Estimate]]:
        """Posterior per config of each context: the surrogate's prediction combined with the
        config's own samples, or a similar fabric's (precision-weighted), in one batched model
        call."""
        pairs = [(context, config) for context, configs in requests for config in configs]
        means, stds = self.model.predict(pairs)
        results, index = [], 0
        for context, configs in requests:
            key = ContextKey.of(context)
            near = [ContextKey(key.collective, key.bucket + delta, key.nranks, key.nnodes) for delta in (-2, -1, 1, 2)]
            row = []
            for config in configs:
                unexplored = _family(self.prior, context, config) not in self.explored
                row.append(self._combine(key, near, config.key(), means[index], stds[index], unexplored))
                index += 1
            results.append(row)
        return results

    def keep_decisions(self, other: Snapshot, unchanged: Callable[[ContextKey], bool]) -> None:
        """Reuse `other`'s decisions (and plans) for the contexts `unchanged` accepts (same model,
        same evidence there)."""
        with other._memo_lock:
            kept = {key: d for key, d in other._memo.items() if unchanged(ContextKey.of(d.context))}
            plans = {key: p for key, p in other._plans.items() if key in kept}
        with self._memo_lock:
            self._memo.update(kept)
            self._plans.update(plans)

    def _combine(self, key: ContextKey, near: list[ContextKey], config_key: tuple, mean: float, std: float,
                 unexplored: bool) -> Estimate:
        """The surrogate's prediction combined with what a fabric like this one measured there
        (`lent_cells`), while this fabric has fewer than MIN_SAMPLES of its own, and then with the
        cell's own samples: a sample of its own never leaves an estimate less certain than none."""
        cell = self.cells.get((key, config_key))
        donor = self.donor_cells.get((key, config_key))
        if not _repeated(donor) or (cell is not None and cell.n >= MIN_SAMPLES):
            donor = None
        spreads = [summary.std_error for summary in (cell, donor) if summary is not None]
        if spreads:  # the model learned from these very cells: do not count them twice
            std = max(std, MODEL_STD_WITH_DATA, min(spreads))
        if donor is not None:
            mean, std = _precision_weighted(mean, std, donor.location, donor.std_error)
        if cell is not None and cell.n == 1:  # one sample, perhaps a straggler's
            mean, std = self.stragglers.lone_sample(mean, std, cell.location, cell.std_error)
        elif cell is not None:
            mean, std = _precision_weighted(mean, std, cell.location, cell.std_error)
        transferred = self._transferred(key, near, config_key)
        return Estimate(
            mean=mean,
            std=std,
            samples=cell.n if cell else 0,
            transferred=transferred,
            trusted=cell.trusted if cell is not None else transferred,
            novel=bool(unexplored) and not spreads,
        )

    def _transferred(self, key: ContextKey, near: list[ContextKey], config_key: tuple) -> bool:
        """Measured (twice or more, trusted) in the neighbouring buckets (`near`) or on a fabric
        like this one."""
        return _repeated(self.donor_cells.get((key, config_key))) or any(
            _repeated(self.cells.get((neighbour, config_key))) for neighbour in near)


class FabricKnowledge:
    """Statistics and surrogate of one fabric; `refresh` runs on the worker thread, `catch_up` on
    a request's, one at a time."""

    def __init__(self, fabric_id: str, fabric: Fabric) -> None:
        self.fabric_id = fabric_id
        self.fabric = fabric
        self.signature = hardware_signature(fabric)
        self.prior = NcclPrior(fabric)
        self._cells: dict[CellKey, Cell] = {}
        self._context_cells: dict[ContextKey, list[CellKey]] = defaultdict(list)  # in arrival order
        self._summaries: dict[CellKey, CellSummary] = {}
        self._explored: set[tuple] = set()  # the pair families of this fabric's cells
        self._distrusted: frozenset[str] = frozenset()
        self._noise = DEFAULT_NOISE
        self._stragglers = Stragglers()
        self._novel_std = NOVEL_STD
        self._last_id = 0
        self._seen = 0
        self._loaded = False  # the store's compacted counts are folded in on the first read
        self._lock = threading.Lock()
        self._recent: dict[tuple, Context] = {}  # by context key, oldest first
        self._recent_lock = threading.Lock()
        self._fitted_on: tuple | None = None  # the evidence (ids taken in) the surrogate was fit on
        self._fitted_cells = 0  # how many cells the fabric held when the surrogate was fit
        self.checked_at = time.monotonic()  # when the store was last read for new measurements
        self.snapshot = Snapshot(self.prior, {}, {}, ResidualModel(self.prior, []), DEFAULT_NOISE, 0)

    def refresh(self, store: Store, donors: Iterable[FabricKnowledge], fit: bool = True) -> bool:
        """Fold in new measurements, re-judge every cell (sources distrusted, noise) and, with
        `fit`, refit the surrogate unless it was fit on this very evidence; True when it was refit.
        The fit runs without holding the fabric, so `catch_up` never waits for one."""
        donors = list(donors)
        with self._lock:
            self.checked_at = time.monotonic()
            new = self._read_new(store)
            evidence = (self._last_id, tuple((d.fabric_id, d.snapshot.last_id) for d in donors))
            fit = fit and evidence != self._fitted_on
            if not new and not fit:
                return False
            self._distrusted = distrusted_sources(self._cells.values())
            views = [view for cell in self._cells.values() if (view := cell.without(self._distrusted)) is not None]
            self._noise = pooled_noise(views)
            self._stragglers = Stragglers.learned(views)
            self._summaries = {}
            for context_key in self._context_cells:
                self._summaries.update(self._judge(context_key))
            self._novel_std = model_error(self.prior, self._summaries)
            donor_cells = {key: summary for donor in donors if behaves_alike(self._summaries, donor.snapshot.cells)
                           for key, summary in lent_cells(self._summaries, donor.snapshot.cells).items()}
            examples = self._examples(self._summaries, donor_cells)
            cells = len(self._cells)
            donor_explored = frozenset(_family(self.prior, *_representative(key, summary.mean_nbytes))
                                       for key, summary in donor_cells.items() if summary.trusted)
        model = ResidualModel(self.prior, examples) if fit else self.snapshot.model
        with self._lock:  # what catch_up folded in meanwhile is kept: summaries are current
            snapshot = self._snapshot(model, donor_cells, donor_explored)
        with self._recent_lock:
            recent = list(self._recent.values())
        snapshot.decisions(recent)  # requests find it warm; warmed without the fabric: catch_up never waits
        with self._lock:
            if self._last_id != snapshot.last_id:  # a catch_up took rows in meanwhile: keep its summaries
                snapshot = self._snapshot(model, donor_cells, donor_explored)
            self.snapshot = snapshot
            if fit:
                self._fitted_on, self._fitted_cells = evidence, cells
        return fit

    def surrogate_behind(self) -> bool:
        """Whether the fabric holds many cells the surrogate was not fit on (UNFITTED_CELLS)."""
        unfitted = len(self._cells) - self._fitted_cells
        return unfitted >= max(UNFITTED_CELLS, UNFITTED_SHARE * self._fitted_cells)

    def catch_up(self, store: Store, target_id: int, timeout_s: float) -> bool:
        """Take in every measurement up to `target_id` within `timeout_s`: fold the new rows in and
        re-judge the contexts they touched, keeping the current surrogate (the worker refits it
        next) and every remembered estimate the new rows cannot have changed. False when the
        fabric stayed busy longer than the timeout."""
        if self.snapshot.last_id >= target_id:
            return True
        if not self._lock.acquire(timeout=max(timeout_s, 0.0)):
            return False
        try:
            if self.snapshot.last_id >= target_id:  # another request took it in while this one waited
                return True
            previous = self.snapshot
            # rows a refresh took in after `previous` was made: which contexts they touched is unknown
            untracked = self._last_id != previous.last_id
            touched: set[ContextKey] = set()
            self._read_new(store, touched)
            for context_key in sorted(touched):  # one order on every replica: the surrogate's rows
                self._summaries.update(self._judge(context_key))
            snapshot = self._snapshot(previous.model, previous.donor_cells, previous.explored)
            if not untracked:
                near = {(k.group, k.bucket + d) for k in touched for d in range(-2, 3)}
                snapshot.keep_decisions(previous, lambda key: (key.group, key.bucket) not in near)
            self.snapshot = snapshot
        finally:
            self._lock.release()
        return self.snapshot.last_id >= target_id

    def _snapshot(self, model: ResidualModel, donor_cells: dict[CellKey, CellSummary],
                  explored_elsewhere: frozenset[tuple]) -> Snapshot:
        """A snapshot of the current statistics; `explored_elsewhere` joins this fabric's own pair
        families (a similar fabric's, or an earlier snapshot's: families are never unlearned)."""
        withdrawn = sum(summary.withdrawn for summary in self._summaries.values())
        return Snapshot(self.prior, dict(self._summaries), donor_cells, model, self._noise, self._seen,
                        self._distrusted, withdrawn, self._last_id, explored_elsewhere.union(self._explored),
                        self._stragglers, self._novel_std)

    def decisions(self, contexts: Sequence[Context]) -> list[Decision]:
        """The current snapshot's decisions; what was asked is remembered, so the next snapshot
        has decided it before it replaces this one."""
        self._remember(contexts)
        return self.snapshot.decisions(contexts)

    def _remember(self, contexts: Sequence[Context]) -> None:
        with self._recent_lock:
            for context in contexts:
                self._recent[context.key()] = context
            while len(self._recent) > RECENT_LIMIT:
                self._recent.pop(next(iter(self._recent)))

    def plans(self, contexts: Sequence[Context]) -> list[tuple[Decision, Plan]]:
        """The current snapshot's decisions and plans (what was asked is remembered, as above)."""
        self._remember(contexts)
        return self.snapshot.plans(contexts)

    def live_rows(self) -> tuple[set[int], int]:
        """(the ids of every stored measurement a cell still holds a sample of, the last id taken
        in): retention may delete the other rows up to that id and no replica's cells change, since
        a cell keeps only each source's newest samples and those rows stay."""
        with self._lock:
            return {row_id for cell in self._cells.values() for row_id in cell.live_ids()}, self._last_id

    def _cell(self, context: Context, config: NcclConfig) -> tuple[CellKey, Cell]:
        key = cell_key(context, config)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Cell()
            self._context_cells[key[0]].append(key)
            self._explored.add(_family(self.prior, context, config))
        return key, cell

    def _read_new(self, store: Store, touched: set[ContextKey] | None = None) -> int:
        count = 0
        if not self._loaded:
            self._loaded = True
            for compacted in store.compacted(self.fabric_id):
                _, cell = self._cell(compacted.context, compacted.config)
                cell.add_compacted(compacted.context.nbytes, compacted.rows)
                count += compacted.rows
        while True:
            rows = store.measurements(self.fabric_id, after_id=self._last_id, limit=READ_PAGE)
            for row in rows:
                key, cell = self._cell(row.context, row.config)
                cell.add(row.context.nbytes, row.latency_us, row.client or row.job_id, row.id)
                if touched is not None:
                    touched.add(key[0])
                self._last_id = row.id
            count += len(rows)
            if len(rows) < READ_PAGE:
                break
        self._seen += count
        return count

    def _judge(self, context_key: ContextKey) -> dict[CellKey, CellSummary]:
        """Summaries of one context's cells, each trusted or not as the module docstring says, and
        withdrawn where a source that ran the config found it slower than the default."""
        views = {key: view for key in self._context_cells[context_key]
                 if (view := self._cells[key].without(self._distrusted)) is not None}
        witnesses = {source for view in views.values() for source in view.by_source}
        quorum = max(2, math.ceil(len(witnesses) / QUORUM_SHARE_INVERSE))
        default = views.get((context_key, DEFAULT_KEY))
        summaries = {}
        for key, cell in views.items():
            location = cell.location()
            # NCCL's default is the baseline, never itself recommended (see the module docstring)
            if key[1] == DEFAULT_KEY:
                corroborated = cell.corroborated(2, slower_contests=False)
            else:
                corroborated = cell.corroborated(quorum)
            withdrawn = (
                default is not None and key[1] != DEFAULT_KEY and location < default.location() - MIN_GAIN
                and slower_in_use(cell, default, self._noise)
            )
            trusted = (corroborated or (cell.sources == 1 and len(witnesses) == 1)) and not withdrawn
            if withdrawn:  # for exploration too, the word of the source that ran it slower counts
                location = max(cell.source_locations())
            summaries[key] = CellSummary(location, cell.std_error(self._noise), cell.n, cell.mean_nbytes,
                                         cell.sources, trusted, withdrawn)
        return summaries

    def _examples(
        self, cells: dict[CellKey, CellSummary], donor_cells: dict[CellKey, CellSummary]
    ) -> list[Example]:
        """Training rows of the surrogate: trusted cells only, so a source's unconfirmed claims
        cannot move what the model predicts for anything else. In key order: the fit depends on
        the evidence, not on the order it arrived in (or on what retention compacted)."""
        examples = []
        for source, scale in ((cells, 1.0), (donor_cells, TRANSFER_WEIGHT)):
            for key, summary in sorted(source.items()):
                if not summary.trusted or (source is donor_cells and key in cells):
                    continue
                context, config = _representative(key, summary.mean_nbytes)
                examples.append(Example(context, config, summary.location, scale * _example_weight(summary.n)))
        return examples


def _precision_weighted(mean: float, std: float, location: float, spread: float) -> tuple[float, float]:
    """N(mean, std) combined with the independent evidence N(location, spread)."""
    precision = 1.0 / std**2 + 1.0 / spread**2
    return (mean / std**2 + location / spread**2) / precision, math.sqrt(1.0 / precision)


def _family(prior: NcclPrior, context: Context, config: NcclConfig) -> tuple:
    """The `pair_family` a measurement of `config` on `context` belongs to, as NCCL resolves it."""
    return pair_family(context, prior.resolve(context, config))


def _representative(key: CellKey, nbytes: int) -> tuple[Context, NcclConfig]:
    """A context and config standing for a cell (its mean message size)."""
    context_key, (algo, proto, channels) = key
    context = Context(
        collective=context_key.collective, nbytes=nbytes, nranks=context_key.nranks, nnodes=context_key.nnodes
    )
    return context, NcclConfig(algo=algo or None, proto=proto or None, nchannels=channels or None)


def _example_weight(samples: int) -> float:
    """A lone sample may be a straggler: it counts for a third of a confirmed one."""
    return 0.3 if samples == 1 else min(samples, 6)


class KnowledgeBase:
    """All fabrics' knowledge, with one worker thread that refreshes what `observe` marks and,
    with `retention_s`, compacts each fabric's measurements older than that (`compact`) every
    COMPACT_EVERY_S."""

    def __init__(self, store: Store, on_refit: Callable[[float], None] | None = None,
                 retention_s: float | None = None, on_compact: Callable[[str, int], None] | None = None) -> None:
        self._store = store
        self._on_refit = on_refit
        self._retention_s = retention_s
        self._on_compact = on_compact
        self._next_compaction: dict[str, float] = {}
        self._fabrics: dict[str, FabricKnowledge] = {}
        self._fabrics_lock = threading.RLock()  # creation only; lookups are plain dict reads
        self._pending: set[str] = set()
        self._urgent: set[str] = set()  # fabrics whose surrogate is behind: refit without spacing
        self._wake = threading.Condition()
        self._refitted = threading.Condition()  # notified after every refresh
        self._idle = threading.Event()
        self._idle.set()
        self._stopped = False
        self._next_refit: dict[str, float] = {}
        self._worker = threading.Thread(target=self._run, name="dynamiccl-refit", daemon=True)
        self._worker.start()

    def get(self, fabric_id: str, fabric: Fabric) -> FabricKnowledge:
        """The fabric's knowledge; loaded synchronously (statistics only) on first use."""
        knowledge = self._loaded(fabric_id, fabric)
        if knowledge is None:
            with self._fabrics_lock:
                knowledge = self._loaded(fabric_id, fabric)
                if knowledge is None:
                    knowledge = FabricKnowledge(fabric_id, fabric)
                    knowledge.refresh(self._store, self._donors(knowledge), fit=False)
                    self._fabrics[fabric_id] = knowledge
            self.mark(fabric_id)
        elif time.monotonic() - knowledge.checked_at > STALE_AFTER_S:
            self.mark(fabric_id)
        return knowledge

    def caught_up(self, fabric_id: str, fabric: Fabric, target_id: int) -> bool:
        """Whether the fabric is loaded and its snapshot has taken in every row up to `target_id`
        (plain reads: never blocks)."""
        knowledge = self._loaded(fabric_id, fabric)
        return knowledge is not None and knowledge.snapshot.last_id >= target_id

    def _loaded(self, fabric_id: str, fabric: Fabric) -> FabricKnowledge | None:
        """The fabric's knowledge if loaded, and loaded for this hardware (a changed fabric starts afresh)."""
        knowledge = self._fabrics.get(fabric_id)
        return knowledge if knowledge is not None and knowledge.signature == hardware_signature(fabric) else None

    def catch_up(self, fabric_id: str, fabric: Fabric, timeout_s: float, target_id: int | None = None,
                 with_model: bool = False) -> bool:
        """Take in everything stored for the fabric up to `target_id` (None: before this call),
        within `timeout_s`; the background refit that follows updates the surrogate. With
        `with_model` (what suggestions are made from), where the surrogate has not seen much of
        the evidence (`FabricKnowledge.surrogate_behind`) this also waits for that refit, at most
        REFIT_WAIT_S and within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        knowledge = self.get(fabric_id, fabric)
        target = self._store.last_measurement_id(fabric_id) if target_id is None else target_id
        if knowledge.snapshot.last_id >= target:
            return True
        caught_up = knowledge.catch_up(self._store, target, timeout_s)
        if not (caught_up and knowledge.surrogate_behind()):
            self.mark(fabric_id)
            return caught_up
        self.mark(fabric_id, urgent=True)
        if with_model:
            with self._refitted:
                self._refitted.wait_for(lambda: not knowledge.surrogate_behind(),
                                        timeout=max(min(deadline - time.monotonic(), REFIT_WAIT_S), 0.0))
        return True

    def compact(self, fabric_id: str, received_before: float) -> int:
        """Delete the fabric's measurements received before `received_before` that no cell holds
        a sample of any more (their counts are kept): what the learner knows, on this replica and
        on one that starts afresh, does not change. How many rows were deleted."""
        keep, through_id = self._fabrics[fabric_id].live_rows()  # rows not yet taken in are left alone
        deleted = self._store.compact(fabric_id, through_id, received_before, keep)
        if deleted:
            log.info("fabric %s: %d measurements older than retention compacted", fabric_id, deleted)
            if self._on_compact is not None:
                self._on_compact(fabric_id, deleted)
        return deleted

    def mark(self, fabric_id: str, urgent: bool = False) -> None:
        """Have the worker refresh the fabric; `urgent`: without waiting out its refit spacing."""
        with self._wake:
            self._pending.add(fabric_id)
            if urgent:
                self._urgent.add(fabric_id)
            self._idle.clear()
            self._wake.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no refresh is pending (for tests and in-process benchmarks)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._worker.join(timeout=5)

    def _donors(self, knowledge: FabricKnowledge) -> list[FabricKnowledge]:
        """Other fabrics with the same hardware, loaded (statistics only) when first needed."""
        donors = []
        for fabric_id, fabric in self._store.list_fabrics().items():
            if fabric_id == knowledge.fabric_id or hardware_signature(fabric) != knowledge.signature:
                continue
            with self._fabrics_lock:
                other = self._loaded(fabric_id, fabric)
                if other is None:
                    other = self._fabrics[fabric_id] = FabricKnowledge(fabric_id, fabric)
                    other.refresh(self._store, [], fit=False)
            donors.append(other)
        return donors

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopped:
                    self._idle.set()
                    self._wake.wait()
                if self._stopped:
                    return
                fabric_id = self._pending.pop()
            knowledge = self._fabrics.get(fabric_id)
            if knowledge is None:
                continue
            with self._wake:  # the spacing, cut short when a request waits for this fabric
                self._wake.wait_for(lambda: fabric_id in self._urgent or self._stopped,
                                    timeout=max(0.0, self._next_refit.get(fabric_id, 0.0) - time.monotonic()))
                self._urgent.discard(fabric_id)
                if self._stopped:
                    return
            started = time.perf_counter()
            try:
                refit = knowledge.refresh(self._store, self._donors(knowledge))
            except Exception:  # a failed refit keeps the last snapshot; the next one retries
                log.exception("refit of fabric %s failed", fabric_id)
                continue
            finally:
                with self._refitted:
                    self._refitted.notify_all()
            elapsed = time.perf_counter() - started
            self._next_refit[fabric_id] = time.monotonic() + max(MIN_REFIT_INTERVAL_S, REFIT_SPACING * elapsed)
            if refit and self._on_refit is not None:
                self._on_refit(elapsed)
            if self._retention_s is not None and time.monotonic() >= self._next_compaction.get(fabric_id, 0.0):
                self._next_compaction[fabric_id] = time.monotonic() + COMPACT_EVERY_S
                try:
                    self.compact(fabric_id, time.time() - self._retention_s)
                except Exception:  # the next period retries; nothing is lost by waiting
                    log.exception("compaction of fabric %s failed", fabric_id)

