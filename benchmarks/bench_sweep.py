"""Sweep efficiency on 2 CPU cores: the default sweep as `ncssl-sweep search_spaces/vicreg.yaml` runs it.

Three runs of the same sweep (same seeds, so the same first trials; ASHA's decisions can differ with timing),
side by side in one process:
- "mlflow off": run_sweep without a tracking store, in this process;
- "mlflow on": run_sweep with a SQLite MLflow store, then the analysis, in this process (what the CLI does);
- "cli": the command itself, `python -m ncssl_tune.cli SPACE --results-dir TMP`, timed from process start to
  exit (interpreter start, imports, Ray start, references, trials, analysis, export: what a user waits for).

Efficiency = Σ over trials of their training + evaluation seconds (each epoch's `epoch_seconds`, as the trial
measured it) ÷ (wall seconds × concurrent trial slots). Slots = min(search.max_concurrent, CPUs ÷ resources.cpu).
In-process runs give it for the sweep (Ray start, set-up, Tune run) and for the whole (plus analysis and
export), with each phase's seconds; the CLI's phases are its own record (<sweep>/timings.json) plus the
interpreter's start and exit. Each run's slot-seconds are split into trial epochs, trial set-up, between epochs
and outside trials (slot_seconds()). Between epochs: each trial reports `between_epochs_s`, the seconds from the
end of its previous epoch to the start of this one (its checkpoint, then waiting while the driver handles the
result: Ray's function trainables report synchronously); p50 and p95 over every epoch after the first, read from
the results Ray stored. Targets: cli efficiency >= 0.70, sweep >= 0.85, between-epochs p50 with MLflow on <=
1.2x off. Writes results/benchmarks/sweep.json. `--quick`: 2 trials x 2 epochs per run (the test suite).
The study file's figure (target >= 0.85 end to end): `--space search_spaces/study_vicreg.yaml --cli-only --out
results/benchmarks/sweep_study.json` (~7 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ncssl_tune.analysis import run_analysis
from ncssl_tune.records.store import default_tracking_uri
from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.monitor import read_trials
from ncssl_tune.sweep.runner import RAY_DIR, TUNE_NAME, run_sweep, sweep_dir
from ncssl_tune.vocab import RESULT_BETWEEN

REPO = Path(__file__).resolve().parent.parent


def stored_results(out_dir: Path) -> list[dict]:
    """Every result Ray stored for the sweep's trials (result.json, one JSON line per reported epoch)."""
    rows = []
    for path in sorted((out_dir / RAY_DIR / TUNE_NAME).glob("*/result.json")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def slot_seconds(results: list[dict], wall_s: float, slots: int) -> dict:
    """Where the slot-seconds (wall x slots) went, from the results Ray stored. Per trial, time_total_s of its
    last result is the time from the trial function's start to that report, and its first result's
    time_this_iter_s less that epoch's seconds is the trial's set-up (config, data, model, first-call costs).
    `outside trials` is every slot-second in which no trial function ran: the interpreter's start and imports
    (CLI), Ray's start, the references, Tune starting worker processes (their imports come before the function
    starts), the tail when one trial runs alone, export and analysis."""
    by_trial: dict[str, list[dict]] = {}
    for r in results:
        by_trial.setdefault(r.get("trial_id"), []).append(r)
    epochs = sum(_finite(r.get("epoch_seconds")) or 0.0 for r in results)
    alive = setup = 0.0
    for rows in by_trial.values():
        rows.sort(key=lambda r: r.get("training_iteration", 0))
        alive += _finite(rows[-1].get("time_total_s")) or 0.0
        first = rows[0]
        setup += max(0.0, (_finite(first.get("time_this_iter_s")) or 0.0) - (_finite(first.get("epoch_seconds")) or 0.0))
    total = wall_s * slots
    # between epochs: each report's checkpoint and its wait for the driver (what between_epochs_s measures)
    parts = {"trial epochs": epochs, "trial set-up": setup, "between epochs": alive - epochs - setup,
             "outside trials": total - alive}
    return {"slot_seconds": total, "parts": parts, "fractions": {k: v / total for k, v in parts.items()}}


def summary(out_dir: Path, wall_s: float, slots: int, metric: str) -> dict:
    results = stored_results(out_dir)
    trial_s = sum(float(r.get("epoch_seconds") or 0.0) for r in results)
    between = [float(r[RESULT_BETWEEN]) for r in results
               if isinstance(r.get(RESULT_BETWEEN), (int, float)) and r[RESULT_BETWEEN] == r[RESULT_BETWEEN]]
    rows = read_trials(out_dir)
    best = max((float(r[metric]) for r in rows if r.get(metric)), default=None)
    return {"trials": len(rows), "statuses": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
            "epochs": len(results), "slots": slots, "trial_seconds": trial_s, "wall_seconds": wall_s,
            "efficiency": trial_s / (wall_s * slots),
            "between_epochs_s": {"n": len(between), "p50": quantile(between, 0.5), "p95": quantile(between, 0.95)},
            f"best_{metric}": best, "slot_time": slot_seconds(results, wall_s, slots)}


def in_process(space: str, quick: dict, tracking: bool, slots: int) -> dict:
    spec = load_spec(space, **quick)
    with tempfile.TemporaryDirectory() as tmp:
        uri = default_tracking_uri(tmp) if tracking else None
        start = time.perf_counter()
        result = run_sweep(spec, tmp, tracking_uri=uri, monitor_interval_s=30.0)
        sweep_s = time.perf_counter() - start
        if tracking:
            run_analysis(spec.name, uri, result.out_dir / "analysis", parent_run_id=result.mlflow_parent_run_id)
        total_s = time.perf_counter() - start
        out = summary(result.out_dir, total_s, slots, spec.search.metric)
    out["phase_seconds"] = {**result.seconds, "analysis": total_s - sweep_s,
                            "other": sweep_s - sum(result.seconds.values())}
    out["efficiency_sweep"] = out["trial_seconds"] / (result.seconds["tune"] + result.seconds["ray_start"]
                                                      + result.seconds["setup"]) / slots
    return out


def cli(space: str, quick: dict, slots: int) -> dict:
    spec = load_spec(space, **quick)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in quick.items()]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "ncssl_tune.cli", space, "--results-dir", tmp, *args],
                              cwd=REPO, capture_output=True, text=True, check=False)
        end = time.time()
        if done.returncode != 0:
            raise RuntimeError(f"the CLI failed ({done.returncode}): {done.stderr[-2000:]}")
        out = summary(sweep_dir(spec, tmp), end - start, slots, spec.search.metric)
        path = sweep_dir(spec, tmp) / "timings.json"
        timings, written = json.loads(path.read_text()), path.stat().st_mtime  # written as the command ends
    # the command's own phases (timings.json), and what it cannot see: the interpreter's start (up to the CLI
    # module's import) and the exit (from timings.json's writing to the process's end, its output read)
    out["phase_seconds"] = {"interpreter start": written - timings["total"] - start, **timings["seconds"],
                            "exit": end - written}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 trials x 2 epochs per run, for the test suite")
    p.add_argument("--space", default=str(REPO / "search_spaces/vicreg.yaml"))
    p.add_argument("--out", default="results/benchmarks/sweep.json")
    p.add_argument("--cli-only", action="store_true",
                   help="only the command, as a user runs it (a long space: e.g. a study file, ~15 min)")
    args = p.parse_args(argv)
    quick = {"num_samples": 2, "epochs": 2} if args.quick else {}
    spec = load_spec(args.space, **quick)
    slots = min(spec.search.max_concurrent or spec.search.num_samples,
                int((os.cpu_count() or 1) // spec.resources.cpu))
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                 "space": Path(args.space).name, "load_average_start": os.getloadavg()[0],
                 "targets": {"cli efficiency": 0.70, "sweep efficiency (mlflow on)": 0.85,
                             "between-epochs p50, on / off": 1.2}}
    runs = {} if args.cli_only else {"mlflow off": in_process(args.space, quick, False, slots),
                                     "mlflow on": in_process(args.space, quick, True, slots)}
    runs["cli"] = cli(args.space, quick, slots)
    out.update(runs)
    out["load_average_end"] = os.getloadavg()[0]
    on, off = (runs[k]["between_epochs_s"]["p50"] if k in runs else None for k in ("mlflow on", "mlflow off"))
    out["between_epochs_p50_on_over_off"] = on / off if on and off else None
    print(f"sweep {out['space']}, {slots} trial slots; efficiency = Σ trial epoch seconds / (wall x slots)")
    print(f"{'':11} {'trials':>6} {'epochs':>6} {'trial s':>8} {'wall s':>7} {'eff.':>5} {'sweep eff.':>10} "
          f"{'between p50':>11} {'p95':>6}  phases (s)")
    for name, r in runs.items():
        b = r["between_epochs_s"]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.get("phase_seconds", {}).items())
        sweep_eff = f"{r['efficiency_sweep']:10.2f}" if "efficiency_sweep" in r else f"{'':>10}"
        print(f"{name:11} {r['trials']:6d} {r['epochs']:6d} {r['trial_seconds']:8.1f} {r['wall_seconds']:7.1f} "
              f"{r['efficiency']:5.2f} {sweep_eff} {b['p50'] or float('nan'):11.3f} {b['p95'] or float('nan'):6.3f}"
              f"  {phases}")
    print("where the slot-seconds (wall x slots) went:")
    for name, r in runs.items():
        st = r["slot_time"]
        print(f"{name:11} {st['slot_seconds']:7.1f} slot-s: " + ", ".join(
            f"{k} {v:.1f} ({st['fractions'][k]:.0%})" for k, v in st["parts"].items()))
    ratio = out["between_epochs_p50_on_over_off"]
    print(f"between epochs, p50 with MLflow on / off: {ratio:.2f} (target <= 1.2)" if ratio else
          "between epochs: no MLflow-off run, or too few epochs to compare")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
