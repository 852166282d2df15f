from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest
from helpers import TINY_SWEEP, MlflowServer, free_port, mlflow_client, mlflow_server, runs_of, steps
from ray.tune import Callback

from ncssl_tune.config import flatten
from ncssl_tune.naming import fmt_number, trial_index, trial_label
from ncssl_tune.records.spectra import read_spectrum_csv
from ncssl_tune.records.store import TrackingError, check_tracking_uri, default_tracking_uri
from ncssl_tune.spec import CollapseStopConfig, load_spec
from ncssl_tune.sweep.monitor import read_trials, trial_outcome
from ncssl_tune.sweep.tracker import OUTBOX_DIR, OUTBOX_FILE, UNSENT_FILE, MlflowTracker, safe_key
from ncssl_tune.sweep.trainable import build_config
from ncssl_tune.vocab import (
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    SPECTRUM_CSV,
    TAG_BEST_TRIAL,
    TAG_HEADLINE_PREDICTOR,
    TAG_NOTE,
)

# One `mlflow server` for the whole module (a start costs ~10 s): the tests that stop it mid-sweep (at the end of
# the module) use it too, each from a running server (`server` and `running_server` start it again if a test before
# left it stopped). Each test records under its own experiment name, so sharing the store mixes nothing.

@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as srv:
        yield srv


@pytest.fixture
def running_server(module_server) -> MlflowServer:
    """The module's server, running, by its handle (a test may stop and restart it)."""
    if module_server.proc is None:
        module_server.start()
    return module_server


@pytest.fixture
def server(running_server) -> str:
    """The module's server, running, by its URI (conftest's `server` would start a server of its own)."""
    return running_server.uri


# --- check_tracking_uri

def test_unreachable_server_fails_fast_with_a_clear_message():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable") as e:
        check_tracking_uri(uri, timeout_s=2)
    assert time.monotonic() - start < 5
    assert uri in str(e.value) and "mlflow server" in str(e.value) and "sqlite:///" in str(e.value)


@pytest.mark.parametrize("uri", ["ftp://host/x", "results/mlruns", "databricks-uc://x"])
def test_unknown_scheme_is_an_error(uri):
    with pytest.raises(TrackingError, match="unsupported scheme") as e:
        check_tracking_uri(uri)
    assert repr(uri) in str(e.value)


def test_sqlite_uris(tmp_path):
    uri = default_tracking_uri(tmp_path / "a" / "b")
    assert uri == f"sqlite:///{tmp_path.resolve()}/a/b/mlflow.db"
    check_tracking_uri(uri)
    assert (tmp_path / "a" / "b").is_dir()  # the folder is created; the database is left to MLflow
    with pytest.raises(TrackingError, match="needs a file"):
        check_tracking_uri("sqlite://")
    (tmp_path / "bad.db").write_text("not a database " * 100)
    with pytest.raises(TrackingError, match="not a usable SQLite database"):
        check_tracking_uri(f"sqlite:///{tmp_path}/bad.db")
    (tmp_path / "file").write_text("")
    with pytest.raises(TrackingError, match="cannot write into"):
        check_tracking_uri(f"sqlite:///{tmp_path}/file/mlflow.db")


def test_a_command_asks_the_store_once(tmp_path, monkeypatch, capsys):
    """The CLI checks the tracking URI at its start and tells run_analysis (and run_sweep) so: the store is asked
    once per command. No memory is kept between calls: the next check asks the store again."""
    from ncssl_tune.cli import main
    from ncssl_tune.records import store

    asked = []
    check_sqlite = store._check_sqlite
    monkeypatch.setattr(store, "_check_sqlite", lambda uri: asked.append(uri) or check_sqlite(uri))
    uri = f"sqlite:///{tmp_path}/once/mlflow.db"
    assert main(["analyze", "--experiment", "x", "--tracking-uri", uri, "--no-log"]) == 2
    assert asked == [uri] and "no MLflow database" in capsys.readouterr().err
    (tmp_path / "once").rmdir()
    (tmp_path / "once").write_text("")  # the same check now fails, and is made again
    with pytest.raises(TrackingError, match="cannot write into"):
        check_tracking_uri(uri)


