"""`caries-mim pretrain` end to end on a small synthetic set: outputs, learning, resume, errors, DDP (gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caries_mim.models import load_encoder
from caries_mim.synth import generate_dataset
from pipelines import engine as engine_module
from pipelines.cli import main

#: A model and input small enough for dozens of steps per second on 2 CPU cores.
FAST = [
    "--config",
    "tiny",
    "--set",
    "data.image_size=64",
    "--set",
    "data.workers=0",
    "--set",
    "optim.batch_size=8",
    "--set",
    "log.every=1",
    "--set",
    "log.images=2",
    # One thread: tiny matmuls gain nothing from two, and spinning OpenMP threads on a busy 2-core CI machine can
    # slow a step down tenfold.
    "--set",
    "train.threads=1",
    "--quiet",
]


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_unlabeled=24, n_labeled=0, seed=3, progress=False)
    return out / "unlabeled"


def pretrain(data: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--data", str(data), "--out", str(out), *FAST, *extra])


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
def test_tiny_run_learns_and_writes_every_output(unlabeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(unlabeled, run, "--set", "train.steps=50", "--set", "log.images_every=25") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 50
    assert summary["encoder"] == str(run / "encoder.pt")
    assert summary["device"] == "cpu"
    assert summary["images_per_second"] > 0
    curve = losses(run)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(46, 51)) / 5
    assert last < 0.6 * first, f"loss did not fall clearly: first 5 steps {first:.4f}, last 5 {last:.4f}"

    loaded = load_encoder(run / "encoder.pt")
    assert loaded.encoder.config.embed_dim == 192
    assert loaded.encoder.config.image_size == (64, 64)
    assert loaded.metadata["steps"] == 50
    assert loaded.metadata["objective"]["name"] == "mae"
    assert sorted(p.name for p in (run / "reconstructions").iterdir()) == ["step_000025.png", "step_000050.png"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 50
    assert not list(run.glob(".*.tmp")), "temporary files left behind"


#: MoCo v3 with MLP heads sized for the tiny encoder.
MOCO = (
    *("--set", "objective.name=moco", "--set", "objective.projector_hidden=64"),
    *("--set", "objective.predictor_hidden=64", "--set", "objective.out_dim=32"),
)


#: The CL+MIM hybrid (SimMIM part) with the same MoCo heads.
HYBRID = (
    *("--set", "objective.name=hybrid", "--set", "objective.contrastive_weight=0.4"),
    *("--set", "objective.moco={projector_hidden: 64, predictor_hidden: 64, out_dim: 32}"),
)


#: SemanticMIM with the CLS token and one extra proxy.
SEMANTIC_MIM = ("--set", "objective.name=semantic_mim", "--set", "objective.proxy_tokens=2")


@pytest.mark.parametrize("objective", [(), MOCO, HYBRID, SEMANTIC_MIM], ids=["mae", "moco", "hybrid", "semantic_mim"])
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(unlabeled, tmp_path, monkeypatch, objective):
    """10 steps, a SIGINT (what a scheduler's SIGTERM also does), then --resume for the rest == 20 straight steps:
    weights, optimizer, schedule, RNG (masks) and data position (crops) all continue exactly; for MoCo also its
    momentum branch and the views drawn from each image."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--set", "train.steps=20", "--set", "log.checkpoint_every=100", "--set", "data.workers=1", *objective)
    assert pretrain(unlabeled, straight, *common) == 0

    real_step = engine_module.TrainingEngine._optimizer_step

    def interrupted_after_ten(engine, *args):
        result = real_step(engine, *args)
        if engine.position.step == 9:  # the step being finished is the 10th
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(engine_module.TrainingEngine, "_optimizer_step", interrupted_after_ten)
    assert pretrain(unlabeled, resumed, *common) == 130
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["position"]["step"] == 10
    monkeypatch.undo()
    assert main(["pretrain", "--data", str(unlabeled), "--out", str(resumed), "--resume", "--quiet"]) == 0
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6), f"step {step}"


