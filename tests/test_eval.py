"""vlmtrain.eval: metrics on fixed cases, and a whole evaluation of a run directory."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from model_fixtures import make_run_dir

from vlmtrain.cli import CONFIG_DIR
from vlmtrain.inference.evaluation import anls, evaluate, levenshtein, relaxed, score


@pytest.mark.parametrize(
    "pred, ref, exact, rel, a",
    [
        ("red", "red", 1, 1, 1.0),
        (" Red. ", "red", 0, 1, 0.75),  # ANLS normalises case/space, not punctuation: 1 - 1/4
        ("two circles", "Two circles!", 0, 1, 1 - 1 / 12),
        ("blue", "purple", 0, 0, 0.0),  # distance 4 of 6 > 0.5 -> 0
        ("triangle", "triangles", 0, 0, 1 - 1 / 9),
        ("", "", 1, 1, 1.0),
    ],
)
def test_scores(pred, ref, exact, rel, a):
    s = score(pred, ref)
    assert s["exact_match"] == exact and s["relaxed_match"] == rel
    assert s["anls"] == pytest.approx(a)


def test_levenshtein_and_relaxed():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert relaxed("  Hello,   World!! ") == "hello world"
    assert anls("abc", "abd", threshold=0.3) == 0.0  # 1/3 >= 0.3


def _eval_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_eval_run_dir_on_demo_heldout(tmp_path):
    make_run_dir(tmp_path / "run")
    cfg = _eval_cfg([f"ckpt={tmp_path / 'run'}", "eval.limit=6", "eval.batch_size=4",
                     "generation.max_new_tokens=4", "device=cpu"])
    metrics = evaluate(cfg)
    out = tmp_path / "run" / "eval"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and metrics["datasets"]["shapes_val"]["count"] == 6
    assert json.loads((out / "metrics.json").read_text())["overall"]["count"] == 6
    for r in rows:
        assert set(r) >= {"prediction", "reference", "exact_match", "relaxed_match", "anls"}
        assert r["exact_match"] == score(r["prediction"], r["reference"])["exact_match"]


def test_eval_exported_dir_gives_the_same_predictions(tmp_path):
    from omegaconf import OmegaConf

    from vlmtrain.models.export import export

    make_run_dir(tmp_path / "run")
    export(OmegaConf.create({"ckpt": str(tmp_path / "run"), "out": str(tmp_path / "hf"), "dtype": None, "max_tiles": 4}))
    common = ["eval.limit=4", "eval.batch_size=4", "generation.max_new_tokens=4", "device=cpu"]
    evaluate(_eval_cfg([f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'e1'}", *common]))
    evaluate(_eval_cfg([f"ckpt={tmp_path / 'hf'}", f"out={tmp_path / 'e2'}", *common]))
    p1 = [json.loads(x)["prediction"] for x in (tmp_path / "e1" / "predictions.jsonl").read_text().splitlines()]
    p2 = [json.loads(x)["prediction"] for x in (tmp_path / "e2" / "predictions.jsonl").read_text().splitlines()]
    assert p1 == p2 and len(p1) == 4


def test_group_of_and_summarise_groups():
    from vlmtrain.inference.evaluation import NO_GROUP, group_of, summarise_groups

    raw = {"question_types": ["one_image/count", "one_image/exists"], "category": "OCR"}
    assert group_of(raw, "question_types", 1, "x:1") == "one_image/exists"
    assert group_of(raw, "category", 1, "x:1") == "OCR"  # a string applies to every turn
    assert group_of(raw, "missing", 0, "x:1") == NO_GROUP and group_of(raw, None, 0, "x:1") is None
    with pytest.raises(ValueError, match="x:1.*question_types"):
        group_of(raw, "question_types", 2, "x:1")
    rows = [{"group": g, "exact_match": e, "relaxed_match": e, "anls": e}
            for g, e in [("one_image/count", 1.0), ("one_image/count", 0.0), ("one_image/exists", 1.0), ("text/plus", 1.0)]]
    groups = summarise_groups(rows)
    assert list(groups) == ["one_image", "one_image/count", "one_image/exists", "text", "text/plus"]
    assert groups["one_image"]["count"] == 3 and groups["one_image"]["exact_match"] == pytest.approx(2 / 3)
    assert groups["one_image/count"]["exact_match"] == 0.5 and groups["text"]["count"] == 1


def test_eval_group_by_question_types(tmp_path):
    from vlmtrain.data.synthetic import make_shapes_dataset

    val = make_shapes_dataset(tmp_path / "data", 12, seed=3, split="val")
    make_run_dir(tmp_path / "run")
    cfg = _eval_cfg([f"ckpt={tmp_path / 'run'}", f"data.datasets.shapes_val.path={val}", "eval.group_by=question_types",
                     "eval.batch_size=8", "generation.max_new_tokens=2", "device=cpu"])
    metrics = evaluate(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    lines = [json.loads(x) for x in val.read_text().splitlines()]
    assert [r["group"] for r in rows] == [t for line in lines for t in line["question_types"]]
    groups = metrics["groups"]
    assert metrics["group_by"] == "question_types"
    # top-level kinds partition the questions; each kind's count is the sum of its sub-kinds
    top = [g for g in groups if "/" not in g]
    assert sum(groups[g]["count"] for g in top) == metrics["overall"]["count"] == len(rows)
    for g in top:
        assert groups[g]["count"] == sum(m["count"] for k, m in groups.items() if k.startswith(g + "/"))
