"""``caries-mim study objectives``: which pretraining objective makes the best encoder here, on one budget?

Every objective (MAE, SimMIM, MoCo v3, the CL+MIM hybrid, SemanticMIM) pretrains the same encoder size on the same
unlabeled images for the same steps with the same batch (a pretraining config, ``demo`` by default, plus each
objective's own options sized for a small encoder: :data:`OBJECTIVE_SETTINGS`). Then, on the same radiographs:

1. ``caries-mim analyze`` measures all of them at once (attention distance, NMI, Fourier, effective rank, and the
   linear / k-NN probes on the validation labels' surface crops);
2. each encoder is fine-tuned at every label fraction (10% and 100% by default) with the same fine-tuning config
   and seed, beside one run from a random encoder per fraction (the floor), and evaluated on the test split:
   the label-efficiency study's runs (:func:`pipelines.study.run_study_arm`).

Output folder::

    pretrain/<objective>/                 the pretraining run (encoder.pt, metrics, reconstructions or views)
    analysis/                             analysis.json and its figures, every encoder overlaid
    finetune/<objective or scratch>/runs/ the fine-tuning runs and their test evaluations
    objectives.csv, objectives.md         one row per objective (the markdown with the command that made it)
    objectives.png                        test AP50 against the label fraction, one line per objective

Finished stages are reused (a pretraining run with its summary, a fine-tuning run with its test metrics), so an
interrupted study continues where it stopped; a pretraining run left half-way resumes from its checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caries_mim.errors import InvalidArgumentError
from pipelines.analyze import AnalysisSettings, run_analyze
from pipelines.finetune import load_finetune_config
from pipelines.pretrain import load_pretrain_config, run_pretrain
from pipelines.run_folder import read_run_config
from pipelines.study import StudyRun, ap50_cell, format_cell, run_study_arm, write_study_outputs

#: The objectives compared, with the options that size them for the study's small encoders (MoCo v3's reference
#: MLPs are 4096 wide for ViT-B; a ViT-Tiny's 192-wide CLS token gets 1024, as the hybrid's MoCo part does).
OBJECTIVE_SETTINGS: dict[str, tuple[str, ...]] = {
    "mae": ("objective.decoder_dim=128", "objective.decoder_depth=2", "objective.decoder_heads=4"),
    "simmim": (),
    "moco": ("objective.projector_hidden=1024", "objective.predictor_hidden=1024", "objective.out_dim=256"),
    "hybrid": (
        "objective.contrastive_weight=0.2",
        "objective.moco={projector_hidden: 1024, predictor_hidden: 1024, out_dim: 256}",
    ),
    "semantic_mim": ("objective.proxy_tokens=8",),
}
DEFAULT_FRACTIONS = (0.1, 1.0)
CSV_COLUMNS = (
    "objective",
    "pretrain_steps",
    "pretrain_last_loss",
    "pretrain_seconds",
    "attention_distance_mm_first",
    "attention_distance_mm_last",
    "nmi_last",
    "high_frequency_first",
    "effective_rank_last",
    "linear_probe",
    "knn",
    "fraction",
    "test_ap50",
    "test_ap50_low",
    "test_ap50_high",
    "val_ap50",
)


def parse_objectives(text: str) -> tuple[str, ...]:
    """``"mae,moco"`` -> ("mae", "moco"): known names, no repeats."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in OBJECTIVE_SETTINGS]
    if not names or unknown or len(set(names)) != len(names):
        raise InvalidArgumentError(
            f"--objectives: expected distinct names from {', '.join(OBJECTIVE_SETTINGS)}, got {text!r}"
        )
    return names


def _pretrain_settings(name: str, overrides: Sequence[str]) -> list[str]:
    """The ``--set`` list that makes the pretraining config train objective ``name`` with its study options."""
    return [f"objective.name={name}", *OBJECTIVE_SETTINGS[name], *overrides]


def _pretrain(
    name: str, data: Sequence[Path], out: Path, config: str | None, overrides: Sequence[str], progress: bool
) -> dict[str, Any]:
    folder = out / "pretrain" / name
    summary = folder / "summary.json"
    if not summary.is_file():
        resume = (folder / "checkpoint.pt").is_file()
        base = read_run_config(folder) if resume else None
        built = load_pretrain_config(config, _pretrain_settings(name, overrides), base=base)
        run_pretrain(list(data), folder, built, resume=resume, progress=progress)
    return json.loads(summary.read_text(encoding="utf-8"))


