"""Offline test fixtures for I/O: a tiny trained tokenizer (vocab 128), tiny saved model folders, and the `surgeon`
command (in process and as a subprocess)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from tiny_models import VOCAB, tiny_model

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A pruned network keeps most of its accuracy.",
    "Pruning removes weights from a neural network while keeping its loss low.",
    "Language models predict the next token; perplexity measures how surprised they are.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-=",
]

TEXT = (
    "Surgery on language models removes structure while keeping the loss low.\n"
    "The curvature of the loss tells which weights matter.\n"
    "\n"
    "Windows of tokens are cut without overlap, and the remainder is dropped.\n"
) * 20


def tiny_tokenizer():
    """A byte-free BPE tokenizer with exactly VOCAB tokens, trained on CORPUS (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "<s>", "</s>"], limit_alphabet=80,
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    assert tk.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def save_tiny(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random model + tiny tokenizer as a HF folder at ``path``."""
    from surgeon.models import save_model

    model = tiny_model(family, seed=seed)
    save_model(model, tiny_tokenizer(), path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


_NOUNS = ["fox", "river", "garden", "teacher", "engine", "village", "letter", "window", "market", "bridge", "forest",
          "doctor", "castle", "harbor", "student", "mountain", "kitchen", "painter", "soldier", "library"]
_VERBS = ["watched", "crossed", "painted", "followed", "opened", "visited", "repaired", "described", "carried",
          "found"]
_ADJS = ["quiet", "old", "bright", "narrow", "famous", "small", "distant", "careful", "broken", "early"]


def synthetic_prose(paragraphs: int = 40, seed: int = 0, marker: str | None = None) -> str:
    """WikiText-like prose: one long paragraph per line, blank lines between, a heading now and then."""
    rng = random.Random(seed)

    def sentence() -> str:
        s = f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}"
        for _ in range(rng.randrange(0, 4)):
            s += f" near the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}"
        if marker:
            s += f" in {marker}"
        return s[0].upper() + s[1:] + " ."

    lines = []
    for i in range(paragraphs):
        if i % 10 == 0:
            lines.append(f" = Section {i} = ")
        lines.append(" ".join(sentence() for _ in range(rng.randrange(6, 10))))
    return "\n\n".join(lines) + "\n"


# the `surgeon` command as a child process (python -m surgeon_cli)
SURGEON_COMMAND = [sys.executable, "-m", "surgeon_cli"]


def surgeon(*args) -> int:
    """Run the `surgeon` command in this process with ``args`` (stdout/stderr as the command writes them); returns
    its exit status."""
    from surgeon_cli.main import main

    return main([str(a) for a in args])


def zeroshot_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(text file, folder of two local lm-eval tasks made from its held-out part, tiny model folder)."""
    from surgeon import zeroshot

    text = tmp_path_factory.mktemp("zs-text") / "story.txt"
    text.write_text(synthetic_prose(40, seed=1, marker="Zanzibar") + synthetic_prose(40, seed=2))
    tasks = tmp_path_factory.mktemp("zs") / "tasks"
    zeroshot.make_task("lastword", text, tasks, name="lw", n=12, seed=0, holdout=0.3)
    zeroshot.make_task("choice", text, tasks, name="mc", n=12, seed=0, holdout=0.3)
    return text, tasks, save_tiny(tmp_path_factory.mktemp("zs-model") / "tiny")


def run_inputs(root: Path) -> dict:
    """A tiny model and a text file under ``root``: the inputs of :func:`tiny_recipe`."""
    text = root / "text.txt"
    text.write_text(TEXT)
    return {"root": root, "model": save_tiny(root / "tiny"), "text": text}


def tiny_recipe(inputs: dict, **kw) -> dict:
    """Three shots to 70% size on 4 x 16 tokens, evaluated at 80% and at the end."""
    return {"model": str(inputs["model"]),
            "method": {"name": "llm-surgeon", "structure": "unstructured", "target_size": 0.7, "shots": 3},
            "calibration": {"data": str(inputs["text"]), "nsamples": 4, "seqlen": 16},
            "eval": {"data": str(inputs["text"]), "max_windows": 4, "at": [0.8]},
            "compute": {"threads": 1}, **kw}
