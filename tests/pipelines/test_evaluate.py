"""``caries-mim evaluate``: every output written, numbers that agree with pycocotools and with the metrics library,
classes matched by name, and user errors as one line with exit status 2."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import pipelines.evaluate as evaluate_module
from caries_mim.data import load_annotations
from caries_mim.detection import CariesDetector
from caries_mim.errors import InvalidArgumentError, NotAnImageError
from caries_mim.inference import Finding, Findings
from caries_mim.metrics import EvaluatedImage, coco_metrics
from caries_mim.package import ModelPackage, load_package, save_package
from caries_mim.synth import generate_dataset
from caries_mim.synth.config import SynthConfig
from pipelines.cli import main
from pipelines.evaluate import choose_overlays, compute_metrics, load_evaluation_data, run_evaluate
from tests.detection.tiny import tiny_config
from tests.metrics.factory import make_image, perfect

CLASSES = ("caries", "deep_caries")
#: Small images (400-500 px wide) with lesions on most of them: a whole evaluation takes about a second.
SMALL = SynthConfig(width_px_range=(400.0, 500.0), lesion_free_fraction=0.25)
THRESHOLD = 0.3


def make_package(path: Path, class_names=CLASSES, threshold: float = THRESHOLD) -> Path:
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(class_names=class_names))
    return save_package(ModelPackage.from_detector(detector, threshold=threshold, version="0.1.0"), path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=0, n_labeled=8, seed=0, progress=False, config=SMALL)
    return out / "labeled"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("package") / "model.cmpkg")


@pytest.fixture(scope="module")
def evaluated(package, dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("evaluation") / "out"
    summary = run_evaluate(
        package, [dataset / "train.json"], out, overlays=3, bootstrap=20, progress=False, device="cpu"
    )
    return out, summary


def _pycocotools_ap50(truth_file: Path, predictions_file: Path) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(truth_file))
        evaluation = COCOeval(truth, truth.loadRes(str(predictions_file)), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])


def _images_from_predictions(truth_file: Path, predictions: list[dict]) -> list[EvaluatedImage]:
    """EvaluatedImages rebuilt from the ground-truth file and predictions.json alone (COCO ids are the source's)."""
    annotations = load_annotations(truth_file)
    images = []
    for record in annotations.records:
        mine = [p for p in predictions if p["image_id"] == record.image_id]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in mine)]
        images.append(
            EvaluatedImage(
                image_id=record.image_id,
                gt_boxes=record.boxes,
                gt_labels=record.labels,
                pred_boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
                pred_labels=np.array([p["category_id"] - 1 for p in mine], dtype=np.int64),
                pred_scores=np.array([p["score"] for p in mine], dtype=np.float64),
            )
        )
    return images


# ---- the whole run, with a tiny random model ---------------------------------------------------------------------


def test_every_output_is_written_and_described(evaluated, dataset, package):
    out, summary = evaluated
    for name in ("metrics.json", "predictions.json", "pr_curve.png", "froc.png"):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    metrics = json.loads((out / "metrics.json").read_text())
    annotations = load_annotations(dataset / "train.json")

    assert metrics["model"]["path"] == str(package)
    assert metrics["model"]["checksum"] == load_package(package).package.to_payload()["checksum"]
    assert metrics["model"]["package_version"] == "0.1.0"
    assert metrics["model"]["class_names"] == list(CLASSES)
    data = metrics["data"]
    assert data["files"] == [str(dataset / "train.json")]
    assert data["images"] == len(annotations.records) == summary["images"] == metrics["coco"]["n_images"]
    lesions = {name: sum(int((r.labels == i).sum()) for r in annotations.records) for i, name in enumerate(CLASSES)}
    assert data["lesions"] == lesions
    assert data["positive_images"] == sum(len(r.labels) > 0 for r in annotations.records)
    assert data["ids"] == "source"
    assert data["image_ids"] == [{"id": r.image_id, "file": r.image_path.name} for r in annotations.records]

    assert metrics["threshold"] == THRESHOLD == metrics["image_level"]["threshold"]
    assert metrics["froc"]["n_lesions"] == sum(lesions.values()) == summary["lesions"]
    intervals = metrics["confidence_intervals"]
    for key in ("ap50", "froc_score", "sensitivity", "specificity", "auc"):
        assert intervals[key]["n_resamples"] in (0, 20)
    assert summary["ap50"] == metrics["coco"]["ap50"]
    assert summary["froc_score"] == metrics["froc"]["score"]
    assert metrics["seconds"] > 0
    assert Path(summary["metrics"]) == out / "metrics.json"

    # The synthetic annotations carry depth, conspicuity and surface: every lesion lands in one stratum of each.
    point = metrics["operating_point"]
    assert point["threshold"] == THRESHOLD
    n_lesions = sum(lesions.values())
    assert sum(s["lesions"] for s in point["by_depth"].values()) == n_lesions
    assert sum(s["lesions"] for s in point["by_conspicuity"].values()) == n_lesions
    assert sum(s["lesions"] for s in point["by_surface"].values()) == n_lesions
    assert set(point["by_depth"]) <= {"enamel", "outer_dentin", "inner_dentin"}
    assert set(point["by_surface"]) <= {"mesial", "distal", "occlusal"}
    assert summary["sensitivity_by_depth"] == {k: v["sensitivity"] for k, v in point["by_depth"].items()}
    assert summary["sensitivity_by_surface"] == {k: v["sensitivity"] for k, v in point["by_surface"].items()}
    assert summary["false_positives_per_image"] == point["false_positives_per_image"] >= 0

    # Every lesion is found under some class or missed; the merged AP50 and class accuracy reach the summary.
    confusion = metrics["class_confusion"]
    assert confusion["threshold"] == THRESHOLD
    assert {name: sum(row.values()) for name, row in confusion["matrix"].items()} == lesions
    assert summary["ap50_classes_merged"] == confusion["merged_ap50"]
    assert 0.0 <= confusion["merged_ap50"] <= 1.0
    assert summary["class_accuracy"] == confusion["class_accuracy"]