def run_objectives_study(
    *,
    data: Sequence[Path],
    train: Sequence[Path],
    val: Sequence[Path],
    test: Sequence[Path],
    out: Path,
    objectives: Sequence[str] = tuple(OBJECTIVE_SETTINGS),
    pretrain_config: str | None = "demo",
    pretrain_overrides: Sequence[str] = (),
    finetune_config: str | None = "demo",
    finetune_overrides: Sequence[str] = (),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    analysis: AnalysisSettings | None = None,
    bootstrap: int = 1000,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) the study into ``out``; returns the summary with every row and the paths written."""
    for flag, files in (("data", data), ("train", train), ("val", val), ("test", test)):
        if not files:
            raise InvalidArgumentError(f"--{flag}: give at least one")
    # Every config is resolved before the first run: a bad key fails now, not after an hour of pretraining.
    for name in objectives:
        load_pretrain_config(pretrain_config, _pretrain_settings(name, pretrain_overrides))
    load_finetune_config(finetune_config, list(finetune_overrides))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    pretrained: dict[str, dict[str, Any]] = {}
    for number, name in enumerate(objectives, start=1):
        print(f"[pretrain {number}/{len(objectives)}] {name}", file=sys.stderr, flush=True)
        pretrained[name] = _pretrain(name, data, out, pretrain_config, pretrain_overrides, progress)
    encoders = {name: Path(summary["encoder"]) for name, summary in pretrained.items()}

    print("[analyze] every encoder on the same radiographs", file=sys.stderr, flush=True)
    analysis_summary = run_analyze(
        encoders,
        data[0],
        out / "analysis",
        labels=val[0],
        settings=analysis or AnalysisSettings(seed=seed),
        progress=progress,
    )

    runs = [("scratch", StudyRun("scratch", fraction, seed)) for fraction in fractions]
    runs += [(name, StudyRun("pretrained", fraction, seed)) for name in objectives for fraction in fractions]
    finetuned: dict[tuple[str, float], dict[str, Any]] = {}
    for number, (arm, planned) in enumerate(runs, start=1):
        print(f"[finetune {number}/{len(runs)}] {arm} {planned.name}", file=sys.stderr, flush=True)
        # The scratch arm reads only the architecture from an encoder file; every objective's is the same size.
        encoder = encoders[objectives[0] if arm == "scratch" else arm]
        finetuned[(arm, planned.fraction)] = run_study_arm(
            planned,
            train,
            val,
            test,
            encoder,
            out / "finetune" / arm,
            finetune_config,
            finetune_overrides,
            bootstrap,
            progress=progress,
        )

    rows = _rows(objectives, fractions, pretrained, analysis_summary, finetuned)
    written = _write_outputs(out, rows, command)
    return {
        "out": str(out),
        "objectives": list(objectives),
        "rows": rows,
        "analysis": str(out / "analysis" / "analysis.json"),
        "seconds": round(time.perf_counter() - started, 1),
        **written,
    }


def _mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4)


def _rows(
    objectives: Sequence[str],
    fractions: Sequence[float],
    pretrained: dict[str, dict[str, Any]],
    analysis: dict[str, Any],
    finetuned: dict[tuple[str, float], dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per (arm, fraction): the scratch floor first, then each objective with its pretraining and
    analysis figures."""
    rows = []
    for arm in ("scratch", *objectives):
        measures: dict[str, Any] = {}
        if arm != "scratch":
            layers = analysis["encoders"][arm]["layers"]
            probe = analysis["encoders"][arm].get("probe") or {}
            measures = {
                "pretrain_steps": pretrained[arm]["steps"],
                "pretrain_last_loss": pretrained[arm].get("last_loss"),
                "pretrain_seconds": pretrained[arm].get("seconds"),
                "attention_distance_mm_first": _mean(layers["attention_distance_mm"][0]),
                "attention_distance_mm_last": _mean(layers["attention_distance_mm"][-1]),
                "nmi_last": _mean(layers["nmi"][-1]),
                "high_frequency_first": layers["high_frequency"][0],
                "effective_rank_last": layers["effective_rank"][-1],
                "linear_probe": probe.get("linear_probe"),
                "knn": probe.get("knn"),
            }
        for fraction in fractions:
            result = finetuned[(arm, fraction)]
            rows.append(
                {
                    **dict.fromkeys(CSV_COLUMNS),
                    **measures,
                    "objective": arm,
                    "fraction": fraction,
                    "test_ap50": result["test_ap50"],
                    "test_ap50_low": result["test_ap50_low"],
                    "test_ap50_high": result["test_ap50_high"],
                    "val_ap50": result["val_ap50"],
                }
            )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per objective: pretraining, the diagnostics of its last block, probes and test AP50 per fraction."""
    fractions = sorted({row["fraction"] for row in rows})
    by_arm: dict[str, dict[float, dict[str, Any]]] = {}
    for row in rows:
        by_arm.setdefault(row["objective"], {})[row["fraction"]] = row
    ap_headers = " | ".join(f"AP50 at {fraction * 100:g}% (95% CI)" for fraction in fractions)
    lines = [
        "| objective | last loss | attention distance first / last block (mm) | NMI last block | high frequency "
        f"first block | effective rank last block | linear probe | k-NN | {ap_headers} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(fractions),
    ]
    for arm, per_fraction in by_arm.items():
        first = next(iter(per_fraction.values()))
        aps = [ap50_cell(per_fraction.get(fraction)) for fraction in fractions]
        distance = "n/a"
        if first["attention_distance_mm_first"] is not None:
            first_block, last_block = first["attention_distance_mm_first"], first["attention_distance_mm_last"]
            distance = f"{format_cell(first_block, 2)} / {format_cell(last_block, 2)}"
        name = "random encoder (floor)" if arm == "scratch" else arm
        lines.append(
            f"| {name} | {format_cell(first['pretrain_last_loss'])} | {distance} | {format_cell(first['nmi_last'])} | "
            f"{format_cell(first['high_frequency_first'], 2)} | {format_cell(first['effective_rank_last'], 1)} | "
            f"{format_cell(first['linear_probe'])} | {format_cell(first['knn'])} | {' | '.join(aps)} |"
        )
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, rows: list[dict[str, Any]], command: str | None) -> dict[str, str]:
    return write_study_outputs(
        out / "objectives",
        rows,
        CSV_COLUMNS,
        title="Pretraining objectives on one budget: diagnostics, probes and fine-tuned test AP50",
        table=markdown_table(rows),
        command=command,
        arm="objective",
        plot_title="Test AP50 per pretraining objective",
    )
