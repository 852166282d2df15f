"""The MLflow layout of a sweep: tag, artifact and step names shared by the writer (`tracking`) and the readers
(`analysis`, tests). No Ray, Optuna or MLflow import, so a reader loads none of them by importing this."""

from __future__ import annotations

TAG_KIND = "run_kind"  # "sweep" (parent) or "trial" (child)
TAG_SWEEP = "sweep"
TAG_UID = "sweep_uid"  # tells a resumed sweep (same uid) from a new sweep of the same name
TAG_TRIAL = "ray_trial_id"
TAG_STATUS = "status"  # finished | diverged | stopped | error | running | interrupted
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
RUN_STATUS = {"finished": "FINISHED", "stopped": "FINISHED", "diverged": "FAILED", "error": "FAILED",
              "interrupted": "KILLED"}
# Bookkeeping Ray adds to every result, the trainable's copy of the objective and its count of epochs in the same
# collapse state (for the collapse stopper): not metrics of the trial.
NOT_METRICS = frozenset({"objective", "collapse_streak", "timestamp", "training_iteration", "time_this_iter_s", "time_total_s",
                         "time_since_restore", "iterations_since_restore", "timesteps_since_restore",
                         "timesteps_total", "episodes_total", "pid", "done", "should_checkpoint"})
