"""The quantizing libraries (GPTQModel, llm-compressor) pin numpy, transformers and more of their own, so
each lives in a cached virtual environment that reuses the system torch (--system-site-packages: no second
torch download). A worker script runs there as a subprocess and writes the checkpoint and the library's
own results; the tests, in the main environment, compare. Nothing is downloaded from a model hub."""

import os
import subprocess
import sys
from pathlib import Path

import torch

TORCH = "torch==" + torch.__version__.split("+")[0]  # on the same pip line, or pip may fetch a CUDA torch


def library_python(requirement: str, env_var: str) -> Path:
    """The python of the venv holding ``requirement`` (``$env_var`` or ~/.cache), built first if missing or
    half-built (no marker file)."""
    default = Path.home() / ".cache" / "tpaware_compile" / f"venv-{requirement}-{TORCH}".replace("==", "-")
    venv = Path(os.environ.get(env_var) or default)
    python, marker = venv / "bin" / "python", venv / ".tpaware-installed"
    if marker.exists() and marker.read_text() == f"{requirement} {TORCH}":
        return python
    subprocess.run(["rm", "-rf", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", requirement, TORCH], check=True)
    marker.write_text(f"{requirement} {TORCH}")
    return python


def run_worker(python: Path, worker: Path, out: Path, cases, **env) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **env}
    proc = subprocess.run([str(python), str(worker), str(out), *cases], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{worker.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