def test_predictions_json_holds_every_detection_and_reproduces_the_metrics(evaluated, dataset):
    out, _ = evaluated
    predictions = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert predictions, "the tiny detector (score threshold 0) always returns boxes"
    truth = json.loads((dataset / "train.json").read_text())
    assert {p["image_id"] for p in predictions} <= {image["id"] for image in truth["images"]}
    assert {p["category_id"] for p in predictions} <= {category["id"] for category in truth["categories"]}
    assert all(set(p) == {"image_id", "category_id", "bbox", "score"} for p in predictions)
    assert all(p["bbox"][2] >= 0 and p["bbox"][3] >= 0 for p in predictions)
    # All detections, not only those at the operating point: AP sweeps the threshold itself.
    assert any(p["score"] < THRESHOLD for p in predictions)

    rebuilt = coco_metrics(_images_from_predictions(dataset / "train.json", predictions), CLASSES).to_dict()
    for key in ("ap", "ap50", "ap75", "ar"):
        assert rebuilt[key] == pytest.approx(metrics["coco"][key], abs=1e-9)
    assert _pycocotools_ap50(dataset / "train.json", out / "predictions.json") == pytest.approx(
        metrics["coco"]["ap50"], abs=1e-3
    )


def test_overlays_show_images_with_lesions_first_named_by_file_stem(evaluated, dataset):
    out, summary = evaluated
    records = load_annotations(dataset / "train.json").records
    positives = [r.image_path.stem for r in records if len(r.labels)]
    assert len(positives) >= 3
    # The random model finds nothing at THRESHOLD, so the lesion images lead, in file order.
    assert [Path(p).stem for p in summary["overlays"]] == positives[:3]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(f"{stem}.png" for stem in positives[:3])
    sizes = {r.image_path.stem: (r.width, r.height) for r in records}
    for path in summary["overlays"]:
        with Image.open(path) as image:
            assert image.size == sizes[Path(path).stem]
            assert image.mode == "RGB"


def test_no_patient_identifier_in_any_output(evaluated, dataset):
    out, summary = evaluated
    identifiers = set()
    for path in (dataset / "images").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), str(ds.PatientID), str(ds.SOPInstanceUID)}
    text = json.dumps(summary) + "".join(p.read_text() for p in out.glob("*.json"))
    text += " ".join(p.name for p in out.rglob("*"))
    assert not [identifier for identifier in identifiers if identifier in text]


# ---- agreement with pycocotools on a detector with a real AP ---------------------------------------------------


class OraclePredictor:
    """Jittered ground truth, some misses and false positives, seeded scores: AP50 strictly between 0 and 1.

    ``current`` is the file the pipeline read last (set by the patched ``read_image``); predictions follow its
    ground truth. Everything else (classes, threshold, package) is the real package's.
    """

    def __init__(self, real, truth: dict[Path, tuple[np.ndarray, np.ndarray]]) -> None:
        self.package, self.threshold, self.class_names = real.package, real.threshold, real.class_names
        self.truth = truth
        self.rng = np.random.default_rng(7)
        self.current: Path | None = None

    def predict(self, radiograph) -> Findings:
        boxes, labels = self.truth[self.current]
        height, width = radiograph.pixels.shape
        found = []
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            if self.rng.random() < 0.8:
                size = min(box[2] - box[0], box[3] - box[1])
                dx, dy = self.rng.normal(0.0, 0.2 * size, size=2)
                found.append(([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy], label, self.rng.uniform(0.2, 1)))
        for _ in range(int(self.rng.integers(0, 3))):
            x, y = self.rng.uniform(0, width - 30), self.rng.uniform(0, height - 30)
            found.append(([x, y, x + 30.0, y + 25.0], int(self.rng.integers(0, 2)), self.rng.uniform(0.0, 0.8)))
        found.sort(key=lambda item: -item[2])
        findings = tuple(
            Finding(
                label=self.class_names[label],
                score=float(score),
                box=tuple(max(0.0, float(v)) for v in box),
                box_mm=None,
                above_threshold=score >= self.threshold,
            )
            for box, label, score in found
        )
        return Findings(findings, self.threshold, (height, width), None, self.package.version)


