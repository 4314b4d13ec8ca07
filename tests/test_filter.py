"""`python -m vlmtrain.filter`: the rules on demo data with injected defects (precision and recall),
kept + rejected = the input for every format, slices = one process, LLM scoring with the tiny
model and a resumable cache, and the kept data trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, compose_config
from vlmtrain.cli import CONFIG_DIR, command, use_schema
from vlmtrain.config import register_schemas
from vlmtrain.filtering import llm, text
from vlmtrain.filtering.defects import evaluate, make_defect_dataset
from vlmtrain.filtering.pipeline import run

QUIET = ["filter.progress=false"]


def compose_filter(overrides):
    """The config `python -m vlmtrain.filter` composes (its root includes the training tree)."""
    use_schema(command("filter"))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="filter", overrides=[*QUIET, *overrides])
    finally:
        register_schemas()


def filter_data(path, out, *overrides):
    return run(compose_filter(["data=single", f"data.path={path}", f"out={out}", *overrides]))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    return make_defect_dataset(root / "data"), root


# -- the measures ---------------------------------------------------------------------------------


def reference_ngram_ratio(answer: str, n: int) -> float:
    """InternVL's calculate_ngram_repetition, restated: distinct repeated n-grams of str.split()
    words over the number of n-gram positions."""
    ws = answer.split()
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    return sum(1 for g in set(grams) if grams.count(g) > 1) / len(grams) if grams else 0


@pytest.mark.parametrize("answer", [
    "a b c d e f g h i j k l " * 2, "one two three four five six seven eight nine ten " * 5,
    "The model sees an image. " * 3 + "Then it answers.", "short answer", "",
    " ".join(f"w{i % 17}" for i in range(200)),
])
def test_distinct_measure_is_internvl_arithmetic(answer):
    assert text.ngram_repetition(text.words(answer), 10, "distinct") == pytest.approx(reference_ngram_ratio(answer, 10))


def test_loops_score_high_in_both_scripts_and_the_reference_passes_long_loops():
    loop = "This is the same sentence again and again in the answer. " * 12
    assert text.ngram_repetition(text.words(loop), 10) > 0.9
    assert reference_ngram_ratio(loop, 10) < 0.1  # the InternVL arithmetic: ~1/12
    zh = "我认为这个问题的答案是肯定的。" * 8
    assert text.words(zh)[:3] == ["我", "认", "为"]
    assert text.ngram_repetition(text.words(zh), 10) > 0.9
    assert reference_ngram_ratio(zh, 10) == 0  # one "word" to str.split(): never an n-gram


@pytest.mark.parametrize("reply, score", [
    ("Score: 7", 7), ("**Score:** 8.5", 8.5), ("I'd rate it 6/10.", 6), ("9", 9), ("评分：3", 3),
    ("Score: 4\nOn reflection, Score: 5", 5), ("7 out of 10", 7), ("Score: 12", None), ("no idea", None),
    ("The answer mentions 3 cats", None), ("", None), ("I would give it a score of 8.", 8), ("Score (0-10): 7", 7),
    ("Rating is 6 because the answer is short", 6),
])
def test_parse_score(reply, score):
    assert llm.parse_score(reply) == score


# -- the pipeline ---------------------------------------------------------------------------------


def test_precision_and_recall_on_injected_defects(defects):
    data, root = defects
    summary = filter_data(data, root / "out")
    result = evaluate(root / "out", data.parent / "labels.json", "single")
    assert result["precision"] >= 0.95 and result["recall"] >= 0.95, result
    for rule, r in result["per_rule"].items():
        assert r["recall"] is None or r["recall"] >= 0.95, (rule, r)
        assert r["precision"] is None or r["precision"] >= 0.95, (rule, r)
    # every look-alike kind is kept
    assert all(v["kept"] == v["lines"] for v in result["clean_kinds"].values()), result["clean_kinds"]
    assert summary["records"] == result["lines"]
    report = (root / "out" / "report.md").read_text()
    assert "### ngram_repetition" in report and "### unreadable/malformed_json" in report
    assert (root / "out" / "plots" / "rule_counts.png").stat().st_size > 1000
    assert (root / "out" / "plots" / "kept_share.png").is_file()


def _records(path: Path, fmt: str) -> list:
    """The input's samples as source objects, in order (what kept + rejected must add up to)."""
    if fmt == "json":
        return json.loads(path.read_text())
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(line)
    return out


