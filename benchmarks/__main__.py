"""Runs every benchmark, each in its own process, and writes one report.

    python -m benchmarks [--smoke] [--out DIR] [--only jax,torch] [--report-only]

Each `bench_<name>.py` runs in its own process (one per framework) with
`--json DIR/<name>.json`; then `DIR/results.md` (the tables, with the date, versions
and machine), `DIR/results.json` (everything) and `DIR/us_per_step.png` (µs/step of
every system, per workload) are written. The default `DIR` is `benchmarks/results`;
`--smoke` runs a few steps of each, into a temporary directory, so it cannot rot.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# The per-framework scripts whose rows share one layout (workload, system, ratio).
FRAMEWORK_SCRIPTS = {
    "numpy": "hand-written numpy",
    "jax": "hand-written scan",
    "tensorflow": "hand-written tf.range",
    "torch": "faster hand-written torch loop",
}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("numpy", "jax", "tensorflow-cpu", "torch", "keras", "pytorch-lightning",
                 "orbax-checkpoint", "tensorboardX"):  # fmt: skip
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} cores)"
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}"


def _framework_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| framework | workload | system | µs/step (median) | spread (IQR %) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in FRAMEWORK_SCRIPTS:
        for row in results.get(name, {}).get("rows", []):
            lines.append(
                f"| {name} | {row['workload']} | {row['system']} | {row['us_per_step']:.1f} | "
                f"{row['spread_pct']:.1f} | {row['ratio']:.3f} |"
            )
    return lines


def _overhead_table(results: dict[str, Any]) -> list[str]:
    rows = results.get("overhead", {}).get("rows", [])
    lines = [
        "| backend | steps_per_loop | train() alone µs/step | Controller µs/step | overhead |",
        "|---|---|---|---|---|",
    ]
    for alone, controller in zip(rows[::2], rows[1::2]):
        lines.append(
            f"| {alone['backend']} | {alone['steps_per_loop']} | {alone['us_per_step']:.1f} | "
            f"{controller['us_per_step']:.1f} | {100 * (controller['ratio'] - 1):+.1f}% |"
        )
    return lines


def _checkpoint_table(results: dict[str, Any]) -> list[str]:
    lines = ["| state | system | ms (median) | ratio to plain orbax |", "|---|---|---|---|"]
    for row in results.get("checkpoint", {}).get("rows", []):
        lines.append(
            f"| {row['workload']} | {row['system']} | {row['ms']:.1f} | {row['ratio']:.3f} |"
        )
    return lines


def _distributed_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | processes | samples/s (median) | spread (IQR %) | time ratio to 1 process |",
        "|---|---|---|---|---|",
    ]
    for row in results.get("distributed", {}).get("rows", []):
        backend = row["system"].split()[0]
        lines.append(
            f"| {backend} | {row['processes']} | {row['samples_per_second']:.0f} | "
            f"{row['spread_pct']:.1f} | {row['ratio']:.3f} |"
        )
    return lines


def _portable_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| framework | model | µs/step (median) | spread (IQR %) | ratio to native |",
        "|---|---|---|---|---|",
    ]
    for row in results.get("portable", {}).get("rows", []):
        lines.append(
            f"| {row['workload']} | {row['system']} | {row['us_per_step']:.1f} | "
            f"{row['spread_pct']:.1f} | {row['ratio']:.3f} |"
        )
    return lines


def report(results: dict[str, Any], smoke: bool) -> str:
    """The Markdown report of all results."""
    date = datetime.date.today().isoformat()
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    parts = [
        f"# looproto benchmarks{' (smoke run: not measurements)' if smoke else ''}",
        "",
        f"{date}; {_machine()}; {versions}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}.",
        "",
        "Ratios are paired (within a round) medians against the hand-written best loop of the "
        "same framework, in the same process: "
        + "; ".join(f"{k}: {v}" for k, v in FRAMEWORK_SCRIPTS.items())
        + ". Keras `fit` and Lightning rows are their steady state (per-call set-up excluded).",
        "",
        "## Training, µs per step at 100 steps per loop",
        "",
        *_framework_table(results),
        "",
        "## The outer loop's cost, by steps_per_loop (the MLP example)",
        "",
        *_overhead_table(results),
        "",
        "## Checkpoints",
        "",
        *_checkpoint_table(results),
        "",
        "## One model for every framework (`looproto.portable`) against each framework's own",
        "",
        *_portable_table(results),
        "",
        "## Multi-process: 1 against 2 local processes, workload B, global batch 256",
        "",
        "Both configurations share the same 2 cores, so this measures what communication "
        "costs, not a speed-up.",
        "",
        *_distributed_table(results),
        "",
    ]
    return "\n".join(parts)


def plot(results: dict[str, Any], path: str) -> bool:
    """µs/step of every system, one panel per workload, log scale; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads: dict[str, list[tuple[str, float]]] = {}
    for name in FRAMEWORK_SCRIPTS:
        for row in results.get(name, {}).get("rows", []):
            workloads.setdefault(row["workload"], []).append(
                (f"{name}: {row['system']}", row["us_per_step"])
            )
    if not workloads:
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 7), squeeze=False)
    for ax, (title, bars) in zip(axes[0], workloads.items()):
        labels, values = zip(*bars)
        colors = [
            "tab:blue"
            if "looproto" in label
            else ("tab:orange" if "keras" in label or "lightning" in label else "tab:gray")
            for label in labels
        ]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("µs per step (median; lower is better)")
        ax.set_title(title)
    fig.suptitle("looproto (blue), hand-written loops (gray), Keras fit / Lightning fit (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps each, to check they run")
    parser.add_argument("--out", default=None, help="where the report goes")
    parser.add_argument("--only", default=None, help="comma-separated bench names")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from DIR's JSON files"
    )
    args = parser.parse_args(argv)
    out = args.out or (tempfile.mkdtemp(prefix="looproto-bench-") if args.smoke else
                       os.path.join(HERE, "results"))  # fmt: skip
    os.makedirs(out, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    results: dict[str, Any] = {}
    failures = 0
    for script in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        name = os.path.basename(script)[len("bench_") : -len(".py")]
        if only is not None and name not in only:
            continue
        json_path = os.path.join(out, f"{name}.json")
        if args.report_only:
            if os.path.exists(json_path):
                with open(json_path) as f:
                    results[name] = json.load(f)
            continue
        print(f"\n## {name}\n", flush=True)
        cmd = [sys.executable, script, "--json", json_path] + (["--smoke"] if args.smoke else [])
        # One BLAS/OpenMP thread unless told otherwise: with 2 threads on 2 shared cores the
        # compute-bound workload's spread grows from ~4% to ~30%.
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.setdefault("OMP_NUM_THREADS", "1")
        if subprocess.run(cmd, check=False, env=env).returncode:
            print(f"{name} failed", flush=True)
            failures += 1
            continue
        with open(json_path) as f:
            results[name] = json.load(f)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"versions": _versions(), "machine": _machine(), "results": results}, f,
                  indent=2, default=str)  # fmt: skip
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report(results, args.smoke))
    plotted = plot(results, os.path.join(out, "us_per_step.png"))
    print(
        f"\nReport: {os.path.join(out, 'results.md')}" + (" (+ us_per_step.png)" if plotted else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