def test_run_sweep_checks_its_uri_before_anything_starts_and_the_tracker_does_not(tmp_path):
    from ncssl_tune.sweep.runner import run_sweep

    spec = load_spec("search_spaces/vicreg.yaml")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match="not reachable"):
        run_sweep(spec, tmp_path, tracking_uri=uri)
    assert not list(tmp_path.iterdir())
    MlflowTracker(spec, uri)  # run_sweep has checked: the tracker asks nothing on construction


# --- pure helpers

COLLAPSED = {"status": "running", "epoch": 2, "collapse": "total", "collapse_streak": 1}


@pytest.mark.parametrize("result, scheduler, error, expected", [
    ({"status": "finished"}, "asha", None, ("finished", "")),
    ({"status": "diverged", "error": "non-finite loss"}, "asha", None, ("diverged", "non-finite loss")),
    (COLLAPSED, "asha", None, ("stopped", "collapse_total (epoch 2)")),
    ({**COLLAPSED, "epoch": 1}, "asha", None, ("stopped", "asha")),  # before min_epoch: not the collapse stopper
    ({**COLLAPSED, "collapse": "none"}, "asha", None, ("stopped", "asha")),
    ({"status": "running"}, "fifo", None, ("stopped", "stopped")),
    ({"status": "running"}, "fifo", "boom.txt", ("error", "boom.txt")),
])
def test_trial_outcome(result, scheduler, error, expected):
    assert trial_outcome(result, CollapseStopConfig(), scheduler, error) == expected


def test_safe_key_keeps_valid_keys_and_shortens_long_ones_uniquely():
    assert safe_key("loss.vicreg.lam") == "loss.vicreg.lam"
    assert safe_key("a{b}") == "a_b_"
    long1, long2 = safe_key("x" * 300 + "1"), safe_key("x" * 300 + "2")
    assert len(long1) == len(long2) == 250 and long1 != long2


# --- the callback on fake trials (no Ray): status mapping, replayed epochs, pickling

def fake_trial(tid: str, config: dict | None = None, number: int = 1):
    config = config or {"loss.vicreg.lam": 10.0}
    return types.SimpleNamespace(trial_id=tid, config=config, last_result=None, status="RUNNING", error_file=None,
                                 experiment_tag=f"{number}_" + ",".join(f"{k}={v}" for k, v in config.items()))


def report(tracker, trial, epoch: int, status: str = "running", **extra):
    result = {"epoch": epoch, "loss": 1.0 / epoch, "effective_rank": 2.0 + epoch, "effective_rank_h": 3.0,
              "probe_acc": 0.5, "knn_acc": math.nan, "collapse": "none", "status": status, "method": "vicreg",
              "pid": 1, "time_total_s": float(epoch), "config": dict(trial.config), **extra}
    trial.last_result = result
    tracker.on_trial_result(0, [], trial, result)


