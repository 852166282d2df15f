"""Search efficiency and label-free selection on the VICReg digits space (search_spaces/vicreg.yaml), issue 7.

Three strategies, same space, same training seed, same budget of B trial-epochs (one trial-epoch = one epoch
result of one trial), for each seed:
  tpe    TPE (make_sampler: multivariate, grouped, constant liar, stratified start-up) + ASHA + collapse
         stopper (the file's settings), num_samples = ceil(B / 4)
  random random search + FIFO, no collapse stopper, num_samples = B // epochs trials that all run to the end
  qmc    scrambled Sobol (Optuna's QMCSampler) + FIFO, no collapse stopper, num_samples = B // epochs
The equal budget: a stopper ends the sweep once B distinct results (trial-epochs) have arrived, and a callback
records every result in arrival order (max_concurrent 2); the few results of trials already running when the
sweep stops are discarded from every curve. (Before 2026-12-03 the stopper counted calls, and Ray calls it twice
for the last result of a trial that ran to its end: random and QMC stopped at ~287 of 300, their last two trials
cut short; results/benchmarks/search.json was re-run.) ASHA spends ~3-6 epochs per trial, so B/4 trials usually reach B; when
a TPE sweep ends short of B that only handicaps TPE (`spent` says how many it used).

Per seed and objective (the space's objective, fewshot_acc, which both searchers optimise; knn_acc and probe_acc
read from the same curves):
  best       the highest value of any result (any trial, any epoch) within B, per strategy
  reference  the highest of the strategies' bests: the common target
  to_within  cumulative trial-epochs at the first result whose running best is >= reference - 0.01;
             null when never reached within B
  ratio      random.to_within / <strategy>.to_within for tpe and qmc; a strategy that never got there is charged
             B (then the ratio is a bound, flagged in `censored`). Medians and ranges (min, max) are over seeds.
  --random-budget N: random search runs on to N > B trial-epochs (same configurations in the same order: its
             first B results are the equal-budget run), so that its trial-epochs to within 1 point of the
             reference are counted past B: ratio_extended = random.to_within_extended / <strategy>.to_within,
             censored only when random search does not get there within N either.
Target: median ratio >= 2 for tpe on the objective at an equal or better best (median of tpe.best - random.best
>= 0).

Label-free selection: over every trial the sweeps ran (not truncated; diverged trials excluded), regret =
best final objective - final objective of the trial with the highest final effective_rank (RankMe-style
selection, no labels); also for knn_acc, for effective_rank_h, and the regret of a uniformly random pick for
scale. Per seed (both strategies' trials pooled) and over all seeds pooled.

Writes results/benchmarks/search.json after every seed (a long run keeps what it measured). `--quick`: 1 seed, B = 2, 1 epoch per trial: 2 trials per strategy (what
the test suite runs; it checks the plumbing, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray.tune import Callback
from ray.tune.stopper import Stopper

from ncssl_tune.spec import load_spec
from ncssl_tune.sweep.runner import run_sweep

KEYS = ("fewshot_acc", "probe_acc", "knn_acc", "effective_rank", "effective_rank_h")
OBJECTIVES = ("fewshot_acc", "knn_acc", "probe_acc")
TOL = 0.01  # "within 1 point"


class BudgetStopper(Stopper):
    """Ends the whole sweep once `budget` trial-epochs have been reported, so no compute is spent past B.

    Counts distinct (trial, iteration) pairs: Ray calls a stopper twice for the last result of a trial whose
    function returned (once as reported, once marked done), so counting calls ended FIFO sweeps ~13 trial-epochs
    early at B = 300 (one per finished trial) and cut their last trials before their final epochs."""

    def __init__(self, budget: int):
        self.budget, self.seen = budget, set()

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seen.add((trial_id, result.get("training_iteration")))
        return False

    def stop_all(self) -> bool:
        return len(self.seen) >= self.budget


class ResultLog(Callback):
    """Every result Ray sees, in arrival order (Ray calls callbacks for the result a stopper fires on too)."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.rows.append({"trial": trial.trial_id, "epoch": result.get("epoch"), "status": result.get("status"),
                          **{k: _num(result.get(k)) for k in KEYS}})