def test_kept_plus_rejected_is_the_input_for_every_format(defects, tmp_path):
    from vlmtrain.config import DataConfig
    from vlmtrain.data.shard import write_shards

    data, root = defects
    lines = data.read_text().splitlines()
    # a swift .json list, a CogVLM folder and webdataset shards, each with good and bad samples
    swift = [{"query": "<image>What is it?", "response": "A shape.", "images": [str(data.parent / "media" / "size-4.png")]},
             {"query": "Say it.", "response": "!" * 80},
             {"query": "<image>Where?", "response": "Nowhere.", "images": ["missing.png"]},
             {"query": "Sum?", "response": "The sum of two and two is four."}]
    (tmp_path / "swift.json").write_text(json.dumps(swift, indent=2))
    cog = tmp_path / "cog"
    (cog / "labels").mkdir(parents=True)
    (cog / "images").mkdir()
    import shutil
    for k, (label, img) in enumerate([({"captions": [{"role": "caption", "content": "Shapes on grey."}]}, "size-5.png"),
                                      ({"captions": [{"role": "caption", "content": "0" * 40}]}, "size-5.png"),
                                      ({"conversations": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello there."}]}, None)]):
        (cog / "labels" / f"{k:03d}.json").write_text(json.dumps(label))
        if img:
            shutil.copyfile(data.parent / "media" / img, cog / "images" / f"{k:03d}.png")
    wds_src = tmp_path / "wds_src.jsonl"
    wds_src.write_text("\n".join(lines[:40]) + "\n")
    write_shards(DataConfig(datasets={"w": {"path": str(wds_src), "root": str(data.parent)}}), tmp_path / "shards",
                 max_count=15, log=lambda m: None)
    out = tmp_path / "out"
    sets = {"lines": (data, "internvl"), "swift": (tmp_path / "swift.json", "swift"), "cog": (cog, "cogvlm"),
            "wds": (tmp_path / "shards" / "w", "wds")}
    overrides = [f"out={out}", "~data.datasets.shapes"]
    for name, (path, fmt) in sets.items():
        overrides += [f"+data.datasets.{name}.path={path}", f"+data.datasets.{name}.format={fmt}"]
    overrides += [f"+data.datasets.swift.root={data.parent}"]  # its absolute image paths lie under that root
    overrides += [f"+data.datasets.lines.root={data.parent}", "+data.datasets.lines.n_max=3",
                  "+data.datasets.lines.repeat=1.5", "+data.datasets.lines.jpeg_augment=false"]
    summary = run(compose_filter(overrides))
    by_name = {d["dataset"]: d for d in summary["datasets"]}

    # jsonl: kept lines are the source lines verbatim; rejected lines name their 1-based line
    kept = (out / "lines" / "kept.jsonl").read_text().splitlines()
    rejected = jsonl(out / "lines" / "rejected.jsonl")
    assert len(kept) + len(rejected) == len(lines)
    assert all(lines[r["line"] - 1] == r["sample"] or json.loads(lines[r["line"] - 1]) == r["sample"] for r in rejected)
    rejected_at = {r["line"] for r in rejected}
    assert kept == [ln for i, ln in enumerate(lines, 1) if i not in rejected_at]  # verbatim, in order
    assert all(r["source"] == str(data) and r["reasons"] and all("rule" in x for x in r["reasons"]) for r in rejected)
    bad = [r for r in rejected if r["reasons"][0].get("reason") == "malformed_json"]
    assert len(bad) == 1 and bad[0]["reasons"][0]["rule"] == "unreadable" and isinstance(bad[0]["sample"], str)
    assert "malformed JSON" in bad[0]["reasons"][0]["message"]

    # json list: kept + rejected are the elements, in order
    kept_s = jsonl(out / "swift" / "kept.jsonl")
    rej_s = jsonl(out / "swift" / "rejected.jsonl")
    assert [r["line"] for r in rej_s] == [2, 3] and [r["sample"] for r in rej_s] == swift[1:3]
    assert kept_s == [swift[0], swift[3]]

    # cogvlm: labels copied into a trainable folder, images linked
    rej_c = jsonl(out / "cog" / "rejected.jsonl")
    assert [Path(r["source"]).name for r in rej_c] == ["001.json", "002.json"]  # zero run; no image
    assert sorted(p.name for p in (out / "cog" / "kept" / "labels").iterdir()) == ["000.json"]
    assert (out / "cog" / "kept" / "images" / "000.png").is_file()

    # wds: the kept members, byte for byte, in shards named like the sources
    rej_w = jsonl(out / "wds" / "rejected.jsonl")
    kept_w = jsonl(out / "wds" / "kept.jsonl")
    n_src = by_name["wds"]["records"]
    assert len(kept_w) + len(rej_w) == n_src and by_name["wds"]["kept"] == len(kept_w)
    assert sorted(p.name for p in (out / "wds" / "kept").glob("*.tar")) == sorted(
        p.name for p in (tmp_path / "shards" / "w").glob("*.tar"))

    # the data config keeps every dataset's settings and trains: every kept sample reads back
    conf = (out / "data" / "filtered.yaml").read_text()
    assert conf.startswith("# Kept data written by `python -m vlmtrain.filter`")
    from vlmtrain.data.mixture import build_mixture
    cfg = compose_config([f"hydra.searchpath=[file://{out}]", "data=filtered"])
    mixture, _ = build_mixture(cfg)
    assert {s.name: len(s.records) for s in mixture.sources} == {n: d["kept"] for n, d in by_name.items()}
    lines_cfg = next(s.cfg for s in mixture.sources if s.name == "lines")
    assert (lines_cfg.n_max, lines_cfg.repeat, lines_cfg.jpeg_augment, lines_cfg.format) == (3, 1.5, False, "internvl")
    from vlmtrain.data.mixture import Skipped
    for source in mixture.sources:
        for j in range(len(source.records)):
            assert not isinstance(mixture.load_line(source, j, __import__("random").Random(0)), Skipped)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["lines"]["max_dynamic_patch"] == 3 and meta["lines"]["repeat_time"] == 1.5
    assert meta["lines"]["data_augment"] is False and meta["lines"]["length"] == len(kept)


def _outputs(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix in (".jsonl", ".yaml", ".json") and "slices" not in p.parts
            and "llm_cache" not in p.parts and p.name != "summary.json"}


def test_slices_merge_to_what_one_process_writes(defects, tmp_path):
    data, _ = defects
    filter_data(data, tmp_path / "one")
    assert filter_data(data, tmp_path / "two", "filter.slice=1/2") is None  # slice 0 is not done: no merge
    assert not (tmp_path / "two" / "single").exists()
    summary = filter_data(data, tmp_path / "two", "filter.slice=0/2")  # the last slice to finish merges
    assert summary["slices"] == 2 and not list((tmp_path / "two" / "slices").glob("merge-*.lock"))
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert set(one) == set(two) and len(one) >= 4
    for name in one:
        assert one[name] == two[name].replace(str(tmp_path / "two").encode(), str(tmp_path / "one").encode()), name
    # a merge asked for while a slice is missing names it
    with pytest.raises(ValueError, match="slice\\(s\\) 1/3 .*not done"):
        filter_data(data, tmp_path / "three", "filter.slice=0/3", "filter.merge=never")
        filter_data(data, tmp_path / "three", "filter.slice=2/3", "filter.merge=never")
        filter_data(data, tmp_path / "three", "filter.slice=0/3", "filter.merge=only")


def test_bad_rule_settings_fail_in_one_line(defects, tmp_path):
    data, _ = defects
    with pytest.raises(ValueError, match="filter.rules.ngram_repetition: .*measure must be"):
        filter_data(data, tmp_path, "filter.rules.ngram_repetition.measure=avg")
    with pytest.raises(ValueError, match="filter.slice must be i/n"):
        filter_data(data, tmp_path, "filter.slice=half")


# -- LLM scoring ----------------------------------------------------------------------------------


class Judge:
    """A stand-in for the LLM that answers from the prompt: low for loops, one unparseable reply."""

    def __init__(self, *a, **k):
        pass

    def generate(self, prompts):
        out = []
        for p in prompts:
            if "same sentence again" in p and "repetition" in p:
                out.append("Score: 1")
            elif "Sum 2+2" in p:
                out.append("I cannot rate this.")
            else:
                out.append("Score: 9" if "repetition" in p else "**Score:** 8")
        return out


def test_llm_rules_decide_from_parsed_scores(tmp_path, monkeypatch):
    monkeypatch.setitem(llm.BACKENDS, "transformers", Judge)
    loop = "This is the same sentence again and again. " * 2  # under the n-gram rule's threshold
    rows = [{"conversations": [{"from": "human", "value": "Tell me."}, {"from": "gpt", "value": loop}]},
            {"conversations": [{"from": "human", "value": "Sum 2+2?"}, {"from": "gpt", "value": "4"}]},
            {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run(compose_filter(["data=single", f"data.path={path}", f"out={tmp_path / 'out'}", "filter=llm",
                                  "filter.scorer.backend=transformers",
                                  "+filter.rules.llm_quality.domains.single=mathematics"]))
    rejected = jsonl(tmp_path / "out" / "single" / "rejected.jsonl")
    assert [r["line"] for r in rejected] == [1]
    assert rejected[0]["reasons"] == [{"rule": "llm_repetition", "score": 1.0, "domain": "repetition", "threshold": 3.0}]
    review = jsonl(tmp_path / "out" / "single" / "review.jsonl")
    assert [(r["line"], r["rule"], r["reply"]) for r in review] == [(2, "llm_quality", "I cannot rate this."),
                                                                    (2, "llm_repetition", "I cannot rate this.")]
    assert summary["llm"]["unparseable"] == 2 and summary["llm"]["generated"] == 6 and summary["llm"]["tiny_model"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "tiny random model" in report and "scores_llm_quality.png" in report
    assert (tmp_path / "out" / "plots" / "scores_llm_quality.png").stat().st_size > 1000
    verdicts = jsonl(tmp_path / "out" / "slices" / "0-of-1" / "verdicts" / "00000.jsonl")
    assert verdicts[2]["groups"] == {"llm_quality": "mathematics", "llm_repetition": "repetition"}
    assert verdicts[2]["metrics"]["llm_quality"] == 8.0


@pytest.mark.slow
def test_llm_path_with_the_tiny_model_resumes_without_rescoring(tmp_path):
    """A real run of the tiny model, killed after some batches, then run again: the second run
    generates exactly the replies the first did not cache, and no reply is cached twice."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlmtrain.filter", "data=demo", f"out={out}", "filter=llm",
           "filter.scorer.batch_size=4", "filter.scorer.max_new_tokens=8", "filter.progress=false"]
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cache = out / "llm_cache" / "0-of-1.jsonl"
    end = time.time() + 240
    while time.time() < end and p.poll() is None and (not cache.exists() or len(cache.read_text().splitlines()) < 4):
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed: " + (p.stdout.read() if p.stdout else "")
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = {json.loads(line)["key"] for line in cache.read_text().splitlines() if line.endswith("}")}
    assert 4 <= len(before) < 110 and not (out / "report.md").exists()  # 110 prompts in all

    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines() if line.endswith("}")]
    assert len(keys) == len(set(keys))  # nothing scored twice
    done = json.loads((out / "slices" / "0-of-1" / "done.json").read_text())
    assert done["llm"]["generated"] == len(set(keys)) - len(before)
    assert done["llm"]["cached"] >= len(before)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["llm"]["tiny_model"] and summary["kept"] + sum(d["rejected"] for d in summary["datasets"]) == 96
    # every reply was parsed or counted unparseable, and the unparseable ones are up for review
    review = out / "shapes" / "review.jsonl"
    n_review = len(review.read_text().splitlines()) if review.exists() else 0
    assert n_review == summary["llm"]["unparseable"]
    # a third run finds everything cached and never loads the model
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert "LLM replies generated 0," in res.stdout, res.stdout


# -- the kept data trains -------------------------------------------------------------------------


@pytest.mark.slow
def test_kept_data_trains(defects, tmp_path):
    data, root = defects
    out = tmp_path / "out"
    filter_data(data, out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "vlmtrain", f"hydra.searchpath=[file://{out}]", "data=filtered",
                          "stage.global_batch_size=4", "stage.max_steps=2", "data.num_workers=0",
                          "data.max_seq_len=4096", "data.datasets.single.n_max=1", "trainer.enable_progress_bar=false",
                          f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["samples"] == 8 and summary["skipped"] == {}, summary


def test_academic_datasets_are_exempt_from_repetition_rules(tmp_path):
    loop = "The answer is in the table below. " * 10
    row = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": loop}]}
    path = tmp_path / "docvqa_train.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row | {"id": 2}) + "\n")
    overrides = ["~data.datasets.shapes", f"+data.datasets.docvqa_train.path={path}", f"+data.datasets.chat.path={path}"]
    summary = run(compose_filter([*overrides, f"out={tmp_path / 'a'}", "filter.academic=[docvqa*]"]))
    assert {d["dataset"]: d["kept"] for d in summary["datasets"]} == {"docvqa_train": 2, "chat": 0}
    assert summary["datasets"][1]["rules"] == {"ngram_repetition": 2}


def test_duplicate_images_exact_near_and_distinct():
    import io

    from PIL import Image, ImageDraw

    from vlmtrain.data.conversation import Conversation
    from vlmtrain.filtering.media import DuplicateImages
    from vlmtrain.filtering.rules import Sample

    def picture(seed):
        img = Image.new("RGB", (320, 240), (240, 240, 240))
        d = ImageDraw.Draw(img)
        for k in range(6):
            x, y = (seed * 53 + k * 97) % 260, (seed * 31 + k * 61) % 180
            d.ellipse([x, y, x + 50, y + 50], fill=((seed * 70 + k * 40) % 255, 90, (k * 60) % 255))
        return img

    def encoded(img, quality=95):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    a, b = picture(1), picture(2)
    srcs = [encoded(a), encoded(b), encoded(a), encoded(a.resize((256, 192)), 60)]
    rule = DuplicateImages("dup")
    samples = [Sample("ds", i, f"f:{i + 1}", {}, Conversation(turns=[("<image>\nq", "a")], images=[s]))
               for i, s in enumerate(srcs)]
    found = rule.decide(("ds", s.index, s.where, rule.features(s)) for s in samples)
    assert sorted(found) == [("ds", 2), ("ds", 3)]
    assert found[("ds", 2)].scores == {"duplicate_of": "f:1", "kind": "exact", "max_distance": 4}
    assert found[("ds", 3)].scores["kind"] == "near" and found[("ds", 3)].scores["duplicate_of"] == "f:1"
    # same_query_only: the same picture asked a different question is not a duplicate
    rule = DuplicateImages("dup", same_query_only=True)
    samples[2].conv.turns = [("<image>\nanother question", "a")]
    found = rule.decide(("ds", s.index, s.where, rule.features(s)) for s in samples)
    assert sorted(found) == [("ds", 3)]
