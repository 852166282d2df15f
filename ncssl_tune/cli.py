"""`ncssl-sweep`: argument parsing only. Exit status 0 success, 1 runtime failure, 2 bad input.

Nothing heavy is imported at module level or for --help (Ray, Optuna, torch and MLflow take seconds to load):
each command imports what it uses when it runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()  # this module is imported first: the command's own start, for timings.json

USAGE = """ncssl-sweep SPACE.yaml [options]                   run a sweep (also --dry-run, --resume)
       ncssl-sweep validate SPACE.yaml [...] [--set K=V]  check files, start nothing
       ncssl-sweep analyze --experiment NAME [options]    rank vs probe accuracy report from MLflow
       ncssl-sweep replicate RUN1.json RUN2.json          does a study's answer replicate? (two analysis.json)
       ncssl-sweep {validate,analyze,replicate} --help    the options of a subcommand"""

EXAMPLES = """examples:
  ncssl-sweep search_spaces/vicreg.yaml                      run a sweep (results in ./results/vicreg)
  ncssl-sweep search_spaces/vicreg.yaml --dry-run            validate and show the space and budget
  ncssl-sweep search_spaces/vicreg.yaml --resume             continue an interrupted sweep
  ncssl-sweep validate search_spaces/*.yaml                  check files, start nothing
  ncssl-sweep analyze --experiment vicreg                    rank vs probe accuracy report from MLflow
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `main` owns every exit status and message."""

    def error(self, message: str):
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ncssl-sweep", usage=USAGE, description="Run a hyperparameter sweep that measures collapse "
                "in non-contrastive SSL.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="search-space YAML file (see search_spaces/vicreg.yaml for the format)")
    p.add_argument("--num-samples", type=int,
                   help="configurations to sample, each trained search.repeats times (overrides search.num_samples)")
    p.add_argument("--epochs", type=int, help="epochs per trial (overrides train.epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, typed as YAML, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--name", help="sweep name (default: the file's name: or its stem); results go to RESULTS_DIR/NAME")
    p.add_argument("--results-dir", default="results", help="output root (default: ./results)")
    p.add_argument("--address", help="Ray cluster to join: auto, host:port or ray://host:port (default: local)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///RESULTS_DIR/mlflow.db)")
    p.add_argument("--storage", help="Ray Tune storage every node can reach: s3://BUCKET/PATH, gs://BUCKET/PATH or "
                   "an absolute shared path (default: RESULTS_DIR/NAME/ray); trials.csv and optuna.log stay local")
    # No default here: run_sweep's (sweep.RESOURCE_WAIT_S) applies, and importing sweep would load Ray for --help.
    p.add_argument("--resource-wait", type=_seconds, metavar="SECONDS",
                   help="on a cluster joined with --address that has no node fitting one trial (e.g. no GPU yet): "
                        "how long to wait for its autoscaler before failing (default 600)")
    p.add_argument("--resume", action="store_true", help="continue the sweep stored under RESULTS_DIR/NAME")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved space and budget, start nothing")
    p.add_argument("--seed", type=int, help="seed of the sampler and of training (overrides search.seed, train.seed)")
    p.add_argument("--register", metavar="NAME", help="also register the best trial's encoder in MLflow's model "
                   "registry as NAME (it is always written to RESULTS_DIR/NAME/best and logged on its trial's run)")
    return p


def _analyze_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ncssl-sweep analyze", description="Rank every label-free collapse metric by how well it "
                "predicts the sweep's objective, at equal budgets, over its MLflow runs; write analysis.json, "
                "report.md and plots, and log them to the parent run.")
    p.add_argument("--experiment", required=True, help="MLflow experiment = the sweep name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///RESULTS_DIR/mlflow.db)")
    p.add_argument("--results-dir", default="results", help="output root (default: ./results)")
    p.add_argument("--out", help="report folder (default: RESULTS_DIR/EXPERIMENT/analysis)")
    p.add_argument("--parent-run-id", help="the sweep's parent run (default: the latest one)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    return p


def _analyze(args) -> int:
    from ncssl_tune.analysis import run_analysis
    from ncssl_tune.records.store import TrackingError, check_tracking_uri, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(args.results_dir)
    out = args.out or str(Path(args.results_dir) / args.experiment / "analysis")
    try:
        check_tracking_uri(uri)  # once per command: run_analysis is told so and does not ask the store again
        result = run_analysis(args.experiment, uri, out, log_to_parent=not args.no_log,
                              parent_run_id=args.parent_run_id, tracking_checked=True)
    except TrackingError as e:
        print(f"ncssl-sweep: error: {e}", file=sys.stderr)
        return 2
    _print_analysis(result, out)
    return 0


def _replicate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ncssl-sweep replicate", description="Compare two analyses of the same study run with other "
                "seeds: each predictor's rho in both with intervals and noise ceilings, Kendall's tau between the "
                "two rankings, and whether the top predictor is the same (markdown on stdout).")
    p.add_argument("runs", nargs=2, metavar="ANALYSIS.json", help="analysis.json of each run")
    p.add_argument("--scope", default="all", help="scope to compare: all, healthy or method=NAME (default: all)")
    return p


def _replicate(args) -> int:
    import json

    from ncssl_tune.analysis.replication import compare_files

    for path in args.runs:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"ncssl-sweep: error: {path}: cannot read an analysis.json: {e}", file=sys.stderr)
            return 2
        scopes = (result.get("study") or result).get("scopes", {}) if isinstance(result, dict) else {}
        if args.scope not in scopes:
            print(f"ncssl-sweep: error: {path}: --scope {args.scope!r} not in this analysis; choose from: "
                  f"{', '.join(scopes) or '(none: not an analysis.json)'}", file=sys.stderr)
            return 2
    print(compare_files(*args.runs, scope=args.scope), end="")
    return 0


def _print_analysis(result: dict, out: str | Path) -> None:
    from ncssl_tune.analysis import summary_lines

    print("\n".join(summary_lines(result)))
    print(f"analysis: {Path(out) / 'report.md'}")


def _validate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ncssl-sweep validate", description="Check search-space files; start nothing.")
    p.add_argument("spaces", nargs="+", help="search-space YAML files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


def _load(args) -> object:
    from ncssl_tune.spec import load_spec

    return load_spec(args.space, args.set, num_samples=args.num_samples, epochs=args.epochs, seed=args.seed,
                     name=args.name)


class _Missing(str):
    """What of a spec's dataset is not on this machine: the whole message (how to get it, for --dry-run and a
    sweep's refusal) with `short`, the problem alone (validate's one line per file)."""

    short: str


def _check_data(spec, checked: dict | None = None) -> tuple[_Missing | None, str | None]:
    """(missing, bad): what of the spec's dataset is not on this machine, and what is wrong with what is there
    ("data.root: ..."), or None. A valid file may name data that lives elsewhere (a cluster, a later --set
    data.root=...): `validate` and --dry-run only note missing data, starting a sweep refuses it. Data that is
    here is loaded once, as a trial would, and checked (core/datasets_check.py): bad data is an error in every
    command, before anything starts. checked: verdicts by dataset, so that files sharing one are loaded once."""
    from ncssl_tune.core.data import DATASETS, DatasetError, DatasetMissing, check_dataset
    from ncssl_tune.core.datasets_check import load_checked

    cfg = spec.train_config()
    d = cfg.data
    key = "data.root" if DATASETS[d.dataset].expected else "data"
    try:
        check_dataset(d.dataset, d.root)
    except DatasetMissing as e:
        missing = _Missing(f"{key}: {e}")
        missing.short = e.short
        return missing, None
    except DatasetError as e:
        return None, f"{key}: {e}"
    checked = {} if checked is None else checked
    seen = (d.dataset, d.root, d.seed, d.test_fraction, d.image_size, repr(d.synthetic), cfg.eval.fewshot_k)
    if seen not in checked:
        try:
            load_checked(cfg)
            checked[seen] = None
        except DatasetError as e:
            checked[seen] = f"{key}: {e}"
    return None, checked[seen]


def _validate(args) -> int:
    """Every file checked and reported on its own line (ok on stdout, errors on stderr); 2 if any failed."""
    from ncssl_tune.spec import SpecError

    failed, checked = 0, {}
    for path in args.spaces:
        ns = argparse.Namespace(space=path, set=args.set, num_samples=None, epochs=None, seed=None, name=None)
        try:
            spec = _load(ns)
        except SpecError as e:
            print(f"ncssl-sweep: error: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        missing, bad = _check_data(spec, checked)
        if bad:
            print(f"ncssl-sweep: error: {path}: {bad}", file=sys.stderr, flush=True)
            failed += 1
            continue
        # short: the full note (where the files go, how to get them) is --dry-run's, ~400 characters
        note = f"; data missing here: {missing.short}" if missing else ""
        s = spec.search
        trials = f"{s.num_samples} configurations x {s.repeats} repeats" if s.repeats > 1 else f"{s.num_samples} trials"
        print(f"{path}: ok ({len(spec.space)} swept keys, {trials}){note}", flush=True)
    return 2 if failed else 0


def _dry_run(spec) -> None:
    from ncssl_tune.sweep.space import describe, grid_size

    cfg = spec.train_config()
    s = spec.search
    print(f"sweep {spec.name!r} from {spec.path}")
    print(f"method {cfg.loss.method}, dataset {cfg.data.dataset}, backbone {cfg.model.backbone}, "
          f"projector {cfg.model.projector or '(none)'}")
    print(f"search: {s.algorithm} (seed {s.seed}), objective {s.metric} ({spec.mode}), scheduler {s.scheduler.name}")
    print("space:")
    print("\n".join(describe(spec)) or "  (empty: every trial uses the base configuration)")
    n = (min(s.num_samples, grid_size(spec)) if s.algorithm == "grid" else s.num_samples) * s.repeats
    if s.repeats > 1:
        print(f"study: {n // s.repeats} configurations x {s.repeats} repeats (training seeds train.seed + r*1000)")
    print(f"budget: {n} trials x {cfg.train.epochs} epochs = at most {n * cfg.train.epochs} trial-epochs, "
          f"{s.max_concurrent} at once, {spec.resources.cpu:g} cpu + {spec.resources.gpu:g} gpu per trial")
    print(_data_line(cfg, spec.resources.gpu))


def _data_line(cfg, gpu: float) -> str:
    """Which path the sweep's data takes and what memory it needs (docs/data.md)."""
    from ncssl_tune.core.data import format_bytes, plan_storage

    storage, why, shape = plan_storage(cfg.data)
    if shape is None and cfg.data.storage == "auto":
        return ("data: size unknown here (its files are not on this machine, or its source does not say); each node "
                "decides when a trial starts: an image folder is streamed from disk if larger than data.memory_cap_gb (default 80% of "
                "the node's object store), else one copy per node in Ray's object store")
    size = shape.describe() if shape else "size unknown until loaded"
    if storage == "stream":
        workers = cfg.data.workers or "as many as a trial's CPUs"
        held = f"streamed from disk batch by batch ({workers} decoding threads a trial; memory: a few batches)"
    elif storage == "shared":
        held = "in memory, one copy per node in Ray's object store shared by its trials"
    else:
        held = "in memory, a private copy per trial"
    if storage != "stream" and shape and gpu > 0:
        held += f"; each GPU trial also holds it on its device ({format_bytes(shape.nbytes)})"
    return f"data: {size}; {held} [{storage}: {why}]"


def resume_command(argv: list[str]) -> str:
    """The command that continues this sweep: the same arguments, with --resume."""
    return shlex.join(["ncssl-sweep", *argv, *([] if "--resume" in argv else ["--resume"])])


def _interrupted(argv: list[str], trials: list[str]) -> int:
    named = f"; {len(trials)} trials did not finish: {', '.join(trials)}" if trials else ""
    print(f"ncssl-sweep: interrupted{named} (status 'interrupted' in trials.csv). The state is saved; continue "
          f"with:\n  {resume_command(argv)}", file=sys.stderr)
    return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl+C


def _sweep(args, argv: list[str]) -> int:
    from ncssl_tune.analysis import run_analysis
    from ncssl_tune.naming import mlflow_runs_view
    from ncssl_tune.records.store import TrackingError, check_tracking_uri, default_tracking_uri
    from ncssl_tune.sweep.runner import SweepError, check_storage, run_sweep

    spec = _load(args)
    missing, bad = _check_data(spec)
    if bad or (missing and not args.dry_run):
        print(f"ncssl-sweep: error: {spec.path}: {bad or missing}", file=sys.stderr)
        return 2
    if args.storage is not None:
        try:
            check_storage(args.storage)
        except SweepError as e:
            print(f"ncssl-sweep: error: {e}", file=sys.stderr)
            return 2
    uri = args.tracking_uri or default_tracking_uri(args.results_dir)
    if args.dry_run:
        _dry_run(spec)
        print(f"tracking: {uri} (not contacted in a dry run)")
        if args.storage:
            print(f"ray tune storage: {args.storage.rstrip('/')}/{spec.name} (not contacted in a dry run)")
        if missing:
            print(f"note: data missing on this machine; starting this sweep fails (exit status 2) until it is "
                  f"there: {missing}")
        return 0
    try:
        # once per command, before anything starts: run_sweep and run_analysis are told so and do not ask again
        check_tracking_uri(uri)
        wait = {} if args.resource_wait is None else {"resource_wait_s": args.resource_wait}
        marks = [time.perf_counter()]
        result = run_sweep(spec, args.results_dir, resume=args.resume, address=args.address, tracking_uri=uri,
                           storage=args.storage, tracking_checked=True, register=args.register, **wait)
    except (SweepError, TrackingError) as e:
        print(f"ncssl-sweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl+C skips Ray's last save: the previous save is resumed
        return _interrupted(argv, [])
    marks.append(time.perf_counter())
    if result.interrupted:
        return _interrupted(argv, result.interrupted)
    print(f"\n{result.num_trials} trials ({result.errors} errored); results in {result.out_dir}")
    if result.best_metrics:
        _print_best(result.best_metrics, result.best_config or {}, spec.search.metric)
    print(f"per-trial table: {result.out_dir / 'trials.csv'}")
    if (ex := result.best_export) is not None:
        logged = f"; MLflow model {ex.model_uri}" if ex.model_uri else ""
        registered = f", registered as {ex.registered}" if ex.registered else ""
        print(f"best encoder (trial {ex.trial_id}, epoch {ex.epoch}): {ex.folder}{logged}{registered} "
              f"(how to load it: {ex.folder / 'README.md'})")
    print(f"MLflow: mlflow ui --host 127.0.0.1 --backend-store-uri {uri}  (experiment {spec.name!r})")
    if result.mlflow_experiment_id:
        view = mlflow_runs_view(result.mlflow_experiment_id, spec.search.metric, spec.mode)
        print(f"  then open http://127.0.0.1:5000/{view}  (the trials, best {spec.search.metric} first)")
    analysis_dir = result.out_dir / "analysis"
    marks.append(time.perf_counter())
    _print_analysis(run_analysis(spec.name, uri, analysis_dir, parent_run_id=result.mlflow_parent_run_id,
                                 tracking_checked=True), analysis_dir)
    _write_timings(result, [_STARTED, *marks, time.perf_counter()])
    return 1 if result.errors == result.num_trials and result.num_trials else 0


def _write_timings(result, marks: list[float]) -> None:
    """<sweep>/timings.json: the wall seconds of this command's phases, where a sweep's time went. marks: the
    command's start, run_sweep's call, its return, the analysis' start and end. `start` is the imports and the
    checks before run_sweep; `sweep_rest` is what run_sweep spent outside its own phases (stopping Ray, the
    result table); `reporting` the lines printed after the sweep."""
    start, called, returned, analysing, done = marks
    seconds = {"start": called - start, **result.seconds,
               "sweep_rest": returned - called - sum(result.seconds.values()),
               "reporting": analysing - returned, "analysis": done - analysing}
    (result.out_dir / "timings.json").write_text(json.dumps({"seconds": seconds, "total": done - start}, indent=2))


def _print_best(metrics: dict, config: dict, metric: str) -> None:
    """The best trial, rounded for reading (trials.csv and MLflow keep full precision), named as the live table,
    trials.csv and its MLflow run name it: `#9 (66ad3c7a)`, number (Ray's experiment tag) and Ray trial id."""
    from ncssl_tune.naming import fmt_number, trial_index, trial_label

    label = trial_label(trial_index(metrics.get("experiment_tag")), str(metrics.get("trial_id")))
    print(f"best trial {label}: {metric} = {fmt_number(metrics.get(metric))}")
    for key, value in sorted(config.items()):
        print(f"  {key} = {fmt_number(value)}")


def main(argv: list[str] | None = None) -> int:
    from ncssl_tune.spec import SpecError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "analyze":
            return _analyze(_analyze_parser().parse_args(argv[1:]))
        if argv and argv[0] == "replicate":
            return _replicate(_replicate_parser().parse_args(argv[1:]))
        if argv and argv[0] == "validate":
            return _validate(_validate_parser().parse_args(argv[1:]))
        return _sweep(_run_parser().parse_args(argv), argv)
    except (_UsageError, SpecError) as e:
        print(f"ncssl-sweep: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version print and exit through argparse
        return int(e.code or 0)


def entry() -> None:
    status = main()
    # At exit Python clears its modules and runs the cyclic collector over the whole heap several times (torch,
    # Ray, MLflow, pandas, matplotlib: 3 s after a sweep on 2 busy cores, 25 s once). Nothing of ours waits on
    # that collection (files are closed, runs ended, Ray stopped): the objects alive now are left out of it.
    # atexit handlers and every object's own clean-up still run.
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":  # python -m ncssl_tune.cli: the console script's command
    entry()
