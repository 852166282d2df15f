"""Plugins through entry points: the example distribution (examples/plugin, the one docs/plugins.md walks through) is
built and installed into a temporary folder by pip, and a sweep runs with its loss, backbone and dataset end to end;
a broken plugin is one message naming its entry point, exit status 2, and nothing started."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from helpers import REPO, runs_of

from ncssl_tune.core import plugins
from ncssl_tune.core.data import DATASETS
from ncssl_tune.core.losses import LOSSES
from ncssl_tune.core.models import BACKBONES

EXAMPLE = REPO / "examples" / "plugin"
SWEEP = Path(sys.executable).parent / "ncssl-sweep"


def install_example(tmp: Path) -> Path:
    """pip-install examples/plugin (a copy: pip builds in the source folder) into tmp/site; returns that folder."""
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True, text=True)
    return site


def sweep_cli(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """ncssl-sweep in a fresh process that finds the plugins in `site` (as an installed distribution would be)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([str(SWEEP), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_docs_walk_through_the_example_that_is_tested():
    doc = (REPO / "docs" / "plugins.md").read_text()
    for f in ("pyproject.toml", "ncssl_align_uniform/__init__.py", "align_uniform.yaml"):
        assert (EXAMPLE / f).read_text().strip() in doc, f"docs/plugins.md does not show examples/plugin/{f} as it is"


@pytest.mark.slow
def test_example_plugin_sweeps_end_to_end(tmp_path):
    site = install_example(tmp_path)
    space = EXAMPLE / "align_uniform.yaml"
    dry = sweep_cli([str(space), "--dry-run"], site, tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "method align_uniform, dataset digits_inverted, backbone mlp" in dry.stdout
    assert "loss.align_uniform.t" in dry.stdout  # the swept plugin parameter, described like a built-in one
    bad = sweep_cli(["validate", str(space), "--set", "loss.align_uniform.t=-1"], site, tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("ncssl-sweep: error: --set loss.align_uniform.t=-1: loss.align_uniform.t: must be "
                                  "> 0, got -1.0")

    out = tmp_path / "results"
    run = sweep_cli([str(space), "--results-dir", str(out), "--num-samples", "2", "--epochs", "2",
                     "--set", "loss.align_uniform.alpha=1", "--set", "eval.cond_views=0",
                     "--set", "eval.eval_samples=256"], site, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader((out / "align_uniform" / "trials.csv").open()))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert all(float(r["fewshot_acc"]) > 0.1 for r in rows)  # above chance on 10 classes: it trained and was probed
    _, children = runs_of(f"sqlite:///{out}/mlflow.db", "align_uniform")
    assert len(children) == 2
    for child in children:
        assert child.data.params["loss.method"] == "align_uniform"
        assert child.data.params["model.backbone"] == "mlp" and child.data.params["data.dataset"] == "digits_inverted"
        assert float(child.data.params["loss.align_uniform.alpha"]) == 1.0
        assert 0.5 <= float(child.data.params["loss.align_uniform.t"]) <= 4.0
        assert {"loss", "loss_align", "loss_uniform"} <= set(child.data.metrics)
    analysis = json.loads((out / "align_uniform" / "analysis" / "analysis.json").read_text())
    assert analysis["n_trials"] == 2


# --- broken plugins, checked in this process (nothing of them joins the registries)

BROKEN = {
    "import_error": ("import does_not_exist_anywhere\n", "ncssl_tune.losses", "cannot be loaded: ModuleNotFoundError"),
    "three_args": ("def loss(z1, z2, z3):\n    return {}\n", "ncssl_tune.losses",
                   "a loss takes exactly two positional arguments (z1, z2)"),
    "untyped": ("def loss(z1, z2, *, w=1.0):\n    return {}\n", "ncssl_tune.losses",
                "parameter 'w' needs a default and one of the annotations float, int, bool, str"),
    "no_default": ("def loss(z1, z2, *, w: float):\n    return {}\n", "ncssl_tune.losses",
                   "parameter 'w' needs a default"),
    "not_a_dict": ("def loss(z1, z2):\n    return (z1 - z2).pow(2).mean()\n", "ncssl_tune.losses",
                   "a loss returns a dict of named terms with the key 'loss', got Tensor"),
    "term_name": ("def loss(z1, z2):\n    d = (z1 - z2).pow(2).mean()\n    return {'loss': d, 'effective_rank': d}\n",
                  "ncssl_tune.losses", "term 'effective_rank': named terms start with 'loss_'"),
    "no_gradient": ("import torch\ndef loss(z1, z2):\n    return {'loss': torch.tensor(1.0)}\n", "ncssl_tune.losses",
                    "its 'loss' carries no gradient"),
    "raises": ("def loss(z1, z2):\n    raise RuntimeError('boom')\n", "ncssl_tune.losses",
               "raised RuntimeError: boom"),
    "backbone_args": ("def loss(channels):\n    pass\n", "ncssl_tune.backbones", "lacks in_channels, image_size"),
    "loader_args": ("def loss(root):\n    pass\n", "ncssl_tune.datasets",
                    "lacks seed, test_fraction, image_size, synthetic"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_names_its_entry_point_and_registers_nothing(case, tmp_path, monkeypatch):
    source, group, problem = BROKEN[case]
    (tmp_path / f"plug_{case}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = {g: dict(r) for g, r in plugins.GROUPS.items()}
    good = EntryPoint("fine", "ncssl_align_uniform_absent:x", "ncssl_tune.losses")  # never reached: order matters
    with pytest.raises(plugins.PluginError) as e:
        plugins.register([EntryPoint(f"my_{case}", f"plug_{case}:loss", group), good])
    message = str(e.value)
    assert message.startswith(f"plugin entry point my_{case} = plug_{case}:loss (group {group}): ")
    assert problem in message and "\n" not in message
    assert {g: dict(r) for g, r in plugins.GROUPS.items()} == before


@pytest.mark.parametrize("group,registry", [("ncssl_tune.losses", LOSSES), ("ncssl_tune.backbones", BACKBONES),
                                            ("ncssl_tune.datasets", DATASETS)])
def test_a_plugin_cannot_take_a_built_in_name(group, registry):
    name = min(registry)
    with pytest.raises(plugins.PluginError, match=f"'{name}' is already a built-in name"):
        plugins.register([EntryPoint(name, "math:sqrt", group)])


def test_two_plugins_cannot_share_a_name(tmp_path, monkeypatch):
    (tmp_path / "plug_twice.py").write_text("def loss(z1, z2):\n    return {'loss': (z1 - z2).pow(2).mean()}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    twice = [EntryPoint("twice", "plug_twice:loss", "ncssl_tune.losses")] * 2
    with pytest.raises(plugins.PluginError, match="another installed plugin already declares 'twice'"):
        plugins.register(twice)
    assert "twice" not in LOSSES


def _broken_distribution(tmp: Path) -> Path:
    """An installed distribution (its .dist-info, as pip writes it) whose loss entry point fails to import."""
    site = tmp / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ncssl_tune.losses]\nbroken = broken_plugin:loss\n")
    (site / "broken_plugin.py").write_text(textwrap.dedent("""\
        raise ImportError("the plugin's own dependency is missing")
    """))
    return site


@pytest.mark.parametrize("command", [["validate", "{space}"], ["{space}", "--results-dir", "{out}"],
                                     ["{space}", "--dry-run"]])
def test_a_broken_plugin_stops_the_cli_with_status_2(command, tmp_path):
    site = _broken_distribution(tmp_path)
    out = tmp_path / "out"
    args = [a.format(space=REPO / "search_spaces" / "vicreg.yaml", out=out) for a in command]
    r = sweep_cli(args, site, tmp_path)
    assert r.returncode == 2
    expected = ("ncssl-sweep: error: plugin entry point broken = broken_plugin:loss (group ncssl_tune.losses, "
                "distribution broken-plugin): cannot be loaded: ImportError: the plugin's own dependency is missing")
    assert r.stderr.splitlines() == [expected]
    assert r.stdout == "" and not out.exists()
