"""Evaluation: metrics agree with scikit-learn, retrieval and robustness measures on known
answers, and ``evaluate`` covers every modality subset and noise level of a tiny model."""

import io
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn import metrics as sk

from modalmoe.data.tasks import load_task
from modalmoe.evaluate import (
    ALL,
    PRIMARY,
    classification_metrics,
    cross_modal_retrieval,
    effective_robustness,
    evaluate,
    maxmin_normalize,
    modality_subsets,
    multilabel_metrics,
    predict,
    regression_metrics,
    relative_robustness,
    retrieval_metrics,
    task_metrics,
)
from modalmoe.model import build_model
from modalmoe.model.presets import get_preset

# --- metrics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 5])
def test_classification_metrics_match_sklearn(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(300, classes, generator=g)
    target = torch.randint(0, classes, (300,), generator=g)
    out = classification_metrics(logits, target)
    probs, y = logits.double().softmax(-1).numpy(), target.numpy()
    pred = probs.argmax(1)
    auroc = sk.roc_auc_score(y, probs[:, 1]) if classes == 2 else sk.roc_auc_score(y, probs, multi_class="ovr")
    assert out["accuracy"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-6)
    assert out["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"), abs=1e-6)
    assert out["auroc"] == pytest.approx(auroc, abs=1e-6)
    assert out["nll"] == pytest.approx(sk.log_loss(y, probs, labels=range(classes)), abs=1e-5)
    assert all(isinstance(v, float) for v in out.values())


def test_multilabel_and_regression_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g)
    target = (torch.rand(200, 4, generator=g) < 0.4).long()
    out = multilabel_metrics(logits, target)
    probs, y = logits.sigmoid().double().numpy(), target.numpy()
    pred = (probs > 0.5).astype(int)
    assert out["accuracy"] == pytest.approx((pred == y).mean(), abs=1e-6)
    assert out["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"), abs=1e-6)
    assert out["auroc"] == pytest.approx(sk.roc_auc_score(y, probs, average="macro"), abs=1e-6)

    for shape in [(50,), (50, 3)]:
        pred_r, true_r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        out = regression_metrics(pred_r, true_r)
        assert out["mse"] == pytest.approx(sk.mean_squared_error(true_r.numpy(), pred_r.numpy()), abs=1e-5)
        assert out["mae"] == pytest.approx(sk.mean_absolute_error(true_r.numpy(), pred_r.numpy()), abs=1e-5)
        assert out["r2"] == pytest.approx(sk.r2_score(true_r.numpy(), pred_r.numpy()), abs=1e-5)


def test_ece_on_a_hand_built_case():
    # Four samples at confidence 0.9 with 3 right (accuracy 0.75), two at 0.7 with 1 right:
    # ECE = 4/6 * |0.9 - 0.75| + 2/6 * |0.7 - 0.5| = 0.1 + 0.0667.
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.3, 0.7]] * 2)
    target = torch.tensor([0, 0, 0, 1, 1, 0])
    out = classification_metrics(probs.log(), target)
    assert out["ece"] == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.2, abs=1e-5)
    assert out["accuracy"] == pytest.approx(4 / 6)


def test_metrics_refuse_empty_input_and_unknown_kinds():
    with pytest.raises(ValueError, match="N = 0"):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown task kind"):
        task_metrics(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "ranking")
    assert set(PRIMARY) == {"classification", "multilabel", "regression"}


# --- retrieval --------------------------------------------------------------------------------


