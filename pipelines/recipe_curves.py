"""``python -m pipelines.recipe_curves LABEL=RUN ... --out PNG``: validation AP50 against steps for several
fine-tuning runs in one plot, and their last and best values as a markdown table (what docs/detection_recipe.md
shows). RUN is a ``caries-mim finetune`` run folder (its metrics.jsonl is read, nothing else) or a CSV file with
the columns ``step,ap50`` and optionally ``froc``: the validation rows of a run whose folder was not kept, as its
report recorded them. ``--rows DIR`` also writes each run folder's rows as such a CSV (``DIR/<folder name>.csv``),
so a plot in the docs can be rebuilt after the run folders are gone.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from caries_mim.atomic_files import atomic_path
from caries_mim.curves import plot_learning_curves


def read_validations(run: Path) -> list[dict]:
    """The ``split: val`` rows of a run's metrics.jsonl (or of a ``step,ap50[,froc]`` CSV), in step order."""
    if run.suffix == ".csv":
        with run.open(newline="") as handle:
            rows = [
                {
                    "step": int(row["step"]),
                    "ap50": float(row["ap50"]),
                    "froc": float(row["froc"]) if row.get("froc") else None,
                }
                for row in csv.DictReader(handle)
            ]
        return sorted(rows, key=lambda row: row["step"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted((row for row in rows if row.get("split") == "val"), key=lambda row: row["step"])


def write_rows(rows: list[dict], path: Path) -> Path:
    """``rows`` (from :func:`read_validations`) as a ``step,ap50,froc`` CSV, 4 decimals, written atomically."""
    lines = ["step,ap50,froc"]
    lines += [
        f"{row['step']},{row['ap50']:.4f},{'' if row.get('froc') is None else format(row['froc'], '.4f')}"
        for row in rows
    ]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--rows", type=Path, metavar="DIR", help="also write each run folder's rows as DIR/NAME.csv")
    args = parser.parse_args(argv)
    if args.rows is not None:
        args.rows.mkdir(parents=True, exist_ok=True)
    curves, table = (
        {},
        ["| run | steps | last val AP50 | best val AP50 (step) | FROC score at best |", "|---|---|---|---|---|"],
    )
    for item in args.runs:
        label, separator, folder = item.partition("=")
        if not separator:
            print(f"recipe_curves: {item!r} is not LABEL=RUN", file=sys.stderr)
            return 2
        run = Path(folder)
        if run.suffix == ".csv" and not run.is_file():
            print(f"recipe_curves: {run} does not exist", file=sys.stderr)
            return 2
        if run.suffix != ".csv" and not (run / "metrics.jsonl").is_file():
            print(f"recipe_curves: {run} has no metrics.jsonl", file=sys.stderr)
            return 2
        try:
            rows = read_validations(run)
        except (KeyError, ValueError) as error:
            print(f"recipe_curves: {run} is not a step,ap50[,froc] CSV ({error})", file=sys.stderr)
            return 2
        if not rows:
            continue
        if args.rows is not None and run.suffix != ".csv":
            write_rows(rows, args.rows / f"{run.resolve().name}.csv")
        curves[label] = ([row["step"] for row in rows], [row["ap50"] for row in rows])
        best = max(rows, key=lambda row: row["ap50"])
        froc = "" if best["froc"] is None else f"{best['froc']:.3f}"
        table.append(
            f"| {label} | {rows[-1]['step']} | {rows[-1]['ap50']:.3f} | {best['ap50']:.3f} ({best['step']}) | {froc} |"
        )
    plot_learning_curves(curves, args.out)
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
