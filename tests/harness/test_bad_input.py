"""Bad suites and bad command lines: one line, exit status 2, nothing written, for validate and run alike.

Each row of the table is a case from the reliability review (issue 12 §1, 6, 7, 8, 10): a suite
(as a mapping over the tiny suite, or as raw YAML text), extra command-line arguments, and a
fragment the one-line message must contain.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sparsebench.cli import app
from tests.conftest import TINY_SUITE

LONG = "x" * 300
BOMB = "\n".join(
    ["name: bomb", "methods: [dense]", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    + ["distributed: {backend: none, config: [" + ", ".join(["*a8"] * 10) + "]}"]
)


def _tiny_yaml(**changes) -> str:
    suite = {**TINY_SUITE, **changes}
    return yaml.safe_dump({k: v for k, v in suite.items() if v is not _DROP}, sort_keys=False)


_DROP = object()


def _with_training(**changes) -> str:
    return _tiny_yaml(training={**TINY_SUITE["training"], **changes})


def _with_model(**model) -> str:
    return _tiny_yaml(model=model)


def _raw(text: str) -> str:
    """Raw YAML appended to the tiny suite's text (a later key replaces an earlier one in PyYAML)."""
    return _tiny_yaml() + text


# (id, suite text, extra CLI args, expected fragment of the one-line message)
CASES = [
    # §1 path traversal
    ("label-absolute-path", _tiny_yaml(methods=[{"static": {"label": "/tmp/x/ESCAPED"}}]), [], "not a safe folder name"),
    ("label-dotdot", _tiny_yaml(methods=[{"static": {"label": ".."}}]), [], "not a safe folder name"),
    ("label-via-set", _tiny_yaml(), ["--set", "methods=[{static: {label: ../../ESCAPED}}]"], "not a safe folder name"),
    ("name-dotdot", _tiny_yaml(name=".."), [], "name '..' is not a safe folder name"),
    ("name-dot", _tiny_yaml(name="."), [], "is not a safe folder name"),
    ("name-slash", _tiny_yaml(name="a/b"), [], "is not a safe folder name"),
    ("name-300-chars", _tiny_yaml(name=LONG), [], "at most 100 characters"),
    ("label-300-chars", _tiny_yaml(methods=[{"static": {"label": LONG}}]), [], "at most 100 characters"),
    # §6 values checked before training
    ("grad-clip-negative", _with_training(grad_clip=-1.0), [], "training.grad_clip"),
    ("grad-clip-zero", _with_training(grad_clip=0), [], "training.grad_clip"),
    ("beta-one", _with_training(betas=[0.9, 1.0]), [], "training.betas"),
    ("beta-negative", _with_training(betas=[-0.1, 0.9]), [], "training.betas"),
    ("lr-inf", _raw("training: {steps: 5, lr: .inf}\n"), [], "training.lr: infinite or NaN"),
    ("lr-nan-via-set", _tiny_yaml(), ["--set", "training.lr=.nan"], "training.lr: infinite or NaN"),
    ("method-option-nan", _tiny_yaml(methods=[{"rigl": {"alpha": float("nan")}}]), [], "methods[0].rigl.alpha: infinite"),
    ("gpt2-heads-not-dividing", _with_model(family="gpt2", n_layer=2, n_head=3, n_embd=32), [], "n_head (3) must divide model.n_embd (32)"),
    ("gpt2-negative-layers", _with_model(family="gpt2", n_layer=-1, n_head=2, n_embd=32), [], "model.n_layer must be a positive integer"),
    ("gpt2-float-width", _with_model(family="gpt2", n_layer=2, n_head=2, n_embd=32.5), [], "model.n_embd must be a positive integer"),
    ("gpt2-bool-heads", _with_model(family="gpt2", n_layer=2, n_head=True, n_embd=32), [], "model.n_head must be a positive integer"),
    ("llama-kv-not-dividing", _with_model(family="llama", n_layer=2, n_head=4, n_kv_head=3, n_embd=64, n_inner=128), [],
     "num_key_value_heads (3) must divide model.num_attention_heads (4)"),
    ("llama-heads-not-dividing", _with_model(family="llama", n_layer=2, n_head=4, n_embd=66, n_inner=128), [],
     "num_attention_heads (4) must divide model.hidden_size (66)"),
    ("llama-string-layers", _with_model(family="llama", num_hidden_layers="2", hidden_size=64, num_attention_heads=4,
                                        intermediate_size=128), [], "model.num_hidden_layers must be a positive integer"),
    ("unknown-version", _tiny_yaml(version=2), [], "unknown suite version 2"),
    # §7 tracebacks turned into one line
    ("include-not-a-path", _raw("include: 5\n"), [], "include must be a file path"),
    ("options-int", _tiny_yaml(methods=[{"rigl": 5}]), [], "rigl: options must be a mapping"),
    ("options-list", _tiny_yaml(methods=[{"rigl": [1, 2]}]), [], "rigl: options must be a mapping"),
    ("options-string", _tiny_yaml(methods=[{"rigl": "abc"}]), [], "rigl: options must be a mapping"),
    ("label-int", _tiny_yaml(methods=[{"static": {"label": 123}}]), [], "static.label must be a string"),
    ("with-int", _tiny_yaml(methods=[{"rigl": {"with": 5}}]), [], "rigl.with: a method name or a list"),
    ("sweep-int-key", _tiny_yaml(sweep={1: [0.5]}), [], "sweep key 1 is not a dotted key"),
    ("top-level-int-key", _raw("1: 2\n"), [], "top-level key 1 is not a name"),
    ("set-malformed", _tiny_yaml(), ["--set", "training.steps=[1"], "--set training.steps: malformed YAML"),
    ("set-python-tag", _tiny_yaml(), ["--set", "training.steps=!!python/object/apply:os.system ['echo PWNED']"],
     "--set training.steps: YAML tag not allowed"),
    ("python-tag-in-file", _raw("description: !!python/object/apply:os.system ['echo PWNED']\n"), [], "YAML tag not allowed"),
    ("set-no-equals", _tiny_yaml(), ["--set", "training.steps"], "--set expects KEY=VALUE"),
    # §8 alias bomb, and a recursive alias
    ("alias-bomb", BOMB, [], "expands to more than"),
    ("recursive-alias", _raw("sweep: &s {sparsity: [0.5, *s]}\n"), [], "refers to itself"),
    # issue 10 §6 / issue 11 §1
    ("training-override-unknown-key", _tiny_yaml(methods=[{"rigl": {"training": {"stepz": 4}}}]), [],
     "methods[0].rigl.training.stepz: unknown training key. Did you mean 'steps'?"),
    ("training-override-bad-value", _tiny_yaml(methods=[{"rigl": {"training": {"steps": 0}}}]), [],
     "methods[0].rigl.training.steps"),
    ("training-override-not-mapping", _tiny_yaml(methods=[{"rigl": {"training": 5}}]), [], "a mapping of training keys"),
    ("training-override-in-with", _tiny_yaml(methods=[{"rigl": {"with": [{"ema_distill": {"training": {"steps": 4}}}]}}]), [],
     "training overrides belong to an entry of methods"),
    ("same-label-different-options",
     _tiny_yaml(methods=[{"rigl": {"label": "r"}}, "dense", {"rigl": {"label": "r", "delta_t": 5}}]), [],
     "methods[0] and methods[2] are both labelled 'r'"),
]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def _invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, (RecursionError, MemoryError)), result.exception
    return result