def test_retrieval_on_known_ranks():
    query = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    out = retrieval_metrics(query, 3.0 * query)  # cosine similarity ignores the scale
    assert out == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "map": 1.0}

    # Gallery item j points mostly at query sigma(j) and a little at query j: queries 0 and 1
    # (swapped by sigma) find a decoy first and their match second; queries 2, 3 rank it first.
    sigma = [1, 0, 2, 3]
    eye = torch.eye(4)
    gallery = eye[sigma] + 0.5 * eye
    out = retrieval_metrics(eye, gallery, ks=(1, 2))
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(1.0)
    assert out["map"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_cross_modal_retrieval_uses_samples_with_both_modalities():
    emb = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    embeddings = {"a": emb, "b": emb.clone(), "c": emb.clone()}
    present = {"a": torch.ones(10, dtype=torch.bool), "b": torch.arange(10) < 6, "c": torch.arange(10) >= 8}
    out = cross_modal_retrieval(embeddings, present, ks=(1,))
    assert set(out) == {("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")}  # b and c share no sample
    assert out[("a", "b")]["samples"] == 6 and out[("c", "a")]["samples"] == 2
    assert all(m["recall@1"] == 1.0 and m["map"] == 1.0 for m in out.values())


# --- robustness -------------------------------------------------------------------------------


def test_modality_subsets():
    subsets = modality_subsets(["a", "b", "c"])
    assert len(subsets) == 7 and len(set(subsets)) == 7
    assert subsets[0] == ("a", "b", "c")
    assert [len(s) for s in subsets] == [3, 2, 2, 2, 1, 1, 1]
    assert modality_subsets(["x"]) == [("x",)]


def test_multibench_robustness_on_hand_computed_numbers():
    # Relative: trapezoids on MultiBench's 0.1 grid: (0.9 + 0.8) * 0.05 + (0.8 + 0.6) * 0.05.
    assert relative_robustness([0.9, 0.8, 0.6]) == pytest.approx(0.155)
    assert relative_robustness([0.9, 0.8, 0.6], [0.0, 0.5, 1.0]) == pytest.approx(0.425 + 0.35)
    assert relative_robustness([0.7]) == 0.0
    # Effective: the reference shifted to the clean score 0.9 is [0.9, 0.85, 0.6].
    assert effective_robustness([0.9, 0.8, 0.6], [0.7, 0.65, 0.4]) == pytest.approx(-0.05)
    assert effective_robustness([0.5, 0.5], [0.9, 0.4]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        effective_robustness([0.9, 0.8], [0.9])
    assert maxmin_normalize({"a": 1.0, "b": 3.0, "c": 2.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert maxmin_normalize({"a": 1.0, "b": 3.0}, lower_is_better=True) == {"a": 1.0, "b": 0.0}


# --- the runner on a tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny/token-choice", overrides=["model.head.embed_dim=8"])
    task = load_task(cfg.task, **cfg.task_options)
    torch.manual_seed(0)
    model = build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train)
    test = task.test
    rows = torch.arange(len(test))
    # m0 absent from rows 0-4, m1 from rows 3-7: rows 3 and 4 carry only m2.
    test = test.replace(present={"m0": rows >= 5, "m1": (rows < 3) | (rows >= 8)})
    return model, task, test


def test_evaluate_covers_subsets_noise_and_retrieval(tiny):
    model, task, test = tiny
    n = len(test)
    report = evaluate(model, test, noise_levels=(0, 2, 4), train_scale=task.train, batch_size=7)
    assert report.kind == "classification" and report.metric == "accuracy" and report.samples == n
    counts = {r.modalities: r.samples for r in report.subsets}
    assert len(counts) == 7 and report.subsets[0].modalities == ("m0", "m1", "m2")
    assert counts[("m0",)] == n - 5 and counts[("m1",)] == n - 5 and counts[("m0", "m1")] == n - 2
    assert all(counts[s] == n for s in counts if "m2" in s)
    assert all(set(r.metrics) == {"accuracy", "macro_f1", "auroc", "ece", "nll"} for r in report.subsets)

    assert {(r.noisy, r.level) for r in report.noise} == {
        (m, level) for m in ("m0", "m1", "m2", ALL) for level in (0, 2, 4)
    }
    for row in report.noise:
        if row.level == 0:  # level 0 is the identity
            assert row.metrics == pytest.approx(report.metrics)
    assert [r.noisy for r in report.robustness] == ["m0", "m1", "m2", ALL]
    curve = report.robustness[-1]
    assert curve.levels == [0, 2, 4] and curve.scores[0] == report.metrics["accuracy"]
    assert curve.relative == pytest.approx(relative_robustness(curve.scores, [0.0, 0.4, 0.8]))
    assert curve.effective is None
    assert len(report.retrieval) == 6 and report.retrieval[("m0", "m1")]["samples"] == n - 8

    data = report.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert len(data["subsets"]) == 7 and len(data["noise"]) == 12 and len(data["retrieval"]) == 6
    out = io.StringIO()
    report.print(Console(file=out, width=160))
    text = out.getvalue()
    for title in ("Modality subsets", "Gaussian noise", "MultiBench robustness", "Cross-modal retrieval"):
        assert title in text

    # A model compared with itself has zero effective robustness.
    reference = {r.noisy: r.scores for r in report.robustness}
    again = evaluate(model, test, subsets=False, noise_levels=(2, 4), train_scale=task.train, reference=reference)
    assert not again.subsets and all(r.effective == pytest.approx(0.0) for r in again.robustness)
    with pytest.raises(ValueError, match="text|unknown"):
        evaluate(model, test, noise_levels=(1,), noise_modalities=["nope"])


def test_predict_restores_mode_and_skips_samples_without_modalities(tiny):
    model, _, test = tiny
    model.train()
    pred = predict(model, test, batch_size=4)
    assert model.training
    assert pred.logits.shape == (len(test), 2) and torch.equal(pred.index, torch.arange(len(test)))
    assert pred.present.shape == (len(test), 3) and set(pred.embeddings) == {"m0", "m1", "m2"}
    model.eval()
    only = predict(model, test, modalities=["m0"])
    assert not model.training
    assert torch.equal(only.index, torch.arange(5, len(test)))
    assert not only.present[:, 1:].any() and torch.equal(only.target, test.target[5:])
    # In eval mode the model is deterministic: the same rows give the same logits.
    assert torch.allclose(only.logits, predict(model, test.subset(range(5, len(test))), modalities=["m0"]).logits)
    assert math.isfinite(float(np.asarray(pred.logits).sum()))