def test_callback_statuses_tags_and_replayed_epochs(server):
    spec = load_spec("search_spaces/vicreg.yaml", name="trk_fake", epochs=3)
    tracker = MlflowTracker(spec, server, "ray://head:10001", flush_s=3600)
    tracker.setup(stop={}, num_samples=4, total_num_samples=4)
    trials = {name: fake_trial(name, number=i) for i, name in enumerate(("fin", "div", "col", "err"), start=1)}
    for name, t in trials.items():
        tracker.on_trial_start(0, [], t)
        # the first result carries the trial's whole configuration, as run_trial reports it
        report(tracker, t, 1, resolved_config=flatten(build_config(spec.base, t.config, 1, 0).to_dict()))
        # "col" is where the collapse stopper fires: the reason is read from this result
        report(tracker, t, 2, **({"collapse": "total", "collapse_streak": 1} if name == "col" else {}))
    report(tracker, trials["fin"], 1)  # replayed after a restore from an older checkpoint: ignored
    report(tracker, trials["fin"], 3, "finished", spectrum=[4.0, 1.0, 0.0], spectrum_h=[2.0, 1e-3])
    report(tracker, trials["div"], 3, "diverged", error="non-finite loss 1e9")
    for name in ("fin", "div", "col"):
        trials[name].status = "TERMINATED"
        tracker.on_trial_complete(0, [], trials[name])
    trials["err"].status, trials["err"].error_file = "ERROR", "/x/error.txt"
    tracker.on_trial_error(0, [], trials["err"])
    tracker.on_experiment_end(list(trials.values()))

    parents, children = runs_of(server, "trk_fake")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    experiment = mlflow_client(server).get_experiment_by_name("trk_fake")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # MLflow's UI opens on Runs
    p = parents[0]
    assert p.data.tags["ray_address"] == "ray://head:10001"
    assert p.data.tags["objective"] == f"{spec.search.metric} ({spec.mode})" == "fewshot_acc (max)"
    assert p.data.params["search.algorithm"] == "tpe" and p.data.params["train.epochs"] == "3"
    assert p.data.params["space.loss.vicreg.lam.type"] == "logfloat"
    by_id = {r.data.tags["ray_trial_id"]: r for r in children}
    expected = {"fin": ("FINISHED", "finished", ""), "div": ("FAILED", "diverged", "non-finite loss 1e9"),
                "col": ("FINISHED", "stopped", "collapse_total (epoch 2)"), "err": ("FAILED", "error", "/x/error.txt")}
    for i, (name, (mlflow_status, status, reason)) in enumerate(expected.items(), start=1):
        run = by_id[name]
        assert run.data.tags[PARENT_TAG] == p.info.run_id
        # the trial's number heads the name and is a tag; a collapsed trial is marked in the runs table
        assert run.info.run_name == f"#{i} {'[collapsed] ' if name == 'col' else ''}vicreg lam=10"
        assert run.data.tags["trial_number"] == str(i)
        assert run.data.tags["collapsed"] == ("true" if name == "col" else "false")
        # every trial's description: how it ended; a collapsed one's also why it counts as collapsed
        note = run.data.tags["mlflow.note.content"]
        assert f"; {status} ({reason})" in note if reason else note.endswith(f"; {status}")
        assert ("Collapsed:" in note) == (name == "col")
        assert (run.info.status, run.data.tags["status"], run.data.tags["stop_reason"]) == (mlflow_status, status, reason)
        # each result of the trial carries its run's id, for the Optuna trial's user attributes
        assert trials[name].last_result["mlflow_run_id"] == run.info.run_id
    fin = by_id["fin"]
    assert steps(server, fin.info.run_id) == [1, 2, 3]
    assert math.isnan(fin.data.metrics["knn_acc"]) and "pid" not in fin.data.metrics
    assert "collapse" not in fin.data.metrics and fin.data.tags["collapse"] == "none"
    assert fin.data.params["loss.vicreg.lam"] == "10.0" and fin.data.params["train.threads"] == "1"
    c = mlflow_client(server)
    assert {a.path for a in c.list_artifacts(fin.info.run_id)} == {"spectrum.csv", "spectrum.png", "spectrum_epochs.png"}
    spectra = read_spectrum_csv(c.download_artifacts(fin.info.run_id, SPECTRUM_CSV))
    assert spectra == {"z": [4.0, 1.0, 0.0], "h": [2.0, 1e-3], "epoch": 3}
    assert steps(server, by_id["col"].info.run_id) == [1, 2]
    assert "collapse_streak" not in by_id["col"].data.metrics and by_id["col"].data.tags["collapse"] == "total"


def test_a_resumed_tracker_sends_queued_spectrum_folders_and_drops_orphans(server, tmp_path):
    """A driver killed between making a trial's spectrum folder and queueing it leaves a folder no operation names;
    the next session removes it, and sends (then removes) the folders its outbox file still names."""
    spec = load_spec("search_spaces/vicreg.yaml", name="trk_orphans", epochs=3)
    first = MlflowTracker(spec, server, flush_s=3600, out_dir=tmp_path)
    first.setup(stop={}, num_samples=1, total_num_samples=1)
    trial = fake_trial("t1")
    first.on_trial_start(0, [], trial)
    report(first, trial, 1, spectrum=[2.0, 1.0], spectrum_h=[1.0])
    first.outbox.execute = lambda op: (_ for _ in ()).throw(ConnectionError("store down"))  # the outage
    trial.status = "TERMINATED"
    first.on_trial_complete(0, [], trial)
    queued = [Path(op.payload) for op in first.outbox.ops if op.kind == "artifacts"]
    assert len(queued) == 1 and queued[0].is_dir() and (tmp_path / OUTBOX_FILE).exists()
    orphan = tmp_path / OUTBOX_DIR / "t2_killed"  # as mkdtemp names them: <trial id>_<random>
    orphan.mkdir()
    second = MlflowTracker(spec, server, flush_s=3600, out_dir=tmp_path)  # the resumed session
    second.set_state(first.get_state())
    second.setup(stop={}, num_samples=1, total_num_samples=1)
    assert not orphan.exists()
    assert not queued[0].exists() and not (tmp_path / OUTBOX_FILE).exists()  # sent, then removed
    kid = runs_of(server, "trk_orphans")[1][0]
    assert {a.path for a in mlflow_client(server).list_artifacts(kid.info.run_id)} >= {"spectrum.csv"}


