"""Zero-shot accuracy with lm-eval: offline tasks made from any text file, and evaluation of an in-memory model.

Tasks. ``make_task(kind, text, output_dir)`` turns the held-out end of a text file (``holdout``: the last fraction of
its characters, cut at a line start; by default the last 20%) into an lm-eval task: ``NAME.jsonl`` (the documents)
and ``NAME.yaml`` (the task, reading the jsonl through the local ``json`` builder by absolute path), so
``TaskManager(include_path=DIR)`` finds it offline. Documents are drawn with ``random.Random(seed)``: the same text,
kind, ``n`` and seed give byte-identical files.

- ``lastword`` (LAMBADA-style): a passage of whole sentences from one paragraph (about 40-150 words) without its
  last word; the target is that word (letters only, 3+ characters). ``output_type: loglikelihood``; metrics ``acc``
  (the word is the greedy continuation, every token of it) and ``perplexity`` (of the target word).
- ``choice`` (HellaSwag/StoryCloze-style): one to a few sentences of a paragraph as context; choices are the true
  next sentence and ``choices - 1`` sentences of similar length from other paragraphs of the held-out text.
  ``output_type: multiple_choice``; metrics ``acc`` and ``acc_norm`` (log-likelihood per byte).

Paragraphs: blocks separated by blank lines; a block whose lines are long (median over 200 characters, e.g.
WikiText's one paragraph per line) is split into its lines. Units without sentence-final punctuation or with fewer
than 8 words (headings, code, lists) are skipped; sentences are split after ``.``/``!``/``?`` before a capital.

Evaluation. ``evaluate_model(model, tokenizer, tasks, task_dir=...)`` runs ``lm_eval.simple_evaluate`` on the
model object through ``HFLM`` (no reload from disk), one task at a time (so each task is timed), and returns
per-task metrics (``acc``, ``acc_stderr``, ``acc_norm``, ...), their mean ``acc`` over tasks and the merged lm-eval
results (without per-sample logs). ``standard`` in a task list expands to :data:`STANDARD_SUITE`, the usual suite
of pruning papers (needs the Hugging Face Hub or its datasets cache).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import random
import re
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import yaml

from .errors import SurgeonError
from .models import load_model
from .utils import atomic_write, cache_dir, sha256_file

__all__ = ["KINDS", "STANDARD_SUITE", "read_heldout", "paragraphs", "sentences", "lastword_docs", "choice_docs",
           "make_task", "parse_tasks", "local_tasks", "task_fingerprint", "evaluate_model", "evaluate_dir",
           "task_metrics", "average_accuracy"]

KINDS = ("lastword", "choice")
STANDARD_SUITE = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa",
                  "lambada_openai")
SUITE_ALIAS = "standard"
LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}
DEFAULT_HOLDOUT = 0.2

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_FINAL = re.compile(r"[.!?][\"')\]]*$")
_TRAILING_PUNCT = re.compile(r"[\s.,;:!?\"')\]]+$")
_WORD = re.compile(r"[A-Za-z]{3,}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------------------ text

def read_heldout(path: str | os.PathLike, holdout: float = DEFAULT_HOLDOUT) -> str:
    """The last ``holdout`` fraction of a text file's characters, starting at a line boundary (1.0: all of it)."""
    if not 0.0 < holdout <= 1.0:
        raise SurgeonError(f"holdout must be in (0, 1] (fraction at the end of the file), got {holdout}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise SurgeonError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if holdout >= 1.0:
        return text
    lines = text.splitlines(keepends=True)
    cut, seen = (1.0 - holdout) * len(text), 0
    for i, line in enumerate(lines):
        if seen >= cut:
            return "".join(lines[i:])
        seen += len(line)
    return ""


def paragraphs(text: str, min_words: int = 8) -> list[str]:
    """Prose paragraphs of ``text``, whitespace collapsed (see the module docstring for the rules)."""
    out = []
    for block in re.split(r"\n[ \t\r]*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        units = lines if statistics.median(len(ln) for ln in lines) > 200 else [" ".join(lines)]
        for unit in units:
            unit = " ".join(unit.split())
            if len(unit.split()) >= min_words and _FINAL.search(unit):
                out.append(unit)
    return out


def sentences(paragraph: str, min_words: int = 4) -> list[str]:
    """Sentences of a paragraph; fragments shorter than ``min_words`` (e.g. after "Mr.") join the next one."""
    out, carry = [], ""
    for part in _SENTENCE_END.split(paragraph):
        part = f"{carry} {part}".strip() if carry else part.strip()
        if len(part.split()) < min_words:
            carry = part
            continue
        out.append(part)
        carry = ""
    if carry:
        if out:
            out[-1] = f"{out[-1]} {carry}"
        else:
            out.append(carry)
    return out


def _words(s: str) -> int:
    return len(s.split())


# ------------------------------------------------------------------------------------------------ documents

def lastword_docs(text: str, n: int, seed: int = 0, *, min_words: int = 40, max_words: int = 150) -> list[dict]:
    """Up to ``n`` LAMBADA-style documents ``{"context", "target"}`` (target = " word") from ``text``."""
    candidates = []
    for para in paragraphs(text):
        sents = sentences(para)
        for end in range(len(sents)):
            body = _TRAILING_PUNCT.sub("", sents[end])
            head, _, last = body.rpartition(" ")
            if not head or not _WORD.fullmatch(last):
                continue
            start, words = end, _words(head)
            while start > 0 and words < min_words:
                start -= 1
                words += _words(sents[start])
            if not min_words <= words + 1 <= max_words:
                continue
            context = " ".join([*sents[start:end], head])
            candidates.append({"context": context, "target": f" {last}"})
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(candidates)), min(n, len(candidates))))
    return [candidates[i] for i in picked]


