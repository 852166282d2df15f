"""The console and trials.csv of SweepMonitor: column names, order and rounding, the trial's number and id, its
state, and how many lines a sweep prints (trials here are plain objects with Ray's trial attributes, driven
without Ray; the whole callback runs in real sweeps in test_sweep.py)."""

from __future__ import annotations

import io
import re
import types
from pathlib import Path

import pytest

from ncssl_tune.naming import config_id
from ncssl_tune.spec import CollapseStopConfig
from ncssl_tune.sweep.monitor import SweepMonitor, read_trials, short_state


def trial(tid: str, config: dict, number: int | None = None):
    tag = f"{number}_x=1" if number is not None else ""
    return types.SimpleNamespace(trial_id=tid, config=config, last_result=None, status="RUNNING",
                                 error_file=None, experiment_tag=tag)


def result(epoch: int, method: str, **metrics):
    return {"epoch": epoch, "method": method, "status": "running", "effective_rank": 7.123456789, "collapse": "none",
            "knn_acc": 0.9972222447395325, "probe_acc": 0.5, "loss": 1.0 / 3, "fewshot_acc": 0.41234, **metrics}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_table_names_each_parameter_once_and_rounds(tmp_path):
    out = io.StringIO()
    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, stream=out, metric="fewshot_acc")
    # compare.yaml's space: two `lam`s under different methods, and the method itself sampled
    vic = trial("aaaa0001", {"loss.method": "vicreg", "loss.vicreg.lam": 25.123456, "train.lr": 0.0031234}, 1)
    bt = trial("bbbb0002", {"loss.method": "barlow_twins", "loss.barlow_twins.lam": 0.0012345, "train.lr": 0.001}, 2)
    mon.on_trial_result(0, [vic, bt], vic, result(1, "vicreg"))
    mon.on_experiment_end([vic, bt])  # not a terminal: the whole table once, at the end
    head, *rows, summary = out.getvalue().strip().splitlines()
    # the objective is the first metric column; number and Ray id name the trial
    assert head.split() == ["#", "trial_id", "method", "barlow_twins.lam", "vicreg.lam", "lr", "fewshot_acc",
                            "epoch", "eff_rank", "knn", "probe", "collapse", "state"]
    assert rows[0].split() == ["1", "aaaa0001", "vicreg", "-", "25.1", "0.00312", "0.412", "1", "7.12", "0.997",
                               "0.5", "none", "interrupted"]
    # a trial without a result yet: its method from its config
    assert rows[1].split() == ["2", "bbbb0002", "barlow_twins", "0.00123", "-", "0.001", "-", "-", "-", "-", "-",
                               "-", "interrupted"]
    assert "best #1 (aaaa0001) fewshot_acc=0.412" in summary
    assert "0.9972222447395325" not in out.getvalue()


def test_method_shows_before_the_first_result_when_the_space_does_not_sample_it(tmp_path):
    out = Terminal()
    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, stream=out, metric="knn_acc",
                       method="vicreg")
    t = trial("aaaa0001", {"loss.vicreg.lam": 25.0}, 1)
    mon.on_trial_start(0, [t], t)
    head, row, _ = out.getvalue().split("\x1b[J", 1)[1].strip().splitlines()
    # the objective under its own name, first, and not again under its short name
    assert head.split()[:5] == ["#", "trial_id", "method", "lam", "knn_acc"] and "knn" not in head.split()
    assert row.split() == ["1", "aaaa0001", "vicreg", "25", "-", "-", "-", "-", "-", "running"]


@pytest.mark.parametrize(("status", "reason", "state"), [
    ("stopped", "asha", "asha"), ("stopped", "collapse_total (epoch 3)", "collapse"),
    ("stopped", "collapse_dimensional (epoch 4)", "collapse"), ("stopped", "stopped", "stopped"),
    ("finished", "", "finished"), ("diverged", "non-finite loss", "diverged"), ("error", "/x/error.txt", "error"),
    ("running", "", "running"), ("", "", "pending")])
def test_short_state_tells_who_stopped_a_trial(status, reason, state):
    assert short_state(status, reason) == state


