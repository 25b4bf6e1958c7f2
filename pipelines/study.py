"""``caries-mim study label-efficiency``: how much does MIM pretraining save in labels?

For every label fraction and every seed, the detector is fine-tuned twice with the same config, the same images
(nested seeded subsets, :func:`pipelines.finetune.label_subset`) and the same seed: once from a random encoder
("scratch") and once from the MIM encoder ("pretrained"). Each model package is then evaluated on the same test
split. Output folder::

    runs/<init>_<percent>pct_seed<seed>/     the fine-tuning run (model.cmpkg, metrics, overlays, ...)
    runs/<init>_<percent>pct_seed<seed>/test/ its evaluation on the test split (metrics.json, plots, ...)
    label_efficiency.csv                      one row per run: init, fraction, seed, images, AP50 (95% CI), ...
    label_efficiency.md                       the same as a markdown table, with the command that made it
    label_efficiency.png                      AP50 against the label fraction, one line per initialization

A finished run (its ``test/metrics.json`` exists) is reused, so an interrupted study continues where it stopped;
a run folder left half-way is resumed from its checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caries_mim.atomic_files import atomic_path
from caries_mim.curves import plot_label_efficiency
from caries_mim.errors import InvalidArgumentError
from pipelines.config import path_override
from pipelines.evaluate import run_evaluate
from pipelines.finetune import load_finetune_config, run_finetune
from pipelines.run_folder import read_run_config

log = logging.getLogger("caries_mim.study")

DEFAULT_FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)
INITS = ("scratch", "pretrained")
CSV_COLUMNS = (
    "init",
    "fraction",
    "seed",
    "train_images",
    "steps",
    "best_step",
    "val_ap50",
    "test_ap50",
    "test_ap50_low",
    "test_ap50_high",
    "test_ap",
    "test_froc",
    "finetune_seconds",
)


@dataclass(frozen=True)
class StudyRun:
    init: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        # Not rounded to whole percents: 0.4% and 0.5% are different runs and must not share (and reuse) a folder.
        return f"{self.init}_{self.fraction * 100:g}pct_seed{self.seed}"


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"5,10,25,50,100"`` (percent) -> (0.05, 0.1, 0.25, 0.5, 1.0), each in (0, 100], ascending, distinct."""
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise InvalidArgumentError(f"--fractions: expected percentages like 5,10,25,50,100, got {text!r}") from None
    # not (0 < v <= 100) also refuses nan, which float() accepts and every comparison lets through.
    if not values or not all(0 < value <= 100 for value in values):
        raise InvalidArgumentError(f"--fractions: percentages must be in (0, 100], got {text!r}")
    return tuple(value / 100 for value in values)


