"""vlmtrain.cli: verbs dispatch to their commands, each command's defaults, and the error rule: a
UserError or an unset required value is one line naming it (exit 2), anything else a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import vlmtrain.cli as cli
from conftest import REPO


def python(*args, code: str | None = None, env=None, cwd=None):
    cmd = [sys.executable, *(["-c", textwrap.dedent(code)] if code else []), *args]
    full = {k: v for k, v in os.environ.items() if k != "VLMTRAIN_DEBUG"}
    full.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=cwd, timeout=300)


def test_every_verb_names_a_command_and_has_a_shim():
    for verb in cli.VERBS:
        cmd = cli.command(verb)
        assert cmd.name == verb and callable(cmd.run)
        if verb != "train":
            assert (REPO / "vlmtrain" / f"{verb}.py").is_file(), f"python -m vlmtrain.{verb} needs its shim"
    assert cli.command("train").program == "vlmtrain" and cli.command("eval").program == "vlmtrain.eval"


def test_main_dispatches_verbs_and_defaults_to_train(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "start", lambda cmd, args, prog: calls.append((cmd.name, args, prog)))
    for argv in (["eval", "ckpt=x"], ["stage=mlp_warmup"], ["--cfg", "job"], []):
        monkeypatch.setattr(sys, "argv", ["vlmtrain", *argv])
        cli.main()
    assert calls == [("eval", ["ckpt=x"], "vlmtrain eval"), ("train", ["stage=mlp_warmup"], None),
                     ("train", ["--cfg", "job"], None), ("train", [], None)]


def test_command_defaults(monkeypatch):
    import torch

    train, preview, ev = cli.command("train"), cli.command("preview"), cli.command("eval")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.command_defaults(train, []) == ["hydra.job.name=vlmtrain", "hardware=gpu"]
    assert cli.command_defaults(train, ["hardware=cpu"]) == ["hydra.job.name=vlmtrain"]
    assert cli.command_defaults(train, ["+hardware=ddp", "hydra.job.name=x"]) == []
    assert "hardware=gpu" not in cli.command_defaults(ev, [])  # only train picks the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.command_defaults(train, []) == ["hydra.job.name=vlmtrain"]
    quiet = cli.command_defaults(preview, ["hydra.run.dir=/x"])
    assert "hydra.output_subdir=null" in quiet and "hydra/job_logging=disabled" in quiet
    assert not any(o.startswith("hydra.run.dir=") for o in quiet)


def test_config_dir_is_the_checkout_conf_here():
    assert cli.CONFIG_DIR == REPO / "conf" and (cli.CONFIG_DIR / "config.yaml").is_file()


FAKE = """
    import sys
    from omegaconf import OmegaConf
    from vlmtrain.cli import Command, start
    from vlmtrain.cli.export import ExportConfig
    from vlmtrain.errors import UserError

    def fail(cfg):
        kind = cfg.kind
        if kind == "user":
            raise UserError("data.datasets.x.path: /nope does not exist")
        if kind == "missing":
            OmegaConf.create({"a": {"b": "???"}}).a.b
        raise ValueError("an internal invariant broke")

    start(Command("fake", fail, config_name="export", schema=ExportConfig, schema_name="vlmtrain_export_schema"),
          ["ckpt=c", "out=o", sys.argv[-1]])
"""


@pytest.mark.parametrize("kind, debug, rc, expected", [
    ("user", False, 2, "vlmtrain.fake: error: data.datasets.x.path: /nope does not exist"),
    ("missing", False, 2, "vlmtrain.fake: error: a.b is required: add a.b=... to the command"),
    ("bug", False, 1, "ValueError: an internal invariant broke"),
    ("user", True, 1, "vlmtrain.errors.UserError: data.datasets.x.path"),
])
def test_only_user_errors_become_one_line(tmp_path, kind, debug, rc, expected):
    env = {"VLMTRAIN_DEBUG": "1"} if debug else {}
    p = python(f"+kind={kind}", code=FAKE, env=env, cwd=tmp_path)
    assert p.returncode == rc, p.stderr
    assert expected in p.stderr
    if rc == 2:
        assert p.stderr.strip() == expected and "Traceback" not in p.stderr  # exactly one line
    else:
        assert "Traceback" in p.stderr or "Error executing job" in p.stderr


def test_required_keys_are_named_by_the_tool(tmp_path):
    p = python("-m", "vlmtrain.export", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == "vlmtrain.export: error: ckpt, out are required: add ckpt=... out=... to the command"
    p = python("-m", "vlmtrain", "eval", "device=cpu", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == "vlmtrain eval: error: ckpt is required: add ckpt=... to the command"


def test_a_user_error_from_a_loader_worker_is_still_one_line():
    import torch.utils.data as data

    from vlmtrain.errors import UserError

    class Bad(data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise UserError("data.datasets.x.template: unknown chat template 'y'")

    with pytest.raises(UserError) as e:
        list(data.DataLoader(Bad(), num_workers=1))
    assert "Original Traceback" in str(e.value)  # what torch re-raises in the main process
    assert cli.error_message(e.value) == "data.datasets.x.template: unknown chat template 'y'"
