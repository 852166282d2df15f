"""What `analyze` returns and analysis.json holds, field by field.

The result is plain JSON (TypedDicts are dicts at runtime): every key is a string, epoch numbers included, and a
non-finite number is null. `report` and `plots` read it and nothing else of the study, so this file is the
documentation of analysis.json. Optional keys live in a `total=False` subclass (`NotRequired` needs Python 3.11).

Vocabulary: a *predictor* is a label-free metric (vocab.LABEL_FREE: effective_rank, lidar, avg_corr, …); the
*objective* is the metric the sweep optimised (search.metric, e.g. knn_acc). ρ is always *oriented*: the predictor
times -1 where lower is better, the objective likewise, so ρ > 0 means "agrees with the objective".
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

Mode = Literal["max", "min"]  # which way is better: an objective's mode, a predictor's direction
REFERENCES = ("random_init", "pixels")  # the keys of References, in the order plots and report.md show them


class Objective(TypedDict):
    metric: str
    """The metric the sweep optimised, as its parent run recorded it (param search.metric)."""
    mode: Mode
    """Its direction: search.mode, or the objective's natural one where the sweep left it null."""


class References(TypedDict):
    """The objective's score without self-supervised training, read from the sweep's parent run (params or metrics
    reference_<name>_<objective>, reference.<name>.<objective> or reference_<name>); null when not recorded."""

    random_init: float | None
    """A randomly initialised encoder."""
    pixels: float | None
    """The raw pixels."""


class Excluded(TypedDict):
    diverged_or_failed: int
    """Trials left out of every scope: status diverged or error, or MLflow run status FAILED."""


class Selection(TypedDict):
    """Label-free selection at the headline epoch: pick the trial with the best predictor value."""

    selected_trial: str
    """The picked trial's id (the first one where several tie)."""
    n_tied: int
    """How many trials share the best predictor value (they share the mean regret)."""
    selected_objective: float
    """The objective of the pick (mean over the tied trials)."""
    best_trial: str
    """The trial with the best objective."""
    best_objective: float
    """Its objective."""
    regret: float
    """best_objective - selected_objective, oriented by the objective's mode, so >= 0; 0 = the best trial."""
    random_regret: float
    """The expected regret of a uniformly random pick among the same trials: what a predictor must beat."""


class CurvePoint(TypedDict):
    """One predictor against the objective at one qualifying epoch."""

    epoch: int
    """The epoch."""
    n: int
    """Trials with a fresh objective and a finite predictor value at that epoch."""
    rho: float | None
    """Oriented Spearman ρ; null when there is no statistic (too few trials, a constant column)."""
    ci95: list[float] | None
    """[low, high]: the 95 % interval of ρ from the Fisher-z approximation (Bonett & Wright's variance)."""
    p: float | None
    """Two-sided p-value from the same approximation: ci95 excludes 0 exactly when p < 0.05."""


class _TableRow(TypedDict):
    predictor: str
    """The label-free metric."""
    direction: Mode
    """Which way the predictor is read: max = higher is better (vocab.LABEL_FREE)."""
    n: int
    """Trials at the headline epoch with a finite value of this predictor."""
    rho: float | None
    """Oriented Spearman ρ with the objective at the headline epoch; null with a `reason`."""
    ci95: list[float] | None
    """[low, high], as in CurvePoint."""
    p: float | None
    """As in CurvePoint."""
    selection: Selection | None
    """Picking the trial by this predictor; null when no trial has a value."""
    rank_rho: int
    """Competition rank (1, 2, 2, 4) by ρ, best first; a null ρ ranks last."""
    rank_regret: int
    """Competition rank by selection regret, lowest first; no selection ranks last."""


class TableRow(_TableRow, total=False):
    """One predictor at the headline epoch of a scope."""

    reason: str
    """Why there is no ρ (fewer than stats.MIN_N trials, a constant column)."""
    warning: str
    """Present when n < stats.WARN_N: the interval is an approximation on very few points."""
    baseline: bool
    """Study only: the row is a baseline (the training loss or one of its named terms), not a label-free metric."""
    ceiling: float | None
    """Study only: the noise ceiling √(r_obj · r_pred) of the mean of R repeats; null when a reliability is ≤ 0."""


