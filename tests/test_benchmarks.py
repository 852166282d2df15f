"""Every benchmark's --quick mode runs, so the scripts never rot (full runs are not tests)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = sorted(Path(__file__).resolve().parent.parent.glob("benchmarks/bench_*.py"))
SLOW = {"bench_sweep", "bench_search", "bench_data"}  # whole sweeps (one through the CLI), or six trial processes


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else [])
                                  for p in BENCH])
def test_benchmark_quick_mode_writes_its_json(path, tmp_path, ray_session):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    result = mod.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert not any(math.isnan(v) for v in result.values() if isinstance(v, float))


@pytest.mark.slow
def test_bench_search_runs_random_search_on_past_the_budget(tmp_path, ray_session):
    path = Path(__file__).resolve().parent.parent / "benchmarks/bench_search.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "search.json"
    with pytest.raises(SystemExit, match="must exceed"):
        mod.main(["--quick", "--random-budget", "2", "--out", str(out)])
    result = mod.main(["--quick", "--random-budget", "4", "--out", str(out)])  # B = 2, one epoch per trial
    assert result == json.loads(out.read_text())
    seed = result["per_seed"][0]
    rnd = seed["random"]
    # four one-epoch trials: the budget counts each result once (Ray calls a stopper twice for a trial's last)
    assert rnd["run_budget"] == 4 and rnd["run_spent"] == 4 and rnd["num_samples"] == 4
    assert rnd["spent"] == 2 and seed["tpe"]["spent"] == 2 and seed["qmc"]["spent"] == 2
    for m, ref in seed["reference"].items():
        assert ref == max(seed[n]["best"][m] for n in mod.STRATEGIES)  # the reference is the equal-budget one
        hit, tpe = rnd["to_within_extended"][m], seed["tpe"]["to_within"][m]
        assert hit is None or 1 <= hit <= 4
        if rnd["to_within"][m] is not None:
            assert hit == rnd["to_within"][m]  # the first B results are the start of the longer run
        assert seed["censored_extended"]["tpe"][m] == (hit is None or tpe is None)
        assert seed["ratio_extended"]["tpe"][m] == pytest.approx((hit or 4) / (tpe or 2))
    assert result["medians"]["fewshot_acc"]["tpe_ratio_extended"]["n"] == 1
    assert "ratio_extended_met" in result["targets"]
