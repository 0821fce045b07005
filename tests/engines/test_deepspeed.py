"""DeepSpeed: masks identical on every rank, pruned weights exactly zero in the fp32 master copy,
the same training as one process on the same global batch.

Four kinds of tests:

- configuration (no process group): batch resolution and the settings that are refused;
- one-rank DeepSpeed runs in this process, compared with the plain loop (every ZeRO stage, two
  micro-batches per step), and a run killed and resumed from its DeepSpeed checkpoint;
- one two-rank launch (``deepspeed --num_gpus 2`` on CPU, gloo) that trains a suite per ZeRO
  stage with dense, static, a test DST method and the first-party mask-changing methods (plus a
  killed-and-resumed run), and dumps what each rank holds; the tests compare the ranks with each
  other, with one process and with the uninterrupted run;
- the documented command ``sparsebench run SUITE --gpus 2`` end to end (marked slow).

DeepSpeed compiles a communication op at its first launch (~40 s on two cores); it is cached in
``$TORCH_EXTENSIONS_DIR`` (default here: ``~/.cache/sparsebench/torch_extensions``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install -e '.[test,deepspeed]'")

from sparsebench.config import DistributedConfig  # noqa: E402
from sparsebench.data.batches import TrainSampler  # noqa: E402
from sparsebench.engines.collectives import DistributedError, launcher_command  # noqa: E402
from sparsebench.engines.deepspeed_config import check_ds_config, load_ds_config, resolve_batch, resolve_run_config  # noqa: E402
from sparsebench.engines.sampling import RankSlice  # noqa: E402
from tests.conftest import TINY_SUITE  # noqa: E402
from tests.engines.deepspeed_worker import CrashOnce, RankDump, SwapDST  # noqa: E402
from tests.helpers import registry_with, run_configs, train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STAGES = (0, 1, 2)
#: (label, suite entry) of the methods trained on two ranks
METHODS = [
    ("dense", "dense"),
    ("static", {"static": {"distribution": "uniform"}}),
    ("swap-dst", {"swap-dst": {"every": 3}}),
    ("rigl", {"rigl": {"delta_t": 3}}),
    ("set", {"set": {"delta_t": 3}}),
    ("sparsae", {"sparsae": {"mask_update_every": 3, "p_mutate": 0.05}}),
    ("gumbel", {"gumbel": {"finalize_fraction": 0.5}}),
]
#: which run at each ZeRO stage: all at 0; all but gumbel at 2 (its scores live outside the model,
#: which ZeRO-1/2 refuse); at 1, which shares stage 2's code but for gradient partitioning, fewer
STAGE_METHODS = {
    0: [label for label, _ in METHODS],
    1: ["dense", "static", "swap-dst", "rigl"],
    2: [label for label, _ in METHODS if label != "gumbel"],
}
MASK_CHANGING = {"swap-dst", "rigl", "set", "sparsae", "gumbel"}
TRAINING = {**TINY_SUITE["training"], "steps": 8, "batch_size": 4, "eval_every": 0, "eval_batches": 1, "log_every": 2}


@pytest.fixture(scope="module", autouse=True)
def _extensions_cache():
    """DeepSpeed's CPU communication op is compiled once (~40 s) into a stable folder, shared by
    the in-process runs and the launched ranks of every test session."""
    default = Path.home() / ".cache" / "sparsebench" / "torch_extensions"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR") or str(default))
        yield


def _suite(stage: int, methods: list, dump_dir: Path, name: str, backend: str = "deepspeed",
           plugins: tuple = (), **training) -> dict:
    return {
        **TINY_SUITE,
        "name": name,
        "training": {**TRAINING, **training},
        "methods": methods,
        "plugins": [{"rank-dump": {"dir": str(dump_dir)}}, *plugins],
        "distributed": {"backend": backend, "config": {"zero_optimization": {"stage": stage}}},
    }


def _available_methods() -> list[tuple[str, object]]:
    from sparsebench.registry import load_registry

    names = set(load_registry().names()) | {"swap-dst"}
    return [(label, entry) for label, entry in METHODS if label in names]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def test_suite_batch_is_split_over_ranks_when_deepspeed_config_has_no_batch_keys():
    assert resolve_batch({}, batch_size=8, grad_accum=3, world=2) == (4, 3)
    with pytest.raises(DistributedError, match="training.batch_size"):
        resolve_batch({}, batch_size=5, grad_accum=1, world=2)


def test_deepspeed_batch_keys_follow_deepspeeds_rule():
    assert resolve_batch({"train_micro_batch_size_per_gpu": 3}, 99, 99, world=2) == (3, 1)
    assert resolve_batch({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 99, 99, 2) == (3, 2)
    assert resolve_batch({"train_batch_size": 24, "gradient_accumulation_steps": 3}, 99, 99, world=2) == (4, 3)
    assert resolve_batch({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}, 99, 99, world=2) == (4, 3)
    with pytest.raises(DistributedError, match="train_batch_size 10"):
        resolve_batch({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}, 1, 1, 2)


@pytest.mark.parametrize("ds, match", [
    ({"zero_optimization": {"stage": 3}}, r"stage: 3 is not supported .* Allowed: 0, 1, 2"),
    ({"optimizer": {"type": "Adam"}}, r"remove 'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, r"remove 'scheduler'"),
    ({"fp16": {"enabled": True}}, r"fp16 needs zero_optimization.stage 1 or 2"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, r"bf16 needs zero_optimization.stage 1 or 2"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, r"offload_optimizer: offloading"),
])
def test_unsupported_deepspeed_settings_are_refused_in_one_line(ds, match):
    with pytest.raises(DistributedError, match=match) as info:
        check_ds_config(ds)
    assert "\n" not in str(info.value)


def test_resolved_config_trains_the_global_batch_and_takes_clipping_from_deepspeed(write_suite, registry, tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text('{"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}')
    cfg = run_configs(write_suite(distributed={"backend": "deepspeed", "config": str(ds_file)}), registry)[0]
    t = resolve_run_config(cfg, world=4).training
    assert (t.batch_size, t.grad_accum, t.grad_clip) == (12, 2, 0.5)
    plain = run_configs(write_suite(), registry)[0]
    assert resolve_run_config(plain, world=4) is plain


def test_missing_deepspeed_config_file_is_named():
    with pytest.raises(DistributedError, match="nowhere.json' not found"):
        load_ds_config(DistributedConfig(backend="deepspeed", config="nowhere.json"))


def test_rank_slices_together_are_the_one_process_batch():
    tokens = torch.arange(5000).numpy() % 97
    whole = TrainSampler(tokens, 16, 6, seed=3, device=torch.device("cpu"))
    slices = [RankSlice(TrainSampler(tokens, 16, 6, seed=3, device=torch.device("cpu")), r, 3) for r in range(3)]
    for _ in range(3):
        expected = whole.next()
        parts = [s.next() for s in slices]
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), expected[key])


# --------------------------------------------------------------------------------------------
# one rank, in this process
# --------------------------------------------------------------------------------------------


def _train_one(tmp_path: Path, stage: int, backend: str, method="swap-dst"):
    registry = registry_with(SwapDST, RankDump)
    path = tmp_path / f"{backend}{stage}.yaml"
    entry = {"swap-dst": {"every": 3}} if method == "swap-dst" else method
    # two micro-batches per step: DeepSpeed's accumulation boundary must line up with the hooks
    path.write_text(yaml.safe_dump(_suite(stage, [entry], tmp_path / f"dump-{backend}{stage}", "one", backend, grad_accum=2)))
    cfg = resolve_run_config(run_configs(path, registry)[0])
    return train_config(cfg, registry)


@pytest.fixture(scope="module")
def plain_swap_run(tmp_path_factory):
    return _train_one(tmp_path_factory.mktemp("plain"), 0, "none")


@pytest.mark.parametrize("stage", STAGES)
def test_one_rank_deepspeed_equals_the_plain_loop_through_mask_changes(stage, plain_swap_run, tmp_path):
    """Masks, weights and loss match the plain loop at every stage: the mask changes reach the
    master copy and the partitioned moments, and the regrown weights' re-initialisation too."""
    (ref_setup, ref), (setup, result) = plain_swap_run, _train_one(tmp_path, stage, "deepspeed")
    from deepspeed.utils import safe_get_full_fp32_param

    assert ref_setup.run.plugins["rank-dump"].mask_changes == setup.run.plugins["rank-dump"].mask_changes == 2
    for name, p in setup.run.sparsifiable.items():
        mask = setup.run.masks[name]
        assert torch.equal(mask, ref_setup.run.masks[name])
        torch.testing.assert_close(p.detach(), ref_setup.run.sparsifiable[name].detach(), rtol=1e-5, atol=1e-6)
        assert torch.all(p.detach()[~mask] == 0)
        master = safe_get_full_fp32_param(p)
        if stage > 0:
            assert torch.all(master.view_as(p)[~mask] == 0)
            assert torch.equal(master.view_as(p), p.detach())
    assert result.val_loss == pytest.approx(ref.val_loss, rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_weights_keep_pruned_positions_zero_and_an_fp32_master(stage, tmp_path):
    """DeepSpeed's bf16 (the CPU accelerator has it too): bf16 weights and an fp32 master copy;
    pruned positions are zero in both, active ones keep the master's extra bits."""
    from deepspeed.utils import safe_get_full_fp32_param

    registry = registry_with(SwapDST, RankDump)
    suite = _suite(stage, [{"swap-dst": {"every": 3}}], tmp_path / "dump", "bf16")
    suite["distributed"]["config"]["bf16"] = {"enabled": True}
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(suite))
    setup, result = train_config(resolve_run_config(run_configs(path, registry)[0]), registry)
    assert setup.run.plugins["rank-dump"].mask_changes == 2
    finer = 0
    for name, p in setup.run.sparsifiable.items():
        mask, master = setup.run.masks[name], safe_get_full_fp32_param(p).view_as(p)
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.all(p.detach()[~mask] == 0) and torch.all(master[~mask] == 0)
        assert torch.equal(master.to(torch.bfloat16), p.detach())
        finer += int((master[mask] != p.detach()[mask].float()).sum())
    assert finer > 0  # the master was not overwritten with bf16-rounded values
    assert math.isfinite(result.val_loss)


