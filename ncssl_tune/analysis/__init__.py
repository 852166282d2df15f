"""numbers -> answers: which label-free metric predicts a sweep's objective, from its MLflow runs.

load (MLflow I/O) and stats (numbers) feed study (`analyze`, `run_analysis`), whose AnalysisResult (result.py
documents every field of analysis.json) report writes out with plots. Imports neither Ray, Optuna nor torch.
"""

from __future__ import annotations

from ncssl_tune.analysis.load import load_epochs, load_runs
from ncssl_tune.analysis.report import summary_lines, write_report
from ncssl_tune.analysis.result import AnalysisResult
from ncssl_tune.analysis.study import analyze, run_analysis

__all__ = ["AnalysisResult", "analyze", "load_epochs", "load_runs", "run_analysis", "summary_lines", "write_report"]
