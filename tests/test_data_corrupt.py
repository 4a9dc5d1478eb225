"""Corruption protocols: determinism, purity, rates, keep_one, imbalance, graded noise and masking."""

import copy

import numpy as np
import pytest
import torch

from modalmoe.data import corrupt
from modalmoe.data.batch import ModalitySpec, MultimodalBatch, MultimodalDataset

N = 4000


def make_dataset(n: int = N, seed: int = 0) -> MultimodalDataset:
    """Image, sequence (variable length), tabular (one categorical column), text and vector."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, size=n)
    seq = rng.normal(size=(n, 8, 2)) * 3.0
    seq[np.arange(8)[None, :] >= lengths[:, None]] = 0.0  # padding is zero
    tab = rng.normal(size=(n, 3)) * np.array([1.0, 5.0, 1.0])
    tab[:, 2] = rng.integers(0, 4, size=n)
    words = [" ".join(f"w{j}" for j in range(20)) for _ in range(n)]
    present = {"img": rng.random(n) > 0.1}  # some samples lack the image from the start
    specs = {
        "img": ModalitySpec("img", "image", (1, 8, 8)),
        "seq": ModalitySpec("seq", "sequence", (None, 2)),
        "tab": ModalitySpec("tab", "tabular", (3,), categorical={2: 4}),
        "txt": ModalitySpec("txt", "text", ()),
        "vec": ModalitySpec("vec", "vector", (10,)),
    }
    return MultimodalDataset(
        specs=specs,
        inputs={
            "img": rng.normal(size=(n, 1, 8, 8)) * np.asarray(present["img"], float)[:, None, None, None],
            "seq": seq,
            "tab": tab,
            "txt": words,
            "vec": rng.normal(size=(n, 10)) * 2.0,
        },
        target=rng.integers(0, 3, size=n) * (rng.random(n) < 0.5) + (rng.random(n) < 0.1),  # unbalanced classes
        present=present,
        lengths={"seq": lengths},
    )


@pytest.fixture(scope="module")
def ds() -> MultimodalDataset:
    return make_dataset()


def snapshot(data):
    return copy.deepcopy(data.__dict__)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def equal_data(a, b) -> bool:
    if set(a.inputs) != set(b.inputs):
        return False
    for k in a.inputs:
        va, vb = a.inputs[k], b.inputs[k]
        if isinstance(va, list):
            if va != vb:
                return False
        elif not torch.equal(va, vb):
            return False
    return all(torch.equal(a.present[k], b.present[k]) for k in a.present)


PROTOCOL_CALLS = [
    lambda d, s: corrupt.drop_at_rate(d, 0.3, seed=s),
    lambda d, s: corrupt.add_noise(d, "seq", 3, seed=s),
    lambda d, s: corrupt.add_noise(d, "tab", 5, seed=s),
    lambda d, s: corrupt.add_noise(d, "img", 2, seed=s),
    lambda d, s: corrupt.mask(d, "img", 3, seed=s),
    lambda d, s: corrupt.mask(d, "txt", 3, seed=s),
    lambda d, s: corrupt.mask(d, "seq", 3, seed=s),
    lambda d, s: corrupt.imbalance(d, "vec", 0.3, seed=s),
]


@pytest.mark.parametrize("call", PROTOCOL_CALLS)
def test_deterministic_and_pure_on_datasets(call):
    data = make_dataset(300)
    before = snapshot(data)
    a, b, c = call(data, 0), call(data, 0), call(data, 1)
    assert_same(before, snapshot(data))  # input untouched
    assert a is not data and isinstance(a, MultimodalDataset)
    assert equal_data(a, b)
    assert not equal_data(a, c)
    assert not equal_data(a, data)


@pytest.mark.parametrize("call", PROTOCOL_CALLS[:-1])
def test_deterministic_and_pure_on_batches(call):
    batch = make_dataset(300).batch(torch.arange(300))
    before = snapshot(batch)
    a, b, c = call(batch, 5), call(batch, 5), call(batch, 6)
    assert_same(before, snapshot(batch))
    assert isinstance(a, MultimodalBatch) and a is not batch
    assert equal_data(a, b) and not equal_data(a, c)


def test_level_zero_is_identity_but_a_new_object(ds):
    for fn in (corrupt.add_noise, corrupt.mask):
        out = fn(ds, "seq", 0, seed=0)
        assert out is not ds and equal_data(out, ds)


def test_drop_modalities_dataset_and_batch(ds):
    out = corrupt.drop_modalities(ds, ["img", "txt"])
    assert not out.present["img"].any() and not out.present["txt"].any()
    assert out.present["seq"].all() and ds.present["txt"].all()
    # placeholders carry no data, so nothing leaks to a consumer that forgets `present`
    assert not out.inputs["img"].any() and set(out.inputs["txt"]) == {""}
    batch = out.batch(torch.arange(10))
    assert "img" not in batch.inputs and "txt" not in batch.inputs and set(batch.present) == set(ds.specs)

    b = corrupt.drop_modalities(ds.batch(torch.arange(16)), "seq")
    assert "seq" not in b.inputs and "seq" not in b.masks and not b.present["seq"].any()
    assert "seq" in ds.batch(torch.arange(16)).inputs


def test_drop_at_rate_matches_rate_without_keep_one(ds):
    out = corrupt.drop_at_rate(ds, {"seq": 0.2, "vec": 0.6}, seed=3, keep_one=False)
    assert abs((~out.present["seq"]).float().mean().item() - 0.2) < 0.03
    assert abs((~out.present["vec"]).float().mean().item() - 0.6) < 0.03
    assert out.present["tab"].all()
    # independence between modalities: joint absence ~ product
    joint = ((~out.present["seq"]) & (~out.present["vec"])).float().mean().item()
    assert abs(joint - 0.12) < 0.03
    # absent stays absent: samples without the image keep lacking it
    img = corrupt.drop_at_rate(ds, 0.3, seed=1, modalities=["img"], keep_one=False).present["img"]
    assert not (img & ~ds.present["img"]).any()
    assert abs((~img).float().mean().item() - (1 - 0.9 * 0.7)) < 0.03


def test_drop_at_rate_keep_one_keeps_a_modality_and_documented_rate():
    n, m, r = 6000, 3, 0.7
    data = MultimodalDataset(
        specs={f"v{i}": ModalitySpec(f"v{i}", "vector", (2,)) for i in range(m)},
        inputs={f"v{i}": np.ones((n, 2)) for i in range(m)},
        target=np.zeros(n, dtype=int),
    )
    out = corrupt.drop_at_rate(data, r, seed=0)
    flags = torch.stack(list(out.present.values()), 1)
    assert flags.any(1).all()
    expected = r - r**m / m  # documented effective rate with keep_one
    assert abs((~flags).float().mean().item() - expected) < 0.02
    loose = torch.stack(list(corrupt.drop_at_rate(data, r, seed=0, keep_one=False).present.values()), 1)
    assert (~loose.any(1)).any()
    # dropped rows are zeroed placeholders, kept rows keep their data
    for name in out.present:
        assert (out.inputs[name][~out.present[name]] == 0).all()
        assert (out.inputs[name][out.present[name]] == 1).all()


def test_drop_at_rate_on_batch_updates_masks(ds):
    batch = ds.batch(torch.arange(200))
    out = corrupt.drop_at_rate(batch, 0.5, seed=2, modalities=["seq"])
    gone = batch.present["seq"] & ~out.present["seq"]
    assert gone.any()
    assert not out.masks["seq"][gone].any() and (out.inputs["seq"][gone] == 0).all()
    assert torch.equal(out.masks["seq"][~gone], batch.masks["seq"][~gone])


def test_imbalance_hits_fraction_and_is_stratified(ds):
    out = corrupt.imbalance(ds, "vec", 0.25, seed=0)
    assert out.present["vec"].sum().item() == round(0.25 * N)
    for c in ds.target.unique():
        in_class = ds.target == c
        kept = out.present["vec"][in_class].float().mean().item()
        assert abs(kept - 0.25) < 1.0 / in_class.sum().item() + 1e-9
    # relative to the samples that carry it; absent stays absent
    img = corrupt.imbalance(ds, "img", 0.5, seed=0, stratify=False).present["img"]
    assert img.sum().item() == int(0.5 * ds.present["img"].sum().item() + 0.5)  # half rounds up
    assert not (img & ~ds.present["img"]).any()
    with pytest.raises(TypeError):
        corrupt.imbalance(ds.batch(torch.arange(4)), "vec", 0.5, seed=0)


def test_noise_std_grows_with_severity_and_spares_padding_and_absent(ds):
    x = ds.inputs["seq"]
    real = torch.arange(8)[None, :] < ds.lengths["seq"][:, None]
    std = corrupt.feature_std(ds, "seq")
    assert std.shape == (2,) and torch.allclose(std, torch.full((2,), 3.0), atol=0.15)
    measured = []
    for level in corrupt.LEVELS:
        out = corrupt.add_noise(ds, "seq", level, seed=level)
        delta = out.inputs["seq"] - x
        assert (delta[~real] == 0).all()  # padding untouched
        measured.append(delta[real].std().item() / 3.0)
    assert measured == sorted(measured)
    np.testing.assert_allclose(measured, corrupt.NOISE_STD, atol=0.03)

    img = corrupt.add_noise(ds, "img", 4, seed=0)
    absent = ~ds.present["img"]
    assert (img.inputs["img"][absent] == 0).all() and torch.equal(img.present["img"], ds.present["img"])
    assert (img.inputs["img"][~absent] != ds.inputs["img"][~absent]).all()


def test_noise_on_tabular_resamples_categorical_columns(ds):
    out = corrupt.add_noise(ds, "tab", 5, seed=0)
    cat, new = ds.inputs["tab"][:, 2], out.inputs["tab"][:, 2]
    assert set(new.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    # resampled with prob 0.5 to a uniform code: changed with prob 0.5 * 3/4
    assert abs((cat != new).float().mean().item() - 0.375) < 0.03
    numeric = (out.inputs["tab"][:, :2] - ds.inputs["tab"][:, :2]).std(0)
    torch.testing.assert_close(numeric, 2.0 * torch.tensor([1.0, 5.0]), rtol=0.06, atol=0.0)
    # on a batch, categorical columns are known only through the spec
    batch = ds.batch(torch.arange(500))
    with_spec = corrupt.add_noise(batch, "tab", 5, seed=0, spec=ds.specs["tab"], scale=corrupt.feature_std(ds, "tab"))
    assert set(with_spec.inputs["tab"][:, 2].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    with pytest.raises(ValueError, match="text"):
        corrupt.add_noise(ds, "txt", 1, seed=0)


@pytest.mark.parametrize("level", [1, 3, 5])
def test_mask_fraction_matches_severity(ds, level):
    f = corrupt.MASK_FRACTION[level]
    vec = corrupt.mask(ds, "vec", level, seed=0).inputs["vec"]
    assert abs((vec == 0).float().mean().item() - f) < 0.01

    seq = corrupt.mask(ds, "seq", level, seed=0)
    real = torch.arange(8)[None, :] < ds.lengths["seq"][:, None]
    zeroed = (seq.inputs["seq"] == 0).all(-1)
    assert abs(zeroed[real].float().sum().item() / real.sum().item() - f) < 0.01
    assert torch.equal(seq.lengths["seq"], ds.lengths["seq"])

    img = corrupt.mask(ds, "img", level, seed=0, patch=2)  # 4x4 grid of 2x2 patches
    present = ds.present["img"]
    assert abs((img.inputs["img"][present] == 0).float().mean().item() - f) < 0.01
    assert (img.inputs["img"][~present] == 0).all()

    txt = corrupt.mask(ds, "txt", level, seed=0).inputs["txt"]
    kept = np.mean([len(t.split()) for t in txt]) / 20
    assert abs(kept - (1 - f)) < 0.01
    assert all(set(t.split()) <= {f"w{j}" for j in range(20)} for t in txt[:50])


def test_mask_on_batch_respects_masks_and_present(ds):
    batch = ds.batch(torch.arange(64))
    out = corrupt.mask(batch, "seq", 5, seed=0)
    assert torch.equal(out.masks["seq"], batch.masks["seq"])
    pad = ~batch.masks["seq"]
    assert torch.equal(out.inputs["seq"][pad], batch.inputs["seq"][pad])
    # a modality absent from the whole batch is left as it is
    empty = corrupt.drop_modalities(batch, "vec")
    assert equal_data(corrupt.mask(empty, "vec", 3, seed=0), empty)
    assert equal_data(corrupt.add_noise(empty, "vec", 3, seed=0), empty)


def test_errors_are_clear(ds):
    with pytest.raises(ValueError, match="known modalities: img, seq, tab, txt, vec"):
        corrupt.drop_modalities(ds, "audio")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt.drop_at_rate(ds, 1.5, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt.drop_at_rate(ds, {"vec": -0.1}, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt.imbalance(ds, "vec", 2.0, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt.add_noise(ds, "vec", 6, seed=0)
    with pytest.raises(ValueError, match="severity"):
        corrupt.mask(ds, "vec", 0.5, seed=0)
    with pytest.raises(ValueError, match="unknown modality"):
        corrupt.mask(ds, "nope", 1, seed=0)


def test_describe_lists_every_protocol():
    docs = corrupt.describe()
    assert set(docs) == set(corrupt.PROTOCOLS) and all(docs.values())
