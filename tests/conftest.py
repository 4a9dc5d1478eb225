"""Shared test helpers."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A bench cell run in-process (``bench.runner.run_cell``) sets torch's thread count for
    the whole process; restore it so no later test depends on which tests ran before it (the
    NaN blow-up in test_reliability.py takes another path on 1 thread than on 2)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def interrupted_then_resumed(monkeypatch):
    """``resume(config, out, fail_at)``: train ``config`` into ``out``, fail at the
    ``fail_at``-th loss call, resume, and return (the checkpoint before resuming, the last
    checkpoint after)."""
    from modalmoe.lifelong import growth_callbacks
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
            Trainer(config, out, progress=False, callbacks=growth_callbacks(config)).fit()
        monkeypatch.setattr(CrossEntropy, "forward", original)
        before = load_checkpoint(out / "checkpoints" / "last.safetensors")
        Trainer(read_run_config(out), out, progress=False, callbacks=growth_callbacks(read_run_config(out))).fit(
            resume=True
        )
        return before, load_checkpoint(out / "checkpoints" / "last.safetensors")

    return resume


def assert_same_checkpoint(a, b) -> None:
    """Two checkpoints hold the same progress and bit-equal tensors."""
    assert a.progress == b.progress
    for key, value in a.tensors.items():
        assert torch.equal(value, b.tensors[key]), key
