"""The ``modalmoe`` command line.

Commands arrive with the issues that build them (train, eval, bench, analyze, profile,
data, predict). Every command runs with ``modalmoe.runtime.tune_allocator()`` switched on
unless ``--allocator default`` is given.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import modalmoe
from modalmoe.data import cli as data_cli
from modalmoe.model import cli as model_cli
from modalmoe.moe import grouped_gemm, routers
from modalmoe.runtime import allocator_name, tune_allocator


def cmd_info(args: argparse.Namespace) -> int:
    """Print what this installation runs with."""
    rows = {
        "modalmoe": modalmoe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator_name(),
        "grouped GEMM": "MKL cblas_?gemm_batch"
        if grouped_gemm.available(torch.ones(1))
        else "fallback (padded bmm + per-expert tails)",
        "routers": ", ".join(routers.names()),
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modalmoe", description="Efficient multimodal Mixture-of-Experts learning.")
    parser.add_argument("--version", action="version", version=f"modalmoe {modalmoe.__version__}")
    parser.add_argument(
        "--allocator",
        choices=["tuned", "default"],
        default="tuned",
        help="'tuned' keeps large temporaries in the heap (glibc mallopt; see modalmoe.runtime)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, threads, allocator, kernels and registered components")
    info.set_defaults(func=cmd_info)
    data_cli.add_commands(sub)
    model_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.allocator == "tuned":
        tune_allocator()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
