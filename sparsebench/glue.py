"""GLUE fine-tuning of a sparse model with its mask kept fixed (``sparsebench eval --glue``).

A sequence-classification head (``AutoModelForSequenceClassification``: the last non-padding
token's hidden state → a linear layer) is put on the exported model; every step zeroes the
gradients of pruned weights and the weights themselves stay exactly zero, so the fine-tuned model
has the run's sparsity pattern. Metrics are GLUE's: accuracy, F1 (QQP) and Matthews correlation
(CoLA), on the development set (MNLI: matched).

Data: the Hugging Face Hub (``datasets.load_dataset("glue", task)``) or a local folder in GLUE's
own TSV layout (``--glue-dir``: ``SST-2/train.tsv``, ``SST-2/dev.tsv``, ``MNLI/dev_matched.tsv``, ...).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sparsebench.errors import SparsebenchError


class GlueError(SparsebenchError):
    """GLUE data that cannot be found or read, or a task name that does not exist."""


@dataclass(frozen=True)
class GlueTask:
    name: str  # the hub's config name
    folder: str  # GLUE's folder name
    dev_file: str
    hub_dev: str
    hub_columns: tuple[str, Optional[str]]
    tsv_columns: tuple[Any, Optional[Any], Any]  # text a, text b, label (names, or indices without header)
    header: bool
    labels: dict[str, int]  # the TSV's label strings → the hub's label ids
    metric: str


_BINARY = {"0": 0, "1": 1}
TASKS: dict[str, GlueTask] = {
    "mnli": GlueTask("mnli", "MNLI", "dev_matched.tsv", "validation_matched", ("premise", "hypothesis"),
                     ("sentence1", "sentence2", "gold_label"), True,
                     {"entailment": 0, "neutral": 1, "contradiction": 2}, "accuracy"),
    "qqp": GlueTask("qqp", "QQP", "dev.tsv", "validation", ("question1", "question2"),
                    ("question1", "question2", "is_duplicate"), True, _BINARY, "f1"),
    "sst2": GlueTask("sst2", "SST-2", "dev.tsv", "validation", ("sentence", None), ("sentence", None, "label"),
                     True, _BINARY, "accuracy"),
    "cola": GlueTask("cola", "CoLA", "dev.tsv", "validation", ("sentence", None), (3, None, 1), False,
                     _BINARY, "matthews"),
    "rte": GlueTask("rte", "RTE", "dev.tsv", "validation", ("sentence1", "sentence2"),
                    ("sentence1", "sentence2", "label"), True, {"entailment": 0, "not_entailment": 1}, "accuracy"),
}
# Examples: (text a, text b or None, label id)
Example = tuple[str, Optional[str], int]


def parse_tasks(text: str) -> list[GlueTask]:
    """``"sst2,cola"`` or ``"all"`` → tasks; an unknown name is a one-line error listing them."""
    names = list(TASKS) if text.strip() == "all" else [t.strip().lower().replace("-", "") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise GlueError(f"--glue: unknown task '{unknown[0]}'. Allowed: {', '.join(TASKS)}, all")
    return [TASKS[n] for n in names]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load_task(task: GlueTask, glue_dir: Optional[Path]) -> tuple[list[Example], list[Example]]:
    """(train, dev) examples from ``glue_dir`` if given, else from the Hugging Face Hub."""
    if glue_dir is not None:
        folder = Path(glue_dir) / task.folder
        return _read_tsv(folder / "train.tsv", task), _read_tsv(folder / task.dev_file, task)
    try:
        from datasets import load_dataset

        ds = load_dataset("glue", task.name)
    except Exception as exc:  # no network, HF_DATASETS_OFFLINE, a missing cache: all look different
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise GlueError(
            f"GLUE task '{task.name}': cannot load it from the Hugging Face Hub ({first}). Go online "
            f"(datasets.load_dataset('glue', '{task.name}')), or pass --glue-dir DIR with GLUE's TSV files "
            f"(DIR/{task.folder}/train.tsv and DIR/{task.folder}/{task.dev_file})"
        ) from None
    a, b = task.hub_columns
    train, dev = ([(r[a], r[b] if b else None, int(r["label"])) for r in ds[split]] for split in ("train", task.hub_dev))
    return train, dev


def _read_tsv(path: Path, task: GlueTask) -> list[Example]:
    if not path.is_file():
        raise GlueError(f"GLUE task '{task.name}': {path} not found (GLUE's layout: {task.folder}/train.tsv, "
                        f"{task.folder}/{task.dev_file}); or omit --glue-dir to load it from the Hugging Face Hub")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        header, rows = rows[0], rows[1:]
        try:
            a, b, y = (header.index(c) if c is not None else None for c in task.tsv_columns)
        except ValueError:
            raise GlueError(f"{path}: expected columns {', '.join(c for c in task.tsv_columns if c)}; "
                            f"found {', '.join(header)}") from None
    else:
        a, b, y = task.tsv_columns
    out = []
    for i, row in enumerate(rows):
        if len(row) <= max(i for i in (a, b, y) if i is not None):
            continue  # GLUE's own files have a few malformed lines; the reference loaders skip them
        label = task.labels.get(row[y].strip())
        if label is None:
            raise GlueError(f"{path}: line {i + 1 + task.header}: label '{row[y]}' is not one of {', '.join(task.labels)}")
        out.append((row[a], row[b] if b is not None else None, label))
    if not out:
        raise GlueError(f"{path}: no examples")
    return out


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    y, p = np.asarray(labels), np.asarray(predictions)
    return float((y == p).mean())


def f1_binary(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """F1 of the positive class (1), as GLUE reports it for QQP and MRPC."""
    y, p = np.asarray(labels), np.asarray(predictions)
    tp = int(((p == 1) & (y == 1)).sum())
    denominator = int((p == 1).sum()) + int((y == 1).sum())
    return 2 * tp / denominator if denominator else 0.0


def matthews(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Matthews correlation (multi-class form, as scikit-learn); 0 when undefined."""
    y, p = np.asarray(labels), np.asarray(predictions)
    k = int(max(y.max(initial=0), p.max(initial=0))) + 1
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y, p), 1)
    t, q, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = math.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - t @ q) / denominator) if denominator else 0.0


