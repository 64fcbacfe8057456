"""Prometheus text exposition (format 0.0.4), computed from the database at scrape time."""

from __future__ import annotations

from service.store import QUEUED, Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(store: Store, workers_problem: str | None) -> str:
    counts = store.counts_by_status()
    stages = store.stage_totals()
    lines = [
        "# HELP autoq_jobs Jobs in the database by status.",
        "# TYPE autoq_jobs gauge",
        *(f'autoq_jobs{{status="{status}"}} {count}' for status, count in counts.items()),
        "# HELP autoq_queue_length Jobs waiting for a worker.",
        "# TYPE autoq_queue_length gauge",
        f"autoq_queue_length {counts[QUEUED]}",
        "# HELP autoq_stage_duration_seconds Time jobs spent in each pipeline stage.",
        "# TYPE autoq_stage_duration_seconds summary",
    ]
    for stage, (count, total) in sorted(stages.items()):
        lines.append(f'autoq_stage_duration_seconds_sum{{stage="{_label(stage)}"}} {total:.6f}')
        lines.append(f'autoq_stage_duration_seconds_count{{stage="{_label(stage)}"}} {count}')
    lines += [
        "# HELP autoq_workers_healthy 1 when every configured worker is running.",
        "# TYPE autoq_workers_healthy gauge",
        f"autoq_workers_healthy {0 if workers_problem else 1}",
    ]
    return "\n".join(lines) + "\n"
