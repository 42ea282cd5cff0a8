"""The selector's /metrics endpoint, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from colm_client.status import status
from colm_client.sync import AdapterSync
from colm_server.service.server import SelectorServer
from conftest import lora_model
from test_service import L, W, make_config, take_all, target


def scrape(srv: SelectorServer) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def status_and_scrape(srv: SelectorServer) -> tuple[dict, dict]:
    """A status and a scrape of the same committed step.

    The producer may still select up to ``prefetch`` steps after the ranks stop pulling, so a pair
    read across one of those commits is read again; the prefetch bound ends the loop.
    """
    for _ in range(20):
        s, m = status(target(srv)), scrape(srv)
        if m[("colm_selected_steps", ())] == int(s["selected_steps"]):
            return s, m
    raise AssertionError("status and /metrics never showed the same step")


@pytest.fixture()
def served(tmp_path):
    srv = SelectorServer(make_config(tmp_path, **{"service.metrics_port": 0}))
    srv.start()
    yield srv
    srv.stop(grace=1)


def test_metrics_agree_with_status_after_a_few_steps(served):
    take_all(served, 3)
    s, m = status_and_scrape(served)
    steps = int(s["selected_steps"])
    assert m[("colm_selected_steps", ())] == steps >= 3
    seen = {dict(k[1])["source"]: v for k, v in m.items() if k[0] == "colm_source_seen_total"}
    assert seen == {k: float(v) for k, v in s["source_seen"].items()}
    assert sum(seen.values()) == steps * W * L
    assert m[("colm_selection_seconds_count", ())] == steps  # every selection of this process timed
    assert m[("colm_selection_seconds_sum", ())] > 0
    for r in range(W):  # each rank acknowledged 2 of its 3 batches (the 3rd on its next request)
        assert m[("colm_rank_inflight", (("rank", str(r)),))] <= 1
        assert m[("colm_rank_connected", (("rank", str(r)),))] in (0.0, 1.0)
    assert m[("colm_journal_steps", ())] == steps and m[("colm_journal_bytes", ())] > 0
    assert m[("colm_truncated_samples_total", ())] == 0
    assert m[("process_resident_memory_bytes", ())] > 50 << 20
    small = [k for k in m if k[0] == "colm_small_source_kept_total"]
    assert small, "the test mixture's tiny source is small (share < 0.1): its samples are kept"


def test_param_version_and_staleness_follow_adapter_pushes(served, tmp_path):
    take_all(served, 2)
    before = scrape(served)
    assert before[("colm_param_version", ())] == 0
    sync = AdapterSync(target(served), lora_model(), every=1)
    try:
        sync.push(step=1)
    finally:
        sync.close()
    after = scrape(served)
    assert after[("colm_param_version", ())] == 1
    # Staleness restarts at the push: no more than the prefetch steps selected since.
    assert after[("colm_param_staleness_steps", ())] <= before[("colm_param_staleness_steps", ())]


def test_metrics_are_off_unless_a_port_is_configured(tmp_path):
    srv = SelectorServer(make_config(tmp_path))
    try:
        assert srv.metrics is None and srv.metrics_port is None
    finally:
        srv.stop(grace=1)


def test_target_and_realised_shares_per_source_agree_with_status(tmp_path):
    srv = SelectorServer(make_config(tmp_path, **{"service.metrics_port": 0,
                                                 "selector.mixture": "{big: 1, mid: 1}"}))
    srv.start()
    try:
        take_all(srv, 3)
        s, m = status_and_scrape(srv)
    finally:
        srv.stop(grace=1)

    def per_source(name: str) -> dict[str, float]:
        return {dict(k[1])["source"]: v for k, v in m.items() if k[0] == name}

    assert per_source("colm_source_target_share") == pytest.approx(s["source_target_share"])
    assert per_source("colm_source_realised_share") == pytest.approx(s["source_realised_share"])
    assert per_source("colm_source_weight_total") == pytest.approx(s["source_weight"])
    shares = s["source_target_share"]
    assert shares["big"] == pytest.approx(shares["mid"])  # named alike: they split their mass evenly
    assert sum(shares.values()) == pytest.approx(1.0)
    seen = {k: int(v) for k, v in s["source_seen"].items()}
    assert shares["tiny"] == pytest.approx(seen["tiny"] / sum(seen.values()))  # unnamed: its stream share
    assert sum(per_source("colm_source_realised_share").values()) == pytest.approx(1.0)