def test_references_computed_while_the_sweep_starts_are_logged_when_they_arrive(server, tmp_path, capsys):
    """run_sweep starts Tune while the driver still computes the reference scores (PendingReference): nothing is
    sent before they arrive, they are written, printed and logged on the parent run once, after; a computation
    that fails sends nothing and raises where run_sweep waits for it."""
    from concurrent.futures import Future

    from ncssl_tune.sweep.references import REFERENCE_FILE, PendingReference

    spec = load_spec("search_spaces/vicreg.yaml", name="trk_pending", epochs=3)
    future = Future()
    pending = PendingReference(future, tmp_path, "fewshot_acc")
    tracker = MlflowTracker(spec, server, flush_s=3600, reference=pending)
    tracker.setup(stop={}, num_samples=1, total_num_samples=1)
    tracker.on_step_end(0, [])
    parent = runs_of(server, "trk_pending")[0][0]
    assert pending.ready() is None and not (tmp_path / REFERENCE_FILE).exists()
    assert pickle.loads(pickle.dumps(pending)) == {}  # Ray pickles the callbacks: nothing to send from a copy
    assert not [k for k in parent.data.metrics if k.startswith("reference_")]
    ref = {"random_init": {"fewshot_acc": 0.3, "knn_acc": 0.4}, "pixels": {"fewshot_acc": 0.5, "knn_acc": 0.6}}
    future.set_result(ref)
    assert json.loads((tmp_path / REFERENCE_FILE).read_text()) == ref == pending.ready()
    assert pickle.loads(pickle.dumps(pending)) == ref
    assert "reference fewshot_acc: random-init encoder 0.300, raw pixels 0.500" in capsys.readouterr().out
    tracker.on_step_end(1, [])
    tracker.on_step_end(2, [])  # sent once
    tracker.on_experiment_end([])
    metrics = mlflow_client(server).get_run(parent.info.run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("reference_")} == {
        "reference_random_init_fewshot_acc": 0.3, "reference_random_init_knn_acc": 0.4,
        "reference_pixels_fewshot_acc": 0.5, "reference_pixels_knn_acc": 0.6}
    assert len(mlflow_client(server).get_metric_history(parent.info.run_id, "reference_pixels_knn_acc")) == 1

    failed = Future()
    pending = PendingReference(failed, tmp_path / "other", "fewshot_acc")
    failed.set_exception(OSError("data gone"))
    assert pending.ready() is None and not (tmp_path / "other").exists()
    with pytest.raises(OSError, match="data gone"):
        pending.result()
    tracker = MlflowTracker(spec, server, flush_s=3600, reference=pending)
    tracker.setup(stop={}, num_samples=1, total_num_samples=1)
    tracker.on_experiment_end([])  # waits for the references, finds the error, sends nothing and ends the runs
    assert tracker.reference == {} and tracker.unsent == 0


def test_an_experiment_made_without_the_kind_tag_gets_it(server):
    """Experiments of sweeps recorded before the tag (or made by hand) open on their runs too."""
    mlflow_client(server).create_experiment("trk_untagged")
    spec = load_spec("search_spaces/vicreg.yaml", name="trk_untagged", epochs=3)
    tracker = MlflowTracker(spec, server, flush_s=3600)
    tracker.setup(stop={}, num_samples=1, total_num_samples=1)
    tags = mlflow_client(server).get_experiment_by_name("trk_untagged").tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_load_runs_names_a_missing_experiment(server):
    from ncssl_tune.analysis.load import load_runs

    with pytest.raises(TrackingError, match="no MLflow experiment 'nope'"):
        load_runs("nope", server)