def _num(v) -> float | None:
    """A finite float or None (diverged trials report NaN; JSON must hold none)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


STRATEGIES = ("random", "qmc", "tpe")  # random first: the others' ratios are against it


def run_strategy(space: str, seed: int, epochs: int, budget: int, strategy: str, metric: str, tmp: str,
                 run_budget: int | None = None) -> dict:
    """One sweep of `strategy`, stopped at run_budget (default budget) trial-epochs; best and trials over its
    first `budget` results (what an equal budget compares), `_run_kept` every result up to run_budget."""
    run_budget = run_budget or budget
    sets = ["train.threads=1", f"search.metric={metric}"]  # one torch thread per trial: 2 trials on 2 cores
    if strategy == "tpe":
        num_samples = max(2, math.ceil(run_budget / 4))
        sets += ["search.algorithm=tpe", "search.scheduler.name=asha", "search.collapse_stop.total=true"]
    else:
        num_samples = max(1, run_budget // epochs)
        sets += [f"search.algorithm={strategy}", "search.scheduler.name=fifo", "search.collapse_stop.total=false"]
    name = f"{strategy}-s{seed}"
    spec = load_spec(space, sets, num_samples=num_samples, epochs=epochs, seed=seed, name=name)
    log = ResultLog()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the live table is noise here; our summary follows
        run_sweep(spec, tmp, extra_callbacks=[log], monitor_interval_s=1e9, stoppers=[BudgetStopper(run_budget)])
    rows = log.rows
    kept = rows[:budget]
    out = {"num_samples": num_samples, "wall_seconds": time.perf_counter() - start, "spent": len(kept),
           "discarded": len(rows) - len(rows[:run_budget]), "trials_within_budget": len({r["trial"] for r in kept})}
    if run_budget > budget:
        out["run_budget"], out["run_spent"] = run_budget, len(rows[:run_budget])
    out["best"] = {m: max((r[m] for r in kept if r[m] is not None), default=None) for m in OBJECTIVES}
    # _rows: every result, past the budget too (label-free selection reads each trial's last one)
    out["_rows"], out["_kept"], out["_run_kept"] = rows, kept, rows[:run_budget]
    return out


def to_within(kept: list[dict], metric: str, target: float) -> int | None:
    # The running best first reaches the target at the first single result that does.
    return next((i for i, r in enumerate(kept, 1) if r[metric] is not None and r[metric] >= target - 1e-9), None)


def final_trials(rows: list[dict]) -> list[dict]:
    last = {}
    for r in rows:
        last[r["trial"]] = r
    return [r for r in last.values() if r["status"] != "diverged"]


def regret(trials: list[dict], by: str, metric: str) -> dict:
    pool = [t for t in trials if t[by] is not None and t[metric] is not None]
    if not pool:
        return {"regret": None, "random_pick_regret": None, "trials": 0}
    best = max(t[metric] for t in pool)
    pick = max(pool, key=lambda t: t[by])
    return {"regret": best - pick[metric], "random_pick_regret": best - statistics.fmean(t[metric] for t in pool),
            "trials": len(pool), "best": best, "picked": pick[metric], "picked_rank": pick[by]}


def label_free(trials: list[dict]) -> dict:
    return {f"{by}->{m}": regret(trials, by, m) for by in ("effective_rank", "effective_rank_h") for m in OBJECTIVES}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, B = 2, 1 epoch: for the test suite")
    p.add_argument("--space", default=str(Path(__file__).resolve().parent.parent / "search_spaces/vicreg.yaml"))
    p.add_argument("--out", default="results/benchmarks/search.json")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--budget", type=int, default=100, help="trial-epochs per strategy and seed (random search: "
                   "budget // epochs trials)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the space file's)")
    p.add_argument("--metric", default=None, choices=OBJECTIVES,
                   help="objective both searchers optimise (default: the space file's)")
    p.add_argument("--random-budget", type=int, default=None, metavar="N",
                   help="run random search on to N > B trial-epochs: its best and the reference stay those of "
                        "its first B, and its trial-epochs to within 1 point of the reference are counted up to "
                        "N, so that a ratio censored at B becomes a ratio (ratio_extended)")
    args = p.parse_args(argv)
    seeds, budget = (1, 2) if args.quick else (args.seeds, args.budget)
    if args.random_budget is not None and args.random_budget <= budget:
        raise SystemExit(f"--random-budget {args.random_budget}: must exceed the budget B = {budget}")
    args.metric = args.metric or load_spec(args.space).search.metric
    epochs = 1 if args.quick else (args.epochs or load_spec(args.space).train_config().train.epochs)
    started = not ray.is_initialized()
    if started:  # one Ray for all sweeps (run_sweep would start and stop one per sweep, ~5 s each)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    per_seed, pooled = [], []
    settings = {"seeds": seeds, "budget_trial_epochs": budget, "epochs_per_trial": epochs,
                "objective": args.metric, "tolerance": TOL, "max_concurrent": 2, "threads_per_trial": 1,
                "tpe": "tpe + asha (file's grace/reduction) + collapse stop, num_samples ceil(B/4)",
                "random": "random + fifo, no collapse stop, num_samples B // epochs",
                "qmc": "scrambled sobol + fifo, no collapse stop, num_samples B // epochs",
                "budget_rule": "sweep stopped once B distinct results arrived; results past the first B "
                               "(arrival order) discarded from every curve",
                "random_budget": args.random_budget}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.first_seed, args.first_seed + seeds):
                s = {"seed": seed}
                for name in STRATEGIES:
                    s[name] = run_strategy(args.space, seed, epochs, budget, name, args.metric, tmp,
                                           args.random_budget if name == "random" else None)
                s["reference"], s["ratio"], s["censored"] = {}, {}, {}
                for m in OBJECTIVES:
                    bests = [s[n]["best"][m] for n in STRATEGIES if s[n]["best"][m] is not None]
                    s["reference"][m] = max(bests) if bests else None
                    for n in STRATEGIES:
                        s[n].setdefault("to_within", {})[m] = (
                            None if not bests else to_within(s[n]["_kept"], m, s["reference"][m] - TOL))
                    for n in STRATEGIES[1:]:
                        ratio, censored = _ratio(s["random"]["to_within"][m], budget, s[n]["to_within"][m], budget,
                                                 bool(bests))
                        s["ratio"].setdefault(n, {})[m], s["censored"].setdefault(n, {})[m] = ratio, censored
                if args.random_budget:
                    extend(s, budget, args.random_budget)
                trials = [t for n in STRATEGIES for t in final_trials(s[n].pop("_rows"))]
                for n in STRATEGIES:
                    s[n].pop("_kept"), s[n].pop("_run_kept")
                s["label_free"] = label_free(trials)
                pooled += trials
                per_seed.append(s)
                # Written after every seed: a long run (B = 300: ~15 min a seed) keeps what it measured.
                out = summarise(per_seed, pooled, settings, args.space, args.metric)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(out, indent=2, allow_nan=False))  # raises on a stray NaN
                print(f"seed {seed} done ({len(per_seed)} of {seeds}), written to {args.out}", flush=True)
    finally:
        if started:
            ray.shutdown()
    _print(out)
    return out


def extend(s: dict, budget: int, run_budget: int) -> None:
    """Random search's trial-epochs to within TOL of the seed's reference (the best of any strategy within B)
    counted over its whole run to run_budget, and the ratios against the other strategies' to_within at B."""
    r = s["random"]
    r["to_within_extended"] = {m: None if s["reference"][m] is None else
                               to_within(r["_run_kept"], m, s["reference"][m] - TOL) for m in OBJECTIVES}
    s["ratio_extended"], s["censored_extended"] = {}, {}
    for n in STRATEGIES[1:]:
        for m in OBJECTIVES:
            ratio, censored = _ratio(r["to_within_extended"][m], run_budget, s[n]["to_within"][m], budget,
                                     s["reference"][m] is not None)
            s["ratio_extended"].setdefault(n, {})[m], s["censored_extended"].setdefault(n, {})[m] = ratio, censored


