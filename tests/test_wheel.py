"""The wheel is complete: built from the sources, installed into a fresh virtual environment, it
composes the config tree it carries (``vlmtrain/conf``) and trains one step of the default run from
another directory.

The new environment borrows its dependencies (torch, transformers, ...) from this one through a
``.pth`` file, which adds that site-packages to ``sys.path`` without running its ``.pth`` files:
this checkout's editable install cannot shadow the wheel, and the test asserts it does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("vlmtrain", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src])
    (whl,) = (tmp / "dist").glob("vlmtrain-*.whl")
    return whl


def test_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "vlmtrain").rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages in pyproject.toml): {missing}"
    configs = {"vlmtrain/" + str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml")}
    assert configs <= names, sorted(configs - names)
    assert "vlmtrain/conf/experiment/learning_proof.yaml" in names
    assert "vlmtrain/assets/tokenizer/tokenizer.json" in names


def test_wheel_in_a_fresh_venv_composes_and_trains_one_step(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_vlmtrain_test_deps.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    elsewhere = tmp_path / "elsewhere"  # not the checkout: `python -m` puts the cwd on sys.path
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLMTRAIN_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    where = run([python, "-c", "import vlmtrain, vlmtrain.cli as c; print(vlmtrain.__file__); print(c.CONFIG_DIR)"],
                cwd=elsewhere, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(venv), where  # the wheel, not the editable checkout
    assert Path(where[1]) == Path(where[0]).parent / "conf"

    job = run([venv / "bin" / "vlmtrain", "--cfg", "job"], cwd=elsewhere, env=env).stdout
    assert "stage:" in job and "name: mlp_warmup" in job
    run([python, "-m", "vlmtrain", "stage.max_steps=1", "hydra.run.dir=run", "trainer.enable_progress_bar=false"],
        cwd=elsewhere, env=env)
    assert (elsewhere / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (elsewhere / "run" / "summary.json").is_file()
