"""``caries-mim reference``: rebuild the shipped foundation encoder and reference detector from scratch.

One command, every step from the project's own pipelines, resumable stage by stage (``--work`` keeps what is done;
an interrupted run continues where it stopped):

1. synthetic data: a large unlabeled corpus (pretraining), a labeled set (fine-tuning: train and val splits), a
   labeled test set from a seed used for nothing else, and a second labeled test set from a differently configured
   generator (``shifted_generator``: another sensor's spacing, noise, blur and contrast), all with
   ``caries-mim synth``;
2. MIM pretraining of the foundation encoder on the unlabeled corpus (``pretrain`` config);
3. fine-tuning of the reference detector from it (``finetune`` config);
4. evaluation of the detector on both test sets (``caries-mim evaluate``);
5. export into ``--out`` (``models/`` by default): ``foundation_encoder.pt`` and ``reference_detector.cmpkg`` with
   fp16 weights (half the size; both load into fp32 models), ``foundation_reconstructions.png``, and
   ``provenance.json``: the command, the resolved configs, the data seeds, the code commit, steps, final loss,
   wall time per stage, the machine, the test metrics and each file's SHA-256.

``keep_foundation`` (``--keep-foundation``) skips steps 1's unlabeled corpus and 2: the detector is fine-tuned again
from the foundation encoder already in ``--out``, whose provenance (pretraining config, data, steps, loss, time,
code commit) is carried into the new one. Pretraining is the long part of the build (a GPU's work in the full
build); a new detector recipe should not have to redo it.

``keep_detector`` (``--keep-detector``) also keeps the detector in ``--out`` and replaces step 3 by a retune
(:mod:`pipelines.retune`): the recipe's inference settings (box selection and fusion, test-time flips, sliding
window) are applied to the kept weights and the operating threshold is chosen again on the fine-tuning run's own
validation split; then both test sets are evaluated again. A new inference recipe does not need a new fine-tuning
run. The provenance keeps the fine-tuning record of the build that trained the weights (``detector_kept_from``,
``finetune``, ``finetune_config`` with the new inference settings) and says what the retune changed (``retune``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from caries_mim import __version__
from caries_mim.atomic_files import atomic_write_bytes
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import load_encoder, save_encoder
from caries_mim.package import FOUNDATION_ENCODER, REFERENCE_DETECTOR, read_package, save_package
from caries_mim.synth import SynthConfig, generate_dataset
from pipelines import config as configs
from pipelines.config import path_override
from pipelines.evaluate import run_evaluate
from pipelines.finetune import load_finetune_config, run_finetune
from pipelines.pretrain import load_pretrain_config, run_pretrain
from pipelines.retune import inference_settings, retune_package

#: A second generator for the generalization test: a coarser, noisier, blurrier sensor with another contrast, and
#: no image at the first generator's most common settings.
SHIFTED_GENERATOR: dict[str, Any] = {
    "spacing_mm_range": [0.04, 0.06],
    "width_px_range": [700.0, 950.0],
    "exposure_photons": [800.0, 3000.0],
    "electronic_noise": [6.0, 12.0],
    "psf_sigma_px": [0.9, 1.6],
    "edge_enhancement_probability": 0.8,
    "rotation_deg_range": [-8.0, 8.0],
}

FOUNDATION_FILE = FOUNDATION_ENCODER.name
DETECTOR_FILE = REFERENCE_DETECTOR.name
RECONSTRUCTIONS_FILE = "foundation_reconstructions.png"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class ReferenceConfig:
    """What the reference build draws and trains (``pipelines/configs/reference_*.yaml``)."""

    #: Unlabeled images for pretraining, labeled images for fine-tuning (70/15/15 train/val/test by the
    #: generator; the test split is not used: the fresh test set is), images of each test set.
    unlabeled_images: int = 10000
    labeled_images: int = 1000
    test_images: int = 200
    #: Seeds: unlabeled corpus = seed, labeled set = seed + 1, fresh test set = seed + 2, shifted test = seed + 3.
    seed: int = 2026
    #: SynthConfig fields of the second generator (the generalization test).
    shifted_generator: dict[str, Any] = field(default_factory=lambda: dict(SHIFTED_GENERATOR))
    #: Shipped config names or files for the two trainings, and overrides for each (``--set`` syntax).
    pretrain_config: str = "reference"
    pretrain_set: list[str] = field(default_factory=list)
    finetune_config: str = "reference"
    finetune_set: list[str] = field(default_factory=list)
    #: Processes rendering synthetic images.
    synth_workers: int = 2
    #: Bootstrap resamples of the evaluations.
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        for name in ("unlabeled_images", "labeled_images", "test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.synth_workers < 1 or self.bootstrap < 0 or self.seed < 0:
            raise ValueError("synth_workers must be >= 1, bootstrap and seed >= 0")


def load_reference_config(config: str | None, overrides: list[str] | None) -> ReferenceConfig:
    built, origin = configs.load_layered(ReferenceConfig, "reference", config, overrides)
    try:
        SynthConfig.from_dict(built.shifted_generator)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"shifted_generator: {exc.message} ({origin})") from None
    return built


def _synth(
    folder: Path, *, unlabeled: int, labeled: int, seed: int, config: SynthConfig, workers: int, progress: bool
) -> Path:
    """A synthetic set, unless a complete one with these settings is already there."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        written = json.loads(manifest.read_text())
        counts = written.get("counts", {})
        if (
            written.get("complete")
            and written.get("seed") == seed
            and written.get("config") == config.to_dict()
            and (counts.get("unlabeled"), counts.get("labeled")) == (unlabeled, labeled)
        ):
            return folder
    generate_dataset(
        folder,
        n_unlabeled=unlabeled,
        n_labeled=labeled,
        seed=seed,
        config=config,
        workers=workers,
        progress=progress,
    )
    return folder


