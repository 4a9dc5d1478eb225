"""The typed progress a checkpoint carries: it reads and writes the layout checkpoints have
always had (callbacks' states under their names), so older runs resume unchanged."""

import pytest

from modalmoe.train.progress import Progress


def test_progress_round_trips_the_checkpoint_layout():
    saved = {
        "step": 12,
        "epoch": 3,
        "batch": 0,
        "best": 0.25,
        "bad_evals": 1,
        "stopped_early": False,
        "best_metrics": {"accuracy": 0.75, "nll": 0.25},
        "collapse": {"alarms": 2},  # a callback's state, by the callback's name
    }
    progress = Progress.from_dict(saved)
    assert progress.step == 12 and progress.best_metrics == {"accuracy": 0.75, "nll": 0.25}
    assert progress.callbacks == {"collapse": {"alarms": 2}} and progress.history == []
    assert progress.to_dict() == saved
    fresh = Progress().to_dict()
    assert fresh == {"step": 0, "epoch": 0, "batch": 0, "best": None, "bad_evals": 0, "stopped_early": False}
    progress.history.append({"step": 12, "changes": {"train.epochs": [3, 5]}})
    assert Progress.from_dict(progress.to_dict()) == progress


def test_a_callback_named_like_a_field_is_refused():
    with pytest.raises(ValueError, match=r"callbacks named \['step'\]"):
        Progress(callbacks={"step": {}}).to_dict()