class _Scope(TypedDict):
    n_trials: int
    """Trials in the scope (diverged or failed ones are never in one)."""
    min_trials: int
    """An epoch qualifies when at least this many of the scope's trials have a fresh objective there."""
    epochs: dict[str, int]
    """Epoch -> trials of the scope with a fresh objective at that epoch (a carried probe value is not fresh)."""
    qualifying_epochs: list[int]
    """The epochs reached by at least min_trials trials, ascending: equal budgets."""
    headline_epoch: int | None
    """The last qualifying epoch, where the table is computed; null when none qualifies (see `reason`)."""
    curves: dict[str, list[CurvePoint]]
    """Predictor -> its ρ at every qualifying epoch (early prediction); empty without a headline epoch."""
    table: list[TableRow]
    """Every predictor at the headline epoch, sorted by rank_rho; empty without a headline epoch."""


class Scope(_Scope, total=False):
    """One set of trials: `all` (not failed), `healthy` (collapse class of z `none` at the last epoch) and, when a
    sweep has several methods, `method=<name>`."""

    headline_trials: list[str]
    """The trial ids at the headline epoch, sorted; present with a headline epoch."""
    reason: str
    """Why no epoch qualifies; present when headline_epoch is null."""


class DriverRho(TypedDict):
    """A numeric hyperparameter against one metric's final values."""

    rho: float
    """Spearman ρ (not oriented: the sign says which way the metric moves as the hyperparameter grows)."""
    p: float
    """Its two-sided p-value (Fisher z)."""
    n: int
    """Trials with a value of both."""


class _Driver(TypedDict):
    param: str
    """The hyperparameter's dotted key (e.g. loss.vicreg.mu), the trial's param.<key> column."""
    n: int
    """Trials (not failed) with a value of it."""
    kind: Literal["numeric", "categorical"]
    """numeric: every value parses as a number; categorical otherwise."""
    strength: float
    """How much it moves the final effective_rank: |ρ| (numeric) or the correlation ratio η (categorical), in
    [0, 1]; drivers are sorted by it, strongest first."""


class Driver(_Driver, total=False):
    """A swept hyperparameter (one whose values vary across the trials) and how it moves collapse.

    Numeric drivers also hold one key per metric, `effective_rank` and the objective's name: a DriverRho, or null
    when there is no statistic. Categorical drivers hold `values` instead. (Keys named after metrics: a TypedDict
    cannot declare them.)"""

    values: dict[str, dict[str, float | int | None]]
    """Categorical only: value -> {"n": trials with it, "effective_rank": mean final value, <objective>: mean
    final value} (null where no trial has a finite value)."""


class Reliability(TypedDict, total=False):
    """Test-retest reliability of one measure at a study's final epoch (analysis.repeats.retest)."""

    n_configs: int
    """Configurations with repeats 0 and 1 both measured."""
    repeats: int
    """R, the repeats per configuration."""
    r: float | None
    """Spearman ρ between repeat 0 and repeat 1 over the configurations."""
    ci95: list[float] | None
    """Its 95 % interval."""
    r_mean: float | None
    """Spearman-Brown reliability of the mean of R repeats, R·r / (1 + (R-1)·r)."""
    within_sd: float | None
    """Within-configuration SD: √ of the mean over configurations of the variance across repeats."""
    ceiling: float | None
    """Predictors only: √(r_mean of the objective · r_mean of the predictor), the largest ρ noise allows."""
    reason: str
    """Why there is no r."""


class EarlyPoint(TypedDict):
    """A predictor at epoch e against the objective at the final epoch, over configurations."""

    epoch: int
    n: int
    rho: float | None
    """Spearman ρ, oriented so that ρ > 0 means "agrees"."""
    ci95: list[float] | None
    regret: float | None
    """Final objective of the best configuration minus that of the one this predictor ranks first at e."""
    random_regret: float | None
    """The same for a uniformly random pick."""