def scores(task: GlueTask, labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    out = {"accuracy": accuracy(labels, predictions)}
    if task.metric == "f1":
        out["f1"] = f1_binary(labels, predictions)
    if task.metric == "matthews":
        out["matthews"] = matthews(labels, predictions)
    return out


# --------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneOptions:
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 32
    max_len: int = 128
    max_train: Optional[int] = None  # the first N training examples (quick runs)
    seed: int = 0
    device: str = "cpu"


def encode(examples: list[Example], tokenize: Callable[[str], list[int]], max_len: int, pad_id: int):
    """Token ids (pair texts joined by a newline), truncated to ``max_len`` and right-padded."""
    ids = [tokenize(a if b is None else f"{a}\n{b}")[:max_len] or [pad_id] for a, b, _ in examples]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    return input_ids, attention, torch.tensor([y for _, _, y in examples])


def finetune(
    model_dir: Path,
    masks: dict[str, torch.Tensor],
    task: GlueTask,
    train: list[Example],
    dev: list[Example],
    tokenize: Callable[[str], list[int]],
    pad_id: int,
    options: FinetuneOptions,
) -> dict[str, Any]:
    """Fine-tune the exported model at ``model_dir`` on ``train`` with ``masks`` fixed; score ``dev``."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(options.seed)  # the new head's initialisation
    n_labels = max(task.labels.values()) + 1
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_labels, pad_token_id=pad_id)
    device = torch.device(options.device)
    model.to(device).train()
    params = dict(model.named_parameters())
    fixed = {name: m.to(device, torch.bool) for name, m in masks.items() if name in params}
    if len(fixed) != len(masks):
        raise GlueError(f"{model_dir}: the classification model lacks masked weights "
                        f"({', '.join(sorted(set(masks) - set(fixed))[:3])})")
    train = train[: options.max_train] if options.max_train else train
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    options = dataclasses.replace(options, max_len=min(options.max_len, positions or options.max_len))
    x, attention, y = encode(train, tokenize, options.max_len, pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(options.seed)
    steps = 0
    for _ in range(options.epochs):
        for idx in torch.randperm(len(train), generator=generator).split(options.batch_size):
            out = model(input_ids=x[idx].to(device), attention_mask=attention[idx].to(device), labels=y[idx].to(device))
            out.loss.backward()
            with torch.no_grad():
                for name, mask in fixed.items():  # pruned weights get no update (and no Adam state)
                    params[name].grad.mul_(mask)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, mask in fixed.items():  # weight decay or rounding never revives them
                    params[name].masked_fill_(~mask, 0.0)
            steps += 1
    predictions = predict(model, dev, tokenize, pad_id, options)
    labels = [label for _, _, label in dev]
    result = scores(task, labels, predictions)
    density = sum(int((params[n] != 0).sum()) for n in fixed) / max(sum(m.numel() for m in fixed.values()), 1)
    return {"score": result[task.metric], "metric": task.metric, **result, "n_train": len(train), "n_dev": len(dev),
            "epochs": options.epochs, "lr": options.lr, "steps": steps, "density": density}


@torch.no_grad()
def predict(model, examples: list[Example], tokenize, pad_id: int, options: FinetuneOptions) -> list[int]:
    model.eval()
    device = next(model.parameters()).device
    out: list[int] = []
    for start in range(0, len(examples), options.batch_size):
        x, attention, _ = encode(examples[start : start + options.batch_size], tokenize, options.max_len, pad_id)
        logits = model(input_ids=x.to(device), attention_mask=attention.to(device)).logits
        out += logits.argmax(-1).tolist()
    return out
