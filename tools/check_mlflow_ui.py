#!/usr/bin/env python3
"""Look at a sweep in MLflow's own UI, as a person would: start `mlflow server` on a free 127.0.0.1 port over a
sweep's SQLite store, take headless Chromium screenshots of the experiment page, of the view the link a sweep
prints opens and of its best and a stopped trial's runs, end the server.

    tools/check_mlflow_ui.py --db results/mlflow.db --experiment compare [--out /tmp/ui]

Needs a Chromium binary (Debian: apt-get install chromium) and the project's environment (MLflow); not part of the
package or CI. Prints the PNG paths; open them and check that link.png shows the trials as rows (not folded under
the parent run, not the GenAI traces view), best objective first, with readable names and collapsed ones marked,
and that stopped trials carry no failure mark. Exit status 2 when the store, the experiment or the browser is
missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's ncssl_tune, installed or not

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    with open(log, "w") as f:
        # own process group, so that its uvicorn worker ends with it
        proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                                 "1", "--backend-store-uri", f"sqlite:///{db.resolve()}"],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not start; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def sweep_pages(port: int, name: str) -> dict[str, str]:
    """Screenshot name -> page (after the server's address): what a first visitor gets (the experiment page, its
    runs page), the view the link a sweep prints opens, and the runs of the best trial (as the parent run's
    best_trial tag names it) and of one trial stopped early, where the sweep has them."""
    from mlflow import MlflowClient

    from ncssl_tune.naming import mlflow_runs_view
    from ncssl_tune.vocab import TAG_TRIAL_NUMBER

    client = MlflowClient(f"http://127.0.0.1:{port}")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise LookupError(f"no MLflow experiment {name!r} in the store")
    eid, ml = exp.experiment_id, "workflowType=machine_learning"
    parent = client.search_runs([eid], "tags.run_kind = 'sweep'", max_results=1)
    # the parent's objective tag reads "fewshot_acc (max)"
    objective, _, mode = (parent[0].data.tags.get("objective", "") if parent else "").partition(" (")
    pages = {"experiment": f"#/experiments/{eid}", "runs": f"#/experiments/{eid}/runs",
             "link": mlflow_runs_view(eid, objective or "loss", mode.rstrip(")") or "max")}
    best = parent[0].data.tags.get("best_trial", "").split(" ")[0].lstrip("#") if parent else ""
    runs = {"best_trial": f"tags.{TAG_TRIAL_NUMBER} = '{best}'" if best.isdigit() else None,
            "stopped_trial": "tags.status = 'stopped'"}
    for page, query in runs.items():
        found = client.search_runs([eid], query, max_results=1) if query else []
        if found:
            pages[page] = f"#/experiments/{eid}/runs/{found[0].info.run_id}?{ml}"
    return pages


def screenshot(browser: str, url: str, png: Path, wait_ms: int) -> None:
    """One page, headless, in a fresh profile (no cached workflow choice: what a first visitor sees)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True, type=Path, help="the sweep's SQLite MLflow store (RESULTS_DIR/mlflow.db)")
    p.add_argument("--experiment", required=True, help="experiment = sweep name")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the screenshots (default: a new folder under the system's temp dir, never the "
                        "repository)")
    p.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    p.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets to load")
    args = p.parse_args(argv)
    if not args.db.is_file():
        print(f"check_mlflow_ui: error: --db {args.db}: no such file", file=sys.stderr)
        return 2
    if shutil.which(args.browser) is None:
        print(f"check_mlflow_ui: error: --browser {args.browser!r} not found (apt-get install chromium)",
              file=sys.stderr)
        return 2
    args.out = args.out or Path(tempfile.mkdtemp(prefix="mlflow_ui_"))
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_server(args.db, port, args.out / "server.log")
    try:
        try:
            pages = sweep_pages(port, args.experiment)
        except LookupError as e:
            print(f"check_mlflow_ui: error: --experiment: {e}", file=sys.stderr)
            return 2
        for name, page in pages.items():
            url = f"http://127.0.0.1:{port}/{page}"
            png = args.out / f"{name}.png"
            screenshot(args.browser, url, png, args.wait_ms)
            print(f"{url} -> {png}")
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