# --- one real sweep through Ray Tune: interrupted (as by Ctrl+C) after its first result, then resumed

class Interrupt(Callback):
    """Sends the SIGUSR1 that Ray Tune treats like Ctrl+C (save state, stop) when the `after`-th result arrives."""

    def __init__(self, after: int):
        self.after = after
        self.seen = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen += 1
        if self.seen == self.after:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def sweep(module_server, ray_session, tmp_path_factory):
    from ncssl_tune.sweep.runner import run_sweep

    server = module_server.uri  # built before the outage tests, which come last: running

    spec = load_spec("search_spaces/vicreg.yaml", name="trk_sweep", num_samples=3, epochs=2,
                     sets=[*TINY_SWEEP, "search.scheduler.name=fifo"])
    results = tmp_path_factory.mktemp("results")
    first = run_sweep(spec, results, tracking_uri=server, extra_callbacks=[Interrupt(after=1)],
                      monitor_interval_s=1e9)
    interrupted = runs_of(server, spec.name)
    # run_sweep builds a new tracker on resume, as a new process would: nothing is carried in memory
    done = run_sweep(spec, results, resume=True, tracking_uri=server, monitor_interval_s=1e9)
    return types.SimpleNamespace(spec=spec, first=first, interrupted=interrupted, done=done)


def test_interrupted_sweep_leaves_its_runs_killed(sweep):
    parents, children = sweep.interrupted
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert parents[0].data.tags["status"] == "interrupted"
    stopped = [c for c in children if c.data.tags["status"] == "interrupted"]
    assert stopped and all(c.info.status == "KILLED" for c in stopped)


def test_resume_reuses_the_parent_and_child_runs(sweep, server):
    assert sweep.done.num_trials == 3 and sweep.done.mlflow_parent_run_id == sweep.first.mlflow_parent_run_id
    parents, children = runs_of(server, sweep.spec.name)
    assert [p.info.run_id for p in parents] == [sweep.first.mlflow_parent_run_id]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["status"] == "finished"
    assert len(children) == 3 and len({c.data.tags["ray_trial_id"] for c in children}) == 3
    assert {c.info.run_id for c in sweep.interrupted[1]} <= {c.info.run_id for c in children}
    for run in children:
        assert run.data.tags[PARENT_TAG] == sweep.first.mlflow_parent_run_id
        assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "finished")
        assert steps(server, run.info.run_id) == [1, 2]  # a restarted trial replays epoch 1: not logged twice
        assert steps(server, run.info.run_id, "epoch") == [1, 2]