def test_pycocotools_on_predictions_json_gives_the_ap50_of_metrics_json(package, dataset, tmp_path, monkeypatch):
    truth_file = dataset / "train.json"
    records = load_annotations(truth_file).records
    oracle = OraclePredictor(
        load_package(package, device="cpu"),
        {r.image_path: (r.boxes.astype(np.float64), r.labels) for r in records},
    )
    real_read = evaluate_module.read_image

    def read_and_remember(path, options):
        oracle.current = path
        return real_read(path, options)

    monkeypatch.setattr(evaluate_module, "read_image", read_and_remember)
    monkeypatch.setattr(evaluate_module, "load_package", lambda model, device=None: oracle)
    summary = run_evaluate(package, [truth_file], tmp_path / "out", overlays=0, bootstrap=0, progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    assert 0.2 < metrics["coco"]["ap50"] < 1.0
    reference = _pycocotools_ap50(truth_file, tmp_path / "out" / "predictions.json")
    assert metrics["coco"]["ap50"] == pytest.approx(reference, abs=1e-3)
    assert summary["ap50_ci"] is None
    assert metrics["confidence_intervals"] is None
    assert summary["overlays"] == []
    assert not (tmp_path / "out" / "overlays").exists()


# ---- the metric sections on hand-made predictions -----------------------------------------------------------------


def test_perfect_predictions_score_one_everywhere():
    box_a, box_b = [10.0, 10.0, 30.0, 30.0], [50.0, 40.0, 70.0, 55.0]
    truth = [
        make_image("a", truth=[(box_a, 0), (box_b, 1)]),
        make_image("b", truth=[(box_b, 0)]),
        make_image("negative"),
    ]
    metrics = compute_metrics(perfect(truth, score=0.9), CLASSES, threshold=0.5, bootstrap=50, seed=1).to_dict()
    assert metrics["coco"]["ap50"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["coco"]["ap"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["froc"]["score"] == 1.0
    image_level = metrics["image_level"]
    assert (image_level["sensitivity"], image_level["specificity"], image_level["auc"]) == (1.0, 1.0, 1.0)
    assert metrics["confidence_intervals"]["ap50"]["low"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["confidence_intervals"]["seed"] == 1
    json.dumps(metrics, allow_nan=False)


def test_overlay_choice_puts_lesions_and_findings_first():
    box = [10.0, 10.0, 20.0, 20.0]
    images = [
        make_image("quiet"),
        make_image("low-score", predictions=[(box, 0, 0.1)]),
        make_image("lesion", truth=[(box, 0)]),
        make_image("false-alarm", predictions=[(box, 0, 0.7)]),
        make_image("quiet-2"),
    ]
    assert choose_overlays(images, 0.5, 3) == [2, 3, 0]
    assert choose_overlays(images, 0.5, 10) == [2, 3, 0, 1, 4]
    assert choose_overlays(images, 0.5, 0) == []


# ---- ids and classes ----------------------------------------------------------------------------------------------


def _rewrite_coco(dataset: Path, name: str, change) -> Path:
    data = json.loads((dataset / "train.json").read_text())
    change(data)
    path = dataset / name
    path.write_text(json.dumps(data))
    return path


def test_source_category_ids_by_name_and_a_new_id_for_a_class_the_file_lacks(dataset):
    def renumber(data):
        new_ids = {1: 3, 2: 7}
        data["categories"] = [{**c, "id": new_ids[c["id"]]} for c in data["categories"]]
        data["categories"].append({"id": 9, "name": "restoration"})  # listed, no box: harmless
        for annotation in data["annotations"]:
            annotation["category_id"] = new_ids[annotation["category_id"]]

    loaded = load_evaluation_data([_rewrite_coco(dataset, "renumbered.json", renumber)], CLASSES)
    assert loaded.ids == "source"
    assert loaded.category_ids == {0: 3, 1: 7}

    def caries_only(data):
        data["categories"] = [c for c in data["categories"] if c["name"] == "caries"]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] == 1]

    loaded = load_evaluation_data([_rewrite_coco(dataset, "caries_only.json", caries_only)], CLASSES)
    assert loaded.category_ids == {0: 1, 1: 2}
    assert all(set(item.gt_labels.tolist()) <= {0} for item in loaded.items)


def test_colliding_image_ids_fall_back_to_sequential_ids(dataset):
    train = dataset / "train.json"
    loaded = load_evaluation_data([train, train], CLASSES)
    n = len(load_annotations(train).records)
    assert loaded.ids == "sequential"
    assert [item.result_id for item in loaded.items] == list(range(1, 2 * n + 1))
    assert loaded.category_ids == {0: 1, 1: 2}


def test_classes_are_matched_by_name(dataset):
    def swapped(data):
        data["categories"] = [{**c, "id": 3 - c["id"]} for c in data["categories"]]
        for annotation in data["annotations"]:
            annotation["category_id"] = 3 - annotation["category_id"]

    path = _rewrite_coco(dataset, "swapped.json", swapped)
    original = load_evaluation_data([dataset / "train.json"], CLASSES).items
    renamed = load_evaluation_data([path], CLASSES).items
    # The loader orders classes by category id, so its label indices swap; the mapping by name undoes that.
    assert load_annotations(path).classes == ("deep_caries", "caries")
    for a, b in zip(original, renamed, strict=True):
        np.testing.assert_array_equal(a.gt_labels, b.gt_labels)


def test_a_class_the_package_does_not_predict_is_refused_by_name(dataset, tmp_path):
    assert any(1 in r.labels for r in load_annotations(dataset / "train.json").records), "needs deep_caries boxes"
    with pytest.raises(InvalidArgumentError, match=r"deep_caries.*does not predict.*\['caries'\]"):
        load_evaluation_data([dataset / "train.json"], ("caries",))
    only_caries = make_package(tmp_path / "caries.cmpkg", class_names=("caries",))
    status, err = _cli_error(["--model", str(only_caries), "--data", str(dataset / "train.json")], tmp_path)
    assert status == 2
    assert "[invalid_argument]" in err
    assert "deep_caries" in err


def test_an_unreadable_image_is_a_typed_error_naming_the_file(dataset, package, tmp_path):
    not_an_image = _write(tmp_path / "notes.dcm", b"not a radiograph")

    def point_at_notes(data):
        data["images"][0]["file_name"] = str(not_an_image)  # absolute: used as is

    path = _rewrite_coco(dataset, "bad_image.json", point_at_notes)
    with pytest.raises(NotAnImageError, match=r"notes\.dcm"):
        run_evaluate(package, [path], tmp_path / "out", overlays=0, bootstrap=0, progress=False)


# ---- the command line ---------------------------------------------------------------------------------------------


def _cli_error(arguments: list[str], tmp_path: Path) -> tuple[int, str]:
    output = io.StringIO()
    errors = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
        status = main(["evaluate", *arguments, "--out", str(tmp_path / "cli-out"), "--quiet"])
    assert "Traceback" not in errors.getvalue()
    assert output.getvalue() == ""
    return status, errors.getvalue()


def test_cli_prints_a_one_line_json_summary(package, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(
        [
            "evaluate",
            "--model",
            str(package),
            "--data",
            str(dataset / "train.json"),
            "--out",
            str(out),
            "--overlays",
            "1",
            "--bootstrap",
            "5",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0
    lines = captured.out.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["out"] == str(out)
    assert len(summary["overlays"]) == 1
    assert json.loads((out / "metrics.json").read_text())["confidence_intervals"]["ap50"]["n_resamples"] == 5
    assert captured.err == ""  # --quiet: no progress bar


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda tmp: ("model", tmp / "missing.cmpkg"), "invalid_checkpoint"),
        (lambda tmp: ("model", _write(tmp / "garbage.cmpkg", b"not a package")), "invalid_checkpoint"),
        (lambda tmp: ("data", tmp / "missing.json"), "invalid_dataset"),
        (lambda tmp: ("data", _write(tmp / "broken.json", b"{ not json")), "invalid_dataset"),
    ],
    ids=["missing-package", "corrupt-package", "missing-annotations", "malformed-annotations"],
)
def test_cli_user_errors_are_one_line_with_status_2(package, dataset, tmp_path, make, code):
    which, path = make(tmp_path)
    model = path if which == "model" else package
    data = path if which == "data" else dataset / "train.json"
    status, err = _cli_error(["--model", str(model), "--data", str(data)], tmp_path)
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith(f"caries-mim evaluate: error [{code}]: ")
    assert str(path) in err


def test_cli_refuses_a_negative_count(package, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(package), "--data", str(dataset), "--out", str(tmp_path), "--overlays", "-1"])
    assert exit_info.value.code == 2
    assert "expected a number >= 0" in capsys.readouterr().err


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("command", [[], ["evaluate"], ["predict"]], ids=["top", "evaluate", "predict"])
def test_help_texts_render(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(" ".join(["usage: caries-mim", *command]))
