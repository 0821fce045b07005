"""Pydantic models of a suite and of one resolved run.

Every model forbids unknown keys, so a typo in a suite is refused before any training with the
allowed keys listed (see :mod:`sparsebench.suites` for how errors are worded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

# An Adam β: 1 would never forget (and bias correction divides by zero), below 0 is meaningless.
Beta = Annotated[float, Field(ge=0, lt=1)]


class StrictModel(BaseModel):
    # inf/NaN are refused in every float field: `lr: .inf` would otherwise train to NaN with status ok.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class SyntheticConfig(StrictModel):
    """The embedded data source: a sparse order-2 Markov chain with an exactly known entropy rate."""

    vocab_size: int = Field(128, ge=4, le=65535)
    branching: int = Field(8, ge=2, description="successors with non-zero probability per context")
    candidates: Optional[int] = Field(
        16, ge=2, description="possible next tokens per previous token (null: the whole vocabulary)"
    )
    concentration: float = Field(0.5, gt=0, description="Dirichlet concentration of successor probabilities")
    train_tokens: PositiveInt = 1_000_000
    valid_tokens: PositiveInt = 65_536
    test_tokens: PositiveInt = 65_536
    seed: int = 1234


class DataConfig(StrictModel):
    dataset: Literal["synthetic", "text", "hf"] = "synthetic"
    tokenizer: str = Field("bytes", description="char | bytes | bpe:<vocab> | an HF tokenizer name or path")
    seq_len: PositiveInt = 64
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    # text: three files, or one file whose contiguous tail is the validation (and test) split
    train: Optional[Path] = None
    valid: Optional[Path] = None
    test: Optional[Path] = None
    file: Optional[Path] = None
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    # hf: datasets.load_dataset(path, name)
    path: Optional[str] = None
    name: Optional[str] = None
    text_column: str = "text"
    cache_dir: Optional[Path] = None
    heldout_fraction: float = Field(
        0.02, ge=0, lt=0.5,
        description="tail of the train split never trained on; methods that score masks draw from it",
    )

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        if self.dataset == "text" and self.file is None and self.train is None:
            raise ValueError("dataset 'text' needs 'train' (with 'valid', optionally 'test') or 'file'")
        if self.dataset == "text" and self.file is None and self.valid is None:
            raise ValueError("dataset 'text' with 'train' also needs 'valid' (or use 'file' + 'valid_fraction')")
        if self.dataset == "hf" and not self.path:
            raise ValueError("dataset 'hf' needs 'path' (e.g. path: wikitext, name: wikitext-103-raw-v1)")
        return self


class TrainingConfig(StrictModel):
    steps: PositiveInt = 300
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step; schedules count optimizer steps")
    lr: float = Field(1e-3, gt=0)
    min_lr: Optional[float] = Field(None, ge=0, description="default: lr / 10")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0, description="max global gradient norm; null disables clipping")
    eval_every: int = Field(100, ge=0, description="0: evaluate only at the end")
    eval_batches: PositiveInt = 8
    eval_batch_size: Optional[PositiveInt] = None
    log_every: PositiveInt = 10
    heldout_batches: PositiveInt = Field(8, description="size of the held-out pool for methods that score masks")
    heldout_batch_size: PositiveInt = 16
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(1, ge=0, description="newest checkpoints kept; 0: delete them once the run has finished")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # --- execution: how fast a run goes; none of these changes what is trained, bar float rounding
    compile: bool = Field(False, description="torch.compile the model for the training forward and backward")
    threads: Union[Literal["auto"], PositiveInt] = Field(
        "auto", description="torch intra-op threads: auto (from the model's size and the free cores, or "
        "OMP_NUM_THREADS when set) or a count"
    )
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto", description="masked AdamW step: triton (fused kernel), torch, or auto (triton on a CUDA GPU)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) exceeds lr ({self.lr})")
        return self


class SparsifyConfig(StrictModel):
    """Which weights are sparse: glob patterns over parameter names (fnmatch)."""

    include: list[str] = Field(default_factory=list, description="empty: every 2-D weight inside the blocks")
    exclude: list[str] = Field(default_factory=list)


class DistributedConfig(StrictModel):
    backend: Literal["none", "deepspeed"] = "none"
    config: Union[dict[str, Any], Path, None] = None


class MethodSpec(StrictModel):
    """One entry of ``methods:`` after parsing: a registered name, its overrides, extra components."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    with_: list["MethodSpec"] = Field(default_factory=list, alias="with")
    label: Optional[str] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def display(self) -> str:
        return self.label or "+".join([self.name] + [w.name for w in self.with_])


class RunConfig(StrictModel):
    """Everything one run needs; written as ``config.yaml`` beside its results."""

    suite: str
    run_id: str
    method: MethodSpec
    plugins: list[MethodSpec] = Field(default_factory=list)
    data: DataConfig
    model: Union[str, dict[str, Any]]
    training: TrainingConfig
    sparsity: float = Field(ge=0, lt=1)
    sparsify: SparsifyConfig = Field(default_factory=SparsifyConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    seed: int = 0

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        return float(v)
