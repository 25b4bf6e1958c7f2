"""A quick model package for the service benchmarks (imported by the scripts beside it): a synthetic set and the
shipped ``tiny`` fine-tuning config for 10 steps, about a minute on 2 cores. Its predictions mean nothing, but a
tiny-config model costs the same per image however long it trained, which is what the benchmarks measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on (a command or the server failed, a request was refused); the message says why."""


def cli(*arguments: str) -> None:
    """Run ``caries-mim ARGS`` quietly; raise with its output tail when it fails."""
    command = [sys.executable, "-m", "pipelines.cli", *arguments]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise BenchmarkError(f"caries-mim {arguments[0]} failed (status {done.returncode}):\n{tail}")


def write_synthetic_set(folder: Path, labeled: int = 16) -> Path:
    """``caries-mim synth FOLDER --labeled N``; returns the folder."""
    cli("synth", str(folder), "--unlabeled", "0", "--labeled", str(labeled), "--quiet")
    return folder


def train_quick_package(synthetic: Path, run_dir: Path) -> Path:
    """Fine-tune the ``tiny`` config for 10 steps on ``synthetic`` (a synth output); returns the package path."""
    labeled = synthetic / "labeled"
    cli(
        "finetune", "--train", str(labeled / "train.json"), "--val", str(labeled / "val.json"),
        "--out", str(run_dir), "--config", "tiny", "--set", "train.steps=10", "--set", "eval.every=10", "--quiet",
    )  # fmt: skip
    return run_dir / "model.cmpkg"
