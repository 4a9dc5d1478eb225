"""Modality encoders: every registered one runs forward and backward, and absent data is never read."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modalmoe.model  # noqa: F401  (registers the encoders that hold MoE layers: text_minilm_moe)
from modalmoe.data import ModalitySpec
from modalmoe.encoders import build_encoder, encoders, image_pretrained

D = 16
TEXTS = ["a red dress that fits well", "too small, returned it", "lovely soft fabric", "", "the zipper broke"]

SPECS = {
    "image": ModalitySpec("img", "image", (1, 8, 8)),
    "image_efficientnet_lite0": ModalitySpec("img", "image", (1, 8, 8)),
    "sequence": ModalitySpec("seq", "sequence", (None, 3)),
    "tabular": ModalitySpec("tab", "tabular", (4,), categorical={1: 3, 3: 2}),
    "text_learned": ModalitySpec("txt", "text", ()),
    "text_minilm": ModalitySpec("txt", "text", ()),
    "text_minilm_moe": ModalitySpec("txt", "text", ()),
    "vector": ModalitySpec("vec", "vector", (6,)),
}
OPTIONS = {
    "image": {"patch": 4},
    "image_efficientnet_lite0": {"size": 32, "cache": False},  # weights: random (random_lite0), nothing fetched
    "sequence": {"patch": 2},
    "vector": {"tokens": 2},
    "text_learned": {"vocab_size": 64},
    "text_minilm": {"tokens": 2, "cache": False},  # memory-only: tests leave no files behind
    "text_minilm_moe": {"experts": 4, "k": 2, "max_length": 12},
}


def make_input(name: str, batch: int, seed: int = 0):
    """(x, mask) for ``batch`` samples of the modality kind behind registry ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name.startswith("image"):
        return torch.rand(batch, 1, 8, 8, generator=g), None
    if name == "sequence":
        lengths = torch.randint(1, 8, (batch,), generator=g)
        x = torch.randn(batch, 7, 3, generator=g)
        mask = torch.arange(7) < lengths.unsqueeze(1)
        return x * mask.unsqueeze(-1), mask
    if name == "tabular":
        x = torch.randn(batch, 4, generator=g)
        x[:, 1] = torch.randint(0, 3, (batch,), generator=g).float()
        x[:, 3] = torch.randint(0, 2, (batch,), generator=g).float()
        return x, None
    if name.startswith("text"):
        return [TEXTS[i % len(TEXTS)] for i in range(batch)], None
    return torch.randn(batch, 6, generator=g), None


@functools.cache
def random_lite0() -> str:
    """A randomly initialised EfficientNet-Lite0 as safetensors (the pinned ImageNet weights are
    checked in tests/test_image_pretrained.py's slow tier)."""
    torch.manual_seed(0)
    state = image_pretrained.EfficientNetLite0().state_dict()
    folder = tempfile.mkdtemp(prefix="modalmoe-lite0-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "random.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def build(name: str):
    torch.manual_seed(0)
    options = dict(OPTIONS.get(name, {}))
    if name == "image_efficientnet_lite0":
        options["weights"] = random_lite0()
    encoder = encoders.create(name, spec=SPECS[name], dim=D, **options)
    x, mask = make_input(name, 12, seed=1)
    encoder.fit(x, torch.ones(12, dtype=torch.bool), mask)
    return encoder


def test_every_kind_has_an_encoder():
    assert encoders.names() == sorted(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_encoder_forward_backward_and_absent_samples_get_no_tokens(name):
    encoder = build(name)
    x, mask = make_input(name, 5)
    present = torch.tensor([True, False, True, True, False])
    out = encoder(x, present, mask)
    assert out.x.shape[0] == 5 and out.x.shape[2] == D and out.mask.shape == out.x.shape[:2]
    assert not out.mask[~present].any() and (out.x[~present] == 0).all()
    assert out.mask[present].any(1).all()
    assert (out.x[~out.mask] == 0).all()  # padding tokens are zero
    out.x.sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert encoder.modality_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(SPECS))
def test_absent_data_is_never_read(name):
    """Garbage (even NaN) in an absent sample's row changes nothing."""
    encoder = build(name)
    x, mask = make_input(name, 4)
    present = torch.tensor([True, False, True, False])
    before = encoder(x, present, mask)
    if isinstance(x, list):
        x = [t if p else "completely different words" for t, p in zip(x, present.tolist(), strict=True)]
    else:
        x = x.clone()
        x[~present] = float("nan")
    after = encoder(x, present, mask)
    n = before.x.shape[1]
    assert torch.equal(before.x, after.x[:, :n]) and torch.isfinite(after.x).all()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_sample_does_not_depend_on_its_batch(name):
    encoder = build(name)
    x, mask = make_input(name, 4)
    present = torch.ones(4, dtype=torch.bool)
    full = encoder(x, present, mask)
    for i in range(4):
        xi = x[i : i + 1]
        one = encoder(xi, present[:1], None if mask is None else mask[i : i + 1])
        n = int(one.mask.sum()) if name in ("sequence", "text_learned") else one.x.shape[1]
        torch.testing.assert_close(one.x[0, :n], full.x[i, :n])


def test_sequence_padding_frames_do_not_leak():
    encoder = build("sequence")
    x, mask = make_input("sequence", 6)
    noisy = x + 100 * (~mask).unsqueeze(-1).float()
    present = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(encoder(x, present, mask).x, encoder(noisy, present, mask).x)


def test_tabular_rejects_codes_outside_the_cardinality():
    encoder = build("tabular")
    x, _ = make_input("tabular", 3)
    x[0, 1] = 3
    with pytest.raises(ValueError, match="outside 0..cardinality-1"):
        encoder(x, torch.ones(3, dtype=torch.bool))


def test_text_tokenizer_must_be_fitted_and_travels_in_the_state_dict():
    unfitted = build_encoder(SPECS["text_learned"], dim=D, vocab_size=64)
    with pytest.raises(RuntimeError, match="call encoder.fit"):
        unfitted(TEXTS[:2], torch.ones(2, dtype=torch.bool))
    fitted = build("text_learned")
    unfitted.load_state_dict(fitted.state_dict())
    present = torch.ones(len(TEXTS), dtype=torch.bool)
    torch.testing.assert_close(unfitted(TEXTS, present).x, fitted(TEXTS, present).x)
    ids, _ = fitted.encode(["fits well"])
    assert ids.shape[1] >= 1 and (ids > 1).all()  # seen words are not [UNK]


def test_image_patch_must_divide_the_image():
    with pytest.raises(ValueError, match="not divisible by patch=3"):
        build_encoder(SPECS["image"], dim=D, patch=3)