def test_resume_from_a_deepspeed_checkpoint_continues_exactly(tmp_path):
    """A run killed after step 5 resumes from its step-4 checkpoint (DeepSpeed's partitions plus the
    sparsebench state) and ends with the same masks and weights as an uninterrupted run."""
    from sparsebench.runner import execute_run

    registry = registry_with(SwapDST, RankDump, CrashOnce)
    crash = {"crash-once": {"at_step": 5, "marker": str(tmp_path / "crashed")}}
    summaries = {}
    for label, plugins in (("straight", ()), ("resumed", (crash,))):
        path = tmp_path / f"{label}.yaml"
        suite = _suite(2, [{"swap-dst": {"every": 3}}], tmp_path / label, label, plugins=plugins, checkpoint_every=2)
        path.write_text(yaml.safe_dump(suite))
        cfg = run_configs(path, registry)[0]
        run_dir = tmp_path / "out" / label
        if plugins:
            assert execute_run(cfg, registry, run_dir, resume=False)["status"] == "failed"
            assert [p.name for p in (run_dir / "deepspeed").glob("ckpt-*")] == ["ckpt-00000004"]
        summaries[label] = execute_run(cfg, registry, run_dir, resume=True)
        assert summaries[label]["status"] == "ok", summaries[label]["error"]
    assert "resumed from ckpt-00000004.pt" in (tmp_path / "out" / "resumed" / "resume.log").read_text()
    straight, resumed = (torch.load(tmp_path / x / "swap-dst" / "rank0.pt", weights_only=True) for x in ("straight", "resumed"))
    for name in straight["params"]:
        assert torch.equal(straight["params"][name], resumed["params"][name]), name
    for name in straight["masks"]:
        assert torch.equal(straight["masks"][name], resumed["masks"][name]), name
        assert torch.equal(straight["master"][name], resumed["master"][name]), name
    assert summaries["resumed"]["val_loss"] == summaries["straight"]["val_loss"]
    assert summaries["resumed"]["train_flops"] == summaries["straight"]["train_flops"]