def choice_docs(text: str, n: int, seed: int = 0, *, num_choices: int = 4, context_words: int = 30,
                max_sentence_words: int = 60) -> list[dict]:
    """Up to ``n`` documents ``{"context", "choices", "label"}``: the true next sentence among distractors."""
    if num_choices < 2:
        raise SurgeonError(f"a choice task needs at least 2 choices, got {num_choices}")
    paras = [sentences(p) for p in paragraphs(text)]
    pool = [(pi, s) for pi, sents in enumerate(paras) for s in sents if _words(s) <= max_sentence_words]
    pool.sort(key=lambda x: _words(x[1]))
    lengths = [_words(s) for _, s in pool]
    candidates = []
    for pi, sents in enumerate(paras):
        for i in range(1, len(sents)):
            if _words(sents[i]) > max_sentence_words:
                continue
            start, words = i - 1, _words(sents[i - 1])
            while start > 0 and words < context_words:
                start -= 1
                words += _words(sents[start])
            candidates.append((pi, " ".join(sents[start:i]), sents[i]))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    docs = []
    for pi, context, true in candidates:
        if len(docs) == n:
            break
        # distractors: sentences of other paragraphs whose length is within a factor 1.5 of the true one
        w = _words(true)
        lo = _bisect(lengths, math.floor(w / 1.5))
        hi = _bisect(lengths, math.ceil(w * 1.5) + 1)
        options = [s for p, s in pool[lo:hi] if p != pi and s != true]
        options = list(dict.fromkeys(options))
        if len(options) < num_choices - 1:
            continue
        choices = rng.sample(options, num_choices - 1)
        label = rng.randrange(num_choices)
        choices.insert(label, true)
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def _bisect(values: list[int], x: int) -> int:
    return bisect.bisect_left(values, x)


# ------------------------------------------------------------------------------------------------ task files

