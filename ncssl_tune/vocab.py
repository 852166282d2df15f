"""Every name that more than one place must agree on: trial statuses, metric keys, MLflow tags and artifacts,
column prefixes. The writers (trainable, tracker, live table) and the readers (analysis, tests) import them from
here. No project, Ray, Optuna, MLflow or torch import, so importing it loads nothing."""

from __future__ import annotations

# How a trial ended (or that it is still running): the `status` of a result, trials.csv and the MLflow tag.
RUNNING, FINISHED, STOPPED, DIVERGED, ERROR, INTERRUPTED = (
    "running", "finished", "stopped", "diverged", "error", "interrupted")
ENDED = (FINISHED, STOPPED, DIVERGED, ERROR)  # statuses of a trial Ray ended (not an interrupted one)
FAILED = (DIVERGED, ERROR)  # their last metrics are stale or missing: the analysis excludes and counts them
COLLAPSE_CLASSES = ("none", "dimensional", "total")  # the `collapse` of a result (docs/metrics.md)

# Label-free collapse metrics and the direction in which each is taken to mean a better representation (docs/
# metrics.md says why): objectives of a sweep and the predictors the analysis ranks. alpha_req itself is not
# monotone (≈ 1 is best), so its distance from 1 stands for it; entropy_cond is lower when views agree (the IB
# view) but also at collapse.
LABEL_FREE = {f"{name}{suffix}": mode for suffix in ("", "_h") for name, mode in (
    ("effective_rank", "max"), ("effective_rank_frac", "max"), ("lidar", "max"), ("alpha_req_dev", "min"),
    ("entropy", "max"), ("avg_corr", "min"), ("std_l2", "max"))} | {"entropy_cond": "min"}
DOWNSTREAM = ("fewshot_acc", "knn_acc", "probe_acc")  # measured with labels, never seen by the SSL loss
OBJECTIVES = {"fewshot_acc": "max", "probe_acc": "max", "knn_acc": "max", **LABEL_FREE, "loss": "min"}

PARAM_PREFIX = "param."  # trials.csv and the analysis: one column per sampled key, param.<dotted key>
CARRIED_PREFIX = "probe_"  # train() carries the linear probe's last outputs into every report

# Result keys that are also MLflow tags of a trial's run (strings, not metrics).
TAG_METHOD = "method"
TAG_COLLAPSE = "collapse"
TAG_COLLAPSE_H = "collapse_h"
TAG_OBJECTIVE = "objective"  # parent run: "<metric> (<mode>)"
# The sweep's answer on its parent run, set by the analysis (analysis/parent.py): the metric best_<objective>, the
# best trial as the console names it (`#12 (249dd059)`) and the headline predictor with its Spearman rho.
BEST_PREFIX = "best_"
TAG_BEST_TRIAL = "best_trial"
TAG_HEADLINE_PREDICTOR = "headline_predictor"
TAG_HEADLINE_RHO = "headline_rho"
TAG_CONFIG = "config_id"  # a trial's configuration (naming.config_id): shared by the repeats of a study

TAG_KIND = "run_kind"  # "sweep" (parent) or "trial" (child)
TAG_SWEEP = "sweep"
TAG_UID = "sweep_uid"  # tells a resumed sweep (same uid) from a new sweep of the same name
TAG_TRIAL = "ray_trial_id"
# A trial's number: 1-based, in the order Ray creates trials (the head of its experiment tag), kept on resume. With
# the Ray trial id it is the trial's one identity: live table, trials.csv, MLflow run name and tags, Optuna user
# attributes. An errored trial restarted by --resume keeps its number under a new Ray trial id.
TAG_TRIAL_NUMBER = "trial_number"
TAG_COLLAPSED = "collapsed"  # "true" when the trial ended collapsed (collapse stopper, or total collapse at the end)
TAG_RUN_NAME = "mlflow.runName"  # MLflow's own tags: the run name (a collapsed trial's is marked) and description
TAG_NOTE = "mlflow.note.content"
COLLAPSED_MARK = "[collapsed]"  # after the number in a collapsed trial's run name: #9 [collapsed] vicreg ...
# The tracker writes the child run's id into each result of the trial (Ray lets callbacks modify the result in
# place); the searcher reads it from the trial's last result and sets it as an Optuna user attribute.
RESULT_MLFLOW_RUN = "mlflow_run_id"
# seconds a trial spent between its previous epoch and this one (checkpoint, the driver taking the result)
RESULT_BETWEEN = "between_epochs_s"
TAG_STATUS = "status"  # RUNNING, or how the trial ended (above)
TAG_REASON = "stop_reason"
TAG_SAMPLED = "sampled_params"  # JSON list of the keys Optuna sampled for this trial
TAG_NODE = "node_id"  # Ray node that produced the trial's latest result (multi-node and autoscaling sweeps)
PARENT_TAG = "mlflow.parentRunId"
# The experiment tag MLflow 3's UI reads to choose the experiment's view ("custom_model_development": Runs, the
# "Machine learning" view; unset it guesses, and with no traces guesses GenAI). Values: mlflow/server/js,
# ExperimentKind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

SPECTRUM_CSV = "spectrum.csv"  # columns epoch, k, z, h: covariance eigenvalues of every measured epoch (spectra.py)
SPECTRUM_PNG = "spectrum.png"  # the spectra of z and h at the trial's last measured epoch
SPECTRUM_EPOCHS_PNG = "spectrum_epochs.png"  # the spectrum after every epoch, coloured by epoch
STEP_METRIC = "epoch"  # its history tells which epochs a child already holds
RESOLVED_CONFIG = "resolved_config"  # key of a trial's first result: its whole configuration, {dotted key: value}

# A trial's status tag -> the MLflow run status it ends with. A trial stopped early (ASHA, the collapse stopper) ran
# as it should: FINISHED, told apart by its status and stop_reason tags. KILLED is left to interrupted sweeps.
RUN_STATUS = {FINISHED: "FINISHED", STOPPED: "FINISHED", DIVERGED: "FAILED", ERROR: "FAILED", INTERRUPTED: "KILLED"}
# Bookkeeping Ray adds to every result, the trainable's copy of the objective and its count of epochs in the same
# collapse state (for the collapse stopper): not metrics of the trial.
RESULT_OBJECTIVE = "objective"  # the trainable's copy of the sweep's objective in every result (Ray's schedulers)
RESULT_STREAK = "collapse_streak"  # epochs in the current collapse state, counted by the trainable (the stopper)
NOT_METRICS = frozenset({RESULT_OBJECTIVE, RESULT_STREAK, "timestamp", "training_iteration", "time_this_iter_s", "time_total_s",
                         "time_since_restore", "iterations_since_restore", "timesteps_since_restore",
                         "timesteps_total", "episodes_total", "pid", "done", "should_checkpoint"})
