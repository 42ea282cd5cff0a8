"""Prometheus metrics of a selector: what it selects, how fast, and how far ahead of its ranks.

Counters that the journal keeps (samples seen and selected per source, the loss weight
selected per source, skipped records, truncated samples) are read from the job at scrape
time, so they carry over a restart; so are the target and realised shares of the loss weight.
The selection latency histogram and the small-source counter are this process's own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from colm_server.select import Selection
from colm_server.service.inbox import Waiting
from colm_server.service.job import Job

# Selection takes milliseconds (random) to seconds (colm with a large model on a CPU).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class SelectorMetrics:
    """A registry of its own (several selectors can share a process, e.g. in tests)."""

    def __init__(self, job: Job, waiting: Waiting | None = None):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # resident memory, CPU seconds, open fds
        self.registry.register(_JobCollector(job))
        if waiting is not None:
            self.registry.register(_WaitingCollector(waiting))
        self.latency = Histogram("colm_selection_seconds", "time to select one step's coresets",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.kept = Counter("colm_small_source_kept", "samples of small sources kept whole, per source",
                            ["source"], registry=self.registry)
        self.scorer_loss = Gauge("colm_scorer_loss", "the last coreset's weighted loss on the scorer, "
                                 "before the selector's step on its own adapter (scorer_adapter own)",
                                 registry=self.registry)

    def observe(self, selection: Selection, seconds: float) -> None:
        """Record one step's selection (called by the job after the step is journaled)."""
        self.latency.observe(seconds)
        if "scorer_loss" in selection.stats:
            self.scorer_loss.set(selection.stats["scorer_loss"])
        for source, s in selection.stats.get("sources", {}).items():
            if s.get("kept_small"):
                self.kept.labels(source).inc(s["selected"])


class _JobCollector(Collector):
    """Reads the job's counters and flow-control state each time /metrics is scraped."""

    def __init__(self, job: Job):
        self.job = job

    def collect(self):
        job, snap = self.job, self.job.snapshot()
        seen = CounterMetricFamily("colm_source_seen", "samples drawn into large batches", labels=["source"])
        selected = CounterMetricFamily("colm_source_selected", "samples selected", labels=["source"])
        for source, n in sorted(snap["source_seen"].items()):
            seen.add_metric([source], n)
            selected.add_metric([source], snap["source_selected"].get(source, 0))
        skipped = CounterMetricFamily("colm_skipped_records", "shard records skipped", labels=["reason"])
        for reason, n in sorted(job.stream.skipped.items()):
            skipped.add_metric([reason], n)
        yield from (seen, selected, skipped)
        yield from _mixture_families(snap)
        yield CounterMetricFamily("colm_truncated_samples", "samples cut to tokenize.max_length",
                                  value=snap["truncated"])
        yield GaugeMetricFamily("colm_selected_steps", "steps selected and journaled",
                                value=snap["selected_steps"])
        yield GaugeMetricFamily("colm_param_version", "adapter version the selector scores with",
                                value=snap["param_version"])
        yield GaugeMetricFamily("colm_param_staleness_steps",
                                "steps selected since the current adapter was swapped in",
                                value=snap["selected_steps"] - snap["param_step"])
        inflight = GaugeMetricFamily("colm_rank_inflight", "batches sent to a rank and not yet acknowledged",
                                     labels=["rank"])
        connected = GaugeMetricFamily("colm_rank_connected", "1 while the rank holds a stream",
                                      labels=["rank"])
        for r, (is_connected, next_step, acked) in enumerate(snap["ranks"]):
            inflight.add_metric([str(r)], max(next_step - acked - 1, 0))
            connected.add_metric([str(r)], int(is_connected))
        yield from (inflight, connected)
        slowest = min((acked for _, _, acked in snap["ranks"]), default=-1)
        yield GaugeMetricFamily("colm_prefetch_depth", "steps selected ahead of the slowest rank",
                                value=max(snap["selected_steps"] - slowest - 1, 0))
        first, last = job.journal.first_step, job.journal.last_step
        yield GaugeMetricFamily("colm_journal_steps", "steps held in the journal",
                                value=0 if first is None or last is None else last - first + 1)
        yield GaugeMetricFamily("colm_journal_bytes", "bytes of the journal on disk",
                                value=job.journal.size_bytes())


def _mixture_families(snap: dict):
    """Per source: the loss weight selected so far, its share of the total, and the target share."""
    weight = CounterMetricFamily("colm_source_weight", "loss weight selected (sum of sample weights)",
                                 labels=["source"])
    target = GaugeMetricFamily("colm_source_target_share",
                               "share of the loss weight selection aims at (selector.mixture)",
                               labels=["source"])
    realised = GaugeMetricFamily("colm_source_realised_share", "share of the loss weight selected so far",
                                 labels=["source"])
    for source, w in sorted(snap["source_weight"].items()):
        weight.add_metric([source], w)
        realised.add_metric([source], snap["source_realised_share"].get(source, 0.0))
    for source, share in sorted(snap["source_target_share"].items()):
        target.add_metric([source], share)
    yield from (weight, target, realised)


class _WaitingCollector(Collector):
    """Calls waiting on a client's Join or adapter chunk, or for a push slot: slow clients show here."""

    def __init__(self, waiting: Waiting):
        self.waiting = waiting

    def collect(self):
        gauge = GaugeMetricFamily("colm_calls_waiting", "calls waiting on a client's message or a push slot",
                                  labels=["on"])
        for on, n in sorted(self.waiting.counts().items()):
            gauge.add_metric([on], n)
        yield gauge
