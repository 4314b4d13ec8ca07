"""Every W&B sweep in sweeps/ composes: each grid point (or the bounds of each range) is a valid
Hydra config, each swept key exists, and each names a metric vlmtrain logs. A sweep can never fail
on a typo after it is queued."""

import itertools
import math
import os
import stat
import subprocess

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, compose_config
from vlmtrain.cli import CONFIG_DIR

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
MAX_POINTS = 64  # above this, vary one parameter at a time around the first point

# sweeps over config that another branch adds: skipped (with this reason) only while the key or
# group option is absent from the composed config
PENDING = {
    "lora_rank_alpha.yaml": "stage=lora and stage.lora.{r,alpha} come with the models branch (issue 4: LoRA)",
}


def _summary_metrics() -> set[str]:
    """The keys vlmtrain writes to the W&B run summary (RunTracking prefixes them summary/)."""
    import torch

    from vlmtrain.data.collate import Batch, Step
    from vlmtrain.training.flops import InternVLDims
    from vlmtrain.training.metrics import DatasetLoss, StepMeter

    dims = InternVLDims(64, 2, 256, 224, 14, 0.5, 128, 2, 4, 2, 32, 384, 2048)
    meter = StepMeter(dims, {"multi_modal_projector": "full"}, 1, 1e12)
    mb = Batch(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.tensor([[-100, -100, 5, 6]]),
               attention_mask=torch.ones(1, 4, dtype=torch.long), position_ids=torch.arange(4)[None],
               pixel_values=torch.zeros(1, 3, 224, 224), dummy_vision=True, num_supervised=torch.tensor([2]),
               sample_index=torch.zeros(1, 4, dtype=torch.long), datasets=["d"])
    meter.count(Step([mb]))
    losses = DatasetLoss()
    losses.add(["d"], torch.tensor([[1.0, 1.0, 1.0, 2.0]]))
    meter.collect(lambda x: [x], {}, losses, loss=1.0)
    return {f"summary/{k}" for k in meter.summary()} | {"summary/global_step", "summary/epochs"}


def _candidates(spec: dict) -> list:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        assert spec["values"], "empty values list"
        return list(spec["values"])
    assert "min" in spec and "max" in spec, f"a range needs min and max: {spec}"
    lo, hi = spec["min"], spec["max"]
    assert lo < hi, f"min {lo} >= max {hi}"
    dist = spec.get("distribution", "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    if dist == "log_uniform":  # bounds given as natural logs
        lo, hi = math.exp(lo), math.exp(hi)
    if "int" in dist:
        lo, hi = int(lo), int(hi)
    return [lo, hi]


def _points(params: dict) -> list[dict]:
    keys = list(params)
    cands = [_candidates(params[k]) for k in keys]
    if math.prod(len(c) for c in cands) <= MAX_POINTS:
        return [dict(zip(keys, combo)) for combo in itertools.product(*cands)]
    base = {k: c[0] for k, c in zip(keys, cands)}
    return [base | {k: v} for k, c in zip(keys, cands) for v in c]


def _fixed_overrides(command: list[str]) -> list[str]:
    assert "${args_no_hyphens}" in command, "the command must pass the parameters as Hydra overrides"
    i = command.index("vlmtrain")
    assert command[i - 1] == "-m" and command[i - 2] == "python", command
    return [c for c in command[i + 1:] if not c.startswith("${")]


def _has_key(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node[part]
    return True


def _missing_option(overrides: list[str]) -> str | None:
    for o in overrides:
        group, _, option = o.partition("=")
        if (CONFIG_DIR / group).is_dir() and not (CONFIG_DIR / group / f"{option}.yaml").is_file():
            return o
    return None


def test_there_are_sweeps_for_lr_lora_and_loss():
    names = {p.name for p in SWEEPS}
    assert {"mlp_warmup_lr.yaml", "lora_rank_alpha.yaml", "loss_reduction.yaml"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_composes_at_every_point(path, tmp_path):
    text = path.read_text()
    assert text.startswith("#"), f"{path} must start with a comment saying what it is for and how to run it"
    sweep = yaml.safe_load(text)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    assert sweep["metric"]["name"] in _summary_metrics(), f"{path.name}: vlmtrain never logs {sweep['metric']['name']}"
    fixed = _fixed_overrides(sweep["command"])
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        assert all("values" in s or "value" in s for s in params.values()), "grid sweeps need values lists"

    pending = PENDING.get(path.name)
    missing = _missing_option(fixed + [f"{k}={v}" for k, v in _points(params)[0].items()])
    if missing and pending:
        pytest.skip(f"{missing}: {pending}")
    assert missing is None, f"{path.name}: no config file for {missing}"
    base = compose_config(fixed, run_dir=tmp_path)
    absent = [k for k in params if not _has_key(base, k)]
    if absent and pending:
        pytest.skip(f"{absent} not in the composed config: {pending}")
    assert not absent, f"{path.name}: {absent} not in the config composed from {fixed}"

    for point in _points(params):
        overrides = fixed + [f"{k}={v}" for k, v in point.items()]  # exactly as `wandb agent` formats them
        cfg = compose_config(overrides, run_dir=tmp_path)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        for key, value in point.items():
            got = OmegaConf.select(cfg, key)
            if OmegaConf.is_dict(got):  # a group: its option file was picked
                continue
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got, value)


def test_sweep_agent_sbatch_runs_wandb_agent(tmp_path):
    """The sbatch file, run by bash with Slurm's variables and a stub `wandb` on PATH."""
    stub = tmp_path / "bin" / "wandb"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "wandb $*" > "$STUB_OUT"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "called"
    env = dict(os.environ, PATH=f"{stub.parent}:{os.environ['PATH']}", STUB_OUT=str(out),
               SLURM_SUBMIT_DIR=str(tmp_path), SLURM_ARRAY_TASK_ID="3", SLURM_JOB_ID="77")
    # (a submit dir without .venv: the script would activate one and find the real wandb first)
    env.pop("VIRTUAL_ENV", None)
    script = REPO / "slurm" / "sweep_agent.sbatch"
    r = subprocess.run(["bash", str(script), "me/vlmtrain/abc123", "5"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text().split() == ["wandb", "agent", "--count", "5", "me/vlmtrain/abc123"]
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "usage" in r.stderr
    assert "#SBATCH --array" in script.read_text()