def run_fake_sweep(n: int, stream, metric: str = "fewshot_acc") -> SweepMonitor:
    """n trials, two at a time, ending as a sweep's do: trial k (0-based) finishes its 3 epochs when k % 3 == 0,
    is stopped by ASHA after epoch 2 when k % 3 == 1, by the collapse stopper at epoch 1 (total collapse) when
    k % 3 == 2. A periodic progress tick follows every epoch (interval_s=0: every tick is due)."""
    cfg = CollapseStopConfig(min_epoch=1, total_patience=1)
    mon = SweepMonitor(Path(stream.dir), cfg, "asha", interval_s=0.0, stream=stream, metric=metric,
                       method="vicreg")
    trials = [trial(f"t{i:07d}", {"loss.vicreg.lam": float(i)}, i + 1) for i in range(n)]
    for t in trials:
        t.status = "PENDING"
    last_epoch = {0: 3, 1: 2, 2: 1}
    for pair in (trials[i:i + 2] for i in range(0, n, 2)):
        for t in pair:
            t.status = "RUNNING"
            mon.on_trial_start(0, trials, t)
        for epoch in (1, 2, 3):
            for t in pair:
                k = int(t.trial_id[1:])
                if epoch > last_epoch[k % 3]:
                    continue
                t.last_result = result(epoch, "vicreg", collapse="total" if k % 3 == 2 else "none",
                                       collapse_streak=epoch, status="finished" if epoch == 3 else "running")
                mon.on_trial_result(0, trials, t, t.last_result)
                if epoch == last_epoch[k % 3]:
                    t.status = "TERMINATED"
                    mon.on_trial_complete(0, trials, t)
            mon.on_step_end(0, trials)
    mon.on_experiment_end(trials)
    return mon


class Log(io.StringIO):
    def __init__(self, folder):
        super().__init__()
        self.dir = str(folder)


def test_a_log_gets_lines_linear_in_the_trials(tmp_path):
    """Not a terminal: one line per trial start, per trial end, at most one progress line per tick (here one per
    epoch of each pair of trials), then the table once. The old monitor printed the whole table at every trial
    end: (n² + 5n)/2 lines for n trials."""
    counts = {}
    for n in (6, 12, 24):
        out = Log(tmp_path / str(n))
        run_fake_sweep(n, out)
        lines = out.getvalue().splitlines()
        counts[n] = len(lines)
        assert "\x1b" not in out.getvalue()
        assert sum(line.startswith("start  #") for line in lines) == n
        assert sum(line.startswith("end    #") for line in lines) == n
        progress = [line for line in lines if line.startswith("[")]
        assert len(progress) <= 3 * n // 2 + 1
        assert len(lines) == 2 * n + len(progress) - 1 + (n + 2)  # the table's last line is a progress line
    assert counts[24] - counts[12] == 2 * (counts[12] - counts[6])  # linear: doubling n adds as much again
    assert counts[24] <= 5 * 24 + 2


