"""The command line and the runtime switches."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modalmoe.cli import main


def test_importing_modalmoe_changes_no_allocator_setting():
    code = "import modalmoe, modalmoe.moe, modalmoe.runtime as r; print(r.allocator_name())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out in ("glibc-default", "system", "tcmalloc", "jemalloc")


def test_cli_info_tunes_the_allocator_and_lists_routers(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "token_choice" in out and "expert_choice" in out
    code = "from modalmoe.cli import main; main(['info'])"
    tuned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "glibc-tuned" in tuned or "glibc" not in tuned
    code = "from modalmoe.cli import main; main(['--allocator', 'default', 'info'])"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "glibc-tuned" not in default


@pytest.mark.slow
def test_benchmark_smoke_runs_and_writes_json(tmp_path):
    """The benchmark's code path on a tiny case (numbers are not checked here: no timing in tests)."""
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        str(Path(__file__).parents[1] / "benchmarks" / "moe_layer.py"),
        "--tokens",
        "64",
        "--dim",
        "16",
        "--hidden",
        "32",
        "--experts",
        "4",
        "--k",
        "2",
        "--passes",
        "fwdbwd",
        "--activations",
        "gelu",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    (record,) = json.loads(out.read_text())
    keys = {
        "E",
        "k",
        "activation",
        "pass",
        "ours_ms",
        "dense_ms",
        "loop_ms",
        "ours_over_dense",
        "loop_over_ours",
        "allocator",
    }
    assert keys <= set(record) and record["allocator"] in ("glibc-tuned", "system", "tcmalloc", "jemalloc")
    assert record["ours_peak_mib"] > 0 and record["dense_peak_mib"] > 0
