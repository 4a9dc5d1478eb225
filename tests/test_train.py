"""Training: runs learn on every bundled task; resume after SIGKILL is exact; bad checkpoints
and configs are refused; a non-finite loss stops with a clear message; the CLI works."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from modalmoe.cli import main
from modalmoe.data.batch import Task
from modalmoe.data.tasks import load_task
from modalmoe.model.presets import get_preset
from modalmoe.train import CheckpointError, Trainer, TrainingError, load_checkpoint, load_run_model

SMALL = ["model.dim=32", "model.hidden=64", "model.heads=2", "train.epochs=4", "train.lr=0.003"]
# (task, extra overrides, metric, chance level): chance is the majority-class rate or 1/classes.
# The three tasks whose run takes 9-35 s on 2 cores are in the slow tier; mfeat and synthetic
# (about 2 s) keep a learning check on real data in the default tier.
SLOW = pytest.mark.slow
TASKS = [
    pytest.param("av-digits", [], "accuracy", 0.1, marks=SLOW),
    pytest.param("watch-imu", [], "accuracy", 1 / 7, marks=SLOW),
    ("mfeat", [], "accuracy", 0.1),
    pytest.param("clothing-reviews", ["train.epochs=3"], "macro_f1", 0.5, marks=SLOW),
    ("synthetic", [], "accuracy", 0.5),
]


def small_task(name: str, limit: int = 1500) -> Task:
    task = load_task(name)
    splits = {k: v.subset(range(min(len(v), limit))) for k, v in task.splits.items()}
    return Task(name=task.name, splits=splits, description=task.description)


@pytest.mark.parametrize(("name", "extra", "metric", "chance"), TASKS)
def test_a_short_run_beats_chance_on_every_bundled_task(name, extra, metric, chance, tmp_path):
    cfg = get_preset(f"{name}/token-choice", overrides=SMALL + extra)
    result = Trainer(cfg, tmp_path / "run", task=small_task(name), progress=False).fit()
    assert result.test[metric] > chance + 0.15, result.test
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"][metric] == pytest.approx(result.test[metric])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "valid"} <= {line["split"] for line in lines}
    assert any(p.name.startswith("events") for p in (tmp_path / "run" / "tb").iterdir())


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "modalmoe", *args], capture_output=True, text=True, **kw)


RESUME_ARGS = ["--set", "train.epochs=60", "--set", "train.checkpoint_every=5", "--quiet"]


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    done = _run(["train", "tiny/token-choice-bank", "--out", str(a), *RESUME_ARGS])
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalmoe", "train", "tiny/token-choice-bank", "--out", str(b), *RESUME_ARGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = b / "checkpoints" / "last.safetensors"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last).progress["step"]
    final_a = load_checkpoint(a / "checkpoints" / "last.safetensors")
    assert killed_at < final_a.progress["step"]
    resumed = _run(["train", str(b), "--resume", "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    final_b = load_checkpoint(last)
    assert final_b.progress == final_a.progress
    for key, value in final_a.tensors.items():
        assert torch.equal(value, final_b.tensors[key]), key
    # metrics.jsonl holds each step once, even though steps after the checkpoint ran twice.
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == sorted(set(steps))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = get_preset("tiny/token-choice", overrides=["train.epochs=3"])
    Trainer(cfg, out, progress=False).fit()
    return out


def test_truncated_and_foreign_checkpoints_are_refused(tiny_run, tmp_path):
    broken = tmp_path / "broken.safetensors"
    data = (tiny_run / "checkpoints" / "last.safetensors").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(broken)
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_a_checkpoint_for_another_config_is_refused(tiny_run, tmp_path, capsys):
    code = main(["train", str(tiny_run), "--resume", "--set", "model.dim=32", "--quiet"])
    assert code == 2
    assert "model.dim: 16 -> 32" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    for name in ("task.json", "checkpoints"):
        os.symlink(tiny_run / name, other / name)
    (other / "config.yaml").write_text(
        (tiny_run / "config.yaml").read_text().replace("num_experts: 4", "num_experts: 6")
    )
    with pytest.raises(CheckpointError, match="model.moe.num_experts: 4 -> 6"):
        load_run_model(other)


def test_a_run_from_before_an_option_existed_still_resumes(tiny_run, tmp_path):
    """A saved config without a key (written before that option existed) means its default;
    a finished run from before the best metrics were kept is validated again."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    path = old / "checkpoints" / "last.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config, progress = json.loads(metadata["config"]), json.loads(metadata["progress"])
    del config["train"]["lora"], config["train"]["collapse"], progress["best_metrics"]
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config), "progress": json.dumps(progress)})
    cfg = get_preset("tiny/token-choice", overrides=["train.epochs=3"])
    result = Trainer(cfg, old, progress=False).fit(resume=True)
    assert result.best and json.loads((old / "summary.json").read_text())["valid"] == result.best
    config["train"]["lr"] = 0.5  # a value that differs is still refused
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config), "progress": json.dumps(progress)})
    with pytest.raises(CheckpointError, match="train.lr: 0.5 -> 0.001"):
        Trainer(cfg, old, progress=False).fit(resume=True)


