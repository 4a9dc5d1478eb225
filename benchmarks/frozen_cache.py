"""The frozen image encoder's feature cache during training: time in the encoder per epoch.

    python benchmarks/frozen_cache.py                          # easy-vqa-pretrained/dense-early, 2 epochs
    python benchmarks/frozen_cache.py --preset av-digits-pretrained/dense-early --epochs 3

Trains the preset with an empty feature cache (a fresh ``$MODALMOE_CACHE`` root, with the pinned
weights copied into it, so nothing is fetched) and times every training forward of the modality's
encoder (``--modality``, default ``image``), by hooks, per epoch. The first epoch runs each distinct
training image through the frozen EfficientNet-Lite0 once and writes its features; later epochs
read them from memory. Printed: the encoder's seconds per epoch, their share of the epoch, and the
ratio of each later epoch's encoder time to the first one's (the target is < 0.10). Validation
passes (not training forwards) are left out. ``--cache DIR`` keeps the cache root (and the features
written to disk) for a second run, which then times a process that reads the features from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="easy-vqa-pretrained/dense-early")
    parser.add_argument("--modality", default="image")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: a fresh temporary one)")
    parser.add_argument("--out", type=Path, default=Path("runs/frozen-cache-bench"))
    args = parser.parse_args()

    from modalmoe.data.sources import cache_dir

    user_cache = cache_dir()  # bundled tasks and pinned weights already fetched there
    root = args.cache or Path(tempfile.mkdtemp(prefix="modalmoe-cache-"))
    for sub in ("files", "wheels", "models", "tasks"):  # everything but the feature caches
        if (user_cache / sub).is_dir() and not (root / sub).exists():
            shutil.copytree(user_cache / sub, root / sub, symlinks=True)
    os.environ["MODALMOE_CACHE"] = str(root)

    from modalmoe.model.presets import get_preset
    from modalmoe.train import Trainer
    from modalmoe.train.callbacks.base import Callback

    seconds: dict[int, float] = defaultdict(float)
    calls: dict[int, int] = defaultdict(int)
    epoch_wall: dict[int, list[float]] = defaultdict(list)

    class EncoderClock(Callback):
        name = "encoder-clock"

        def __init__(self, steps_per_epoch: int) -> None:
            self.steps_per_epoch = steps_per_epoch
            self.forwards = 0  # training forwards so far: the epoch is forwards // steps_per_epoch

        @property
        def epoch(self) -> int:
            return self.forwards // self.steps_per_epoch

        def on_model(self, model, init_report) -> None:
            encoder = model.encoders[args.modality]
            started = {}

            def before(module, inputs):
                if module.training:
                    started["t"] = time.perf_counter()

            def after(module, inputs, output):
                if module.training and "t" in started:
                    seconds[self.epoch] += time.perf_counter() - started.pop("t")
                    calls[self.epoch] += 1
                    epoch_wall[self.epoch].append(time.perf_counter())
                    self.forwards += 1

            encoder.register_forward_pre_hook(before)
            encoder.register_forward_hook(after)

    config = get_preset(args.preset, overrides=[f"train.epochs={args.epochs}", "train.early_stopping=null"])
    trainer = Trainer(config, args.out, progress=False)
    steps = -(-len(trainer.task.train) // config.train.batch_size)  # the trainer keeps the last short batch
    trainer = Trainer(config, args.out, task=trainer.task, progress=False, callbacks=[EncoderClock(steps)])
    trainer.fit(overwrite=True)
    epochs = sorted(seconds)
    walls = {e: epoch_wall[e][-1] - epoch_wall[e][0] for e in epochs if len(epoch_wall[e]) > 1}
    result = {
        "preset": args.preset,
        "encoder_seconds": {e: round(seconds[e], 3) for e in epochs},
        "forwards": {e: calls[e] for e in epochs},
        "ratio_to_first": {e: round(seconds[e] / seconds[epochs[0]], 4) for e in epochs[1:]},
        "share_of_epoch": {e: round(seconds[e] / walls[e], 4) for e in walls},
    }
    for e in epochs:
        share = f", {100 * result['share_of_epoch'][e]:.1f}% of the epoch" if e in walls else ""
        ratio = f", {result['ratio_to_first'][e]:.4f} of epoch 0" if e in result["ratio_to_first"] else ""
        print(f"epoch {e}: {calls[e]} forwards of the {args.modality} encoder, {seconds[e]:.2f} s{share}{ratio}")
    print(json.dumps(result))
    if args.cache is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