def test_at_zero_stage_0_before_optimizer_step_sees_gradients_already_clipped(tmp_path):
    """Whole gradients on every rank: the engine clips them before the hook, as in one process."""
    from tests.engines.test_local_engine import ClipWatcher

    registry = registry_with(SwapDST, RankDump, ClipWatcher)
    suite = _suite(0, ["dense"], tmp_path / "dump", "clip", plugins=({"clip-watcher": {}},), grad_clip=1e-3, steps=3)
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(suite))
    setup, _ = train_config(resolve_run_config(run_configs(path, registry)[0]), registry)
    norms = setup.run.plugins["clip-watcher"].norms
    assert len(norms) == 3 and all(n == pytest.approx(1e-3, rel=1e-3) for n in norms), norms


def test_plugin_parameters_outside_the_model_are_refused_at_zero_stage_1(tmp_path):
    from sparsebench.registry import load_registry

    if "gumbel" not in load_registry().names():
        pytest.skip("the gumbel method is not in this checkout")
    with pytest.raises(DistributedError, match=r"stage: 1 cannot hold .* use stage 0"):
        _train_one(tmp_path, 1, "deepspeed", method="gumbel")


# --------------------------------------------------------------------------------------------
# two ranks: one launch for all stages and methods
# --------------------------------------------------------------------------------------------


