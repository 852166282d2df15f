"""The MLflow schema is readable without the sweep engine: `analysis` must not pull in Ray or Optuna."""

from __future__ import annotations

import subprocess
import sys


def test_analysis_loads_neither_ray_nor_optuna():
    code = ("import sys, ncssl_tune.analysis.load, ncssl_tune.vocab; "
            "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