def _task_yaml(kind: str, name: str, data_file: Path, meta: dict) -> str:
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
              "test_split": "test"}
    if kind == "lastword":
        cfg = {**common, "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                               {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}
    else:
        cfg = {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
               "doc_to_target": "label",
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    cfg["metadata"] = {"version": 1.0, **meta}
    header = (f"# lm-eval task made by `surgeon make-task {kind}` from {meta['source']}\n"
              f"# (held-out last {meta['holdout']:g} of the file, seed {meta['seed']}); data: {data_file.name}\n")
    return header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)


def make_task(kind: str, text_path: str | os.PathLike, output_dir: str | os.PathLike, *, name: str | None = None,
              n: int = 500, seed: int = 0, holdout: float = DEFAULT_HOLDOUT, num_choices: int = 4) -> dict:
    """Write the task ``NAME.yaml`` and its documents ``NAME.jsonl`` into ``output_dir`` (each file atomically,
    the data first). Returns ``{"name", "kind", "yaml", "data", "documents", "requested"}``."""
    if kind not in KINDS:
        raise SurgeonError(f"unknown task kind '{kind}' (known: {', '.join(KINDS)})")
    if n < 1:
        raise SurgeonError(f"--n must be at least 1, got {n}")
    text_path = Path(text_path).expanduser()
    name = name or f"{kind}_{re.sub(r'[^A-Za-z0-9_]+', '_', text_path.stem).strip('_').lower() or 'text'}"
    if not _NAME.match(name):
        raise SurgeonError(f"task name '{name}' must be letters, digits, '_', '-' or '.'")
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise SurgeonError(f"output {out} exists and is not a folder")
    text = read_heldout(text_path, holdout)
    if kind == "lastword":
        docs = lastword_docs(text, n, seed)
    else:
        docs = choice_docs(text, n, seed, num_choices=num_choices)
    if not docs:
        raise SurgeonError(f"no {kind} documents found in the held-out last {holdout:g} of {text_path} (it needs "
                           "prose paragraphs of several sentences; try a larger --holdout)")
    out = out.resolve()
    data_file, yaml_file = out / f"{name}.jsonl", out / f"{name}.yaml"
    meta = {"surgeon_kind": kind, "source": str(text_path.resolve()), "source_sha256": sha256_file(text_path),
            "holdout": holdout, "seed": seed, "documents": len(docs)}  # no timestamp: same inputs, same bytes
    if kind == "choice":
        meta["choices"] = num_choices
    atomic_write(data_file, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    atomic_write(yaml_file, _task_yaml(kind, name, data_file, meta))
    return {"name": name, "kind": kind, "yaml": str(yaml_file), "data": str(data_file), "documents": len(docs),
            "requested": n}


# ------------------------------------------------------------------------------------------------ resolving tasks

def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> task names, ``standard`` expanded to the usual suite, duplicates dropped."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in (str(t).strip() for t in items):
        if not item:
            continue
        out.extend(STANDARD_SUITE if item == SUITE_ALIAS else [item])
    if not out:
        raise SurgeonError("no zero-shot tasks given")
    return list(dict.fromkeys(out))


def local_tasks(task_dir: str | os.PathLike | None) -> dict[str, Path]:
    """``{task name: YAML file}`` of the plain task YAMLs under ``task_dir`` (recursively)."""
    if task_dir is None:
        return {}
    root = Path(task_dir).expanduser()
    if not root.is_dir():
        raise SurgeonError(f"task folder not found: {root}")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.yaml")):
        with contextlib.suppress(OSError, yaml.YAMLError, UnicodeDecodeError):
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
                found.setdefault(cfg["task"], path.resolve())
    return found


def _data_files(cfg: dict, yaml_path: Path) -> dict[str, Path]:
    """The local data files a task YAML reads: absolute as written, else relative to the YAML, else the file of
    that name next to the YAML (a task folder that was moved)."""
    files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) or {}
    if isinstance(files, (str, list)):
        files = {"test": files}
    out = {}
    for split, value in files.items():
        if not isinstance(value, str):
            continue
        p = Path(value).expanduser()
        p = p if p.is_absolute() else yaml_path.parent / p
        if not p.exists() and (yaml_path.parent / p.name).exists():
            p = yaml_path.parent / p.name
        if not p.exists():
            raise SurgeonError(f"task {cfg.get('task')}: data file {value} not found (named in {yaml_path})")
        out[split] = p
    return out


def _plain_yaml(path: Path) -> dict | None:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # e.g. !function tags: lm-eval reads it itself
    return cfg if isinstance(cfg, dict) else None


def task_fingerprint(tasks: list[str], task_dir: str | os.PathLike | None, limit: int | None = None) -> str:
    """What determines zero-shot results besides the weights: task names, the bytes of local task YAMLs and their
    data files, ``limit``, the lm-eval version and this module's source (for cache keys)."""
    local = local_tasks(task_dir)
    h = hashlib.sha256()
    h.update(json.dumps([parse_tasks(tasks), limit, version("lm_eval")]).encode())
    h.update(Path(__file__).read_bytes())
    for name in parse_tasks(tasks):
        if name in local:
            h.update(local[name].read_bytes())
            cfg = _plain_yaml(local[name]) or {}
            for split, p in sorted(_data_files(cfg, local[name]).items()):
                h.update(f"{split}\t{sha256_file(p)}".encode())
    return h.hexdigest()[:32]


def _resolve(tasks: list[str], task_dir) -> tuple[object, list]:
    """A TaskManager (built-in tasks only when needed) and the specs to load: local plain YAMLs as inline configs
    with their data file paths resolved and the datasets cache under ``$SURGEON_CACHE``; other names as is."""
    from lm_eval.tasks import TaskManager  # lazy: lm-eval is heavy and only zero-shot evaluation needs it

    local = local_tasks(task_dir)
    include = str(Path(task_dir).expanduser()) if task_dir is not None else None
    need_defaults = any(t not in local for t in tasks)
    tm = TaskManager(include_path=include, include_defaults=need_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        where = f"{task_dir} has: {', '.join(sorted(local)) or 'no tasks'}" if task_dir is not None else \
            "no --task-dir given"
        raise SurgeonError(f"unknown lm-eval task(s) {', '.join(unknown)} ({where}; make one with "
                           "`surgeon make-task`)")
    specs: list = []
    for t in tasks:
        cfg = _plain_yaml(local[t]) if t in local else None
        if cfg is not None and cfg.get("dataset_path") in LOCAL_BUILDERS and "include" not in cfg:
            files = _data_files(cfg, local[t])
            kwargs = dict(cfg.get("dataset_kwargs") or {})
            kwargs["data_files"] = {k: str(v) for k, v in files.items()}
            kwargs.setdefault("cache_dir", str(cache_dir("datasets")))
            specs.append({**cfg, "dataset_kwargs": kwargs})
        else:
            specs.append(t)
    return tm, specs


# ------------------------------------------------------------------------------------------------ evaluation

def task_metrics(results: dict, task: str) -> dict:
    """``{"acc": ..., "acc_stderr": ..., ...}`` of one task from lm-eval's results (filter ``none`` dropped)."""
    out = {}
    for key, value in (results.get("results", {}).get(task) or {}).items():
        metric, _, flt = key.partition(",")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            continue
        if metric != "sample_len":  # lm-eval's document count: "n" below
            out[metric if flt in ("", "none") else f"{metric}/{flt}"] = float(value)
    samples = (results.get("n-samples") or {}).get(task) or {}
    if "effective" in samples:
        out["n"] = int(samples["effective"])
    return out


def average_accuracy(tasks: dict[str, dict]) -> float | None:
    """Mean ``acc`` over the tasks that report it (the zero-shot average of pruning papers)."""
    accs = [m["acc"] for m in tasks.values() if "acc" in m]
    return sum(accs) / len(accs) if accs else None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.WARNING):
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def evaluate_model(model, tokenizer, tasks: str | list[str], *, task_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 1, log=None) -> dict:
    """Zero-shot evaluation of an in-memory Hugging Face causal LM with ``lm_eval.simple_evaluate``.

    Returns ``{"tasks": {name: {metric: value, "n": docs, "seconds": s}}, "average": mean acc, "seconds": total,
    "results": lm-eval's results (all tasks merged, no per-sample logs)}``. ``log(msg)`` gets one line per task.
    """
    import lm_eval  # lazy: lm-eval is heavy and only zero-shot evaluation needs it
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise SurgeonError(f"limit must be at least 1, got {limit}")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap stderr would start a process pool
    t_all = time.perf_counter()
    with _quiet_lm_eval():
        tm, specs = _resolve(names, task_dir)
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        merged: dict = {}
        per_task: dict[str, dict] = {}
        for name, spec in zip(names, specs):
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress; stdout carries results
                    res = lm_eval.simple_evaluate(model=lm, tasks=[spec], task_manager=tm, limit=limit,
                                                  log_samples=False, bootstrap_iters=1000)
            except (ConnectionError, OSError, ValueError, FileNotFoundError) as exc:
                hint = " (the Hugging Face Hub is offline: use local tasks from `surgeon make-task`)" \
                    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") else ""
                raise SurgeonError(f"task {name}: {type(exc).__name__}: {exc}{hint}") from exc
            metrics = task_metrics(res or {}, name)
            for key, value in _jsonable({k: v for k, v in (res or {}).items() if k != "samples"}).items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key].update(value)
                else:
                    merged[key] = value
            metrics["seconds"] = time.perf_counter() - t0
            per_task[name] = metrics
            if log is not None:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("acc", "acc_norm", "perplexity"))
                log(f"{name}: {shown} ({metrics.get('n', '?')} docs, {metrics['seconds']:.1f} s)")
    return {"tasks": per_task, "average": average_accuracy(per_task), "seconds": time.perf_counter() - t_all,
            "limit": limit, "results": merged}


def evaluate_dir(model_dir: str | os.PathLike, tasks: str | list[str], *, task_dir=None, limit: int | None = None,
                 batch_size: int = 1, device: str = "cpu", log=None) -> dict:
    """:func:`evaluate_model` on a saved model folder (loaded once, fp32)."""
    model, tokenizer, _ = load_model(model_dir, dtype=torch.float32, device=device)
    if tokenizer is None:
        raise SurgeonError(f"{model_dir} has no tokenizer; zero-shot tasks need one")
    return evaluate_model(model, tokenizer, tasks, task_dir=task_dir, limit=limit, batch_size=batch_size, log=log)
