"""Nothing lost, nothing silently wrong: runs, logs, benches and the command line under faults.

Each test pins one guarantee of the README's "What modalmoe promises when things go wrong"
table (issue 17's reliability sweep); each failed on 0e5d7bb.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from modalmoe.cli import main
from modalmoe.model.presets import get_preset
from modalmoe.train import CheckpointError, Trainer, TrainingError, load_checkpoint, load_run_model
from modalmoe.train.progress import Progress
from modalmoe.train.trainer import experiment_task

TINY = ["train.epochs=2"]


def _quiet_trainer(cfg, out):
    import io

    from rich.console import Console

    return Trainer(cfg, out, progress=False, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch tiny run, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), out).fit()
    return out


def _copy(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".modalmoe.lock*"))
    return target


def _said(capsys) -> str:
    """What a command printed, as one line (rich wraps long errors at the terminal width)."""
    return " ".join(capsys.readouterr().out.split())


def _all_finite(path: Path) -> bool:
    with safe_open(str(path), "pt") as f:
        return all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys() if f.get_tensor(k).is_floating_point())


# --- 1. a NaN blow-up is never saved ------------------------------------------------------------


def test_the_issues_nan_blow_up_writes_no_checkpoint_and_says_so(tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["train.lr=150", "train.clip_norm=null", "train.epochs=4", "train.batch_size=16"]
    code = main(["train", "tiny/token-choice", "--out", str(out), "--quiet", *[a for x in args for a in ("--set", x)]])
    text = _said(capsys)
    assert code == 1
    assert "non-finite" in text and "no checkpoint was written" in text
    assert not (out / "checkpoints" / "best.safetensors").exists()
    assert not (out / "checkpoints" / "last.safetensors").exists()


def test_an_update_that_makes_weights_nan_keeps_the_last_good_checkpoints(tmp_path, monkeypatch):
    cfg = get_preset("tiny/token-choice", overrides=["train.epochs=3"])
    trainer = _quiet_trainer(cfg, tmp_path / "run")
    steps_per_epoch = -(-len(trainer.task.train) // cfg.train.batch_size)
    poisoned_at = steps_per_epoch + 2  # after the first epoch's best and last checkpoints
    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == poisoned_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match=f"step {poisoned_at}: the optimizer update made 1 parameter") as err:
        trainer.fit()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert f"last.safetensors' (step {steps_per_epoch})" in str(err.value)
    assert "best.safetensors' (step" in str(err.value)
    for name in ("last", "best"):
        assert _all_finite(checkpoints / f"{name}.safetensors")
        assert load_checkpoint(checkpoints / f"{name}.safetensors").progress["step"] == steps_per_epoch


def test_a_nan_validation_metric_is_never_the_best(tmp_path):
    trainer = _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), tmp_path / "run")
    progress = Progress(step=3)
    assert not trainer._early_stopping(progress, {"accuracy": float("nan")})
    assert progress.best is None and progress.bad_evals == 1
    assert trainer._early_stopping(progress, {"accuracy": 0.5})
    assert not trainer._early_stopping(progress, {"accuracy": float("nan")})
    assert progress.best == 0.5


# --- 2. one writer per run directory and per bench directory ----------------------------------


def _hold_lock(directory: Path) -> subprocess.Popen:
    code = f"from modalmoe.lock import DirectoryLock\nimport time\nwith DirectoryLock({str(directory)!r}):\n"
    code += "    print('held', flush=True)\n    time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_into_a_run_directory_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
    from modalmoe.lock import DirectoryInUse, DirectoryLock

    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        with pytest.raises(DirectoryInUse, match=f"in use by pid {holder.pid}"):
            _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), out).fit()
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock: the next trainer takes it over.
    result = _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), out).fit()
    assert result.steps > 0
    with DirectoryLock(out):  # and releases it when done
        pass


def test_a_second_bench_into_one_directory_is_refused(tmp_path, capsys):
    holder = _hold_lock(tmp_path / "bench")
    try:
        code = main(["bench", "--suite", "smoke", "--out", str(tmp_path / "bench"), "--jobs", "1"])
        assert code == 2
        assert f"in use by pid {holder.pid}" in _said(capsys)
        assert not (tmp_path / "bench" / "suite.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


# --- 3. a fresh start never mixes with an old run -------------------------------------------------


def test_a_fresh_start_into_a_run_directory_is_refused_unless_overwrite_which_clears_the_old_logs(finished, tmp_path):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")  # as if killed before its first checkpoint
    old_records = len((out / "metrics.jsonl").read_text().splitlines())
    cfg = get_preset("tiny/token-choice", overrides=["train.epochs=1", "train.seed=5"])
    with pytest.raises(CheckpointError, match="already holds a run .*--overwrite"):
        _quiet_trainer(cfg, out).fit()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == old_records  # untouched
    result = _quiet_trainer(cfg, out).fit(overwrite=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, result.steps + 1))  # this run's steps only, once each
    assert len(list((out / "tb").iterdir())) == 1
    assert "seed: 5" in (out / "config.yaml").read_text()


def test_resume_without_a_checkpoint_says_to_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    with pytest.raises(CheckpointError, match="no checkpoint to resume.*--overwrite"):
        _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), out).fit(resume=True)


# --- 4. a torn last log line does not block resume ------------------------------------------------


def test_a_torn_last_line_of_the_log_is_dropped_on_resume(finished, tmp_path):
    out = _copy(finished, tmp_path)
    log = out / "metrics.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"split": "train", "step": 9, "lo')  # killed mid-write
    _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), out).fit(resume=True)
    assert log.read_text() == complete


def test_a_damaged_line_before_the_last_is_refused_naming_the_file_and_line(finished, tmp_path):
    out = _copy(finished, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        _quiet_trainer(get_preset("tiny/token-choice", overrides=TINY), out).fit(resume=True)
    from modalmoe.analysis.report import _curves

    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        _curves(out)


# --- 5. non-finite outputs are flagged --------------------------------------------------------------


def _huge_inputs(tmp_path: Path) -> Path:
    """The tiny task in the manifest format, its test inputs scaled to 1e30 (finite, huge)."""
    from modalmoe.data.formats import save

    task = experiment_task(get_preset("tiny/token-choice"))
    directory = tmp_path / "huge"
    save(task, directory)
    for path in directory.glob("modality-*.test.npz"):
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        arrays["x"] = arrays["x"] * np.float32(1e30)
        np.savez(path, **arrays)
    return directory


def test_predict_marks_nonfinite_rows_and_fails_unless_allowed(finished, tmp_path, capsys):
    data = _huge_inputs(tmp_path)
    out = tmp_path / "pred.csv"
    code = main(["predict", str(finished), "--input", str(data), "--split", "test", "--out", str(out)])
    assert code == 1
    assert "NaN or infinite" in _said(capsys)
    import csv

    rows = list(csv.DictReader(out.open()))
    assert rows and any(r["finite"] == "False" for r in rows)
    assert main(["predict", str(finished), "--input", str(data), "--split", "test", "--out", str(out),
                 "--allow-nonfinite"]) == 0  # fmt: skip
    assert main(["predict", str(finished), "--input", str(data), "--split", "train", "--out", str(out)]) == 0
    assert all(r["finite"] == "True" for r in csv.DictReader(out.open()))


def test_eval_refuses_nonfinite_outputs_unless_allowed(finished, tmp_path, capsys, monkeypatch):
    import modalmoe.evaluate.runner as runner

    run = _copy(finished, tmp_path)
    real = runner.predict

    def broken(*args, **kwargs):  # a model whose outputs overflow, as with 1e30 inputs
        pred = real(*args, **kwargs)
        pred.logits[:3] = float("nan")
        return pred

    monkeypatch.setattr(runner, "predict", broken)
    assert main(["eval", str(run), "--subsets", "none"]) == 1
    assert "3 of" in _said(capsys) and not (run / "eval-test.json").exists()
    assert main(["eval", str(run), "--subsets", "none", "--allow-nonfinite"]) == 0
    assert json.loads((run / "eval-test.json").read_text())["nonfinite"] == 3


# --- 7. compute budgets are measured for the suite that uses them ----------------------------------


def test_cached_budgets_are_not_reused_under_another_match_kind_or_override(tmp_path):
    from modalmoe.bench.runner import budgets
    from modalmoe.bench.suites import load_suite

    flops = load_suite("smoke", ["designs=[dense-early]"])
    params = load_suite("smoke", ["designs=[dense-early]", "match=params"])
    wider = load_suite("smoke", ["designs=[dense-early]", "overrides=[train.epochs=3, model.hidden=64]"])
    shared = tmp_path / "bench"
    first = budgets(flops, shared)
    assert budgets(params, shared) == budgets(params, tmp_path / "fresh-params") != first
    assert budgets(wider, shared) == budgets(wider, tmp_path / "fresh-wider") != first
    assert budgets(flops, shared) == first


# --- 9. errors a user can act on -------------------------------------------------------------------


def test_a_config_that_is_not_utf8_is_a_usage_error_naming_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("task: synthetic\nname: d\xf6ner\n".encode("latin-1"))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    text = _said(capsys)
    assert "latin1.yaml" in text and "not UTF-8" in text
    path.write_bytes(os.urandom(64) + b"\x00\xff")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2


def test_a_damaged_config_or_task_file_in_a_run_names_the_file(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "task.json").write_bytes(b"\x00garbage{")
    with pytest.raises(CheckpointError, match="task.json' is damaged"):
        load_run_model(run)
    assert main(["eval", str(run)]) == 2
    (run / "config.yaml").write_bytes(b"\xf6\x00\x01")
    assert main(["eval", str(run)]) == 2
    assert "config.yaml" in _said(capsys)


def test_an_unknown_router_option_is_a_usage_error_listing_the_options(tmp_path, capsys):
    code = main(["train", "tiny/token-choice", "--set", "model.moe.router_options={bogus: 1}",
                 "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    text = _said(capsys)
    assert code == 2
    assert "no option 'bogus'" in text and "gating" in text and "jitter_eps" in text


def test_compress_with_zero_experts_is_a_usage_error(finished, capsys):
    assert main(["compress", str(finished), "--method", "prune-experts", "--experts", "0"]) == 2
    assert "0 is not in the range x>=1" in capsys.readouterr().err


# --- 11. impossible selections are refused ------------------------------------------------------------


def test_an_empty_modality_list_is_refused(tmp_path, capsys):
    assert main(["train", "tiny/token-choice", "--set", "modalities=[]", "--out", str(tmp_path / "r")]) == 2
    assert "name at least one" in _said(capsys)


# --- 13. a finished run can be trained longer -----------------------------------------------------------


def test_resume_may_extend_epochs_and_records_it_but_refuses_other_changes(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = load_checkpoint(run / "checkpoints" / "last.safetensors").progress
    with pytest.raises(CheckpointError, match="train.epochs may only grow"):
        _quiet_trainer(get_preset("tiny/token-choice", overrides=["train.epochs=1"]), run).fit(resume=True)
    with pytest.raises(CheckpointError, match="train.lr"):
        _quiet_trainer(get_preset("tiny/token-choice", overrides=["train.epochs=3", "train.lr=0.5"]), run).fit(
            resume=True
        )
    result = _quiet_trainer(get_preset("tiny/token-choice", overrides=["train.epochs=3"]), run).fit(resume=True)
    assert result.epochs == 3 and result.steps == before["step"] * 3 // 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["history"] == [{"step": before["step"], "changes": {"train.epochs": [2, 3]}}]
    assert "epochs: 3" in (run / "config.yaml").read_text()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(1, result.steps + 1))
    # The extended run resumes again as itself.
    again = _quiet_trainer(get_preset("tiny/token-choice", overrides=["train.epochs=3"]), run).fit(resume=True)
    assert again.steps == result.steps


# --- 10. Ctrl-C on a parallel bench ----------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_on_a_parallel_bench_prints_one_line_and_keeps_the_store(tmp_path):
    out = tmp_path / "bench"
    args = [sys.executable, "-m", "modalmoe", "bench", "--suite", "smoke", "--out", str(out), "--jobs", "2"]
    args += ["--set", "overrides=[train.epochs=30]"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    store = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (store.exists() and len(store.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    assert proc.poll() is None, "the bench finished before it could be interrupted"
    time.sleep(1.0)  # workers are inside their next cells
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    assert "handle is closed" not in stderr and "leaked" not in stderr
    assert "interrupted:" in stdout and "--resume" in stdout
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # every worker is gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("bench workers outlived the interrupted bench")
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert records and all(r["status"] == "ok" for r in records)
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


def test_save_checkpoint_refuses_non_finite_tensors_and_keeps_the_old_file(tmp_path):
    from modalmoe.train import save_checkpoint

    module = torch.nn.Linear(4, 2)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, module=module, config={}, progress={"step": 1})
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="weight hold NaN or Inf"):
        save_checkpoint(path, module=module, config={}, progress={"step": 2})
    assert load_checkpoint(path).progress["step"] == 1
