"""Names and numbers as people read them: short, unambiguous column names for dotted config keys, rounded numbers
for the console, and readable MLflow run names. Full precision stays in trials.csv and MLflow; this is display."""

from __future__ import annotations

import math
import numbers
import urllib.parse
from collections.abc import Iterable
from typing import Any

RUN_NAME_MAX = 120  # MLflow shows about this much in its runs table before cutting


def short_names(keys: Iterable[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """{dotted key: the shortest tail of it that no other key (and no name in `taken`) shares}.

    loss.vicreg.lam and loss.barlow_twins.lam become vicreg.lam and barlow_twins.lam; train.lr becomes lr; a key
    whose last part is a name in `taken` (e.g. loss.method beside a metric column "method") keeps one more part.
    """
    keys = list(dict.fromkeys(keys))
    taken = set(taken)
    parts = {k: k.split(".") for k in keys}
    depth = dict.fromkeys(keys, 1)
    while True:
        names = {k: ".".join(parts[k][-depth[k]:]) for k in keys}
        clash = [k for k in keys if depth[k] < len(parts[k])
                 and (names[k] in taken or sum(n == names[k] for n in names.values()) > 1)]
        if not clash:
            return names
        for k in clash:
            depth[k] += 1


def fmt_number(value: Any, digits: int = 3) -> str:
    """A value as a person reads it: floats to `digits` significant digits (0.9972222447395325 -> 0.997,
    0.000123 -> 1.23e-04, 12345.6 -> 12346), integers and strings as they are."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 10 ** digits:
        return f"{v:.{digits}g}"
    if 10 ** digits <= abs(v) < 1e6:
        return f"{v:.0f}"
    return f"{v:.{digits - 1}e}"


def trial_index(experiment_tag: str | None) -> int | None:
    """The 1-based number Ray gives a trial when it creates it: the head of its experiment tag
    (`<number>_<key>=<value>,...`), or None."""
    head = str(experiment_tag or "").split("_", 1)[0]
    return int(head) if head.isdigit() else None


def sampled_values(sampled: dict[str, Any]) -> list[str]:
    """`lam=25.1`, `lr=0.00312`, ...: each sampled value but the method (named apart) under its short name."""
    names = short_names(sampled)
    return [f"{names[k]}={fmt_number(v)}" for k, v in sorted(sampled.items()) if k != "loss.method"]


def trial_label(index: int | None, trial_id: str) -> str:
    """How the console names a trial: `#3 (ab12cd34)`, its number and Ray trial id; the id alone when the number
    is unknown."""
    return f"#{index} ({trial_id})" if index is not None else str(trial_id)


def run_name(index: int | None, trial_id: str, method: str, sampled: dict[str, Any], mark: str = "") -> str:
    """An MLflow run name a person can scan: `#3 vicreg lam=25.1 lr=0.00312` (trial number, method, each sampled
    value but the method under its short name); `mark` (e.g. `[collapsed]`) goes after the number, where a
    person scanning the runs table sees it. The Ray trial id stays in the run's tags; it heads the name only when
    the number is unknown."""
    head = f"#{index}" if index is not None else str(trial_id)
    name = " ".join([head, *([mark] if mark else []), str(method), *sampled_values(sampled)])
    return name if len(name) <= RUN_NAME_MAX else name[:RUN_NAME_MAX - 1] + "…"


def config_id(config: dict[str, Any], seed_key: str = "train.seed") -> str:
    """A short stable name of a configuration: the hash of its sampled values without the training seed, so the
    repeats of one configuration (search.repeats) share it and a configuration sampled twice gets it twice."""
    import hashlib
    import json

    values = {k: v for k, v in config.items() if k != seed_key}
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def mlflow_runs_view(experiment_id: str, objective: str, mode: str) -> str:
    """The MLflow UI's runs page of a sweep as the link a sweep prints opens it (the part after the server's
    address): the Model training view (MLflow 3 opens its GenAI view otherwise), sorted by the objective, best
    first. Sorted by a metric, the UI lists the child runs flat (it nests them under the parent run only when
    sorted by date with no filter), so the trials are the rows, ranked. A URL sets the sort, filter and time range
    of that page, not its columns (docs/usage.md)."""
    key = urllib.parse.quote(f"metrics.`{objective}`")
    return (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&orderByKey={key}"
            f"&orderByAsc={'true' if mode == 'min' else 'false'}")