def test_a_log_line_names_the_trial_and_who_stopped_it(tmp_path):
    out = Log(tmp_path)
    run_fake_sweep(6, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "start  #1 (t0000000) vicreg lam=0"
    ends = {int(line.split()[1][1:]): line for line in lines if line.startswith("end    #")}
    # number and Ray id, how it ended, the objective first
    assert re.match(r"end    #1 \(t0000000\)  finished  epoch 3  fewshot_acc=0\.412 eff_rank=7\.12", ends[1])
    assert ends[2].startswith("end    #2 (t0000001)  asha  epoch 2  fewshot_acc=0.412")
    assert ends[3].startswith("end    #3 (t0000002)  collapse (collapse_total (epoch 1))  epoch 1")
    assert re.search(r"\] 2 running, 4 pending, 0 ended; best #1", out.getvalue())
    assert "6 ended (2 asha, 2 collapse, 2 finished)" in lines[-1]
    assert lines[-1].endswith("best #1 (t0000000) fewshot_acc=0.412")


def test_a_terminal_gets_the_table_redrawn_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LINES", "50")
    out = Terminal()
    out.dir = str(tmp_path)
    run_fake_sweep(4, out)
    frames = out.getvalue().split("\x1b[J")[1:]
    # every drawing after the first goes back up exactly the lines of the one before it
    assert len(frames) > 4
    for before in frames[:-1]:
        body, up = before.rsplit("\n", 1)
        assert up == f"\r\x1b[{len(body.splitlines())}A"
    last = frames[-1].strip().splitlines()
    assert len(last) == 1 + 4 + 1 and last[0].split()[0] == "#"  # header, one row per trial, progress
    assert [row.split()[-1] for row in last[1:5]] == ["finished", "asha", "collapse", "finished"]
    assert "\n" not in out.getvalue().split("\x1b[J")[0]  # nothing printed but the drawings


def test_csv_puts_number_and_id_first_and_parameters_before_metrics_at_full_precision(tmp_path):
    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, stream=io.StringIO())
    first = trial("zzzz0001", {"loss.method": "vicreg", "train.lr": 0.0031234}, 1)
    late = trial("bbbb0002", {"loss.method": "barlow_twins", "loss.barlow_twins.lam": 0.0012345, "train.lr": 0.001}, 2)
    for t, method in ((first, "vicreg"), (late, "barlow_twins")):  # late's lam appears after first's metrics
        t.last_result = result(2, method)
        mon.on_trial_result(0, [first, late], t, t.last_result)
        mon.on_trial_complete(0, [first, late], t)
    rows = read_trials(tmp_path)
    cols = list(rows[0])
    assert cols[:6] == ["trial_number", "trial_id", "method", "status", "stop_reason", "config_id"]
    assert cols[6:9] == ["param.loss.barlow_twins.lam", "param.loss.method", "param.train.lr"]
    assert cols[9:11] == ["epoch", "loss"] and "knn_acc" in cols[11:]
    # rows in the order trials were created (their number), not by Ray id
    assert [(r["trial_number"], r["trial_id"]) for r in rows] == [("1", "zzzz0001"), ("2", "bbbb0002")]
    assert [r["config_id"] for r in rows] == [config_id(first.config), config_id(late.config)]
    assert rows[0]["knn_acc"] == "0.9972222447395325" and rows[1]["param.loss.barlow_twins.lam"] == "0.0012345"
    assert [(r["status"], r["stop_reason"]) for r in rows] == [("stopped", "asha"), ("stopped", "asha")]


def test_a_terminal_table_fits_the_screen_running_trials_first(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("LINES", "8")
    out = Terminal()
    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, stream=out, metric="fewshot_acc")
    trials = [trial(f"t{i:07d}", {"loss.vicreg.lam": float(i)}, i + 1) for i in range(10)]
    for i, t in enumerate(trials[:-1]):  # nine ended, the best of them #4; #10 still running
        t.last_result = result(3, "vicreg", status="finished", fewshot_acc=0.9 if i == 3 else 0.1 * (i % 3))
        mon.on_trial_result(0, trials, t, t.last_result)
        mon.on_trial_complete(0, trials, t)
    mon.on_trial_start(0, trials, trials[-1])
    frame = out.getvalue().split("\x1b[J")[-1].strip().splitlines()
    assert len(frame) <= 8 - 1  # and the cursor on the last line: the redraw never scrolls the screen
    numbers = [line.split()[0] for line in frame[1:-2]]
    assert "10" in numbers and "4" in numbers  # the running trial and the best ended one
    assert frame[-2] == f"... {10 - len(numbers)} more trials in trials.csv"


def test_a_pickled_monitor_keeps_its_rows_and_draws_afresh(tmp_path):
    import pickle

    mon = SweepMonitor(tmp_path, CollapseStopConfig(), "asha", interval_s=1e9, metric="fewshot_acc")
    t = trial("aaaa0001", {"loss.vicreg.lam": 1.0}, 1)
    mon.on_trial_result(0, [t], t, result(1, "vicreg"))
    mon._drawn = 7
    again = pickle.loads(pickle.dumps(mon))
    assert again.rows == mon.rows and again._drawn == 0 and again.metric == "fewshot_acc"
