"""The one table: every figure of the run with its ratio and its target."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from scripts.bench.sections import Bare, EndToEnd, Memory, percentile
from scripts.bench_ingest import ORTHANC, RADFLAG, STORESCP_NAME, Row, round_ratios

TARGET_SR = 0.90
TARGET_SR_SC = 0.50
LATENCY_MARGIN_S = 1.5
TARGET_VS_STORESCP = 0.50
TARGET_VS_ORTHANC = 2.0
SR_ONLY = "SR only, 1-image studies"
SR_SC = "SR+SC, 1-image studies"
TARGETS = {SR_ONLY: TARGET_SR, SR_SC: TARGET_SR_SC}


@dataclass
class Figures:
    """Everything measured in one run (sections not run stay empty)."""

    conditions: list[str] = field(default_factory=list)
    bare: Bare | None = None
    e2e: list[EndToEnd] = field(default_factory=list)
    quiet_period_s: float = 1.0
    latency_idle: list[float] = field(default_factory=list)
    latency_queued: list[float] = field(default_factory=list)
    queued_ahead: int = 0
    memory: list[Memory] = field(default_factory=list)
    ingest: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "misses"


def _e2e_lines(f: Figures) -> list[str]:
    lines = []
    for run in f.e2e:
        short = "" if run.received >= run.expected else f" ({run.received}/{run.expected} recv.)"
        value = f"{run.studies_per_s:.2f} studies/s, {run.images_per_s:.2f} img/s{short}"
        ratio = target = verdict = ""
        if f.bare is not None:
            r = run.images_per_s / f.bare.images_per_s
            ratio = f"{r:.2f} x bare"
            goal = TARGETS.get(run.label)
            if goal is not None:
                target, verdict = f">= {goal:.2f}", _verdict(r, goal)
        lines.append(f"| (b) e2e {run.label} | {value} | {ratio} | {target} | {verdict} |")
    return lines


def _latency_lines(f: Figures) -> list[str]:
    bound = f.quiet_period_s + LATENCY_MARGIN_S
    lines = []
    for name, values in (
        ("idle", f.latency_idle),
        (f"{f.queued_ahead} studies queued ahead", f.latency_queued),
    ):
        if not values:
            continue
        p50, p95 = percentile(values, 50), percentile(values, 95)
        value = f"p50 {p50:.2f} s, p95 {p95:.2f} s (n={len(values)})"
        ratio = f"p95 = {p95 / bound:.2f} x bound"
        if name == "idle":
            target, verdict = f"p95 <= {bound:.1f} s", _verdict(p95, bound, False)
        else:
            target, verdict = "report", ""
        lines.append(f"| (c) latency, {name} | {value} | {ratio} | {target} | {verdict} |")
    return lines


def _memory_lines(f: Figures) -> list[str]:
    lines = []
    for m in f.memory:
        cap = " (killed at the cap)" if m.capped else ""
        value = (
            f"serve VmHWM {m.serve_hwm_mb:.0f} MiB (idle {m.idle_hwm_mb:.0f}), "
            f"children {m.children_hwm_mb:.0f} MiB, peak tree RSS {m.peak_rss_mb:.0f} MiB{cap}"
        )
        what = f"{m.images}-image study, {m.shape[0]}x{m.shape[1]}"
        lines.append(f"| (d) peak memory, {what} | {value} | | bounded by config | |")
    return lines


def _median_per_s(rows: list[Row]) -> dict[tuple[str, str], float]:
    """Median images/s of each (receiver, mode) over the rounds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r.target, r.mode), []).append(r.images_per_s)
    return {key: statistics.median(values) for key, values in groups.items()}


def _ingest_ratio_line(f: Figures, baseline: str, mode: str, target: float) -> list[str]:
    """Ratio radflag / ``baseline``: median of the per-round ratios, every round listed."""
    per_round = round_ratios(f.ingest, RADFLAG, baseline, mode)
    if not per_round:
        return []
    r = statistics.median(per_round)
    rounds = f"median of {len(per_round)} rounds: " + ", ".join(f"{x:.2f}" for x in per_round)
    return [
        f"| (e) ingest radflag / {baseline}, {mode} | {rounds} | {r:.2f} "
        f"| >= {target:g} | {_verdict(r, target)} |"
    ]


def _ingest_lines(f: Figures) -> list[str]:
    rounds = len({r.round for r in f.ingest})
    per = "median of the rounds" if rounds > 1 else ""
    lines = [
        f"| (e) ingest {target}, {mode} | {v:.1f} img/s {per} | | | |"
        for (target, mode), v in _median_per_s(f.ingest).items()
    ]
    lines += _ingest_ratio_line(f, STORESCP_NAME, "4 associations", TARGET_VS_STORESCP)
    lines += _ingest_ratio_line(f, ORTHANC, "1 association", TARGET_VS_ORTHANC)
    return lines


def render(f: Figures) -> str:
    """Markdown table of ``f`` plus the run's conditions."""
    lines = ["| measure | value | ratio | target | verdict |", "|---|---|---|---|---|"]
    if f.bare is not None:
        b = f.bare
        lines.append(
            f"| (a) bare model, batch {b.batch_size}, {b.threads} threads | "
            f"{b.images_per_s:.2f} img/s ({b.images} images, {b.refused} refused by the gate) "
            "| 1.00 | | |"
        )
    lines += _e2e_lines(f) + _latency_lines(f) + _memory_lines(f) + _ingest_lines(f)
    lines.append("")
    lines += [f"- {c}" for c in f.conditions]
    lines += [f"- ERROR: {e}" for e in f.errors]
    return "\n".join(lines)


def ratios(f: Figures) -> dict[str, float]:
    """Return the headline figures (for ``--json``)."""
    out: dict[str, float] = {}
    if f.bare is not None:
        out["bare_images_per_s"] = f.bare.images_per_s
        for run in f.e2e:
            out[f"e2e {run.label} / bare"] = run.images_per_s / f.bare.images_per_s
    for name, values in (("idle", f.latency_idle), ("queued", f.latency_queued)):
        if values:
            out[f"latency {name} p50 s"] = percentile(values, 50)
            out[f"latency {name} p95 s"] = percentile(values, 95)
    for m in f.memory:
        out[f"memory {m.images} images serve VmHWM MiB"] = m.serve_hwm_mb
    for (target, mode), per_s in _median_per_s(f.ingest).items():
        out[f"ingest {target} {mode} images/s"] = per_s
    for baseline, mode in ((STORESCP_NAME, "4 associations"), (ORTHANC, "1 association")):
        per_round = round_ratios(f.ingest, RADFLAG, baseline, mode)
        if per_round:
            out[f"ingest radflag / {baseline} {mode}"] = statistics.median(per_round)
    return out
