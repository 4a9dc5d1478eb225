"""Shared test helpers."""

import pytest
import torch


@pytest.fixture
def interrupted_then_resumed(monkeypatch):
    """``resume(config, out, fail_at)``: train ``config`` into ``out``, fail at the
    ``fail_at``-th loss call, resume, and return (the checkpoint before resuming, the last
    checkpoint after)."""
    from modalmoe.objectives.supervised import CrossEntropy
    from modalmoe.train import Trainer, load_checkpoint, read_run_config

    def resume(config, out, fail_at: int):
        original, calls = CrossEntropy.forward, []

        def fail(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("interrupted")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(CrossEntropy, "forward", fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            Trainer(config, out, progress=False).fit()
        monkeypatch.setattr(CrossEntropy, "forward", original)
        before = load_checkpoint(out / "checkpoints" / "last.safetensors")
        Trainer(read_run_config(out), out, progress=False).fit(resume=True)
        return before, load_checkpoint(out / "checkpoints" / "last.safetensors")

    return resume


def assert_same_checkpoint(a, b) -> None:
    """Two checkpoints hold the same progress and bit-equal tensors."""
    assert a.progress == b.progress
    for key, value in a.tensors.items():
        assert torch.equal(value, b.tensors[key]), key
