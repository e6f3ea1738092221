"""Paired, interleaved timing: the only fair way to compare on a noisy 2-core machine.

Each round runs every contender once, in rotating order, and the ratio of two
contenders is taken *within* a round; the median of those paired ratios is what
the tables report. Single runs on this machine vary by up to 10%.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(
    contenders: dict[str, Callable[[], Any]], rounds: int, steps_per_call: int
) -> dict[str, list[float]]:
    """Runs each contender once per round (rotating order); returns µs/step per round.

    A contender is timed by the wall clock around its call, unless it returns a
    float: the seconds it measured itself for `steps_per_call` steps (Keras `fit`'s
    steady state, timed by a callback, say).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            measured = contenders[name]()
            elapsed = time.perf_counter() - start
            if isinstance(measured, float):
                elapsed = measured
            times[name].append(elapsed * 1e6 / steps_per_call)
    return times


LOOPS_PER_ROUND = {"A": 5, "B": 1}
"""Inner loops each contender runs per round, by workload.

A `Controller` is asked for several loops in one `train()` call, as a real run asks
for many: its per-call set-up (signal handlers, a checkpoint sync) is paid once per
`train()`, its per-loop work (summaries, logs, interval checks) once per loop. On
workload A a loop takes ~2 ms, so five loops keep the per-call part at its share of a
short `train_and_evaluate` interval (500 steps); on B one loop is ~0.6 s.
"""


def repeated(call: Callable[[], Any], times: int) -> Callable[[], Any]:
    """`call` run `times` times per round; seconds it measured itself are summed."""
    if times == 1:
        return call

    def run() -> float | None:
        measured = [call() for _ in range(times)]
        if all(isinstance(m, float) for m in measured):
            return float(sum(measured))
        return None

    return run


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of `name`'s time divided by `baseline`'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def summarize(title: str, times: dict[str, list[float]], baseline: str) -> list[dict[str, Any]]:
    """Rows of median µs/step, spread (IQR as % of median), and paired ratio to `baseline`."""
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [median, median, median]
        rows.append(
            {
                "workload": title,
                "system": name,
                "us_per_step": median,
                "spread_pct": 100 * (q[2] - q[0]) / median,
                "ratio": paired_ratio(times, name, baseline),
                "rounds": len(values),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], baseline_label: str) -> str:
    """A Markdown table of `summarize` rows."""
    lines = [
        f"| workload | system | µs/step (median) | spread (IQR %) | ratio to {baseline_label} |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workload']} | {row['system']} | {row['us_per_step']:.1f} | "
            f"{row['spread_pct']:.1f} | {row['ratio']:.3f} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "node": platform.node(),
    }


def dump(path: str, payload: Any) -> None:
    """Writes the results as JSON."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
