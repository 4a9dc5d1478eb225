"""Multimodal data: the batch contract, bundled real tasks, users' own data, corruptions.

from modalmoe.data import load_task
task = load_task("av-digits")          # fetched once into ~/.cache/modalmoe, then cached
batch = task.train.batch(range(32))   # MultimodalBatch: inputs, present, target, masks
"""

from modalmoe.data.batch import KINDS, ModalitySpec, MultimodalBatch, MultimodalDataset, Task, collate
from modalmoe.data.formats import (
    DataFormatError,
    UntrustedPickleError,
    load,
    load_multibench_affect,
    load_multibench_avmnist,
    save,
)
from modalmoe.data.sources import FetchError, Source, cache_dir, fetch
from modalmoe.data.tasks import BundledTask, load_task, tasks

__all__ = [
    "KINDS",
    "BundledTask",
    "DataFormatError",
    "FetchError",
    "ModalitySpec",
    "MultimodalBatch",
    "MultimodalDataset",
    "Source",
    "Task",
    "cache_dir",
    "collate",
    "fetch",
    "load_task",
    "UntrustedPickleError",
    "load",
    "load_multibench_affect",
    "load_multibench_avmnist",
    "save",
    "tasks",
]
