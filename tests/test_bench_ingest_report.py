"""The ingest benchmark's ratios: paired by round, the median reported (no peers needed)."""

from __future__ import annotations

from scripts.bench_ingest import ORTHANC, RADFLAG, STORESCP_NAME, Row, report, round_ratios

ONE = "1 association"


def _row(target: str, per_s: float, round_no: int, mode: str = ONE) -> Row:
    return Row(target, mode, images=100, seconds=100 / per_s, mbytes=800.0, round=round_no)


def test_ratios_pair_receivers_of_the_same_round() -> None:
    rows = [
        _row(ORTHANC, 10.0, 0),
        _row(RADFLAG, 30.0, 0),
        _row(RADFLAG, 12.0, 1),  # a loaded round slows both receivers measured in it
        _row(ORTHANC, 6.0, 1),
        _row(RADFLAG, 50.0, 2),  # no Orthanc in round 2: not a pair
    ]
    assert round_ratios(rows, RADFLAG, ORTHANC, ONE) == [3.0, 2.0]


def test_report_gives_the_median_of_the_rounds_and_the_verdict() -> None:
    rows = [
        _row(ORTHANC, 10.0, 0),
        _row(RADFLAG, 15.0, 0),
        _row(ORTHANC, 10.0, 1),
        _row(RADFLAG, 25.0, 1),
        _row(ORTHANC, 10.0, 2),
        _row(RADFLAG, 40.0, 2),
        _row(STORESCP_NAME, 40.0, 0, "4 associations"),
        _row(RADFLAG, 16.0, 0, "4 associations"),
    ]
    text = report(rows)
    assert "radflag/Orthanc 2.50x (meets >= 2x) [rounds: 1.50, 2.50, 4.00]" in text
    assert "4 associations: radflag/DCMTK storescp 0.40x (misses >= 0.5x)" in text
    assert "| 3 | radflag | 1 association | 100 |" in text