def _launch_env() -> dict[str, str]:
    # The one-rank tests above made this process a rank; the launch makes its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # One thread per rank: two ranks of two threads on two cores make every collective wait.
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_launch(make_command, clean: list[Path], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a multi-rank launch, retried once from clean folders if it fails.

    About one launch in fifty was seen to abort at exit after all its work was done.
    ``make_command()`` is called per attempt (each takes a fresh port).
    """
    outputs = []
    for attempt in (1, 2):
        proc = subprocess.run(make_command(), cwd=REPO, env=_launch_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return proc
        outputs.append(f"attempt {attempt} (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        for path in clean:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)  # e.g. the crash marker: a file, which rmtree would leave
    raise AssertionError("launch failed twice:\n" + "\n".join(outputs))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Dumps of every rank after training, per stage and method (and of a crashed-and-resumed run)."""
    root = tmp_path_factory.mktemp("two-ranks")
    methods = _available_methods()
    suites = []
    for stage in STAGES:
        entries = [entry for label, entry in methods if label in STAGE_METHODS[stage]]
        path = root / f"stage{stage}.yaml"
        path.write_text(yaml.safe_dump(_suite(stage, entries, root / "dump" / f"stage{stage}", f"ds-stage{stage}")))
        suites.append(path)
    resume = root / "resume.yaml"
    crash = {"crash-once": {"at_step": 5, "marker": str(root / "crashed")}}
    resume.write_text(yaml.safe_dump(_suite(2, [{"swap-dst": {"every": 3}}], root / "dump" / "resume", "ds-resume",
                                            plugins=(crash,), checkpoint_every=2)))
    bf16 = _suite(1, [{"swap-dst": {"every": 3}}], root / "dump" / "bf16", "ds-bf16")
    bf16["distributed"]["config"]["bf16"] = {"enabled": True}
    (root / "bf16.yaml").write_text(yaml.safe_dump(bf16))
    suites.append(root / "bf16.yaml")
    args = [*map(str, suites), "--resume-suite", str(resume), "--out", str(root / "out")]
    command = lambda: launcher_command(2, args, module="tests.engines.deepspeed_worker")  # noqa: E731
    run_launch(command, [root / "out", root / "dump", root / "crashed"])
    return {"root": root, "methods": [label for label, _ in methods]}


def _cases():
    return [(stage, label) for stage in STAGES for label in STAGE_METHODS[stage]]


def _dumps(two_ranks, stage: int, label: str) -> tuple[dict, dict]:
    if label not in two_ranks["methods"]:
        pytest.skip(f"the {label} method is not in this checkout")
    base = two_ranks["root"] / "dump" / f"stage{stage}" / label
    return (torch.load(base / "rank0.pt", weights_only=True), torch.load(base / "rank1.pt", weights_only=True))


@pytest.mark.parametrize("stage, label", _cases())
def test_masks_and_parameters_are_identical_on_both_ranks(two_ranks, stage, label):
    r0, r1 = _dumps(two_ranks, stage, label)
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    for name in r0["master"]:
        assert torch.equal(r0["master"][name], r1["master"][name]), name
    if label in MASK_CHANGING:
        assert r0["mask_changes"] == r1["mask_changes"] > 0  # the masks did change during training


@pytest.mark.parametrize("stage, label", _cases())
def test_pruned_weights_are_exactly_zero_in_weights_and_master_copy(two_ranks, stage, label):
    for dump in _dumps(two_ranks, stage, label):
        assert (len(dump["master"]) > 0) == (stage > 0)  # ZeRO-1/2 keep an fp32 master copy
        for name, mask in dump["masks"].items():
            assert torch.all(dump["params"][name][~mask] == 0), name
            if name in dump["master"]:
                assert torch.all(dump["master"][name][~mask] == 0), name


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("label", ["dense", "static"])
def test_two_ranks_equal_one_process_on_the_same_global_batch(two_ranks, stage, label, tmp_path):
    rank0, _ = _dumps(two_ranks, stage, label)
    entry = dict(METHODS)[label]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(_suite(stage, [entry], tmp_path / "dump", "one", backend="none")))
    registry = registry_with(SwapDST, RankDump)
    setup, result = train_config(run_configs(path, registry)[0], registry)
    for name, p in setup.run.model.named_parameters():
        # Summation order differs (two rank means, then their mean); Adam's m/sqrt(v) amplifies
        # that where gradients are tiny, so a few weights differ by ~1e-5 after a few steps.
        torch.testing.assert_close(rank0["params"][name], p.detach(), rtol=1e-4, atol=1e-4)
    assert rank0["val_loss"] == pytest.approx(result.val_loss, rel=1e-5)