def _ratio(random_to: int | None, random_budget: int, other_to: int | None, budget: int, has_reference: bool
           ) -> tuple[float | None, bool]:
    """(random search's trial-epochs to within TOL ÷ the other strategy's, censored): a strategy that never got
    there is charged its whole budget, which makes the ratio a bound (censored). None without a reference."""
    censored = random_to is None or other_to is None
    return (None if not has_reference else (random_to or random_budget) / (other_to or budget)), censored


def _spread(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    return {"median": _median(xs), "min": min(xs, default=None), "max": max(xs, default=None), "n": len(xs)}


def summarise(per_seed: list[dict], pooled: list[dict], settings: dict, space: str, metric: str) -> dict:
    """The JSON for the seeds run so far: per seed, medians and ranges over seeds, targets, label-free regret."""
    med = {m: {**{f"{n}_ratio": _spread([s["ratio"][n][m] for s in per_seed]) for n in STRATEGIES[1:]},
               **{f"{n}_best": _spread([s[n]["best"][m] for s in per_seed]) for n in STRATEGIES},
               **{f"{n}_to_within": _spread([s[n]["to_within"][m] for s in per_seed]) for n in STRATEGIES},
               **{f"best_gap_{n}_minus_random": _spread([s[n]["best"][m] - s["random"]["best"][m] for s in per_seed
                                                        if None not in (s[n]["best"][m], s["random"]["best"][m])])
                  for n in STRATEGIES[1:]}} for m in OBJECTIVES}
    extended = [s for s in per_seed if "ratio_extended" in s]
    for m in OBJECTIVES if extended else ():
        for n in STRATEGIES[1:]:
            med[m][f"{n}_ratio_extended"] = _spread([s["ratio_extended"][n][m] for s in extended])
        med[m]["random_to_within_extended"] = _spread([s["random"]["to_within_extended"][m] for s in extended])
    ratio, gap = med[metric]["tpe_ratio"]["median"], med[metric]["best_gap_tpe_minus_random"]["median"]
    targets = {"ratio_at_least": 2.0, "ratio_met": ratio is not None and ratio >= 2.0,
               "equal_or_better_best_met": gap is not None and gap >= 0.0}
    if extended:
        ext = med[metric]["tpe_ratio_extended"]["median"]
        targets["ratio_extended_met"] = ext is not None and ext >= 2.0
    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "space": Path(space).name, "settings": {**settings, "seeds_done": len(per_seed)},
            "per_seed": per_seed, "medians": med, "targets": targets,
            "label_free": {"per_seed": [s["label_free"] for s in per_seed], "pooled": label_free(pooled)}}


