"""The synthetic task: determinism, splits, ground truth, and what each mode lets a model learn."""

import numpy as np
import pytest
import torch

from modalmoe.data.tasks.synthetic import SyntheticConfig, latent, make_synthetic

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402


def features(ds, names):
    """Concatenated features; sequences are averaged over their valid steps."""
    cols = []
    for name in names:
        x = ds.inputs[name]
        if x.dim() == 3:
            x = x.sum(1) / ds.lengths[name][:, None]
        cols.append(x)
    return torch.cat(cols, 1).numpy()


def accuracy(task, names, model=None):
    model = model or LogisticRegression(max_iter=500)
    model.fit(features(task.train, names), task.train.target.numpy())
    return model.score(features(task.test, names), task.test.target.numpy())


def test_deterministic_and_seeded():
    a, b, c = make_synthetic(num_samples=300), make_synthetic(num_samples=300), make_synthetic(num_samples=300, seed=1)
    for split in ("train", "valid", "test"):
        for name in a.modalities:
            assert torch.equal(a.splits[split].inputs[name], b.splits[split].inputs[name])
        assert torch.equal(a.splits[split].target, b.splits[split].target)
    assert not torch.equal(a.train.inputs["m0"], c.train.inputs["m0"])


def test_splits_are_stratified_70_15_15_and_describe_provenance():
    task = make_synthetic(num_samples=2000, num_classes=3)
    assert task.name == "synthetic" and task.modalities == ["m0", "m1", "m2"]
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sum(sizes.values()) == 2000
    assert abs(sizes["train"] - 1400) <= 3 and abs(sizes["valid"] - 300) <= 3
    overall = np.bincount(np.concatenate([d.target.numpy() for d in task.splits.values()]), minlength=3) / 2000
    for ds in task.splits.values():
        np.testing.assert_allclose(np.bincount(ds.target.numpy(), minlength=3) / len(ds), overall, atol=0.01)
        assert ds.num_classes == 3 and ds.inputs["m0"].shape[1:] == (16,)
    assert "no license needed" in task.description and "redundant" in task.description


@pytest.mark.parametrize("mode,classes", [("redundant", 3), ("complementary", 3), ("unique", 8)])
def test_latent_codes_are_the_documented_ground_truth(mode, classes):
    config = SyntheticConfig(num_samples=600, num_classes=classes, mode=mode)
    ds = make_synthetic(config).train
    codes, y = latent(ds), ds.target
    assert codes.shape == (len(ds), 3)
    if mode == "redundant":
        assert (codes == y[:, None]).all()
    elif mode == "complementary":
        assert torch.equal(codes.sum(1) % classes, y)
    else:
        assert torch.equal((codes * torch.tensor([1, 2, 4])).sum(1), y)


def test_redundant_every_modality_alone_beats_chance():
    task = make_synthetic(mode="redundant", signal=1.5)
    for name in task.modalities:
        assert accuracy(task, [name]) > 0.75  # Bayes 0.86


def test_complementary_needs_fusion():
    task = make_synthetic(mode="complementary", num_modalities=2, signal=3.0)
    for name in task.modalities:
        assert abs(accuracy(task, [name]) - 0.5) < 0.08
    assert abs(accuracy(task, task.modalities) - 0.5) < 0.08  # linear fusion cannot do XOR
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=400, random_state=0)
    assert accuracy(task, task.modalities, mlp) > 0.85  # Bayes ~0.97


def test_unique_each_modality_knows_one_bit():
    task = make_synthetic(mode="unique", num_modalities=3, num_classes=8, signal=3.0)
    for name in task.modalities:
        assert 0.17 < accuracy(task, [name]) < 0.3  # one bit of three: at best 1/4
    assert accuracy(task, task.modalities) > 0.8


def test_signal_strength_orders_single_modality_accuracy():
    task = make_synthetic(signal=(0.4, 1.0, 2.5))
    scores = [accuracy(task, [name]) for name in task.modalities]
    assert scores == sorted(scores) and scores[2] - scores[0] > 0.2


def test_missing_rates_are_honoured():
    task = make_synthetic(missing=(0.0, 0.2, 0.5))
    allsplits = list(task.splits.values())
    for name, rate in zip(task.modalities, (0.0, 0.2, 0.5), strict=True):
        flags = torch.cat([d.present[name] for d in allsplits])
        assert abs((~flags).float().mean().item() - rate) < 0.03
        for d in allsplits:
            assert (d.inputs[name][~d.present[name]] == 0).all()  # placeholders carry no data


def test_sequence_kind_spreads_the_signal_over_valid_steps():
    task = make_synthetic(kind="sequence", length=12, min_length=4, num_modalities=2, signal=2.0)
    ds = task.train
    spec = ds.specs["m0"]
    assert spec.kind == "sequence" and spec.shape == (None, 16) and ds.inputs["m0"].shape[1:] == (12, 16)
    lengths = ds.lengths["m0"]
    assert lengths.min() >= 4 and lengths.max() <= 12 and len(lengths.unique()) > 1
    pad = torch.arange(12)[None, :] >= lengths[:, None]
    assert (ds.inputs["m0"][pad] == 0).all()
    assert accuracy(task, ["m0"]) > 0.8  # time average has the vector case's SNR: Bayes 0.92


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="2\\*\\*num_modalities = 8"):
        make_synthetic(mode="unique")
    with pytest.raises(ValueError, match="unknown mode"):
        make_synthetic(mode="xor")
    with pytest.raises(ValueError, match="signal has 2 values"):
        make_synthetic(signal=(1.0, 2.0))
    with pytest.raises(ValueError, match="missing rates"):
        make_synthetic(missing=1.5)
    with pytest.raises(TypeError, match="known fields"):
        make_synthetic(num_sample=10)
