"""Reliability of the engine (issue 17, "nothing lost, nothing silently wrong"): a retained
autograd graph can be run backward twice through the hand-written expert kernels, and a
checkpoint whose tensor bytes were flipped is refused instead of loaded."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import modalmoe.moe.experts as experts_module
from modalmoe.checkpoint import save_checkpoint
from modalmoe.moe import ExpertBank, FeedForward, GroupedLayout, build_moe_layer, grouped_ffn, grouped_gemm
from modalmoe.train import CheckpointError, load_checkpoint

D, H = 16, 24
BACKENDS = ["mkl", "blocks"]


def _backend(backend: str, monkeypatch) -> None:
    if backend == "mkl" and not grouped_gemm.available(torch.ones(1)):
        pytest.skip("this PyTorch build does not export MKL's cblas_sgemm_batch")
    if backend == "blocks":  # the fallback kernel, as where MKL's grouped GEMM is missing
        monkeypatch.setattr(grouped_gemm, "available", lambda *t: False)


def _grads(tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("indexed", [False, True])
def test_a_retained_graph_runs_backward_twice_through_the_expert_kernel(
    backend, activation, gated, indexed, monkeypatch
):
    """The second backward gives the first one's gradients again, so they double exactly,
    and the first equals a fresh forward and backward (nothing was overwritten in place)."""
    _backend(backend, monkeypatch)
    torch.manual_seed(0)
    bank = ExpertBank(num_experts=4, dim=D, hidden=H, activation=activation)
    counts = [3, 0, 9, 5]
    layout = GroupedLayout.plan(counts)
    x = torch.randn(11 if indexed else sum(counts), D, requires_grad=True)
    index = torch.randint(0, 11, (sum(counts),)) if indexed else None
    gate = torch.rand(sum(counts), requires_grad=True) if gated else None
    leaves = [x, bank.w_in, bank.w_out] + ([gate] if gated else [])
    g = torch.randn(sum(counts), D)

    def loss():
        return (grouped_ffn(x, bank.w_in, bank.w_out, layout, activation, gate, index) * g).sum()

    loss().backward()
    fresh = _grads(leaves)
    for t in leaves:
        t.grad = None
    retained = loss()
    retained.backward(retain_graph=True)
    first = _grads(leaves)
    retained.backward()
    for a, b, total in zip(fresh, first, [t.grad for t in leaves], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert torch.equal(total, 2 * b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_moe_layer_backward_twice_doubles_gradients_like_a_dense_ffn(backend, monkeypatch):
    _backend(backend, monkeypatch)
    torch.manual_seed(1)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, k=2)
    dense = FeedForward(dim=D, hidden=H)
    x = torch.randn(3, 5, D)
    for module in (layer, dense):
        out = module(x)
        loss = (out.x if module is layer else out).square().sum()
        loss.backward(retain_graph=True)
        first = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        loss.backward()
        assert first
        for name, grad in first.items():
            torch.testing.assert_close(module.get_parameter(name).grad, 2 * grad, msg=name)


def test_without_a_retained_graph_the_kernel_frees_its_activations():
    """The memory saving stays: after a normal backward the node holds neither h nor a (they
    are freed during backward); with ``retain_graph`` it keeps them for the next pass."""
    if not grouped_gemm.available(torch.ones(1)):
        pytest.skip("this PyTorch build does not export MKL's cblas_sgemm_batch")
    torch.manual_seed(2)
    bank = ExpertBank(num_experts=2, dim=D, hidden=H, activation="gelu")
    layout = GroupedLayout.plan([4, 6])
    x = torch.randn(10, D, requires_grad=True)
    y = grouped_ffn(x, bank.w_in, bank.w_out, layout, "gelu", torch.rand(10))
    assert hasattr(y.grad_fn, "h") and hasattr(y.grad_fn, "a")
    y.sum().backward(retain_graph=True)
    assert hasattr(y.grad_fn, "h") and hasattr(y.grad_fn, "a")
    y.sum().backward()
    assert not hasattr(y.grad_fn, "h") and not hasattr(y.grad_fn, "a")


def test_differentiating_through_the_kernel_backward_raises_instead_of_dropping_terms():
    """The grouped GEMM runs outside autograd: a second-order gradient would silently lack
    the kernel's terms, so asking for one is an error."""
    if not grouped_gemm.available(torch.ones(1)):
        pytest.skip("this PyTorch build does not export MKL's cblas_sgemm_batch")
    bank = ExpertBank(num_experts=2, dim=D, hidden=H, activation="gelu")
    x = torch.randn(7, D, requires_grad=True)
    y = grouped_ffn(x, bank.w_in, bank.w_out, GroupedLayout.plan([3, 4]), "gelu")
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.square().sum().backward()


