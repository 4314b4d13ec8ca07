"""Preference pairs from a trained checkpoint: what `vlmtrain pairs` runs (``vlmtrain.cli.pairs``;
``python -m vlmtrain.pairs`` is the same).

    vlmtrain pairs ckpt=runs/sft out=pairs/                                  # the demo questions
    vlmtrain pairs ckpt=runs/sft out=pairs/ data=single data.path=qa.jsonl pairs.samples=8
    vlmtrain pairs ckpt=runs/sft data=single data.path=prefs.jsonl pairs.mode=reference

``pairs.mode=build`` (default): every assistant turn of the data (a question with a ground-truth
answer, its earlier turns as history, as ``vlmtrain eval`` reads them) gets ``pairs.samples``
answers sampled from the checkpoint (temperature ``pairs.temperature``), each scored against the
ground truth by exact or relaxed match (``vlmtrain.inference.evaluation``):

- some sample wrong (and not empty): a *sampling* pair, chosen = the first correct sample (the
  ground truth when none is), rejected = the first wrong sample;
- every non-empty sample right: a *DropoutNTP* pair (``pairs.dropout_ntp``): chosen = the ground truth,
  rejected = its first ``pairs.truncate`` share of tokens (50%) continued by the same model with
  the image removed from the prompt (greedy); a continuation that still matches is skipped and
  counted (``dropout_ntp_matched``).

Each dataset's pairs go to ``out/<dataset>.jsonl`` in the ``preference`` format (absolute media
paths; a ``provenance`` object per line: method, source line and turn, ground truth, samples,
checkpoint), ready for ``data=single data.path=out/<dataset>.jsonl stage=mpo``; ``out/pairs.json``
sums the counts. With ``pairs.reference`` (default) the same checkpoint then scores every pair in a
first pass, ``out/<dataset>.ref.jsonl`` beside it (``stage/reference=precomputed`` reads it).
``pairs.mode=reference`` does only that pass, for preference data made elsewhere, writing
``<data>.ref.jsonl`` beside each dataset's file.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from vlmtrain.config import Choice, DataConfig, DatasetConfig, choice, dataset_config
from vlmtrain.data.collate import pad_pairs
from vlmtrain.data.encode import PairSample
from vlmtrain.data.formats import guess_format
from vlmtrain.data.formats.preference import reference_path, write_reference
from vlmtrain.data.mixture import MixtureDataset, Skipped
from vlmtrain.errors import UserError
from vlmtrain.inference.engine import GenerationConfig, InferenceEngine, Prompt, resolve_device
from vlmtrain.inference.evaluation import questions, relaxed
from vlmtrain.models.checkpoint import load_trained
from vlmtrain.models.family import image_layout

log = logging.getLogger("vlmtrain")

if TYPE_CHECKING:
    PairMode = Choice
    Match = Choice
else:
    PairMode = choice("PairMode", ["build", "reference"], module=__name__)
    Match = choice("Match", ["exact", "relaxed"], module=__name__)


@dataclass
class PairOptions:
    mode: PairMode = PairMode("build")
    """build: sample pairs (then their reference log-probs); reference: only the log-probs pass."""
    samples: int = 4
    """Answers sampled per question."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    match: Match = Match("relaxed")
    """exact or relaxed (case, punctuation, whitespace normalised): what counts as a correct answer."""
    dropout_ntp: bool = True
    """Questions whose samples are all correct get a DropoutNTP pair."""
    truncate: float = 0.5
    """DropoutNTP: the share of the chosen answer's tokens kept before the image-less continuation."""
    batch_size: int = 8
    """Questions sampled together (each repeated ``samples`` times); pairs per reference batch."""
    limit: int | None = None
    """Only the first N questions of each dataset."""
    reference: bool = True
    """build mode: also write reference log-probs beside each pairs file."""
    seed: int = 0


def matches(prediction: str, reference: str, how: str) -> bool:
    if how == "exact":
        return prediction.strip() == reference.strip()
    return relaxed(prediction) == relaxed(reference)


def blind(prompt: Prompt) -> Prompt:
    """The prompt without its media (placeholders removed): DropoutNTP's image-less continuation."""
    def strip(text: str) -> str:
        return text.replace("<image>\n", "").replace("<image>", "").replace("<video>\n", "").replace("<video>", "")

    return Prompt(strip(prompt.query), [], [], [(strip(u), strip(a)) for u, a in prompt.history], prompt.system)