def test_a_changed_steps_schedule_is_refused_only_for_shape_keys(unlabeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(unlabeled, run, "--set", "train.steps=2") == 0
    code = main(
        [
            "pretrain",
            "--data",
            str(unlabeled),
            "--out",
            str(run),
            "--resume",
            "--quiet",
            "--set",
            "objective.mask_ratio=0.5",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid_config" in err
    assert "objective" in err


def test_an_existing_run_is_not_overwritten_without_resume(unlabeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(unlabeled, run, "--set", "train.steps=1") == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert pretrain(unlabeled, run, "--set", "train.steps=1") == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_checkpoint_is_a_clear_error(unlabeled, tmp_path, capsys):
    assert main(["pretrain", "--data", str(unlabeled), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_a_checkpoint_of_another_format_version_is_refused_by_name(unlabeled, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(unlabeled, run, "--set", "train.steps=1") == 0
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    payload["version"] = 1
    torch.save(payload, run / "checkpoint.pt")
    capsys.readouterr()
    assert pretrain(unlabeled, run, "--resume", "--set", "train.steps=2") == 2
    err = capsys.readouterr().err
    assert "checkpoint version 1 cannot be resumed" in err
    assert "model.init_from" in err
    assert len(err.strip().splitlines()) == 1


def test_an_empty_data_folder_is_an_error_not_a_zero_step_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pretrain(empty, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "invalid_dataset" in err
    assert "no radiograph files" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_batch_larger_than_the_data_names_the_key(unlabeled, tmp_path, capsys):
    assert pretrain(unlabeled, tmp_path / "run", "--set", "optim.batch_size=64") == 2
    err = capsys.readouterr().err
    assert "optim.batch_size" in err
    assert "24 readable image(s)" in err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.batch_sise=8", "optim.batch_sise: unknown key"),
        ("optim.base_lr=fast", "optim.base_lr: expected a number"),
        ("objective.name=beit", "unknown objective 'beit'"),
        ("objective.mask_ratios=0.5", "mask_ratios"),
        ("data.image_size=100", "multiple of patch_size"),
        ("model.size=vit_huge", "unknown ViT size"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_the_key(unlabeled, tmp_path, capsys, override, named):
    assert pretrain(unlabeled, tmp_path / "run", "--set", override) == 2
    err = capsys.readouterr().err.strip()
    assert named in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_checkpoint_write_that_dies_leaves_the_previous_one_intact(unlabeled, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert pretrain(unlabeled, run, "--set", "train.steps=2") == 0
    good = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, target, *args, **kwargs):
        if Path(target).name.startswith(".checkpoint.pt"):
            Path(target).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    code = main(
        ["pretrain", "--data", str(unlabeled), "--out", str(run), "--resume", "--quiet", "--set", "train.steps=4"]
    )
    assert code == 1
    assert (run / "checkpoint.pt").read_bytes() == good
    assert not list(run.glob(".*.tmp"))


def test_moco_pretrains_on_two_views_of_each_image_and_its_momentum_branch_follows(unlabeled, tmp_path):
    run = tmp_path / "moco"
    assert pretrain(unlabeled, run, *MOCO, "--set", "train.steps=6", "--set", "log.images_every=3") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert all(math.isfinite(row["loss"]) for row in rows)
    # One picture of the fixed views (two per image), not one per image step.
    assert [p.name for p in (run / "views").iterdir()] == ["step_000003.png"]
    assert not (run / "reconstructions").exists()
    loaded = load_encoder(run / "encoder.pt")
    assert loaded.metadata["objective"]["name"] == "moco"
    state = torch.load(run / "checkpoint.pt", weights_only=True)["objective"]
    online = state["encoder.blocks.0.attn.qkv.weight"]
    momentum = state["momentum_encoder.blocks.0.attn.qkv.weight"]
    assert not torch.equal(online, momentum), "the momentum branch is a copy that never moved"
    torch.testing.assert_close(loaded.encoder.state_dict()["blocks.0.attn.qkv.weight"], online)


def test_the_hybrid_logs_its_parts_and_the_gradient_cosines_of_every_block(unlabeled, tmp_path):
    run = tmp_path / "hybrid"
    assert pretrain(unlabeled, run, *HYBRID, "--set", "train.steps=4", "--set", "log.images_every=2") == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["loss"] == pytest.approx(0.4 * row["loss_contrastive"] + 0.6 * row["loss_mim"], rel=1e-4)
    diagnostics = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in diagnostics] == [2, 4]
    depth = load_encoder(run / "encoder.pt").encoder.config.depth
    for row in diagnostics:
        cosines = [row[f"gradient_cosine_block_{block}"] for block in range(depth)]
        assert all(-1.0 <= value <= 1.0 for value in cosines)


def torchrun_pretrain(data: Path, out: Path, *extra: str) -> dict:
    """``caries-mim pretrain`` on two CPU processes under torchrun (gloo); returns its one summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pipelines.cli", "pretrain", "--data", str(data), "--out", str(out), *FAST, *extra,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary_lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summary_lines) == 1, done.stdout
    return json.loads(summary_lines[0])


@pytest.mark.slow
@pytest.mark.parametrize("objective", [(), SEMANTIC_MIM], ids=["mae", "semantic_mim"])
def test_two_process_gloo_ddp_run(unlabeled, tmp_path, objective):
    """The torchrun path on CPU: two ranks, one checkpoint and encoder written by rank 0, one summary line."""
    run = tmp_path / "ddp"
    summary = torchrun_pretrain(
        unlabeled,
        run,
        *("--set", "train.steps=6", "--set", "optim.batch_size=4", "--set", "log.checkpoint_every=3"),
        *objective,
    )
    assert summary["processes"] == 2
    assert summary["steps"] == 6
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(payload["rng"]) == 2, "every rank's RNG state is saved"
    assert payload["global_batch"] == 8
    assert load_encoder(run / "encoder.pt").metadata["steps"] == 6


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "name"), [(MOCO, "moco"), (HYBRID, "hybrid")], ids=["moco", "hybrid"])
def test_two_process_gloo_ddp_run_of_moco_gathers_keys_across_ranks(unlabeled, tmp_path, objective, name):
    """MoCo (alone, and as the hybrid's contrastive part) under torchrun: the keys of both ranks are gathered in
    every forward (an all_gather both ranks must reach, with a momentum branch on each), and rank 0 writes one
    encoder of the online branch (the hybrid also logs its gradient cosines there, from rank 0's batch alone)."""
    run = tmp_path / f"ddp_{name}"
    summary = torchrun_pretrain(
        unlabeled,
        run,
        *objective,
        "--set",
        "train.steps=4",
        "--set",
        "optim.batch_size=4",
        "--set",
        "log.images_every=2",
    )
    assert summary["processes"] == 2
    assert summary["steps"] == 4
    assert math.isfinite(summary["last_loss"])
    assert load_encoder(run / "encoder.pt").metadata["objective"]["name"] == name
    if name == "hybrid":
        assert (run / "diagnostics.jsonl").read_text().count("\n") == 2  # steps 2 and 4