def _merged_test(folder: Path) -> list[Path]:
    """All three COCO splits of a test set (every image of it is a test image)."""
    return [folder / "labeled" / f"{split}.json" for split in ("train", "val", "test")]


def _train(run: Path, train) -> dict[str, Any] | None:
    """A finished run's summary as it is; else ``train(resume)``, resuming an interrupted run from its checkpoint.
    Returns None for a finished run, so its time is not counted again (see ``timed``)."""
    if (run / "summary.json").is_file():
        return None
    return train((run / "checkpoint.pt").is_file())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: A source tree copied without its git metadata (a build host sent the tree, not a clone) may declare the commit
#: it was exported from in this variable, a 40-digit hex SHA-1; it counts only where git cannot answer.
SOURCE_COMMIT_VARIABLE = "CARIES_MIM_SOURCE_COMMIT"


def declared_source_commit() -> str | None:
    """The commit declared in :data:`SOURCE_COMMIT_VARIABLE`, or None (unset); a malformed value is an error: a
    build must not record a commit nobody can look up."""
    declared = os.environ.get(SOURCE_COMMIT_VARIABLE, "").strip()
    if not declared:
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", declared):
        raise InvalidArgumentError(
            f"{SOURCE_COMMIT_VARIABLE} must be a 40-digit lowercase hex commit, got {declared!r}"
        )
    return declared


def code_commit() -> str | None:
    """The git commit of the code that runs, with ``+dirty`` for local changes; outside a git checkout the commit
    declared in :data:`SOURCE_COMMIT_VARIABLE`, else None."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return declared_source_commit()
    return f"{commit}+dirty" if dirty else commit


def machine() -> dict[str, Any]:
    """Where the build ran: CPU, cores, accelerator, library versions."""
    description = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def export_encoder(source: Path, target: Path) -> None:
    """The encoder with fp16 weights (same config and metadata): half the bytes, loads into an fp32 encoder."""
    loaded = load_encoder(source)
    save_encoder(loaded.encoder.half(), target, metadata=loaded.metadata)


def export_package(source: Path, target: Path, provenance: dict[str, Any]) -> None:
    """The package with fp16 floating-point weights and the build's provenance; checksum recomputed on save."""
    package = read_package(source)
    state = {
        name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in package.state_dict.items()
    }
    save_package(
        dataclasses.replace(package, state_dict=state, provenance={**package.provenance, "reference": provenance}),
        target,
    )


