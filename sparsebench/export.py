"""``sparsebench export``: a finished run as a Hugging Face ``save_pretrained`` folder.

The folder holds the model (``config.json`` + ``model.safetensors``) with every pruned weight
exactly zero, a tokenizer where the run had one (HF tokenizers as they were; the run's own
``bytes``, ``char`` and ``bpe:<vocab>`` tokenizers converted to a ``PreTrainedTokenizerFast``
that encodes identically; synthetic data has none), ``masks.pt`` and ``sparsebench.json`` (the
run it came from and its validation loss). ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it.

The final weights come from the run's newest checkpoint (written at the last step; a run with
``training.keep_checkpoints: 0`` keeps none and cannot be exported).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from sparsebench.errors import SparsebenchError

INFO_FILE = "sparsebench.json"


class ExportError(SparsebenchError):
    """A run folder that cannot be exported (unfinished, no checkpoint, not a run)."""


@dataclass
class LoadedRun:
    """A finished run rebuilt in memory: its config, data, final weights (masked) and masks."""

    run_dir: Path
    config: Any  # RunConfig
    summary: dict
    data: Any  # TokenSplits
    model: torch.nn.Module
    masks: dict[str, torch.Tensor]


def read_run_config(run_dir: Path):
    from sparsebench.config import RunConfig

    path = Path(run_dir) / "config.yaml"
    try:
        return RunConfig(**yaml.safe_load(path.read_text(encoding="utf-8")))
    except OSError:
        raise ExportError(f"{run_dir}: no config.yaml (is it a run's folder, OUT/<suite>/<run-id>?)") from None
    except Exception as exc:
        raise ExportError(f"{path}: not a sparsebench run config ({type(exc).__name__})") from None


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    """Rebuild a finished run's model with its final weights and masks (pruned weights zero)."""
    from sparsebench.checkpoints import CheckpointError, list_checkpoints, read_checkpoint
    from sparsebench.data import load_token_splits
    from sparsebench.models import build_model

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ExportError(f"{run_dir}: no summary.json: the run has not finished") from None
    if summary.get("status") != "ok":
        raise ExportError(f"{run_dir}: the run failed ({summary.get('error')}); nothing to export")
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ExportError(f"{run_dir}: no checkpoint (ckpt-*.pt) holds the final weights; "
                          "runs with training.keep_checkpoints: 0 delete theirs — re-run with keep_checkpoints >= 1")
    step, path = checkpoints[0]
    if step != summary.get("steps"):
        raise ExportError(f"{run_dir}: the newest checkpoint is of step {step}, the run ended at step {summary.get('steps')}")
    try:
        state = read_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(f"{run_dir}: {exc}") from None
    data = load_token_splits(cfg.data)
    model = build_model(cfg.model, data.vocab_size, cfg.data.seq_len)
    model.load_state_dict({k: v.to("cpu") for k, v in state["model"].items()})
    masks = torch.load(run_dir / "masks.pt", map_location="cpu", weights_only=True)
    apply_masks(model, masks)
    return LoadedRun(run_dir, cfg, summary, data, model.to(device).eval(), masks)


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set every pruned weight to exactly +0.0 (a mask name the model lacks is an error)."""
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise ExportError(f"masks.pt names weights the model does not have: {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(~mask.to(params[name].device, torch.bool), 0.0)


def hf_tokenizer(tokenizer: Any, seq_len: int):
    """A ``transformers`` tokenizer that encodes exactly as the run's tokenizer, or ``None``."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer is None:
        return None
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        return hf
    raw = getattr(tokenizer, "backend", None)  # bpe:<vocab>: a `tokenizers` Tokenizer already
    if raw is None and tokenizer.spec == "bytes":
        raw = _byte_tokenizer()
    elif raw is None and tokenizer.spec == "char":
        raw = _char_tokenizer(tokenizer.chars)
    if raw is None:
        return None
    extra = {"unk_token": "<unk>"} if tokenizer.spec == "char" else {}
    newline = tokenizer.encode("\n")
    if len(newline) == 1:  # documents are joined by newlines in sparsebench's text data: the end of a text
        extra["eos_token"] = raw.id_to_token(newline[0])  # (lm-eval-harness needs one to start a context)
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=seq_len, **extra)


def _byte_tokenizer():
    """UTF-8 bytes as ids 0..255: byte-level BPE without merges (GPT-2's byte ↔ character map)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _gpt2_byte_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _gpt2_byte_chars() -> dict[int, str]:
    """Byte → the printable character GPT-2's byte-level encoding shows it as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _char_tokenizer(chars: str):
    """One id per character of the run's alphabet, ``<unk>`` (the last id) for any other."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<unk>"] = len(chars)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def export_run(run_dir: Path, out: Path) -> Path:
    """Write ``run_dir``'s final model as a ``save_pretrained`` folder at ``out``; returns ``out``."""
    loaded = load_run(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise ExportError(f"{out}: exists and is not an earlier export; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out, safe_serialization=True)
    tokenizer = hf_tokenizer(loaded.data.tokenizer, loaded.config.data.seq_len)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    shutil.copyfile(Path(run_dir) / "masks.pt", out / "masks.pt")
    s = loaded.summary
    info = {
        "run_id": s.get("run_id"), "suite": s.get("suite"), "method": s.get("method"), "label": s.get("label"),
        "sparsity_target": s.get("sparsity_target"), "sparsity_actual": s.get("sparsity_actual"),
        "steps": s.get("steps"), "val_loss": s.get("val_loss"), "val_ppl": s.get("val_ppl"),
        "tokenizer": loaded.config.data.tokenizer if loaded.config.data.dataset != "synthetic" else None,
        "seq_len": loaded.config.data.seq_len, "source": str(Path(run_dir).resolve()),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def validation_batches(cfg: Any, data: Any, device: str = "cpu") -> list:
    """The run's validation batches (the same windows its reported ``val_loss`` was measured on)."""
    from sparsebench.data.batches import fixed_batches

    t = cfg.training
    return fixed_batches(data.valid, cfg.data.seq_len, t.eval_batch_size or t.batch_size, t.eval_batches,
                         torch.device(device))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list) -> float:
    """Mean token NLL of ``model`` over ``batches`` (labels already shifted), as the loop measures it."""
    from sparsebench.losses import cross_entropy

    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"]).logits
        n = batch["labels"].numel()
        total += float(cross_entropy(logits, batch["labels"])) * n
        count += n
    return total / count


def check_export(out: Path, run_dir: Optional[Path] = None) -> tuple[float, float]:
    """(validation loss of the exported model reloaded with transformers, the run's own)."""
    from transformers import AutoModelForCausalLM

    from sparsebench.data import load_token_splits

    out = Path(out)
    info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
    run_dir = Path(run_dir or info["source"])
    cfg = read_run_config(run_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    batches = validation_batches(cfg, load_token_splits(cfg.data))
    return mean_loss(model, batches), float(info["val_loss"])