def test_sweep_records_params_metrics_and_artifacts(sweep, server):
    c = mlflow_client(server)
    parents, children = runs_of(server, sweep.spec.name)
    p = parents[0]
    assert p.data.tags["ray_address"] == "local" and p.data.tags["search_algorithm"] == "tpe"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert p.data.tags["git_commit"] == head  # the checkout the sweep ran from
    assert p.data.params["data.dataset"] == "synthetic" and p.data.params["search.num_samples"] == "3"
    assert {a.path for a in c.list_artifacts(p.info.run_id)} >= {"vicreg.yaml", "sweep_effective.yaml"}
    # the references, computed once per sweep (kept in the sweep folder), logged once although the sweep resumed
    ref = json.loads((sweep.first.out_dir / "reference.json").read_text())
    for kind in ("random_init", "pixels"):
        for m in ("fewshot_acc", "knn_acc", "probe_acc"):
            assert 0.25 <= ref[kind][m] <= 1  # 4 classes: chance is 0.25
            assert p.data.metrics[f"reference_{kind}_{m}"] == pytest.approx(ref[kind][m])
            assert len(c.get_metric_history(p.info.run_id, f"reference_{kind}_{m}")) == 1
    assert sorted(int(r.info.run_name.split()[0][1:]) for r in children) == [1, 2, 3]  # Ray's trial numbers
    for run in children:
        assert run.data.tags["method"] == "vicreg" and run.data.tags["collapse"] in ("none", "dimensional", "total")
        words = run.info.run_name.split()
        if run.data.tags["collapsed"] == "true":  # a collapsed trial is marked in the runs table
            assert words.pop(1) == "[collapsed]"
        assert words[1] == "vicreg" and f"lam={fmt_number(float(run.data.params['loss.vicreg.lam']))}" in words
        sampled = {"loss.vicreg.lam", "loss.vicreg.mu", "loss.vicreg.nu", "loss.vicreg.gamma", "model.projector",
                   "train.lr"}
        assert set(run.data.params) >= sampled | {"data.dataset", "eval.eval_samples", "train.threads"}
        assert float(run.data.params["loss.vicreg.lam"]) > 0
        assert {"effective_rank", "effective_rank_h", "effective_rank_frac", "probe_acc", "knn_acc", "loss_var",
                "avg_corr", "std_l2_h", "images_per_s"} <= set(run.data.metrics)
        assert not {"collapse", "spectrum", "objective", "pid"} & set(run.data.metrics)
        assert {a.path for a in c.list_artifacts(run.info.run_id)} == {SPECTRUM_CSV, "spectrum.png", "spectrum_epochs.png"}
        spectra = read_spectrum_csv(c.download_artifacts(run.info.run_id, SPECTRUM_CSV))
        assert len(spectra["z"]) == int(run.data.params["model.projector"].split("-")[-1])
        assert len(spectra["h"]) == 16  # model.width


def test_run_analysis_reports_into_the_parent_run(sweep, server, tmp_path):
    from ncssl_tune.analysis import run_analysis

    result = run_analysis(sweep.spec.name, server, tmp_path / "analysis")
    assert result["n_trials"] == 3 and result["parent_run_id"] == sweep.first.mlflow_parent_run_id
    assert result["scopes"]["all"]["n_trials"] == 3
    assert result["scopes"]["all"]["headline_epoch"] is None  # 3 trials: no epoch reached by 6
    names = {f.name for f in (tmp_path / "analysis").iterdir()}
    assert {"analysis.json", "report.md", "spectra.png", "rank_over_epochs.png"} <= names
    logged = mlflow_client(server).list_artifacts(sweep.first.mlflow_parent_run_id, "analysis")
    assert {Path(a.path).name for a in logged} == names

    # the answer on the parent run, where MLflow's runs page lands: the best trial as the console names it
    parent = mlflow_client(server).get_run(sweep.first.mlflow_parent_run_id).data
    best = sweep.done.best_metrics
    label = trial_label(trial_index(best["experiment_tag"]), best["trial_id"])
    assert parent.tags[TAG_BEST_TRIAL] == label
    assert parent.metrics["best_fewshot_acc"] == pytest.approx(best["fewshot_acc"])
    assert parent.tags[TAG_HEADLINE_PREDICTOR] == "none"  # no headline epoch (above)
    note = parent.tags[TAG_NOTE]
    assert f"**Best trial**: {label}, fewshot_acc = {fmt_number(best['fewshot_acc'])}" in note
    assert "analysis/report.html" in note and "**Objective**: fewshot_acc (max)" in note
    ref = result["reference"]["random_init"]
    assert ref is not None and f"random-init {fmt_number(ref)}" in note


# --- the tracking server goes down mid-sweep

OUTAGE_SPACE = """\
model: {projector: 64-64}
loss: {method: vicreg}
search: {algorithm: random, num_samples: 3, scheduler: {name: fifo}}
space:
  train.lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2}
"""


