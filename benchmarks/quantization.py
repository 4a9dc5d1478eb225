"""Int8 post-training quantization: matmul kernels, and trained models' speed and accuracy.

    python benchmarks/quantization.py --kernels
    python benchmarks/quantization.py --runs runs/designs/av-digits/token-choice-s0 RUN_DIR ...
    python benchmarks/quantization.py --widths 64 128 256 512 --preset av-digits/token-choice
    python benchmarks/quantization.py --layers runs/designs/av-digits/token-choice-s0 [--min-weight 0 --patch-convs]

``--kernels``: ``[M, K] @ [K, N]`` in float32 (``addmm``) against the int8 candidates
(``torch._int_mm`` on rows quantized per row, fbgemm's ``quantized.linear_dynamic``, and
the weight-only ``_weight_int8pack_mm``), medians of interleaved runs, time relative to
float32 and relative error. ``--runs``: each trained run's test accuracy in float32 and
int8 (``quantize_int8``) and the inference time ratio at batch 64, interleaved in one
process. ``--widths``: the time ratio only, on a preset rebuilt at other widths with random
weights (no accuracy: untrained), to show where int8 starts to pay. ``--layers``: every layer
that quantization replaces, timed in float32 and in int8 on the inputs it gets in one forward
pass at the batch size, against the whole model's time: since every other operation is the
same in both models, the model's speed-up is at most what these layers' times allow
(``bound``), and no more than ``1 / (1 - share)`` even if they took no time at all.

Ratios are fp32 time / int8 time (> 1: int8 is faster). Threads: ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def kernels(repeats: int) -> None:
    from modalmoe.efficiency.quantize import int8_matmul, quantize_rows, quantize_weight

    print("| M x K x N | fp32 | _int_mm (ours) | fbgemm dynamic | weight-only int8 | err ours | err fbgemm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, k, n in [(400, 64, 64), (1600, 64, 192), (1024, 784, 64), (1600, 256, 768), (4096, 512, 2048)]:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        wq, scale = quantize_weight(w.t(), dim=1)
        wq_t = wq.t().contiguous()
        with warnings.catch_warnings():
            # Only here, to compare against it: creating torch.qint8 tensors warns that the
            # quantized-tensor API is deprecated, which is why the library does not use it.
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                wq_t, scale.reshape(-1).double(), torch.zeros(n, dtype=torch.long), 0
            )
        packed = torch.ops.quantized.linear_prepack(qw, b)
        fns = {
            "fp32": lambda x=x, w=w, b=b: torch.addmm(b, x, w.t()),
            "ours": lambda x=x, wq=wq, scale=scale, b=b: int8_matmul(*quantize_rows(x), wq, scale).add_(b),
            "fbgemm": lambda x=x, packed=packed: torch.ops.quantized.linear_dynamic(x, packed, True),
            "weight_only": lambda x=x, q=wq_t, scale=scale, b=b: torch.ops.aten._weight_int8pack_mm(
                x, q, scale.reshape(-1)
            ).add_(b),
        }
        ref = fns["fp32"]()
        err = {k: float((fns[k]() - ref).norm() / ref.norm()) for k in ("ours", "fbgemm")}
        t = interleaved(fns, repeats)
        cells = " | ".join(f"{t[k] / t['fp32']:.2f}" for k in ("ours", "fbgemm", "weight_only"))
        print(f"| {m} x {k} x {n} | 1.00 | {cells} | {err['ours']:.4f} | {err['fbgemm']:.4f} |")
    print("\n(time relative to fp32: < 1 is faster)")


def runs(paths: list[str], repeats: int, batch_size: int) -> None:
    from modalmoe.efficiency.quantize import quantize_int8
    from modalmoe.evaluate.runner import evaluate
    from modalmoe.train import load_run_model
    from modalmoe.train.trainer import experiment_task, read_run_config

    print(f"| run | fp32 accuracy | int8 accuracy | delta (points) | speed-up at batch {batch_size} |")
    print("|---|---:|---:|---:|---:|")
    deltas, speedups = [], []
    for path in paths:
        task = experiment_task(read_run_config(path))
        model = load_run_model(path).eval()
        qmodel = quantize_int8(model)
        fp32 = evaluate(model, task.test).metrics["accuracy"]
        int8 = evaluate(qmodel, task.test).metrics["accuracy"]
        batch = task.test.batch(range(min(batch_size, len(task.test))))
        with torch.no_grad():
            t = interleaved({"fp32": lambda m=model, b=batch: m(b), "int8": lambda m=qmodel, b=batch: m(b)}, repeats)
        speedup = t["fp32"] / t["int8"]
        deltas.append(100 * (int8 - fp32))
        speedups.append(speedup)
        print(f"| {path} | {100 * fp32:.1f} | {100 * int8:.1f} | {100 * (int8 - fp32):+.1f} | {speedup:.2f}x |")
    print(
        f"\nmedian speed-up {statistics.median(speedups):.2f}x, "
        f"mean accuracy delta {statistics.mean(deltas):+.2f} points"
    )


def widths(preset: str, dims: list[int], repeats: int, batch_size: int) -> None:
    from modalmoe.efficiency.quantize import quantize_int8
    from modalmoe.model import build_model
    from modalmoe.model.presets import get_preset
    from modalmoe.train.trainer import experiment_task

    print(f"| {preset} dim | hidden | fp32 / int8 time at batch {batch_size} |")
    print("|---:|---:|---:|")
    for dim in dims:
        cfg = get_preset(preset, overrides=[f"model.dim={dim}", f"model.hidden={2 * dim}"])
        task = experiment_task(cfg)
        torch.manual_seed(0)
        train = task.train
        model = build_model(cfg.model, task.specs, task_type=train.task_type, outputs=len(train.classes)).fit(train)
        model.eval()
        qmodel = quantize_int8(model)
        batch = task.test.batch(range(batch_size))
        with torch.no_grad():
            t = interleaved({"fp32": lambda m=model, b=batch: m(b), "int8": lambda m=qmodel, b=batch: m(b)}, repeats)
        print(f"| {dim} | {2 * dim} | {t['fp32'] / t['int8']:.2f}x |")


def layers(path: str, repeats: int, batch_size: int, min_weight: int | None = None, patch_convs: bool = False) -> None:
    from modalmoe.efficiency.quantize import Int8ExpertBank, Int8Linear, Int8PatchConv, quantize_int8
    from modalmoe.train import load_run_model
    from modalmoe.train.trainer import experiment_task, read_run_config

    task = experiment_task(read_run_config(path))
    model = load_run_model(path).eval()
    options = {"patch_convs": patch_convs} | ({} if min_weight is None else {"min_weight": min_weight})
    qmodel = quantize_int8(model, **options)
    batch = task.test.batch(range(min(batch_size, len(task.test))))
    floats = dict(model.named_modules())
    kinds = Int8Linear | Int8PatchConv | Int8ExpertBank
    # A patch convolution's inner linear is timed with it: keep the modules the float model has.
    replaced = {n: m for n, m in qmodel.named_modules() if isinstance(m, kinds) and n in floats}
    inputs: dict[str, tuple] = {}
    hooks = [
        floats[name].register_forward_pre_hook(
            lambda _m, args, kwargs, name=name: inputs.setdefault(name, (args, kwargs)), with_kwargs=True
        )
        for name in replaced
    ]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    print(f"| layer | kind | fp32 µs | int8 µs | fp32 / int8 |  ({path}, batch {len(batch)})")
    print("|---|---|---:|---:|---:|")
    total_fp32 = total_int8 = 0.0
    with torch.no_grad():
        whole = interleaved({"fp32": lambda: model(batch), "int8": lambda: qmodel(batch)}, repeats)
        for name, qmodule in replaced.items():
            if name not in inputs:
                continue  # not reached by this batch
            args, kwargs = inputs[name]
            calls = {
                "fp32": lambda f=floats[name], a=args, k=kwargs: f(*a, **k),
                "int8": lambda q=qmodule, a=args, k=kwargs: q(*a, **k),
            }
            t = interleaved(calls, repeats)
            total_fp32, total_int8 = total_fp32 + t["fp32"], total_int8 + t["int8"]
            kind = type(qmodule).__name__
            print(f"| {name} | {kind} | {1e6 * t['fp32']:.0f} | {1e6 * t['int8']:.0f} | {t['fp32'] / t['int8']:.2f}x |")
    share = total_fp32 / whole["fp32"]
    bound = whole["fp32"] / (whole["fp32"] - total_fp32 + total_int8)
    print(
        f"\nwhole model: fp32 {1e3 * whole['fp32']:.2f} ms, int8 {1e3 * whole['int8']:.2f} ms, "
        f"speed-up {whole['fp32'] / whole['int8']:.2f}x; the quantized layers take {100 * share:.1f}% of the fp32 "
        f"time and run {total_fp32 / total_int8:.2f}x as fast in int8: the speed-up is at most {bound:.2f}x, "
        f"and at most {1 / (1 - share):.2f}x if they took no time at all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--runs", nargs="+", default=[])
    parser.add_argument("--widths", nargs="+", type=int, default=[])
    parser.add_argument("--layers", default=None, metavar="RUN_DIR", help="per-layer fp32 / int8 times of a run")
    parser.add_argument("--min-weight", type=int, default=None, help="--layers: quantize_int8's min_weight")
    parser.add_argument("--patch-convs", action="store_true", help="--layers: quantize patch convolutions too")
    parser.add_argument("--preset", default="av-digits/token-choice")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernels(args.repeats)
    if args.runs:
        runs(args.runs, args.repeats, args.batch_size)
    if args.widths:
        widths(args.preset, args.widths, args.repeats, args.batch_size)
    if args.layers:
        layers(args.layers, args.repeats, args.batch_size, args.min_weight, args.patch_convs)
    if not (args.kernels or args.runs or args.widths or args.layers):
        parser.error("give --kernels, --runs RUN_DIR ..., --widths DIM ... or --layers RUN_DIR")


if __name__ == "__main__":
    main()