def run_label_efficiency(
    *,
    train: Sequence[Path],
    val: Sequence[Path],
    test: Sequence[Path],
    encoder: Path,
    out: Path,
    config: str | None = None,
    overrides: Sequence[str] = (),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = (0,),
    bootstrap: int = 1000,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the study into ``out``; returns the summary with every row and the paths written."""
    if not Path(encoder).is_file():
        raise InvalidArgumentError(f"--encoder: {encoder} does not exist (an encoder.pt from caries-mim pretrain)")
    for name, files in (("train", train), ("val", val), ("test", test)):
        if not files:
            raise InvalidArgumentError(f"--{name}: give at least one annotation file")
    # Resolved once up front: a bad key fails before the first hour of training, not after it.
    load_finetune_config(config, [*overrides, path_override("model.encoder", encoder)])
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plan = [StudyRun(init, fraction, seed) for seed in seeds for fraction in fractions for init in INITS]
    rows = []
    for number, planned in enumerate(plan, start=1):
        print(f"[{number}/{len(plan)}] {planned.name}", file=sys.stderr, flush=True)
        rows.append(
            run_study_arm(planned, train, val, test, encoder, out, config, overrides, bootstrap, progress=progress)
        )
    written = _write_outputs(out, rows, command)
    return {
        "out": str(out),
        "runs": len(rows),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        **written,
    }


def run_study_arm(
    planned: StudyRun,
    train: Sequence[Path],
    val: Sequence[Path],
    test: Sequence[Path],
    encoder: Path,
    out: Path,
    config: str | None,
    overrides: Sequence[str],
    bootstrap: int,
    *,
    progress: bool,
) -> dict[str, Any]:
    folder = out / "runs" / planned.name
    test_dir = folder / "test"
    settings = [
        *overrides,
        f"data.label_fraction={planned.fraction}",
        f"train.seed={planned.seed}",
        f"data.seed={planned.seed}",
        # Both arms read the architecture from the encoder file; only the pretrained one keeps its weights.
        path_override("model.encoder", encoder),
        f"model.reinitialize={planned.init == 'scratch'}",
        # A random encoder has to learn: the scratch arm trains every layer, whatever the config keeps frozen.
        *(["optim.frozen_layers=0"] if planned.init == "scratch" else []),
    ]
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        resume = (folder / "checkpoint.pt").is_file()
        base = read_run_config(folder) if resume else None
        run_config = load_finetune_config(config, settings, base=base)
        run_finetune(list(train), list(val), folder, run_config, resume=resume, progress=progress)
    finetune = json.loads(summary_path.read_text(encoding="utf-8"))
    metrics_path = test_dir / "metrics.json"
    if not metrics_path.is_file():
        run_evaluate(folder / "model.cmpkg", list(test), test_dir, overlays=4, bootstrap=bootstrap, progress=progress)
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    interval = (metrics.get("confidence_intervals") or {}).get("ap50") or {}
    return {
        "init": planned.init,
        "fraction": planned.fraction,
        "seed": planned.seed,
        "train_images": finetune["train_images"],
        "steps": finetune["steps"],
        "best_step": finetune["best_step"],
        "val_ap50": finetune["best_val_ap50"],
        "test_ap50": metrics["coco"]["ap50"],
        "test_ap50_low": interval.get("low"),
        "test_ap50_high": interval.get("high"),
        "test_ap": metrics["coco"]["ap"],
        "test_froc": metrics["froc"]["score"],
        "finetune_seconds": finetune["seconds"],
    }


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ap50_cell(row: dict[str, Any] | None) -> str:
    """A row's test AP50 with its bootstrap interval when there is one: ``0.812 (0.749-0.863)``."""
    if row is None:
        return "n/a"
    interval = ""
    if row.get("test_ap50_low") is not None:
        interval = f" ({format_cell(row['test_ap50_low'])}-{format_cell(row['test_ap50_high'])})"
    return format_cell(row.get("test_ap50")) + interval


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Test AP50 (95% bootstrap CI) per label fraction, scratch vs pretrained side by side, plus the gain."""
    by_key = {(row["init"], row["fraction"], row["seed"]): row for row in rows}
    fractions = sorted({row["fraction"] for row in rows})
    seeds = sorted({row["seed"] for row in rows})
    lines = [
        "| labels | seed | train images | AP50 scratch (95% CI) | AP50 pretrained (95% CI) | gain |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fraction in fractions:
        for seed in seeds:
            scratch, pretrained = by_key.get(("scratch", fraction, seed)), by_key.get(("pretrained", fraction, seed))
            cells = [ap50_cell(scratch), ap50_cell(pretrained)]
            gain = "n/a"
            if scratch and pretrained and scratch["test_ap50"] is not None and pretrained["test_ap50"] is not None:
                gain = f"{pretrained['test_ap50'] - scratch['test_ap50']:+.3f}"
            images = (scratch or pretrained or {}).get("train_images", "n/a")
            lines.append(f"| {fraction * 100:g}% | {seed} | {images} | {cells[0]} | {cells[1]} | {gain} |")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, rows: list[dict[str, Any]], command: str | None) -> dict[str, str]:
    return write_study_outputs(
        out / "label_efficiency",
        rows,
        CSV_COLUMNS,
        title="Label efficiency: test AP50, fine-tuned from scratch vs from the MIM encoder",
        table=markdown_table(rows),
        command=command,
        arm="init",
        plot_title="Label efficiency (test AP50)",
    )


def write_study_outputs(
    stem: Path,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    title: str,
    table: str,
    command: str | None,
    arm: str,
    plot_title: str,
) -> dict[str, str]:
    """A study's ``stem``.csv (``columns`` of every row), ``stem``.md (``title``, the command, ``table``) and
    ``stem``.png (test AP50 against the label fraction, one line per value of the rows' ``arm`` key), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in columns})
    csv_path, md_path, png_path = (stem.with_name(f"{stem.name}.{ext}") for ext in ("csv", "md", "png"))
    with atomic_path(csv_path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")
    header = f"# {title}\n\n"
    if command:
        header += f"Made by:\n\n```\n{command}\n```\n\n"
    with atomic_path(md_path) as temporary:
        temporary.write_text(header + table, encoding="utf-8")
    plot_rows = [
        {
            "fraction": row["fraction"],
            "init": row[arm],
            "ap50": row["test_ap50"],
            "ap50_low": row["test_ap50_low"],
            "ap50_high": row["test_ap50_high"],
        }
        for row in rows
    ]
    plot_label_efficiency(plot_rows, png_path, title=plot_title)
    return {"csv": str(csv_path), "markdown": str(md_path), "plot": str(png_path)}


def command_line(argv: Sequence[str]) -> str:
    """The command as a user would retype it (for the table's provenance line)."""
    return "caries-mim " + " ".join(shlex.quote(part) for part in argv)
