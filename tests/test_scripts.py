"""The README's demo and the benchmarks' CPU validation modes run from the command line (so they cannot rot)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_demo_matches_eager():
    out = _run("-m", "tpaware_compile", "demo", "--new-tokens", "4")
    assert "applied" in out and "same tokens: True" in out, out[-3000:]


def test_bench_mlp_cpu_check(tmp_path):
    _run("bench/bench_mlp.py", "--cpu-check", "--out", str(tmp_path / "mlp.json"))
    assert (tmp_path / "mlp.json").exists()


def test_bench_model_cpu_check():
    out = _run("bench/bench_model.py", "--cpu-check")
    assert out.count("decode") == 4, out  # eager, inductor, tpaware, tpaware_nmajor
