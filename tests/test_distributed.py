"""Distributed oracles with real processes (2 gloo ranks on 127.0.0.1, launched by torchrun):
an expert-parallel MoE layer equals the local layer in forward and backward; 2-rank data
parallel training equals one process on the full batch; a checkpoint from a 2-rank
expert-parallel run loads into one process and predicts the same.

This file is also the workers' script: ``python tests/test_distributed.py SCENARIO OUT``
under torchrun runs one scenario and writes its results under OUT for the test to compare.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalmoe.moe import build_moe_layer

HERE = Path(__file__).resolve()
TOL = 1e-5
# Layer cases: the routers and combines that reach the experts through the sharded bank.
LAYER_CASES = {
    "token_choice": dict(router="token_choice", k=2),
    "capacity": dict(router="token_choice", k=2, capacity_factor=0.75),
    "expert_choice": dict(router="expert_choice"),
    "soft": dict(router="soft", router_options={"slots_per_expert": 2}),
    "communication": dict(router="token_choice", k=2, communication="dense"),
}
# A tiny run: 84 training samples in 4 steps of 25, 25, 25 and 9 (split 13/12 and 5/4 over two
# ranks: uneven shards), no dropout, and no router aux losses (they are computed per rank; see
# modalmoe.train.distributed).
RUN = ["train.epochs=1", "train.batch_size=25", "train.aux_weights={}", "model.dropout=0.0"]


def _layer(case: str):
    torch.manual_seed(0)
    return build_moe_layer(dim=16, hidden=24, num_experts=4, **LAYER_CASES[case])


def _layer_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens [B, N, D] and the upstream gradient of its output."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 10, 16, generator=g), torch.randn(3, 10, 16, generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def test_expert_parallel_without_enough_processes_is_refused_with_the_fix():
    from modalmoe.config import ConfigError
    from modalmoe.model.presets import get_preset
    from modalmoe.train.distributed import DistributedError, setup_parallel

    config = get_preset("tiny/token-choice", overrides=["distributed.expert_parallel_size=2"])
    with pytest.raises(DistributedError, match="torchrun --nproc-per-node 2"):
        setup_parallel(config, 84)  # one process, no torchrun
    with pytest.raises(ConfigError, match="not divisible by distributed.expert_parallel_size"):
        get_preset("tiny/token-choice", overrides=["distributed.expert_parallel_size=3"])
    with pytest.raises(ConfigError, match="needs MoE layers"):
        get_preset("tiny/dense-early", overrides=["distributed.expert_parallel_size=2"])


# --- (a) the expert-parallel layer ------------------------------------------------------------


@pytest.mark.slow
def test_expert_parallel_layer_equals_the_local_layer_forward_and_backward(tmp_path):
    _torchrun([str(HERE), "layer", str(tmp_path)])
    for case in LAYER_CASES:
        ref = _layer(case)
        ranks = [torch.load(tmp_path / f"{case}-{r}.pt") for r in range(2)]
        for r, got in enumerate(ranks):
            x, upstream = _layer_inputs(r)
            x.requires_grad_(True)
            out = ref(x).x
            (out * upstream).sum().backward()  # reference grads accumulate over both ranks' tokens
            torch.testing.assert_close(got["out"], out.detach(), atol=TOL, rtol=0, msg=f"{case} rank {r} output")
            torch.testing.assert_close(got["x_grad"], x.grad, atol=TOL, rtol=0, msg=f"{case} rank {r} input grad")
        for name, p in ref.named_parameters():
            if name.startswith("experts."):  # each rank holds half of the experts
                got = torch.cat([ranks[0]["grads"][name], ranks[1]["grads"][name]])
            else:  # replicated: each rank has its own tokens' gradient; data parallel sums them
                got = ranks[0]["grads"][name] + ranks[1]["grads"][name]
            torch.testing.assert_close(got, p.grad, atol=TOL, rtol=0, msg=f"{case}: gradient of {name}")
        assert ranks[0]["local_shape"][0] == ranks[1]["local_shape"][0] == 2  # 4 experts over 2 ranks


def _worker_layer(out: Path) -> None:
    import torch.distributed as dist

    from modalmoe.moe.parallel import ShardedExpertBank, shard_experts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for case in LAYER_CASES:
        layer = _layer(case)
        assert shard_experts(layer) == 1 and isinstance(layer.experts, ShardedExpertBank)
        x, upstream = _layer_inputs(rank)
        x.requires_grad_(True)
        y = layer(x).x
        (y * upstream).sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        result = dict(out=y.detach(), x_grad=x.grad, grads=grads, local_shape=tuple(layer.experts.w_in.shape))
        torch.save(result, out / f"{case}-{rank}.pt")
    dist.destroy_process_group()


# --- (b) data parallel training ----------------------------------------------------------------


def _single_process_run(out: Path, overrides: list[str]):
    from modalmoe.model.presets import get_preset
    from modalmoe.train import Trainer

    return Trainer(get_preset("tiny/token-choice", overrides=overrides), out, progress=False).fit()


def _assert_same_weights(a: Path, b: Path, which: str = "last") -> None:
    from modalmoe.train import load_checkpoint

    ca, cb = (load_checkpoint(p / "checkpoints" / f"{which}.safetensors") for p in (a, b))
    assert ca.progress["step"] == cb.progress["step"] > 0
    keys = [k for k in ca.tensors if k.startswith(("module/", "optimizer/"))]
    assert keys and set(keys) == {k for k in cb.tensors if k.startswith(("module/", "optimizer/"))}
    for key in keys:
        a, b = ca.tensors[key], cb.tensors[key]
        if key.startswith("module/") and key.endswith(".qkv.bias"):
            # softmax(q (k + b)^T) does not depend on the key bias b: its gradient is rounding
            # noise (~1e-10, see the moments, compared below) that AdamW divides by its own size,
            # so each run's noise moves it by up to ~lr. Compare the query and value parts.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=key)


@pytest.mark.slow
def test_two_rank_data_parallel_training_equals_one_process(tmp_path):
    sets = [arg for o in RUN for arg in ("--set", o)]
    dist_run = tmp_path / "ddp"
    done = _torchrun(["-m", "modalmoe", "train", "tiny/token-choice", "--out", str(dist_run), "--quiet", *sets])
    _single_process_run(tmp_path / "single", RUN)
    _assert_same_weights(dist_run, tmp_path / "single")
    # Rank 0 alone logs and summarises; its train losses are the global batch's.
    lines = (dist_run / "metrics.jsonl").read_text().splitlines()
    single = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(single)
    import json

    for a, b in zip(lines, single, strict=True):
        a, b = json.loads(a), json.loads(b)
        if a["split"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert (dist_run / "summary.json").is_file(), done.stdout


@pytest.mark.slow
def test_two_rank_bias_balancing_equals_one_process(tmp_path):
    """Loss-free balancing under data parallelism: each rank counts its own tokens, the counts
    are summed over ranks before the update, and DDP leaves the buffers alone, so the biases
    (and everything else) end where one process on the full batch ends."""
    from modalmoe.train import load_checkpoint

    run = [*RUN, "train.accumulate=2", "model.moe.router_options.bias_rate=0.01"]  # counts span micro-batches
    sets = [arg for o in run for arg in ("--set", o)]
    _torchrun(["-m", "modalmoe", "train", "tiny/token-choice", "--out", str(tmp_path / "ddp"), "--quiet", *sets])
    _single_process_run(tmp_path / "single", run)
    _assert_same_weights(tmp_path / "ddp", tmp_path / "single")
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors").tensors
    biases = [k for k in saved if k.startswith("module/") and k.endswith("balance.bias")]
    assert biases and all(float(saved[k].abs().sum()) > 0 for k in biases)


# --- (c) expert-parallel training and its checkpoint -------------------------------------------


@pytest.mark.slow
def test_expert_parallel_checkpoint_loads_into_one_process_and_predicts_the_same(tmp_path):
    from modalmoe.evaluate.runner import predict
    from modalmoe.train import load_run_model

    run = tmp_path / "ep"
    _torchrun([str(HERE), "ep_train", str(run)])
    saved = load_run_model(run, which="last")
    assert saved.state_dict()  # an ordinary single-process model
    live = torch.load(run / "ep_predictions.pt")
    assert live["sharded"] == 2  # both MoE layers of the tiny model ran expert-parallel
    task = _single_task()
    with torch.no_grad():
        here = predict(saved, task.test, batch_size=256).logits
    torch.testing.assert_close(here, live["trained"], atol=TOL, rtol=0)  # the model that trained, sharded
    torch.testing.assert_close(here, live["reloaded"], atol=TOL, rtol=0)  # the checkpoint, sharded on load
    # And the expert-parallel run trained exactly like one process (expert gradients included).
    _single_process_run(tmp_path / "single", RUN)
    _assert_same_weights(run, tmp_path / "single")


def _single_task():
    from modalmoe.model.presets import get_preset
    from modalmoe.train.trainer import experiment_task

    return experiment_task(get_preset("tiny/token-choice", overrides=RUN))


def _worker_ep_train(out: Path) -> None:
    import torch.distributed as dist

    from modalmoe.checkpoint import restore_module
    from modalmoe.evaluate.runner import predict
    from modalmoe.model.multimodal import build_model
    from modalmoe.model.presets import get_preset
    from modalmoe.moe.parallel import shard_experts, sharded_banks
    from modalmoe.train import Trainer, load_checkpoint
    from modalmoe.train.distributed import shard_state
    from modalmoe.train.trainer import read_task_info

    config = get_preset("tiny/token-choice", overrides=[*RUN, "distributed.expert_parallel_size=2"])
    dist.init_process_group("gloo")  # the trainer uses an existing group as it finds it

    class Recording(Trainer):
        """Keeps the test predictions of the live (sharded) model at each validation."""

        def validate(self, model):
            self.sharded = len(sharded_banks(model))
            with torch.no_grad():
                self.trained = predict(model, self.task.test, batch_size=256).logits
            return super().validate(model)

    trainer = Recording(config, out, progress=False)
    trainer.fit()
    # Load the (gathered) checkpoint into a fresh sharded model on both ranks.
    dist.barrier()
    info = read_task_info(out)
    model = build_model(config.model, info["specs"], task_type=info["task_type"], outputs=info["outputs"])
    shard_experts(model)
    restore_module(
        model, shard_state(model, load_checkpoint(out / "checkpoints" / "last.safetensors").model_state()), ""
    )
    with torch.no_grad():
        reloaded = predict(model.eval(), trainer.task.test, batch_size=256).logits
    if dist.get_rank() == 0:
        torch.save(
            {"trained": trainer.trained, "reloaded": reloaded, "sharded": trainer.sharded}, out / "ep_predictions.pt"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, target = sys.argv[1], Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    {"layer": _worker_layer, "ep_train": _worker_ep_train}[scenario](target)
