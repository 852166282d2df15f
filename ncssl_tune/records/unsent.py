"""What a sweep could not record in MLflow before it ended: a summary on stderr and <sweep folder>/mlflow_unsent.json
(metric values included); unsent artifacts move to <sweep folder>/mlflow_unsent/<trial>/. The operations stay in
the sweep's outbox file, so `--resume` sends them once the store is back."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from ncssl_tune.records.outbox import Op
from ncssl_tune.records.runs import Kind, tag_value
from ncssl_tune.records.spectra import draw_staged_plots

log = logging.getLogger(__name__)

UNSENT_FILE = "mlflow_unsent.json"  # in the sweep folder: what could not be sent before the sweep ended
UNSENT_DIR = "mlflow_unsent"  # artifacts that could not be sent, one folder per trial


def report_unsent(folder: Path, queued: list[Op], rejected: list[tuple[Op, str]], *, tracking_uri: str,
                  experiment: str, sweep_uid: str, parent_run_id: str | None, runs: dict[str, str],
                  last_error: str) -> tuple[Path | None, list[Op]]:
    """Print and write the report; returns its path (None when it could not be written) and the queued
    operations with their artifact folders moved to mlflow_unsent/<trial>/ (for the outbox file)."""
    entries: dict[str, dict] = {}

    def entry(tid: str | None) -> dict:
        key = tid or "(parent)"
        if key not in entries:
            run_id = runs.get(tid) if tid else parent_run_id
            entries[key] = {"trial_id": tid, "run_id": run_id, "run_created": bool(run_id), "epochs": set(),
                            "metrics": [], "tags": {}, "final_status": None, "artifacts": [], "errors": []}
        return entries[key]

    moved: list[Op] = []
    for op, error in [(op, None) for op in queued] + list(rejected):
        kind, tid, payload = op
        e = entry(tid)
        if error:
            e["errors"].append(f"{kind}: {error}")
        if kind == Kind.BATCH:
            e["metrics"] += [[k, v if math.isfinite(v) else str(v), step, ts] for k, v, ts, step in payload["metrics"]]
            e["epochs"].update(step for k, _, _, step in payload["metrics"] if k != "time_total_s")
            e["tags"].update({k: tag_value(v) for k, v in payload["tags"].items()})
        elif kind == Kind.TERMINATE:
            e["final_status"] = payload
        elif kind == Kind.ARTIFACTS:
            dest = folder / UNSENT_DIR / (tid or "parent")
            try:
                draw_staged_plots(payload)  # the files as they would have been sent
                dest.mkdir(parents=True, exist_ok=True)
                for f in Path(payload).iterdir():
                    shutil.move(str(f), dest / f.name)
                    e["artifacts"].append(str(dest / f.name))
                shutil.rmtree(payload, ignore_errors=True)
                op = op._replace(payload=str(dest))
            except OSError as err:
                e["errors"].append(f"artifacts kept in {payload}: {err}")
                e["artifacts"].append(str(payload))
        elif kind in (Kind.CHILD, Kind.PARENT, Kind.PARENT_FILES):
            e.setdefault("pending", []).append(kind)
        if error is None:
            moved.append(op)
    for e in entries.values():
        e["epochs"] = sorted(e["epochs"])
    report = {"tracking_uri": tracking_uri, "experiment": experiment, "sweep_uid": sweep_uid,
              "parent_run_id": parent_run_id, "last_error": last_error,
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": list(entries.values())}
    path: Path | None = folder / UNSENT_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
    except OSError as err:
        log.error("cannot write %s (%s)", path, err)
        path = None
    n = len(queued) + len(rejected)
    lines = [f"MLflow: {n} operations could not be recorded at {tracking_uri} ({last_error or 'refused'}):"]
    for key, e in entries.items():
        epochs = f"epochs {_ranges(e['epochs'])}" if e["epochs"] else "no epochs"
        what = ", ".join(x for x in (epochs, f"status {e['final_status']}" if e["final_status"] else "",
                                     f"{len(e['artifacts'])} artifacts" if e["artifacts"] else "",
                                     f"tags {sorted(e['tags'])}" if e["tags"] and not e["epochs"] else "") if x)
        lines.append(f"  {'trial ' + key if e['trial_id'] else key}: run {e['run_id'] or '(not created)'}: {what}")
    lines.append(f"  details (metric values included): {path}" if path else "  (no file could be written)")
    if queued:
        lines.append("  they are kept in the sweep folder and sent when the sweep is resumed (--resume)")
    print("\n".join(lines), file=sys.stderr)
    log.warning("MLflow: %d operations unsent; see %s", n, path)
    return path, moved


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out: list[str] = []
    for s in steps:
        if out and s == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{s}"
        else:
            out.append(str(s))
    return ", ".join(out)