class ServerOutage(Callback):
    """Stops the server (by its handle) at the first trial result; starts it again, same port and store, when
    `restart_after` trials have completed since (None: it stays down). Runs after the tracker in every hook."""

    def __init__(self, server: MlflowServer, restart_after: int | None):
        self.server, self.restart_after = server, restart_after
        self.stopped_at_epoch = None
        self.completed_while_down = 0
        self.restarted = False

    def __getstate__(self) -> dict:  # Ray may pickle callbacks; the process handle stays here
        return {**self.__dict__, "server": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.stopped_at_epoch is None:
            self.stopped_at_epoch = result.get("epoch")
            self.server.stop()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.stopped_at_epoch is None or self.restarted or self.restart_after is None:
            return
        self.completed_while_down += 1
        if self.completed_while_down >= self.restart_after:
            self.server.start()
            self.restarted = True


def outage_sweep(tmp_path, server: MlflowServer, name: str, restart_after: int | None):
    from ncssl_tune.sweep.runner import run_sweep

    path = tmp_path / "outage.yaml"
    path.write_text(OUTAGE_SPACE)
    spec = load_spec(str(path), name=name, epochs=3, sets=[*TINY_SWEEP, "eval.probe_every=0"])
    outage = ServerOutage(server, restart_after)
    result = run_sweep(spec, tmp_path / "results", tracking_uri=server.uri, extra_callbacks=[outage],
                       monitor_interval_s=1e9)
    trial_ids = [r["trial_id"] for r in read_trials(result.out_dir)]
    return spec, outage, result, trial_ids


def test_server_restart_mid_sweep_loses_nothing(running_server, ray_session, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ncssl_tune.sweep.tracker")
    start = time.monotonic()
    spec, outage, result, trial_ids = outage_sweep(tmp_path, running_server, "trk_restart", restart_after=1)

    assert outage.stopped_at_epoch == 1 and outage.restarted and result.num_trials == 3 and result.errors == 0
    assert time.monotonic() - start < 240
    text = caplog.text
    assert "unreachable" in text and "is back after" in text  # the outage was met, and recovered from
    assert not (result.out_dir / UNSENT_FILE).exists()
    parents, children = runs_of(running_server.uri, spec.name)
    assert [p.info.run_id for p in parents] == [result.mlflow_parent_run_id]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["status"] == "finished"
    assert sorted(c.data.tags["ray_trial_id"] for c in children) == sorted(trial_ids) and len(trial_ids) == 3
    c = mlflow_client(running_server.uri)
    for run in children:
        assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "finished")
        assert steps(running_server.uri, run.info.run_id) == [1, 2, 3]  # every epoch, none twice
        assert steps(running_server.uri, run.info.run_id, "epoch") == [1, 2, 3]
        assert len(c.get_metric_history(run.info.run_id, "time_total_s")) == 1
        assert {a.path for a in c.list_artifacts(run.info.run_id)} == {SPECTRUM_CSV, "spectrum.png", "spectrum_epochs.png"}


def test_server_down_until_the_end_reports_what_was_not_sent(running_server, ray_session, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(MlflowTracker, "end_wait_s", 2.0)
    start = time.monotonic()
    _, outage, result, trial_ids = outage_sweep(tmp_path, running_server, "trk_down", restart_after=None)

    assert outage.stopped_at_epoch == 1 and result.num_trials == 3 and result.errors == 0
    assert time.monotonic() - start < 240
    report_path = result.out_dir / UNSENT_FILE
    report = json.loads(report_path.read_text())
    assert report["tracking_uri"] == running_server.uri and report["last_error"]
    runs = {r["trial_id"]: r for r in report["runs"]}
    assert runs[None]["final_status"] == "FINISHED" and runs[None]["run_id"] == result.mlflow_parent_run_id
    assert set(runs) - {None} == set(trial_ids)
    for tid in trial_ids:
        r = runs[tid]
        assert r["final_status"] == "FINISHED" and r["tags"]["status"] == "finished"
        assert r["epochs"] and set(r["epochs"]) <= {1, 2, 3} and r["epochs"][-1] == 3
        assert {m[2] for m in r["metrics"] if m[0] == "effective_rank"} == set(r["epochs"])
        assert sorted(Path(a).name for a in r["artifacts"]) == [SPECTRUM_CSV, "spectrum.png", "spectrum_epochs.png"]
        assert all(Path(a).is_file() and str(result.out_dir) in a for a in r["artifacts"])
    assert sum(r["run_created"] for r in runs.values() if r["trial_id"]) >= 1  # started before the outage
    err = capsys.readouterr().err
    assert f"could not be recorded at {running_server.uri}" in err and str(report_path) in err
    for tid in trial_ids:
        assert f"trial {tid}: run " in err