def _assert_one_line_exit_2(result, fragment: str) -> str:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert fragment in output, output
    return output


@pytest.mark.parametrize("case,text,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_bad_suite_in_one_line(runner, tmp_path, case, text, args, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _assert_one_line_exit_2(_invoke(runner, "validate", path, *args), fragment)


@pytest.mark.parametrize("case,text,args,fragment", CASES, ids=[c[0] for c in CASES])
def test_run_refuses_bad_suite_before_writing_anything(runner, tmp_path, case, text, args, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    _assert_one_line_exit_2(_invoke(runner, "run", path, "--out", out, *args), fragment)
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "ESCAPED").exists() and not Path("/tmp/x/ESCAPED").exists()


def test_alias_bomb_is_refused_quickly_without_expanding():
    from sparsebench.errors import SuiteError
    from sparsebench.yaml_loading import load_yaml

    started = time.perf_counter()
    with pytest.raises(SuiteError, match="expands to more than"):
        load_yaml(BOMB, "bomb.yaml")  # 10^10 nodes once expanded
    assert time.perf_counter() - started < 1.0


def test_include_cycle_and_self_include_are_refused(runner, tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n" + _tiny_yaml())
    (tmp_path / "b.yaml").write_text("include: a.yaml\nsparsity: 0.5\n")
    (tmp_path / "self.yaml").write_text("include: self.yaml\n" + _tiny_yaml())
    message = _assert_one_line_exit_2(_invoke(runner, "validate", tmp_path / "a.yaml"), "include cycle")
    assert "a.yaml → " in message and "b.yaml → " in message
    _assert_one_line_exit_2(_invoke(runner, "validate", tmp_path / "self.yaml"), "include cycle")


def test_including_a_file_that_is_not_a_suite_never_echoes_its_content(runner, tmp_path):
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\nsecret_user: hunter2\n")
    (tmp_path / "s.yaml").write_text(f"include: {shadow}\n" + _tiny_yaml())
    message = _assert_one_line_exit_2(_invoke(runner, "validate", tmp_path / "s.yaml"), "not a suite mapping")
    text = message.replace(str(tmp_path), "")
    assert "root:" not in text and "19000" not in text and "secret" not in text and "hunter2" not in text


def test_validating_a_foreign_file_never_echoes_its_content(runner, tmp_path):
    passwd = tmp_path / "passwd.yaml"
    passwd.write_text("daemon: x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    message = _assert_one_line_exit_2(_invoke(runner, "validate", passwd), "not a suite mapping")
    assert "daemon" not in message.replace(str(passwd), "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["validate", "run"])
def test_cuda_device_without_a_gpu_is_refused_before_training(runner, tmp_path, command):
    path = tmp_path / "s.yaml"
    path.write_text(_with_training(device="cuda"))
    extra = ["--out", tmp_path / "out"] if command == "run" else []
    _assert_one_line_exit_2(_invoke(runner, command, path, *extra), "training.device is 'cuda' but no CUDA device")
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused(runner, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(_tiny_yaml())
    (tmp_path / "file").write_text("not a folder")
    _assert_one_line_exit_2(_invoke(runner, "run", path, "--out", tmp_path / "file"), "is a file, not a folder")
    _assert_one_line_exit_2(_invoke(runner, "run", path, "--out", tmp_path / "file" / "sub"), "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_refused(runner, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(_tiny_yaml())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _assert_one_line_exit_2(_invoke(runner, "run", path, "--out", locked), "cannot write into")
    finally:
        locked.chmod(0o755)


def test_permission_error_while_writing_results_is_one_line(runner, tmp_path, monkeypatch):
    """A read-only OUT/<suite>/ (simulated: the tests may run as root) ends in one line, exit 2."""
    import sparsebench.runner

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "tiny" / "config.yaml"))

    monkeypatch.setattr(sparsebench.runner, "run_suite", refuse)
    path = tmp_path / "s.yaml"
    path.write_text(_tiny_yaml())
    _assert_one_line_exit_2(_invoke(runner, "run", path, "--out", tmp_path / "out"), "Permission denied")


def _results_folder(tmp_path: Path, summary) -> Path:
    folder = tmp_path / "tiny"
    (folder / "run-a").mkdir(parents=True)
    (folder / "run-a" / "summary.json").write_text(json.dumps(summary))
    return folder


def test_report_on_a_summary_that_is_not_an_object_is_one_line(runner, tmp_path):
    folder = _results_folder(tmp_path, [1, 2, 3])
    _assert_one_line_exit_2(_invoke(runner, "report", folder), "no run summaries (*/summary.json) found")


def test_report_into_a_read_only_folder_is_one_line(runner, tmp_path, monkeypatch):
    import sparsebench.results

    def refuse(directory, *_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(Path(directory) / "table.md"))

    folder = _results_folder(tmp_path, {"suite": "tiny", "run_id": "run-a", "method": "dense", "status": "ok"})
    monkeypatch.setattr(sparsebench.results, "write_suite_tables", refuse)
    _assert_one_line_exit_2(_invoke(runner, "report", folder), "cannot write the tables into")
