"""Ctrl+C on a real `ncssl-sweep` process, the printed --resume command run as printed, and a resume that asks
for another budget (refused, nothing started)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_SWEEP

from ncssl_tune.cli import main
from ncssl_tune.sweep.monitor import read_trials

pytestmark = pytest.mark.slow  # a real `ncssl-sweep` process, interrupted and resumed

# No collapse stopper: every trial is meant to run until Ctrl+C or its last epoch (TPE tries model.norm=none too)
SETS = [*TINY_SWEEP, "search.scheduler.name=fifo", "search.collapse_stop.total=false", "train.threads=1"]
ARGS = ["search_spaces/vicreg.yaml", "--name", "ctrlc", "--num-samples", "2", "--epochs", "6",
        *[a for s in SETS for a in ("--set", s)]]


def _first_result(folder: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(p.stat().st_size for p in folder.glob("ray/tune/*/result.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no trial result in time"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    argv = [*ARGS, "--results-dir", str(results)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-c", "import sys; from ncssl_tune.cli import main; sys.exit(main(sys.argv[1:]))"]
    proc = subprocess.Popen([*cli, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _first_result(results / "ctrlc", proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl+C sends to the foreground process
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"rc": proc.returncode, "out": out, "err": err, "rows": read_trials(results / "ctrlc"), "cli": cli,
            "env": env, "results": results, "argv": argv}


def test_ctrl_c_exits_130_names_the_trials_and_prints_the_resume_command(interrupted):
    assert interrupted["rc"] == 130, interrupted["err"][-3000:]
    err, out = interrupted["err"], interrupted["out"]
    rows = interrupted["rows"]
    left = [r["trial_id"] for r in rows if r["status"] == "interrupted"]
    assert left and all(r["status"] in ("interrupted", "finished") for r in rows)
    assert f"{len(left)} trials did not finish: " in err and all(t in err for t in left)
    assert shlex.join(["ncssl-sweep", *interrupted["argv"], "--resume"]) in err.splitlines()[-1]
    assert "Tuner.restore" not in out + err and "best trial" not in out


def test_the_printed_resume_command_finishes_the_sweep(interrupted):
    command = shlex.split(interrupted["err"].splitlines()[-1])
    assert command[0] == "ncssl-sweep" and command[-1] == "--resume"
    done = subprocess.run([*interrupted["cli"], *command[1:]], cwd=REPO, env=interrupted["env"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_trials(interrupted["results"] / "ctrlc")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"} and {r["epoch"] for r in rows} == {"6"}


def test_resume_with_another_budget_is_refused_before_anything_starts(interrupted, capsys):
    folder = interrupted["results"] / "ctrlc"
    before = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    status = main([*interrupted["argv"], "--resume", "--num-samples", "8"])
    err = capsys.readouterr().err
    assert status == 2
    assert "--resume: sweep 'ctrlc' was started with other settings (search.num_samples: 2 -> 8)" in err
    assert "--name NEW" in err
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