def _metric_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    metrics = json.loads(Path(evaluation["metrics"]).read_text())
    froc = metrics["froc"]
    at_one = None
    if froc["sensitivities"] is not None:
        at_one = dict(zip(froc["fp_rates"], froc["sensitivities"], strict=True)).get(1.0)
    return {
        "images": evaluation["images"],
        "lesions": evaluation["lesions"],
        "ap50": evaluation["ap50"],
        "ap50_ci": evaluation["ap50_ci"],
        "froc_score": evaluation["froc_score"],
        "froc_sensitivity_at_1_fp": at_one,
        "image_auc": evaluation["auc"],
        "image_sensitivity": evaluation["sensitivity"],
        "image_specificity": evaluation["specificity"],
        "lesion_sensitivity": evaluation["lesion_sensitivity"],
        "false_positives_per_image": evaluation["false_positives_per_image"],
        "sensitivity_by_depth": evaluation["sensitivity_by_depth"],
        "sensitivity_by_conspicuity": evaluation["sensitivity_by_conspicuity"],
        "threshold": evaluation["threshold"],
    }


def _kept_foundation(out: Path) -> dict[str, Any]:
    """The provenance of the foundation encoder already in ``out``, checked against the file itself."""
    encoder, recorded = out / FOUNDATION_FILE, out / PROVENANCE_FILE
    if not encoder.is_file() or not recorded.is_file():
        raise InvalidArgumentError(
            f"--keep-foundation needs {encoder} and {recorded} from an earlier build; run without it to pretrain one"
        )
    try:
        earlier = json.loads(recorded.read_text())
        expected = earlier["files"][FOUNDATION_FILE]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InvalidArgumentError(
            f"{recorded} is not a reference build's provenance (no {FOUNDATION_FILE} entry)"
        ) from None
    _check_kept_file(encoder, expected, "encoder", recorded)
    return earlier


def _check_kept_file(path: Path, expected_sha256: str, what: str, provenance: Path) -> None:
    """Raises unless ``path`` holds the bytes ``provenance`` recorded for it."""
    if file_sha256(path) != expected_sha256:
        raise InvalidArgumentError(
            f"{path} is not the {what} {provenance} describes (SHA-256 differs): its provenance is unknown"
        )


def _kept_detector(out: Path, earlier: dict[str, Any], labeled: dict[str, Any]) -> None:
    """Checks that the detector in ``out`` is the one ``earlier`` describes, fine-tuned on the ``labeled`` set this
    build draws (its validation split is where the threshold is chosen again: other data could overlap training)."""
    detector = out / DETECTOR_FILE
    recorded = earlier.get("files", {}).get(DETECTOR_FILE, {}).get("sha256")
    if not detector.is_file() or recorded is None:
        raise InvalidArgumentError(f"--keep-detector needs {detector} and its entry in {out / PROVENANCE_FILE}")
    _check_kept_file(detector, recorded, "detector", out / PROVENANCE_FILE)
    if earlier["data"]["labeled"] != labeled:
        raise InvalidArgumentError(
            "--keep-detector: the kept detector was fine-tuned on another labeled set (seed, count or generator) than "
            "this config draws; its validation split would not be the one it was validated on"
        )


def _kept_from(earlier: dict[str, Any], file: str, stages: tuple[str, ...]) -> dict[str, Any]:
    """Where a kept file of ``earlier``'s build came from: that build's command, commit and machine, the time its
    ``stages`` took there (those it timed), and the file's SHA-256."""
    return {
        "command": earlier["command"],
        "code_commit": earlier["code_commit"],
        "machine": earlier["machine"],
        "stage_seconds": {stage: took for stage, took in earlier.get("stage_seconds", {}).items() if stage in stages},
        "sha256": earlier["files"][file]["sha256"],
    }