def test_bf16_on_two_ranks_keeps_masks_weights_and_master_identical_and_pruned_zero(two_ranks):
    r0, r1 = (torch.load(two_ranks["root"] / "dump" / "bf16" / "swap-dst" / f"rank{r}.pt", weights_only=True)
              for r in (0, 1))
    assert r0["mask_changes"] == r1["mask_changes"] > 0
    for name, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][name])
        assert torch.equal(r0["params"][name], r1["params"][name]) and r0["params"][name].dtype == torch.bfloat16
        assert torch.equal(r0["master"][name], r1["master"][name]) and r0["master"][name].dtype == torch.float32
        assert torch.all(r0["params"][name][~mask] == 0) and torch.all(r0["master"][name][~mask] == 0)


def test_two_rank_run_resumes_from_its_deepspeed_checkpoint_exactly(two_ranks):
    """Killed after step 5, resumed from step 4 on two ranks at ZeRO-2: the same weights, masks and
    master copy as the uninterrupted run, on both ranks."""
    straight, _ = _dumps(two_ranks, 2, "swap-dst")
    base = two_ranks["root"] / "dump" / "resume" / "swap-dst"
    for rank in (0, 1):
        resumed = torch.load(base / f"rank{rank}.pt", weights_only=True)
        for key in ("params", "masks", "master"):
            for name in straight[key]:
                assert torch.equal(straight[key][name], resumed[key][name]), (key, name)
    (run_dir,) = [p for p in (two_ranks["root"] / "out" / "ds-resume").iterdir() if p.is_dir() and p.name != "plots"]
    assert "resumed from ckpt-00000004.pt" in (run_dir / "resume.log").read_text()
    assert sorted(p.name for p in (run_dir / "deepspeed").glob("ckpt-*")) == ["ckpt-00000008"]