class Study(TypedDict):
    """A study design (search.repeats > 1): configurations × repeats, every one to the same final epoch."""

    n_configs: int
    repeats: int
    n_trials: int
    final_epoch: int
    baselines: dict[str, Mode]
    """The training loss and its named terms, compared like predictors: a label-free metric has to beat them."""
    carried_trials: list[str]
    """Trials the total-collapse stopper ended: their last values stand at every later epoch (analysis.repeats)."""
    scopes: dict[str, Scope]
    """As the search's scopes, over per-configuration means (a row's trial ids are config ids); the headline is the
    final epoch; table rows add `baseline` and `ceiling`."""
    noise: dict[str, Any]
    """{"objective": Reliability, "predictors": {name: Reliability}}."""
    early: dict[str, list[EarlyPoint]]
    """Predictor (baselines and the objective itself included) -> its early prediction at every epoch."""
    drivers: list[Driver]
    """The swept hyperparameters over per-configuration means at the final epoch (equal budgets)."""


class _AnalysisResult(TypedDict):
    objective: Objective
    """The metric every predictor is compared with."""
    n_trials: int
    """Trial child runs of the sweep's parent run, failed ones included."""
    status_counts: dict[str, int]
    """Status tag (finished, stopped, diverged, error, …) -> trials."""
    collapse_counts: dict[str, int]
    """Collapse class of z at the last epoch (none, dimensional, total) -> trials not failed that have one."""
    excluded: Excluded
    """Trials left out of the study, by reason."""
    predictors: dict[str, Mode]
    """The label-free metrics the trials logged (the objective excepted) -> their direction."""
    min_trials_per_epoch: int
    """The equal-budget threshold: an epoch enters the study when this many trials have a fresh objective there."""
    scopes: dict[str, Scope]
    """Scope name -> the equal-budget study over its trials: `all`, `healthy`, then `method=<name>` (several
    methods only)."""
    reference: References
    """The objective's reference scores."""
    drivers: list[Driver]
    """The swept hyperparameters, strongest driver of the final effective_rank first."""
    drivers_epochs: list[int]
    """The epochs at which the trials' final values (what `drivers` reads) were taken: several = unequal budgets."""
    same_as: dict[str, str]
    """Scope -> the earlier scope whose headline table holds the very same trials at the same epoch, so the same
    numbers: report.md, the console and the plots show that table once."""


class OptunaCounts(TypedDict):
    """The sweep's trials as its Optuna study holds them (sweep/searcher.py): a trial that ran to its last epoch is
    COMPLETE, one stopped early (ASHA, the collapse stopper) PRUNED, a diverged or errored one FAIL; with repeats,
    an Optuna trial is a configuration, COMPLETE when every repeat finished. optuna-dashboard's hyperparameter
    importance reads the COMPLETE ones only."""

    complete: int
    trials: int


class AnalysisResult(_AnalysisResult, total=False):
    """The whole analysis: `analyze` returns it, run_analysis adds where it came from, analysis.json is its JSON."""

    optuna: OptunaCounts
    """What optuna-dashboard's importance is computed on; `analyze` always sets it."""

    study: Study
    reference_sd: dict[str, float | int]
    """{"random_init": SD of the objective over the random-init encoder's initialisations, "inits": how many};
    present when the sweep recorded them (reference.random_init is their mean)."""
    lidar: dict[str, Any]
    """LiDAR of z where it cannot work: {"trials", "rank_deficient": trials whose views give a within-sample scatter
    of rank M(K-1) below the width D of z, "widths": those D, "views_dof": the M(K-1) of the sweep}."""
    """Present when the sweep trained configurations more than once (search.repeats > 1)."""
    experiment: str
    """The MLflow experiment (the sweep's name); run_analysis only."""
    parent_run_id: str
    """The sweep's parent run, to which the report was logged; run_analysis only."""