def _print(out: dict) -> None:
    f = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    st = out["settings"]
    print(f"B = {st['budget_trial_epochs']} trial-epochs, {st['epochs_per_trial']} epochs/trial, "
          f"objective {st['objective']}; to_within = trial-epochs to within {TOL} of the seed's reference")
    for m in OBJECTIVES:
        print(f"\n{m:9s} seed | " + " | ".join(f"{n} best  to_within spent trials" for n in STRATEGIES)
              + " | ratio " + " ".join(STRATEGIES[1:]))
        for s in out["per_seed"]:
            cells = [f"{f(s[n]['best'][m]):>8s} {f(s[n]['to_within'][m]):>10s} {s[n]['spent']:5d} "
                     f"{s[n]['trials_within_budget']:6d}" for n in STRATEGIES]
            ratios = " ".join(f"{f(s['ratio'][n][m], 2)}{'*' if s['censored'][n][m] else ''}" for n in STRATEGIES[1:])
            print(f"{'':9s} {s['seed']:4d} | " + " | ".join(cells) + f" | {ratios}")
        md = out["medians"][m]
        for n in STRATEGIES[1:]:
            r, g = md[f"{n}_ratio"], md[f"best_gap_{n}_minus_random"]
            print(f"{'':9s} {n}: median ratio {f(r['median'], 2)} (range {f(r['min'], 2)}-{f(r['max'], 2)}), "
                  f"best gap {n} - random median {f(g['median'])} (range {f(g['min'])} to {f(g['max'])})")
            if f"{n}_ratio_extended" in md:
                e = md[f"{n}_ratio_extended"]
                print(f"{'':9s} {n}: random run on to {st['random_budget']}: median ratio {f(e['median'], 2)} "
                      f"(range {f(e['min'], 2)}-{f(e['max'], 2)}; per seed "
                      + " ".join(f"{f(s['ratio_extended'][n][m], 2)}{'*' if s['censored_extended'][n][m] else ''}"
                                 for s in out["per_seed"] if "ratio_extended" in s) + ")")
        print(f"{'':9s} (* = censored)")
    tg = out["targets"]
    print(f"\ntarget ({st['objective']}): ratio >= 2: {'met' if tg['ratio_met'] else 'NOT met'}; equal or better "
          f"best: {'met' if tg['equal_or_better_best_met'] else 'NOT met'}"
          + (f"; ratio >= 2 with random run on to {st['random_budget']}: "
             f"{'met' if tg['ratio_extended_met'] else 'NOT met'}" if "ratio_extended_met" in tg else ""))
    for key, v in out["label_free"]["pooled"].items():
        print(f"label-free {key:25s} regret {f(v['regret'])} (random pick {f(v['random_pick_regret'])}, "
              f"{v['trials']} trials pooled)")


if __name__ == "__main__":
    main()
