"""Sweep efficiency on 2 CPU cores: the default sweep as `ncssl-sweep search_spaces/vicreg.yaml` runs it.

What the CLI does, in-process: run_sweep with a SQLite MLflow store in a throwaway folder, then the analysis. Run
twice side by side: "before", the engine's scheduling as it was (a fresh worker process per trial,
`reuse_actors=False`, and Ray Tune's default of one trial staged at a time for a custom searcher,
TUNE_MAX_PENDING_TRIALS_PG=1), and "after", as it is now (workers reused, max_concurrent trials staged). The
changes both runs share (reference scores in the driver, lazy imports in the workers) are not in the comparison.
The same seeds, so both runs propose the same first trials (ASHA decisions can differ with timing).

Efficiency = Σ over trials of their training + evaluation seconds (each epoch's `epoch_seconds`, as the trial
measured it) ÷ (wall seconds × concurrent trial slots). Slots = min(search.max_concurrent, CPUs ÷ resources.cpu).
It is given for the sweep (Ray start, reference scores, Tune run) and for the whole command (plus the analysis),
with each phase's seconds: what the rest of the wall time is spent on. Target: >= 0.85 for the sweep.
Writes results/benchmarks/sweep.json. `--quick` runs 2 trials x 1 epoch per mode (what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from ncssl_tune.analysis import run_analysis
from ncssl_tune.records.store import default_tracking_uri
from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.monitor import read_trials
from ncssl_tune.sweep.runner import run_sweep
from ncssl_tune.sweep.session import MAX_PENDING


class EpochSeconds(Callback):
    """Σ of the trials' reported epoch_seconds (training + evaluation), the number of epochs reported, and each
    trial's start and end on the driver's clock (its slot is occupied in between)."""

    def __init__(self) -> None:
        self.seconds, self.epochs = 0.0, 0
        self.spans: dict[str, list[float]] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.spans[trial.trial_id] = [time.perf_counter()] * 2

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("epoch_seconds") is not None:
            self.seconds += float(result["epoch_seconds"])
            self.epochs += 1
        self.spans.setdefault(trial.trial_id, [time.perf_counter()] * 2)[1] = time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.spans.setdefault(trial.trial_id, [time.perf_counter()] * 2)[1] = time.perf_counter()

    on_trial_error = on_trial_complete

    def occupied(self) -> float:
        """Σ over trials of start to end: slot-seconds spent inside trials (epochs plus what lies between)."""
        return sum(end - start for start, end in self.spans.values())


def one_sweep(space: str, quick: dict, before: bool) -> dict:
    spec = load_spec(space, **quick)
    slots = min(spec.search.max_concurrent or spec.search.num_samples,
                int((os.cpu_count() or 1) // spec.resources.cpu))
    counter = EpochSeconds()
    with tempfile.TemporaryDirectory() as tmp:
        uri = default_tracking_uri(tmp)
        if before:
            os.environ[MAX_PENDING] = "1"
        start = time.perf_counter()
        try:
            result = run_sweep(spec, tmp, tracking_uri=uri, extra_callbacks=[counter], monitor_interval_s=30.0,
                               reuse_actors=not before)
        finally:
            os.environ.pop(MAX_PENDING, None)
        sweep_s = time.perf_counter() - start
        run_analysis(spec.name, uri, result.out_dir / "analysis", parent_run_id=result.mlflow_parent_run_id)
        total_s = time.perf_counter() - start
        rows = read_trials(result.out_dir)
    statuses = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    best = max((float(r[spec.search.metric]) for r in rows if r.get(spec.search.metric)), default=None)
    return {"reuse_actors": not before, "staged_trials": 1 if before else spec.search.max_concurrent, "trials": len(rows), "statuses": statuses, "epochs": counter.epochs,
            "slots": slots, "trial_seconds": counter.seconds, "sweep_seconds": sweep_s,
            "phase_seconds": {**result.seconds, "analysis": total_s - sweep_s,
                              "other": sweep_s - sum(result.seconds.values())},
            "wall_seconds": total_s,
            # where the slot-seconds of the sweep went: epochs, inside trials between epochs (set-up, reports,
            # checkpoints, the epoch a stopped trial finishes), and slots with no trial (starts, the tail, phases)
            "slot_seconds": {"epochs": counter.seconds, "in_trials_between_epochs": counter.occupied() - counter.seconds,
                             "no_trial": sweep_s * slots - counter.occupied()},
            "efficiency_sweep": counter.seconds / (sweep_s * slots),
            "efficiency_total": counter.seconds / (total_s * slots), f"best_{spec.search.metric}": best}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 trials x 1 epoch per mode, for the test suite")
    p.add_argument("--space", default=str(Path(__file__).resolve().parent.parent / "search_spaces/vicreg.yaml"))
    p.add_argument("--out", default="results/benchmarks/sweep.json")
    args = p.parse_args(argv)
    quick = {"num_samples": 2, "epochs": 1} if args.quick else {}
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                 "space": Path(args.space).name, "load_average_start": os.getloadavg()[0],
                 "target": "efficiency_sweep >= 0.85"}
    runs = {"before": one_sweep(args.space, quick, before=True), "after": one_sweep(args.space, quick, before=False)}
    out.update(runs)
    out["load_average_end"] = os.getloadavg()[0]
    print(f"default sweep ({out['space']}), {runs['after']['slots']} trial slots; efficiency = Σ trial seconds / "
          f"(wall x slots), target >= 0.85")
    print(f"{'':28} {'trials':>6} {'epochs':>6} {'trial s':>8} {'sweep s':>8} {'eff.':>5} {'+analysis s':>11} "
          f"{'eff.':>5}  phases (s)")
    for name, r in runs.items():
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phase_seconds"].items())
        label = f"{name} (reuse {'on' if r['reuse_actors'] else 'off'}, staged {r['staged_trials']})"
        print(f"{label:28} {r['trials']:6d} {r['epochs']:6d} {r['trial_seconds']:8.1f} {r['sweep_seconds']:8.1f} "
              f"{r['efficiency_sweep']:5.2f} {r['wall_seconds']:11.1f} {r['efficiency_total']:5.2f}  {phases}")
    for name, r in runs.items():
        print(f"{name}: slot-seconds " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in r["slot_seconds"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