def run_reference(
    out: Path,
    work: Path,
    config: ReferenceConfig,
    *,
    command: list[str] | None = None,
    progress: bool = True,
    keep_foundation: bool = False,
    keep_detector: bool = False,
) -> dict[str, Any]:
    """Build (or finish building) the reference models into ``out``; returns the provenance it writes.

    With ``keep_foundation`` the foundation encoder in ``out`` is reused, with ``keep_detector`` the detector too
    (retuned for the recipe's inference settings; it implies ``keep_foundation``); see the module docstring."""
    keep_foundation = keep_foundation or keep_detector
    earlier = _kept_foundation(out) if keep_foundation else None
    default = SynthConfig()
    labeled_record = {"images": config.labeled_images, "seed": config.seed + 1, "generator": default.to_dict()}
    if keep_detector:
        _kept_detector(out, earlier, labeled_record)
    started = time.perf_counter()
    # The code that runs is the code at the start: a checkout edited during a long build must not be recorded.
    commit = code_commit()
    seconds: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    def timed(name: str, action):
        """``action()``, timed; a stage that was already done (None) is read from its run's summary, untimed."""
        since = time.perf_counter()
        result = action()
        if result is None:
            return json.loads((work / name / "summary.json").read_text())
        seconds[name] = round(time.perf_counter() - since, 1)
        return result

    shifted = SynthConfig.from_dict(config.shifted_generator)
    # (stage, folder, unlabeled, labeled, seed, generator): every set from its own seed.
    sets = (
        *(
            ()
            if keep_foundation
            else (("synth_unlabeled", "unlabeled", config.unlabeled_images, 0, config.seed, default),)
        ),
        ("synth_labeled", "labeled", 0, config.labeled_images, config.seed + 1, default),
        ("synth_test", "test", 0, config.test_images, config.seed + 2, default),
        ("synth_shifted_test", "shifted_test", 0, config.test_images, config.seed + 3, shifted),
    )
    folders = {}
    for stage, folder, unlabeled, labeled_count, seed, generator in sets:
        folders[folder] = timed(
            stage,
            lambda folder=folder, unlabeled=unlabeled, count=labeled_count, seed=seed, generator=generator: _synth(
                work / folder,
                unlabeled=unlabeled,
                labeled=count,
                seed=seed,
                config=generator,
                workers=config.synth_workers,
                progress=progress,
            ),
        )
    labeled, fresh, other = (folders[name] for name in ("labeled", "test", "shifted_test"))

    cache = path_override("data.cache_dir", work / "decode_cache")
    pretrain_run = work / "pretrain"
    if earlier is not None:
        encoder = out / FOUNDATION_FILE
        pretrain_config = earlier["pretrain_config"]
        pretrain = earlier["pretrain"]
    else:
        pretrain_config = load_pretrain_config(config.pretrain_config, [*config.pretrain_set, cache])
        corpus = folders["unlabeled"]
        pretrain = timed(
            "pretrain",
            lambda: _train(pretrain_run, lambda resume: run_pretrain(
                [corpus / "unlabeled"], pretrain_run, pretrain_config, resume=resume, progress=progress
            )),
        )  # fmt: skip
        encoder = Path(pretrain["encoder"])

    finetune_run = work / "finetune"
    finetune_config = load_finetune_config(
        config.finetune_config, [*config.finetune_set, cache, path_override("model.encoder", encoder)]
    )
    train_file, val_file = (labeled / "labeled" / f"{split}.json" for split in ("train", "val"))
    retune = None
    if keep_detector:
        settings = inference_settings(finetune_config.detector)
        package = work / "retune" / DETECTOR_FILE
        package.parent.mkdir(parents=True, exist_ok=True)
        retune = timed(
            "retune", lambda: retune_package(out / DETECTOR_FILE, [val_file], package, settings, progress=progress)
        )
        finetune = earlier["finetune"]
        trained = earlier["finetune_config"]
        recorded_finetune_config = {**trained, "detector": {**trained["detector"], **settings}}
    else:
        finetune = timed(
            "finetune",
            lambda: _train(finetune_run, lambda resume: run_finetune(
                [train_file], [val_file], finetune_run, finetune_config, resume=resume, progress=progress
            )),
        )  # fmt: skip
        package = Path(finetune["package"])
        recorded_finetune_config = configs.to_dict(finetune_config)

    evaluations = {}
    for name, test_set in (("fresh_seed", fresh), ("shifted_generator", other)):
        evaluation = timed(
            f"evaluate_{name}",
            lambda test_set=test_set, name=name: run_evaluate(
                package,
                _merged_test(test_set),
                work / f"evaluate_{name}",
                bootstrap=config.bootstrap,
                seed=config.seed,
                progress=progress,
            ),
        )
        evaluations[name] = _metric_summary(evaluation)

    provenance = {
        "command": command if command is not None else sys.argv,
        "caries_mim_version": __version__,
        "code_commit": commit,
        "machine": machine(),
        "reference_config": configs.to_dict(config),
        "pretrain_config": pretrain_config if earlier is not None else configs.to_dict(pretrain_config),
        "finetune_config": recorded_finetune_config,
        "data": {
            "unlabeled": earlier["data"]["unlabeled"]
            if earlier is not None
            else {"images": config.unlabeled_images, "seed": config.seed, "generator": default.to_dict()},
            "labeled": labeled_record,
            "fresh_test": {"images": config.test_images, "seed": config.seed + 2, "generator": default.to_dict()},
            "shifted_test": {"images": config.test_images, "seed": config.seed + 3, "generator": shifted.to_dict()},
        },
        "pretrain": {key: pretrain.get(key) for key in ("steps", "last_loss", "seconds", "device", "precision")},
        "finetune": {
            key: finetune.get(key) for key in ("steps", "best_val_ap50", "best_step", "seconds", "device", "precision")
        },
        "test_metrics": evaluations,
        "stage_seconds": seconds,
    }
    if earlier is not None:
        # Where the kept encoder came from: the build that pretrained it, and that build's own record of it. An
        # earlier build that itself kept the encoder points further back, to the build that did pretrain it.
        provenance["foundation_kept_from"] = earlier.get("foundation_kept_from") or _kept_from(
            earlier, FOUNDATION_FILE, ("synth_unlabeled", "pretrain")
        )
    if keep_detector:
        # Where the kept weights came from: the build that fine-tuned them (or the one an earlier retune kept them
        # from), and what this build changed.
        provenance["detector_kept_from"] = earlier.get("detector_kept_from") or _kept_from(
            earlier, DETECTOR_FILE, ("finetune",)
        )
        provenance["retune"] = retune
    # Through JSON: metric values may be numpy scalars, which a package (loaded with weights_only) must not hold.
    provenance = json.loads(json.dumps(provenance))
    if earlier is None:
        export_encoder(encoder, out / FOUNDATION_FILE)
    export_package(package, out / DETECTOR_FILE, provenance)
    reconstructions = sorted((pretrain_run / "reconstructions").glob("step_*.png"))
    if reconstructions and earlier is None:
        shutil.copyfile(reconstructions[-1], out / RECONSTRUCTIONS_FILE)
    provenance["wall_seconds"] = round(time.perf_counter() - started, 1)
    provenance["files"] = {
        name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
        for name in (FOUNDATION_FILE, DETECTOR_FILE, RECONSTRUCTIONS_FILE)
        if (out / name).is_file()
    }
    atomic_write_bytes(out / PROVENANCE_FILE, (json.dumps(provenance, indent=2) + "\n").encode())
    return provenance