def test_rank0_alone_writes_results_counting_the_global_batch(two_ranks):
    out = two_ranks["root"] / "out"
    assert (out / "done-rank0").read_text() == (out / "done-rank1").read_text() == "0"  # no failed run
    seq_len, rows = TINY_SUITE["data"]["seq_len"], TRAINING["batch_size"]
    for stage, suite_dir in [(s, out / f"ds-stage{s}") for s in STAGES] + [(2, out / "ds-resume"), (1, out / "ds-bf16")]:
        assert (suite_dir / "table.md").is_file()
        for run_dir in (p for p in suite_dir.iterdir() if p.is_dir() and p.name != "plots"):
            assert not list(run_dir.glob("error*.log"))
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "ok"
            assert (summary["world_size"], summary["zero_stage"], summary["micro_batch_size"]) == (2, stage, rows // 2)
            assert summary["tokens"] == TRAINING["steps"] * rows * seq_len
            assert summary["mask_disagreement"] == 0
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            logged = [r["step"] for r in records if "loss" in r]
            assert logged == list(range(2, TRAINING["steps"] + 1, 2))  # one writer: no record twice
            assert [r["tokens"] for r in records if "loss" in r] == [s * rows * seq_len for s in logged]


@pytest.mark.slow  # a second launch (~20 s on two idle cores): the documented command end to end
def test_sparsebench_run_with_gpus_launches_deepspeed_and_rank0_reports(write_suite, tmp_path):
    """The documented command: ``sparsebench run SUITE --gpus 2`` (→ ``deepspeed --num_gpus 2
    --module sparsebench run SUITE``)."""
    suite = write_suite(
        "ds-cli.yaml", methods=[{"static": {"distribution": "uniform"}}],
        training={**TRAINING, "steps": 4}, distributed={"backend": "deepspeed", "config": {"zero_optimization": {"stage": 2}}},
    )
    out = tmp_path / "results"
    proc = run_launch(lambda: [sys.executable, "-m", "sparsebench", "run", str(suite), "--gpus", "2", "--out", str(out)], [out])
    summaries = list((out / TINY_SUITE["name"]).glob("*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert (summary["status"], summary["world_size"], summary["zero_stage"]) == ("ok", 2, 2)
    assert proc.stdout.count("synthetic floor") == 1  # the table is printed by rank 0 alone


def test_gpus_option_refuses_a_suite_without_the_deepspeed_backend(write_suite):
    from typer.testing import CliRunner

    from sparsebench.cli import app

    result = CliRunner().invoke(app, ["run", str(write_suite()), "--gpus", "2"])
    assert result.exit_code == 2
    assert "distributed.backend 'none'" in result.output


def test_validate_refuses_zero_stage_3_before_any_training(write_suite):
    from typer.testing import CliRunner

    from sparsebench.cli import app

    suite = write_suite(distributed={"backend": "deepspeed", "config": {"zero_optimization": {"stage": 3}}})
    result = CliRunner().invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2
    assert "zero_optimization.stage: 3 is not supported" in result.output
