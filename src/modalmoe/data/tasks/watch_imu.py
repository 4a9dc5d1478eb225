"""watch-imu: a smartwatch's accelerometer and gyroscope during shoulder exercises."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task
from modalmoe.data.sources import Source
from modalmoe.data.splits import group_split
from modalmoe.data.tasks import BundledTask, tasks

WINDOW = 200  # samples: 4 s at 50 Hz
STEP = 100  # 50% overlap
SUBJECTS = {"train": [1, 2, 3, 4, 5, 6], "valid": [7, 8], "test": [9, 10]}


@tasks.register("watch-imu")
class WatchIMU(BundledTask):
    """Shoulder rehabilitation exercises recorded by a smartwatch: accelerometer and gyroscope.

    Provenance: 140 recordings at 50 Hz (19-52 s each) of 7 shoulder exercises (pendulum,
    abduction, forward elevation, internal and external rotation, trapezius extension,
    upright row) by 10 subjects, each exercise once per arm; a 3-axis accelerometer (``ax,
    ay, az``) and a 3-axis gyroscope (``wx, wy, wz``) of the same watch. Collected by
    D. Burns et al. for seglearn (Burns and Whyne, "Seglearn: a python package for learning
    sequences and time series", JMLR 2018) and shipped in ``seglearn==1.2.5`` as
    ``seglearn/data/watch_dataset.npy``. License: BSD-3-Clause (seglearn's license covers
    its bundled data).

    The file is a pickled dict inside a ``.npy``. A pickle can run code when loaded, so it
    is read only after the wheel's and the file's sha256 both match the pinned values, and
    then with an unpickler that accepts nothing but numpy arrays and dtypes.

    Processing: the two sensors are two modalities of the same samples. Each recording is
    cut into 4 s windows (200 samples) with 50% overlap; every window carries its
    recording's exercise label. Splits by subject, so no subject is in two splits: train
    subjects 1-6, valid 7-8, test 9-10. ``groups`` holds the subject of each window.
    """

    name = "watch-imu"
    summary = "smartwatch accelerometer + gyroscope, 7 shoulder exercises, 10 subjects, subject-wise splits"
    version = 1
    sources = {
        "watch": Source(
            package="seglearn",
            version="1.2.5",
            wheel="seglearn-1.2.5-py3-none-any.whl",
            wheel_sha256="ec6b952c85c9627050102854b372d85951563d3b990df677d7c55547e87413dd",
            path="seglearn/data/watch_dataset.npy",
            sha256="eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537",
            license="BSD-3-Clause (seglearn)",
        )
    }

    def build(self, files: dict[str, Path]) -> Task:
        raw = load_numpy_pickle(files["watch"])
        windows, labels, subjects = [], [], []
        for series, label, subject in zip(raw["X"], raw["y"], raw["subject"], strict=True):
            series = np.asarray(series, dtype=np.float32)
            for start in range(0, len(series) - WINDOW + 1, STEP):
                windows.append(series[start : start + WINDOW])
                labels.append(int(label))
                subjects.append(int(subject))
        x = np.stack(windows)  # [N, 200, 6]
        columns = [str(c) for c in raw["X_labels"]]
        specs = {
            "accel": ModalitySpec("accel", "sequence", (None, 3), columns=columns[:3], description="accelerometer"),
            "gyro": ModalitySpec("gyro", "sequence", (None, 3), columns=columns[3:], description="gyroscope"),
        }
        full = MultimodalDataset(
            specs=specs,
            inputs={"accel": x[:, :, :3], "gyro": x[:, :, 3:]},
            target=np.asarray(labels),
            classes=[str(c) for c in raw["y_labels"]],
            groups=np.asarray(subjects),
        )
        splits = group_split(np.asarray(subjects), SUBJECTS)
        return Task(self.name, {k: full.subset(v) for k, v in splits.items()}, self.description)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs; anything else is refused."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstructor, whatever its module
        return super().find_class(module, name)


def load_numpy_pickle(path: Path):
    """The object stored in an object-dtype ``.npy`` (call only after its checksum matched)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if dtype != np.dtype(object):
            raise ValueError(f"{path} holds a plain {dtype} array, not a pickled object")
        array = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array
