"""LLM quality scoring and LLM repetition detection (InternVL 2.5 report: a 0-10 score from a
domain-specific prompt, drop below 7; a repetition prompt with a stricter threshold, 3).

A ``Scorer`` wraps a local causal LM (``filter.scorer.path``; vLLM when it is importable and a GPU
is visible, transformers otherwise) behind a cache: every reply is appended to
``<cache>/<slice>.jsonl`` under a hash of (model, prompt, generation settings) as soon as its
batch is done, so an interrupted run resumes without generating anything it already has. With no
path, a tiny random model is built from ``filter.scorer.tiny`` and the shipped tokenizer and saved
under ``$VLMTRAIN_CACHE`` (like the demo data): it makes the path run end to end, and its scores
mean nothing.

A reply is parsed for a 0-10 score (``Score: 7``, ``7/10``, ``**8**``, a bare number, CJK labels);
one that holds none is counted, kept for review (``review.jsonl``) and, by default, does not
reject the sample.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from vlmtrain.errors import MissingPathError
from vlmtrain.filtering.rules import Finding, Rule, Sample

log = logging.getLogger(__name__)

TINY_VERSION = "filter-scorer-v1"

_LABELLED = re.compile(r"(?:score|rating|grade|分数|评分|得分)(?:\s|\*|:|：|=|\bis\b|\bof\b|\bwould\b|\bbe\b)*"
                       r"(\d+(?:\.\d+)?)", re.IGNORECASE)
_ASIDE = re.compile(r"\([^)]*\)|（[^）]*）")
_OUT_OF = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10(?!\d)", re.IGNORECASE)
_BARE = re.compile(r"^\W*(\d+(?:\.\d+)?)\W*$")


def parse_score(reply: str, lo: float = 0.0, hi: float = 10.0) -> float | None:
    """The score a reply gives, or None: the last labelled score (``Score: 7``, ``a score of 7``;
    asides in parentheses such as ``(0-10)`` are skipped), else the first ``N/10``, else a reply
    that is only a number; values outside [lo, hi] do not count."""
    text = _ASIDE.sub(" ", reply).strip()
    for pattern, pick in ((_LABELLED, -1), (_OUT_OF, 0), (_BARE, 0)):
        found = pattern.findall(text)
        if found:
            value = float(found[pick])
            return value if lo <= value <= hi else None
    return None


def render_conversation(sample: Sample, max_chars: int) -> str:
    """The sample as ``User: ...`` / ``Assistant: ...`` lines; a long one keeps its head and tail
    (loops sit at the end of an answer) around a ``[... N characters cut ...]`` marker."""
    parts = [f"System: {sample.conv.system}"] if sample.conv.system else []
    for user, answer in sample.conv.turns:
        parts += [f"User: {user}", f"Assistant: {answer}"]
    text = "\n".join(parts)
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


# -- the model ------------------------------------------------------------------------------------


def ensure_tiny_scorer(spec: dict) -> Path:
    """A random causal LM from ``spec`` (transformers config fields) with the shipped tokenizer,
    saved under ``$VLMTRAIN_CACHE/filter_scorer`` on first use; returns its directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from vlmtrain.assets import TOKENIZER_DIR
    from vlmtrain.data.synthetic import default_cache_dir

    key = hashlib.sha256(json.dumps([TINY_VERSION, spec], sort_keys=True).encode()).hexdigest()[:12]
    root = default_cache_dir() / "filter_scorer" / f"tiny-{key}"
    if (root / ".complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
        spec = dict(spec)
        config = AutoConfig.for_model(spec.pop("model_type", "llama"), vocab_size=len(tok),
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(TINY_VERSION + "\n")
        tmp.chmod(0o755)
        try:
            os.replace(tmp, root)
        except OSError:  # another process installed it first
            if not (root / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{prompt}\n"


class TransformersGenerator:
    """Greedy batched generation with transformers (left padding, prompts sorted by length)."""

    def __init__(self, path: str, batch_size: int, max_new_tokens: int, device: str = "auto", dtype=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs).to(self.device).eval()
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def generate(self, prompts: list[str]) -> list[str]:
        texts = [_chat(self.tok, p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            # a chat template writes its own BOS; a plain prompt gets the tokenizer's
            enc = self.tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=not getattr(self.tok, "chat_template", None))
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with self.torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            replies = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, r in zip(idx, replies):
                out[i] = r
        return out


class VLLMGenerator:
    """Greedy generation with vLLM (continuous batching; the whole list at once)."""

    def __init__(self, path: str, batch_size: int, max_new_tokens: int, device: str = "auto", dtype=None):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=str(path), dtype=dtype or "auto", max_num_seqs=batch_size)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.tok = self.llm.get_tokenizer()

    def generate(self, prompts: list[str]) -> list[str]:
        outs = self.llm.generate([_chat(self.tok, p) for p in prompts], self.params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


BACKENDS = {"transformers": TransformersGenerator, "vllm": VLLMGenerator}


def _vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def model_fingerprint(path: Path) -> str:
    """The model's identity for the cache: its path, config and weight files' sizes."""
    parts = [str(path.resolve())]
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        parts.append(f"{f.name}:{f.stat().st_size}")
        if f.name == "config.json":
            parts.append(hashlib.sha256(f.read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class ScoreCache:
    """Replies by key, from every ``*.jsonl`` under ``folder``; new ones go to ``<name>.jsonl``,
    flushed and synced after each batch, so a killed run loses at most the batch in flight (a torn
    last line is ignored on reading)."""

    def __init__(self, folder: Path, name: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, str] = {}
        for f in sorted(self.folder.glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self.path = self.folder / f"{name}.jsonl"

    def add(self, items: list[tuple[str, str]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for key, reply in items:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
                self.entries[key] = reply
            f.flush()
            os.fsync(f.fileno())


class Scorer:
    """A local causal LM behind a reply cache. The model loads on the first prompt it lacks, so a
    resumed run whose replies are all cached never loads it."""

    def __init__(self, path: str | None = None, backend: str = "auto", batch_size: int = 16,
                 max_new_tokens: int = 16, max_sample_chars: int = 8000, device: str = "auto",
                 dtype: str | None = None, cache: str | None = None, tiny: dict | None = None):
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"filter.scorer.backend must be auto or one of {sorted(BACKENDS)}, got {backend!r}")
        self.tiny = path is None
        self.path = Path(path).expanduser() if path else ensure_tiny_scorer(tiny or {})
        if not self.path.is_dir():
            raise MissingPathError(f"filter.scorer.path: {self.path} is not a model directory")
        self.backend = backend if backend != "auto" else ("vllm" if _vllm_usable() else "transformers")
        self.batch_size, self.max_new_tokens, self.max_sample_chars = batch_size, max_new_tokens, max_sample_chars
        self.device, self.dtype, self.cache_dir = device, dtype, cache
        self.fingerprint = model_fingerprint(self.path)
        self.cache: ScoreCache | None = None
        self._generator: Any = None
        self.generated = self.cached = 0

    def open_cache(self, default_folder: Path, name: str) -> None:
        self.cache = ScoreCache(Path(self.cache_dir).expanduser() if self.cache_dir else default_folder, name)

    def key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.fingerprint, self.max_new_tokens, prompt]).encode()).hexdigest()

    def replies(self, prompts: list[str]) -> list[str]:
        if self.cache is None:
            raise RuntimeError("Scorer.open_cache must be called before scoring")
        keys = [self.key(p) for p in prompts]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.cache.entries}.values())
        self.cached += len(prompts) - len(todo)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            if self._generator is None:
                log.info("loading scorer %s (%s)", self.path, self.backend)
                self._generator = BACKENDS[self.backend](str(self.path), self.batch_size, self.max_new_tokens,
                                                         self.device, self.dtype)
            got = self._generator.generate([prompts[i] for i in chunk])
            self.cache.add([(keys[i], r) for i, r in zip(chunk, got)])
            self.generated += len(chunk)
        return [self.cache.entries[k] for k in keys]


# -- the rules ------------------------------------------------------------------------------------


class BatchRule(Rule):
    """A rule that scores samples in batches with the shared ``Scorer``."""

    kind = "batch"

    def check_batch(self, samples: list[Sample], scorer: Scorer) -> list[Finding | None]:
        raise NotImplementedError


class LLMRule(BatchRule):
    """Score = the LLM's 0-10 reply to ``prompt`` (``{conversation}`` stands for the sample);
    fires below ``threshold``. ``applies_to``: ``text`` (text-only samples), ``multimodal`` or
    ``all``. ``on_unparseable``: ``keep`` (count it, keep it for review) or ``reject``."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), threshold: float = 7.0, applies_to: str = "all",
                 on_unparseable: str = "keep", prompt: str = "", prompts: dict | None = None,
                 domains: dict | None = None, default_domain: str = "general"):
        super().__init__(name, exempt)
        if applies_to not in ("text", "multimodal", "all"):
            raise ValueError(f"applies_to must be text, multimodal or all, got {applies_to!r}")
        if on_unparseable not in ("keep", "reject"):
            raise ValueError(f"on_unparseable must be keep or reject, got {on_unparseable!r}")
        self.prompts = dict(prompts or {})
        if prompt:
            self.prompts.setdefault(default_domain, prompt)
        self.domains, self.default_domain = dict(domains or {}), default_domain
        for domain in [default_domain, *self.domains.values()]:
            if domain not in self.prompts:
                raise ValueError(f"no prompt for domain {domain!r}; prompts: {sorted(self.prompts)}")
        for domain, p in self.prompts.items():
            if "{conversation}" not in p:
                raise ValueError(f"the {domain!r} prompt lacks the {{conversation}} placeholder")
        self.threshold, self.applies_to, self.on_unparseable = threshold, applies_to, on_unparseable

    def domain_of(self, dataset: str) -> str:
        """The first ``domains`` pattern (fnmatch on the dataset name) that matches, else the default."""
        return next((d for pattern, d in self.domains.items() if fnmatch(dataset, pattern)), self.default_domain)

    def applies(self, sample: Sample) -> bool:
        return self.applies_to == "all" or (self.applies_to == "multimodal") == sample.multimodal

    def check_batch(self, samples, scorer):
        todo = [s for s in samples if self.applies(s)]
        domains = [self.domain_of(s.dataset) for s in todo]
        prompts = [self.prompts[d].replace("{conversation}", render_conversation(s, scorer.max_sample_chars))
                   for s, d in zip(todo, domains)]
        by_id = {}
        for s, d, reply in zip(todo, domains, scorer.replies(prompts)):
            score = parse_score(reply)
            if score is None:
                by_id[id(s)] = Finding(self.on_unparseable == "reject", None, {"domain": d, "unparseable": True},
                                       group=d, review=reply)
            else:
                by_id[id(s)] = Finding(score < self.threshold, score, {"domain": d, "threshold": self.threshold},
                                       group=d)
        return [by_id.get(id(s)) for s in samples]


class LLMQuality(LLMRule):
    """0-10 quality from the prompt of the sample's domain (``domains``: dataset pattern -> domain)."""


class LLMRepetition(LLMRule):
    """0-10 freedom from repetition (10: none) from one prompt; fires below the stricter threshold."""

    def __init__(self, name: str = "", exempt: Sequence[str] = (), threshold: float = 3.0, applies_to: str = "all",
                 on_unparseable: str = "keep", prompt: str = ""):
        super().__init__(name, exempt, threshold, applies_to, on_unparseable, prompts={"repetition": prompt},
                         default_domain="repetition")