@torch.no_grad()
def continue_answer(engine: InferenceEngine, prompt: Prompt, prefix: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of the answer tokens ``prefix`` after ``prompt``; the whole answer's text."""
    rendered, pixels, sizes = engine.prompts.encode(prompt)
    ids = rendered.input_ids
    input_ids = torch.tensor([ids + prefix], device=engine.device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if pixels is not None:
        inputs["pixel_values"] = pixels.to(engine.device, engine.model.dtype)
        inputs.update(engine.family.generate_kwargs(inputs["pixel_values"], sizes))
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    out = engine.model.generate(**inputs, **engine._generate_kwargs(gen))
    return engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def line_of(prompt: Prompt, chosen: str, rejected: str, provenance: dict) -> dict | None:
    """A preference line; None when the media are not paths (in-memory shards cannot be referenced)."""
    if not all(isinstance(m, str) for m in [*prompt.images, *prompt.videos]):
        return None
    conversations = []
    for user, answer in prompt.history:
        conversations += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    conversations.append({"from": "human", "value": prompt.query})
    line: dict[str, Any] = {}
    if prompt.images:
        line["image"] = [str(Path(p).resolve()) for p in prompt.images]
    if prompt.videos:
        line["video"] = [str(Path(p).resolve()) for p in prompt.videos]
    if prompt.system is not None:
        line["system"] = prompt.system
    line.update(conversations=conversations, chosen=chosen, rejected=rejected, provenance=provenance)
    return line


def build_dataset_pairs(engine: InferenceEngine, name: str, dcfg, opts: PairOptions, ckpt: str,
                        out_file: Path, counts: dict) -> int:
    skipped: dict[str, int] = {}
    qs = questions(name, dcfg, None, opts.limit, skipped, None)
    for reason, n in skipped.items():
        counts[f"skipped/{reason}"] = counts.get(f"skipped/{reason}", 0) + n
    tok = engine.tokenizer
    written = 0
    with open(out_file, "w", encoding="utf-8") as f:
        for start in range(0, len(qs), opts.batch_size):
            batch = qs[start:start + opts.batch_size]
            gen = GenerationConfig(max_new_tokens=opts.max_new_tokens, do_sample=True, temperature=opts.temperature,
                                   top_p=opts.top_p, seed=opts.seed + start)
            answers = engine.generate([q.prompt for q in batch for _ in range(opts.samples)], gen)
            for i, q in enumerate(batch):
                samples = answers[i * opts.samples:(i + 1) * opts.samples]
                right = [a for a in samples if a and matches(a, q.reference, opts.match)]
                wrong = [a for a in samples if a.strip() and not matches(a, q.reference, opts.match)]
                prov = {"source": q.where, "turn": q.turn, "ground_truth": q.reference, "ckpt": ckpt,
                        "samples": samples, "temperature": opts.temperature, "match": opts.match}
                if wrong:
                    chosen = right[0] if right else q.reference
                    prov.update(method="sampling", chosen_from="sample" if right else "ground_truth")
                    rejected = wrong[0]
                elif opts.dropout_ntp:  # every (non-empty) sample right
                    ids = tok(q.reference, add_special_tokens=False)["input_ids"]
                    keep = ids[:int(len(ids) * opts.truncate)]
                    rejected = continue_answer(engine, blind(q.prompt), keep, opts.max_new_tokens)
                    chosen = q.reference
                    prov.update(method="dropout_ntp", truncate=opts.truncate, kept_tokens=len(keep))
                    if not rejected or matches(rejected, chosen, opts.match):
                        counts["dropout_ntp_matched"] = counts.get("dropout_ntp_matched", 0) + 1
                        continue
                else:
                    counts["all_correct"] = counts.get("all_correct", 0) + 1
                    continue
                line = line_of(q.prompt, chosen, rejected, prov)
                if line is None:
                    counts["media_not_paths"] = counts.get("media_not_paths", 0) + 1
                    continue
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                counts[prov["method"]] = counts.get(prov["method"], 0) + 1
                written += 1
            log.info("%s: %d/%d questions, %d pairs", name, start + len(batch), len(qs), written)
    return written


# -- the reference pass ------------------------------------------------------------------------------


@torch.no_grad()
def score_pairs(trained, data: DataConfig, path: Path, batch_size: int = 8, settings=None,
                name: str = "pairs") -> tuple[list, dict, dict]:
    """Every pair of the preference file ``path`` scored by ``trained``: ([(record, log-prob of
    chosen, of rejected)], skipped counts per reason, the data settings used). Eval mode, no JPEG
    re-encoding; ``settings``: the dataset's config (tiling: n_max, min_tiles, template) as
    training reads it, None: the defaults ``data=single data.path=<path>`` trains with."""
    from vlmtrain.training.preference import pair_logps, sample_logps

    model, cfg = trained.model, trained.model_cfg
    settings = settings or DatasetConfig(path=str(path))
    entry = {"path": str(path), "format": "preference", "jpeg_augment": False, "n_max": settings.n_max,
             "min_tiles": settings.min_tiles, "template": settings.template, "system": settings.system}
    one = DataConfig(**{**{k: getattr(data, k) for k in ("template", "system", "tile_size", "use_thumbnail",
                                                          "fast_resize", "max_seq_len", "min_frames", "max_frames",
                                                          "image_mode")},
                        "datasets": {name: entry}, "too_long": "skip", "on_error": "skip"})
    ds = MixtureDataset(one, trained.tokenizer, image_layout(cfg), training=False)
    source = ds.sources[0]
    source.reference = None  # scored afresh here (a table beside the data must match the settings)
    device = next(model.parameters()).device
    model.eval()
    rows, pending, skipped = [], [], {}

    def flush():
        if not pending:
            return
        mb = pad_pairs([p for _, p in pending], trained.tokenizer.pad_token_id, cfg.vision.image_size).to(device)
        values = pair_logps(sample_logps(model, mb), mb).float().cpu()
        rows.extend((record, float(v[0]), float(v[1])) for (record, _), v in zip(pending, values))
        pending.clear()

    for i in range(len(ds)):
        sample = ds.load(i)
        if isinstance(sample, Skipped):
            skipped[sample.reason] = skipped.get(sample.reason, 0) + 1
            continue
        assert isinstance(sample, PairSample)
        pending.append((source.records[int(source.indices[i])], sample))
        if len(pending) >= batch_size:
            flush()
    flush()
    return rows, skipped, ds.reference_settings(source)


def reference_logps(trained, data: DataConfig, name: str, path: Path, batch_size: int, ckpt: str,
                    settings=None) -> Path:
    """The first pass of ``stage/reference=precomputed``: ``score_pairs`` by the reference
    checkpoint, written to ``<path>.ref.jsonl`` beside the data with the settings it used."""
    stale = reference_path(path)
    if stale.is_file():  # computed again: the old table must not be checked against the new settings
        stale.unlink()
    rows, skipped, used = score_pairs(trained, data, path, batch_size, settings, name)
    out = write_reference(path, rows, {"ckpt": ckpt, "pairs": len(rows), "skipped": skipped, "settings": used})
    log.info("reference log-probs of %d pairs: %s (skipped: %s)", len(rows), out, skipped or "none")
    return out


# -- the command -------------------------------------------------------------------------------------


def build_pairs(cfg: DictConfig) -> dict:
    opts: PairOptions = OmegaConf.to_object(cfg.pairs)
    if opts.samples < 1 or not 0.0 <= opts.truncate < 1.0:
        raise UserError("pairs.samples must be >= 1 and pairs.truncate in [0, 1)")
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    trained = load_trained(cfg.ckpt)
    with open_dict(cfg):
        cfg.model = OmegaConf.to_container(trained.model_cfg, resolve=True)
    data: DataConfig = OmegaConf.to_object(cfg.data)
    if not data.datasets:
        raise UserError("data.datasets is empty: name at least one dataset")
    device = resolve_device(cfg.device)
    trained.model.to(device)
    summary: dict = {"ckpt": str(cfg.ckpt), "mode": opts.mode, "datasets": {}}
    if opts.mode == "reference":
        for name, d in data.datasets.items():
            d = dataset_config(name, d)
            path = Path(d.path).expanduser()
            if not path.is_file() or guess_format(path) != "preference":
                raise UserError(f"data.datasets.{name}.path: {path} is not a preference jsonl (chosen/rejected lines)")
            summary["datasets"][name] = str(reference_logps(trained, data, name, path, opts.batch_size, str(cfg.ckpt), d))
        print(json.dumps(summary, indent=2))
        return summary
    if not cfg.out:
        raise UserError("out is required in pairs.mode=build: add out=DIR")
    out_dir = Path(cfg.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, d in data.datasets.items():
        d = dataset_config(name, d)
        frames = d.max_frames if d.max_frames is not None else data.max_frames
        engine = InferenceEngine(trained, max_tiles=d.n_max, num_frames=frames, template=d.template or data.template,
                                 system=data.system, device=device)
        counts: dict = {}
        out_file = out_dir / f"{name}.jsonl"
        n = build_dataset_pairs(engine, name, d, opts, str(cfg.ckpt), out_file, counts)
        entry = {"file": str(out_file), "pairs": n, "counts": counts}
        if opts.reference and n:
            entry["reference"] = str(reference_logps(trained, data, name, out_file, opts.batch_size, str(cfg.ckpt)))
        summary["datasets"][name] = entry
    summary["options"] = OmegaConf.to_container(cfg.pairs, resolve=True)
    (out_dir / "pairs.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
