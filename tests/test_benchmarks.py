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