def test_an_existing_run_is_not_overwritten_without_resume(tiny_run, capsys):
    assert main(["train", "tiny/token-choice", "--out", str(tiny_run), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().out


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from modalmoe.objectives.supervised import CrossEntropy

    original, calls = CrossEntropy.forward, []

    def nan_at_step_5(self, *args, **kwargs):
        calls.append(1)
        terms = original(self, *args, **kwargs)
        return {n: v * float("nan") for n, v in terms.items()} if len(calls) == 5 else terms

    monkeypatch.setattr(CrossEntropy, "forward", nan_at_step_5)
    cfg = get_preset("tiny/dense-early", overrides=["train.epochs=4"])  # 2 steps per epoch
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 5: loss term 'cross_entropy' is nan"):
        Trainer(cfg, out, progress=False).fit()
    last = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert last.progress["step"] == 4 and last.progress["epoch"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_cli_eval_predict_info_and_errors(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--noise", "1,3"]) == 0
    report = json.loads((tiny_run / "eval-test.json").read_text())
    assert report["split"] == "test"
    out = tmp_path / "pred.csv"
    assert main(["predict", str(tiny_run), "--input", "synthetic", "--split", "test", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("split,index,prediction") and len(lines) > 10
    assert (
        main(
            [
                "predict",
                str(tiny_run),
                "--input",
                "synthetic",
                "--split",
                "test",
                "--modalities",
                "m0",
                "--out",
                str(tmp_path / "p.json"),
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "p.json").read_text())) == len(lines) - 1
    capsys.readouterr()
    assert main(["info"]) == 0
    shown = capsys.readouterr().out
    assert "fusions" in shown and "cross_entropy" in shown and "av-digits" in shown
    assert main(["train", "tiny/token-choise"]) == 2
    assert "Did you mean 'token-choice'" in capsys.readouterr().out
    assert main(["train", "tiny/token-choice", "--set", "model.moe.num_expert=3"]) == 2
    assert "did you mean num_experts" in capsys.readouterr().out
    assert main(["eval", str(tiny_run), "--noise", "x"]) == 2
    assert main(["predict", str(tiny_run), "--input", str(tmp_path / "nope")]) == 2


def test_predict_reads_users_data_in_the_manifest_format_with_a_modality_missing(tiny_run, tmp_path):
    from modalmoe.data.formats import save

    task = load_task("synthetic", num_samples=120, dim=8)
    test = task.test.select(["m0", "m2"])  # the users' data lacks m1 altogether
    save(Task(name="mine", splits={"train": test, "valid": test, "test": test}), tmp_path / "mine")
    out = tmp_path / "pred.csv"
    assert (
        main(["predict", str(tiny_run), "--input", str(tmp_path / "mine"), "--split", "test", "--out", str(out)]) == 0
    )
    rows = out.read_text().splitlines()
    assert len(rows) == len(test) + 1 and "p_0" in rows[0]
    wrong = load_task("synthetic", num_samples=120, dim=5)
    save(wrong, tmp_path / "wrong")
    assert main(["predict", str(tiny_run), "--input", str(tmp_path / "wrong")]) == 2


def test_several_objectives_and_ogm_train_together(tmp_path):
    cfg = get_preset(
        "tiny/token-choice",
        overrides=[
            "model.head.embed_dim=8",
            "train.epochs=2",
            "train.ogm.enabled=true",
            "train.objectives=[{name: cross_entropy, options: {label_smoothing: 0.1}}, {name: infonce, weight: 0.5},"
            " {name: matching, weight: 0.2}, {name: masked, weight: 0.2, options: {modality: m0}}]",
        ],
    )
    result = Trainer(cfg, tmp_path / "run", progress=False).fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert {"cross_entropy", "infonce/m0-m1", "matching", "masked", "ogm/m0"} <= set(train[-1])
    assert result.steps == 4


def test_the_collapse_alarm_warns_in_the_log(tmp_path):
    cfg = get_preset(
        "tiny/token-choice",
        overrides=["train.epochs=3", "train.collapse.min_entropy=1.0", "train.collapse.patience=2"],
    )  # normalised entropy is always below 1: every step alarms
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    alarms = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"alarm"' in x]
    assert alarms and alarms[0]["step"] == 2
    assert "routing collapse in MoE layer 0" in alarms[0]["message"]
