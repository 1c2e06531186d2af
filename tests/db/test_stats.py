"""``radflag stats``: counts, stage latency percentiles, positive rate per version per day."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.stats import STAGES, collect_stats, percentile
from tests.db.conftest import ResultSpec, add_study

DAY1 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 5, 50):
        values = [rng.uniform(0, 100) for _ in range(n)]
        for q in (0, 50, 90, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_stats_on_known_timelines(sessions: sessionmaker[Session]) -> None:
    rng = random.Random(3)
    expected: dict[str, list[float]] = {s: [] for s in STAGES}
    positives_day1 = 0
    for n in range(12):
        quiet, classify, deliver, spread = (
            rng.uniform(30, 40),
            rng.uniform(0.5, 5),
            rng.uniform(0.1, 3),
            rng.uniform(0, 20),
        )
        day = DAY1 if n < 8 else DAY1 + timedelta(days=1)
        positive = n % 3 == 0
        positives_day1 += positive and n < 8
        add_study(
            sessions,
            f"2.{n}",
            state="DONE",
            received_at=day + timedelta(minutes=n),
            spread_s=spread,
            quiet_s=quiet,
            classify_s=classify,
            deliver_s=deliver,
            results=(
                ResultSpec(
                    model_version="1.0.0", positive=positive, probability=0.9 if positive else 0.2
                ),
            ),
        )
        expected["received_to_ready"].append(quiet)
        expected["ready_to_classified"].append(classify)
        expected["classified_to_delivered"].append(deliver)
        expected["received_to_delivered"].append(spread + quiet + classify + deliver)
    # Not finished: counted by state, contribute only the stages they reached.
    add_study(sessions, "3.1", state="READY", received_at=DAY1, quiet_s=31.0)
    add_study(
        sessions,
        "3.2",
        state="FAILED",
        received_at=DAY1,
        quiet_s=32.0,
        classify_s=1.0,
        failure_reason="cannot decode pixel data",
    )
    add_study(
        sessions,
        "3.3",
        state="FAILED",
        received_at=DAY1,
        quiet_s=33.0,
        classify_s=1.0,
        failure_reason="cannot decode pixel data",
    )
    expected["received_to_ready"] += [31.0, 32.0, 33.0]
    expected["ready_to_classified"] += [1.0, 1.0]
    # Another version on day 2, and a superseded result that must not count.
    add_study(
        sessions,
        "4.1",
        state="DONE",
        received_at=DAY1 + timedelta(days=1),
        quiet_s=30,
        classify_s=1,
        deliver_s=1,
        results=(
            ResultSpec(model_version="2.0.0", positive=True),
            ResultSpec(model_version="1.0.0", positive=True, superseded=True),
        ),
    )
    for stage, add in (
        ("received_to_ready", 30.0),
        ("ready_to_classified", 1.0),
        ("classified_to_delivered", 1.0),
        ("received_to_delivered", 32.0),
    ):
        expected[stage].append(add)

    stats = collect_stats(sessions, since=DAY1 - timedelta(hours=1), until=DAY1 + timedelta(days=2))
    assert stats.studies_by_state["DONE"] == 13
    assert stats.studies_by_state["FAILED"] == 2 and stats.studies_by_state["READY"] == 1
    assert stats.studies_by_state["RECEIVING"] == 0
    assert stats.deliveries_by_state["SENT"] == 13
    assert stats.studies_in_window == 16
    for lat in stats.latencies:
        values = expected[lat.stage]
        assert lat.n == len(values), lat.stage
        for q, got in ((50, lat.p50_s), (90, lat.p90_s), (95, lat.p95_s), (99, lat.p99_s)):
            assert got == pytest.approx(float(np.percentile(values, q)), abs=1e-3), (lat.stage, q)
        assert lat.max_s == pytest.approx(max(values), abs=1e-3)
    rates = {(r.day.isoformat(), r.model_version): r for r in stats.positive_rate}
    assert set(rates) == {("2024-05-01", "1.0.0"), ("2024-05-02", "1.0.0"), ("2024-05-02", "2.0.0")}
    day1 = rates[("2024-05-01", "1.0.0")]
    assert (day1.n_results, day1.n_positive) == (8, positives_day1)
    assert day1.positive_rate == pytest.approx(positives_day1 / 8)
    assert rates[("2024-05-02", "2.0.0")].n_results == 1
    assert [(f.reason, f.n_studies) for f in stats.failures] == [("cannot decode pixel data", 2)]
    json.dumps(stats.as_dict())

    # A window that holds only day 2.
    later = collect_stats(sessions, since=DAY1 + timedelta(days=1), until=DAY1 + timedelta(days=2))
    assert later.studies_in_window == 5
    assert {r.day.isoformat() for r in later.positive_rate} == {"2024-05-02"}
    assert later.studies_by_state == stats.studies_by_state  # counts are all-time


def test_empty_database(sessions: sessionmaker[Session]) -> None:
    stats = collect_stats(sessions)
    assert stats.studies_in_window == 0 and set(stats.studies_by_state.values()) == {0}
    assert all(lat.n == 0 and lat.p50_s is None for lat in stats.latencies)
    assert stats.positive_rate == () and stats.failures == ()
    with pytest.raises(ValueError, match="timezone-aware"):
        collect_stats(sessions, since=datetime(2024, 1, 1))