def test_where_torch_cannot_say_whether_the_graph_is_kept_the_kernel_keeps_its_tensors(monkeypatch):
    """The keep-graph query is a private binding; without it the kernel assumes the graph is
    kept: still correct for a retained graph and a normal one alike."""
    if not grouped_gemm.available(torch.ones(1)):
        pytest.skip("this PyTorch build does not export MKL's cblas_sgemm_batch")
    monkeypatch.setattr(experts_module, "_keep_graph", lambda: True)
    torch.manual_seed(2)
    bank = ExpertBank(num_experts=2, dim=D, hidden=H, activation="swiglu")
    layout = GroupedLayout.plan([4, 6])
    x = torch.randn(10, D, requires_grad=True)
    gate = torch.rand(10, requires_grad=True)
    grouped_ffn(x, bank.w_in, bank.w_out, layout, "swiglu", gate).square().sum().backward()
    once = _grads([x, gate, bank.w_in, bank.w_out])
    for t in (x, gate, bank.w_in, bank.w_out):
        t.grad = None
    loss = grouped_ffn(x, bank.w_in, bank.w_out, layout, "swiglu", gate).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    for a, b in zip(once, [x.grad, gate.grad, bank.w_in.grad, bank.w_out.grad], strict=True):
        assert torch.equal(b, 2 * a)


# --- checkpoints: tensor data is checksummed --------------------------------------------------


def _save(path):
    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    # Every kind of tensor the digest must read as bytes: half precision, bool, 0-d, empty.
    module.register_buffer("bf16", torch.randn(3, 2, dtype=torch.bfloat16))
    module.register_buffer("flags", torch.tensor([True, False, True]))
    module.register_buffer("scalar", torch.tensor(2.5, dtype=torch.float64))
    module.register_buffer("empty", torch.zeros(0, 4))
    save_checkpoint(path, module=module, config={"name": "tiny"}, progress={"step": 1})
    return module


def _data_offset(path) -> int:
    """Where safetensors' tensor bytes start: an 8-byte little-endian header length, then the header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def test_an_intact_checkpoint_loads(tmp_path):
    path = tmp_path / "last.safetensors"
    module = _save(path)
    loaded = load_checkpoint(path)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.tensors["module/" + key], value)
    assert "checksum" not in loaded.meta  # verification metadata is not a section of its own


@pytest.mark.parametrize("where", [0, 1000, -1])
def test_a_flipped_bit_in_the_tensor_data_is_refused(tmp_path, where):
    path = tmp_path / "best.safetensors"
    _save(path)
    data = bytearray(path.read_bytes())
    offset = _data_offset(path)
    position = offset + where if where >= 0 else len(data) + where
    assert offset <= position < len(data)
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "checksum" in message and "retrain" in message
    assert "\n" not in message


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path):
    """Files written before the checksum existed carry no checksum key: they load unverified."""
    path = tmp_path / "old.safetensors"
    _save(path)
    loaded = load_checkpoint(path)
    metadata = {"format": "modalmoe-checkpoint/1"}
    metadata.update({k: json.dumps(v) for k, v in loaded.meta.items()})
    metadata.update(config=json.dumps(loaded.config), progress=json.dumps(loaded.progress))
    save_file(loaded.tensors, str(path), metadata=metadata)
    old = load_checkpoint(path)
    assert old.progress == {"step": 1}
    for key, value in loaded.tensors.items():
        assert torch.equal(old.tensors[key], value)
