"""``caries-mim pretrain``: masked image modeling on unlabeled radiographs, on one CPU or many GPUs (torchrun).

Run folder (``--out RUN``)::

    config.yaml          the resolved config (defaults + file + --set), what --resume starts from
    checkpoint.pt        last full training state (model, optimizer, scheduler, scaler, RNG, data position)
    encoder.pt           encoder weights + architecture (caries_mim.models.load_encoder), refreshed with checkpoints
    metrics.jsonl        one line per logged interval: step, loss, lr, img/s
    tensorboard/         scalars and reconstruction images
    reconstructions/     step_NNNNNN.png grids: original | masked | reconstruction (masked image modeling)
    views/               step_NNNNNN.png: each preview image's two training views (two-view objectives)
    diagnostics.jsonl    the objective's own measurements, e.g. the hybrid's per-block gradient cosines
    decode_cache/        decoded pixels (unless data.cache_dir points elsewhere)
    summary.json         written when the run completes

Resuming restores everything that decides what happens next (weights, optimizer moments, LR schedule, loss
scaler, every rank's RNG, and the position inside the epoch), so 10 + 10 resumed steps give the loss curve of 20
uninterrupted ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from caries_mim import __version__
from caries_mim.atomic_files import atomic_path
from caries_mim.data import (
    DecodeCache,
    ResumableEpochSampler,
    UnlabeledRadiographs,
    contrastive_view_transform,
    mim_pretrain_transform,
)
from caries_mim.errors import InvalidArgumentError, InvalidConfigError
from caries_mim.io import DEFAULT_ALLOWED_MODALITIES, ReadOptions
from caries_mim.mim import MaskedImageObjective, PretrainingObjective, build_objective
from caries_mim.mim.registry import objective_options
from caries_mim.models import VisionTransformer, ViTConfig, import_mae_weights, save_encoder
from caries_mim.models.encoder_file import encoder_from_payload, is_encoder_payload, read_weights_file
from caries_mim.visualization import tile, to_uint8
from pipelines import config as configs
from pipelines import distributed
from pipelines.distributed import Distributed
from pipelines.engine import LoopPosition, TrainingEngine
from pipelines.run_folder import (
    append_metrics,
    finish_summary,
    prepare_run_folder,
    read_resumable_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from pipelines.training import (
    TrainConfig,
    WarmupCosine,
    adamw_param_groups,
    capture_rng,
    configure_threads,
    endless_batches,
    resolve_precision,
    restore_optimization,
    resumable_loader,
)

log = logging.getLogger("caries_mim.pretrain")

#: Rows of the objective's own measurements, now and then (see ``_write_diagnostics``).
DIAGNOSTICS_NAME = "diagnostics.jsonl"

CHECKPOINT_FORMAT = "caries-mim-pretrain-checkpoint"
#: 2: encoders standardize their input (ViTConfig.input_mean/input_std); a version-1 run cannot continue as one.
CHECKPOINT_VERSION = 2
#: Config sections that must not change when resuming (they decide parameter shapes or what the loss means).
FROZEN_ON_RESUME = ("model", "objective", "data.image_size")


@dataclass(frozen=True)
class ModelConfig:
    size: str = "vit_small"
    patch_size: int = 16
    #: Blocks, replacing the named size's depth (null = the size's own, 12 for tiny/small/base). Fewer blocks make
    #: more optimizer steps per CPU minute, which is what a short MAE run needs most.
    depth: int | None = None
    drop_path_rate: float = 0.0
    #: Start from weights instead of random: an ``encoder.pt`` or an official MAE ImageNet checkpoint (``.pth``).
    init_from: str | None = None


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    #: Working spacing (mm/px): images are resampled to it and cropped to image_size, as the detector will see
    #: them (crop_scale is then unused); null = random resized crops at any scale.
    spacing_mm: float | None = None
    workers: int = 2
    #: Decoded-pixel cache folder; null = RUN/decode_cache. Share one folder between runs on the same data.
    cache_dir: str | None = None
    modalities: list[str] = field(default_factory=lambda: sorted(DEFAULT_ALLOWED_MODALITIES))
    allow_non_dicom: bool = True

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.spacing_mm is not None and not 0.0 < self.spacing_mm <= 10.0:
            raise ValueError(f"spacing_mm must be in (0, 10] mm per pixel or null, got {self.spacing_mm}")


@dataclass(frozen=True)
class OptimConfig:
    #: Images per process per micro-batch; the effective batch is batch_size * accumulate * processes.
    batch_size: int = 64
    accumulate: int = 1
    #: MAE's rule: lr = base_lr * effective batch / 256.
    base_lr: float = 1.5e-4
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    #: Max gradient norm; null = no clipping.
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("batch_size and accumulate must be >= 1")
        if self.base_lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("need base_lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, warmup_steps >= 0")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or null, got {self.clip_grad}")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    checkpoint_every: int = 200
    images_every: int = 200
    #: Images in each reconstruction grid.
    images: int = 6

    def __post_init__(self) -> None:
        if min(self.every, self.checkpoint_every, self.images_every, self.images) < 1:
            raise ValueError("every, checkpoint_every, images_every and images must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    #: ``name`` (mae, simmim, ...) plus that objective's options, e.g. mask_ratio.
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "mae"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.objective.get("name"), str):
            raise ValueError("objective.name is required (mae, simmim, ...)")

    def encoder_config(self) -> ViTConfig:
        depth = {} if self.model.depth is None else {"depth": self.model.depth}
        return ViTConfig.named(
            self.model.size,
            patch_size=self.model.patch_size,
            image_size=self.data.image_size,
            drop_path_rate=self.model.drop_path_rate,
            **depth,
        )


def load_pretrain_config(
    config: str | None, overrides: list[str] | None, *, base: dict[str, Any] | None = None
) -> PretrainConfig:
    """Defaults <- ``base`` (a resumed run's config.yaml) <- ``config`` file or shipped name <- ``--set`` overrides."""
    built, origin = configs.load_layered(PretrainConfig, "pretrain", config, overrides, base)
    try:
        built.encoder_config()
    except InvalidArgumentError as exc:
        raise InvalidConfigError(f"model/data: {exc.message} ({origin})") from None
    # The objective's name and option keys are checked now, before a run folder or a data index is made.
    options = {key: value for key, value in built.objective.items() if key != "name"}
    objective_options(built.objective["name"], options, origin)
    return built


def run_pretrain(
    data_dirs: list[Path],
    out: Path,
    config: PretrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain an encoder; returns the summary (also written to RUN/summary.json on rank 0)."""
    context = distributed.start(config.train.device)
    try:
        return _Pretraining(data_dirs, out, config, context, resume=resume, progress=progress).run()
    finally:
        distributed.stop(context)


class _Pretraining:
    def __init__(
        self,
        data_dirs: list[Path],
        out: Path,
        config: PretrainConfig,
        context: Distributed,
        *,
        resume: bool,
        progress: bool,
    ) -> None:
        self.data_dirs = data_dirs
        self.out = out
        self.config = config
        self.context = context
        self.device = context.device
        self.resume = resume
        self.progress = progress and context.is_main
        self.precision = resolve_precision(config.train.precision, self.device)
        self.checkpoint_path = out / "checkpoint.pt"

    # -- set-up ---------------------------------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        prepare_run_folder(
            self.out,
            resume=self.resume,
            outputs=("checkpoint.pt", "encoder.pt"),
            kind="pretraining",
            is_main=self.context.is_main,
        )
        distributed.barrier(self.context)

    def _dataset(self, views: int) -> UnlabeledRadiographs:
        """The unlabeled images, ``views`` augmented views of each (two-view objectives: decoded once, augmented
        twice with the contrastive preset; masked image modeling: one MIM crop)."""
        data = self.config.data
        cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else self.out / "decode_cache"
        options = ReadOptions(allowed_modalities=frozenset(data.modalities), allow_non_dicom=data.allow_non_dicom)
        preset = contrastive_view_transform if views > 1 else mim_pretrain_transform
        transform = preset(data.image_size, scale=data.crop_scale, spacing_mm=data.spacing_mm)
        # Rank 0 decodes every file once into the cache; the other ranks then index from cache hits.
        with distributed.main_first(self.context):
            dataset = UnlabeledRadiographs(
                self.data_dirs,
                cache=DecodeCache(cache_dir),
                options=options,
                transform=transform,
                views=views,
                progress=self.progress,
            )
        global_batch = self.config.optim.batch_size * self.context.world_size
        if len(dataset) < global_batch:
            raise InvalidConfigError(
                f"optim.batch_size: {len(dataset)} readable image(s) cannot fill one batch of {global_batch} "
                f"({self.config.optim.batch_size} per process x {self.context.world_size} process(es)); "
                "lower optim.batch_size or add images"
            )
        return dataset

    def _encoder(self) -> VisionTransformer:
        wanted = self.config.encoder_config()
        source = self.config.model.init_from
        if source is None:
            return VisionTransformer(wanted)
        payload = read_weights_file(source, "a caries-mim encoder.pt or an official MAE checkpoint (.pth)")
        if is_encoder_payload(payload):
            encoder = encoder_from_payload(
                payload, source, image_size=wanted.image_size, drop_path_rate=wanted.drop_path_rate
            ).encoder
            shape_keys = ("embed_dim", "depth", "num_heads", "patch_size", "in_channels")
            if any(getattr(encoder.config, key) != getattr(wanted, key) for key in shape_keys):
                raise InvalidConfigError(
                    f"model.init_from: {source} holds a different architecture than model.size={self.config.model.size}"
                    f" / patch_size={self.config.model.patch_size}"
                )
            log.info("encoder initialized from %s", source)
            return encoder
        encoder = VisionTransformer(wanted)
        report = import_mae_weights(encoder, payload)
        log.info("encoder initialized from MAE checkpoint %s: %s", source, report.summary())
        return encoder

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()  # a time limit counts the start-up too
        config, context = self.config, self.context
        self._prepare_folder()
        threads = configure_threads(self.device, context.local_world_size, config.train.threads)
        torch.manual_seed(config.train.seed * 1000 + context.rank)  # masks and drop-path differ per rank
        objective = build_objective(
            config.objective["name"], self._encoder(), {k: v for k, v in config.objective.items() if k != "name"}
        ).to(self.device)
        dataset = self._dataset(objective.views)
        model: torch.nn.Module = objective
        if context.enabled:
            model = DistributedDataParallel(
                objective, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if config.train.compile:
            model = torch.compile(model)

        optim = config.optim
        effective_batch = optim.batch_size * optim.accumulate * context.world_size
        lr = optim.base_lr * effective_batch / 256
        optimizer = torch.optim.AdamW(
            adamw_param_groups(objective, optim.weight_decay),
            lr=lr,
            betas=optim.betas,
            # fused kernels exist on CPU and CUDA in the torch versions we support; one kernel per step.
            fused=self.device.type in ("cpu", "cuda"),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(config.train.steps, optim.warmup_steps, optim.min_lr_ratio)
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        sampler = ResumableEpochSampler(
            len(dataset),
            batch_size=optim.batch_size,
            rank=context.rank,
            world_size=context.world_size,
            seed=config.train.seed,
        )
        position = LoopPosition()
        if self.resume:
            position = self._load_checkpoint(objective, optimizer, scheduler, scaler)
        elif context.is_main:
            configs.write_yaml(self.out / "config.yaml", configs.to_dict(config))

        if context.is_main:
            log.info(
                "pretraining %s/%s on %d image(s), %s x %d process(es), %s, effective batch %d, lr %.3g, %d thread(s)",
                config.objective["name"],
                config.model.size,
                len(dataset),
                self.device,
                context.world_size,
                self.precision.name,
                effective_batch,
                lr,
                threads,
            )
        trainer = _Loop(self, dataset, sampler, objective, model, optimizer, scheduler, scaler, position, started)
        return trainer.run()

    def _load_checkpoint(self, objective, optimizer, scheduler, scaler) -> LoopPosition:
        payload = read_resumable_checkpoint(
            self.checkpoint_path,
            checkpoint_format=CHECKPOINT_FORMAT,
            version=CHECKPOINT_VERSION,
            kind="pretraining",
            config=self.config,
            frozen=FROZEN_ON_RESUME,
            version_advice="; start a new run with --set model.init_from=<its encoder.pt>",
            frozen_reason="these decide the model's shapes or loss (start a new run, or init_from the old encoder.pt)",
        )
        objective.load_state_dict(payload["objective"])
        position = LoopPosition(**payload["position"])
        restore_optimization(
            payload,
            optimizer,
            scheduler,
            scaler,
            context=self.context,
            position=position,
            batch_size=self.config.optim.batch_size,
        )
        if self.context.is_main:
            truncate_metrics(self.out / "metrics.jsonl", position.step)
            truncate_metrics(self.out / DIAGNOSTICS_NAME, position.step)
            log.info("resumed from %s at step %d", self.checkpoint_path, position.step)
        return position


class _Loop:
    """What pretraining feeds the training engine (:mod:`pipelines.engine`): the objective's loss, checkpoints every
    ``log.checkpoint_every`` steps, reconstruction pictures, and everything it writes (rank 0): metrics,
    TensorBoard, pictures, checkpoints, the encoder."""

    def __init__(
        self,
        run: _Pretraining,
        dataset: UnlabeledRadiographs,
        sampler: ResumableEpochSampler,
        objective: PretrainingObjective,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler,
        position: LoopPosition,
        started: float,
    ) -> None:
        self.run_state = run
        self.config = run.config
        self.context = run.context
        self.device = run.device
        self.out = run.out
        self.dataset = dataset
        self.sampler = sampler
        self.objective = objective
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.position = position
        self.loader = resumable_loader(
            dataset,
            sampler,
            batch_size=self.config.optim.batch_size,
            workers=self.config.data.workers,
            device=self.device,
        )
        self.writer = (
            SummaryWriter(str(self.out / "tensorboard"), purge_step=position.step or None)
            if self.context.is_main
            else None
        )
        self.preview = self._preview_batch() if self.context.is_main else None
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.engine = TrainingEngine.for_run(
            run,
            model=model,
            module=objective,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            batches=endless_batches(self.loader, sampler, position),
            position=position,
            lr_key="optim.base_lr",
            description="pretrain",
            started=started,
        )

    def _preview_batch(self) -> torch.Tensor:
        """Fixed views for the pictures, the same at every step. Masked image modeling: crops at the middle of the
        training crop scale, so the pictures show the task the model learns (a tiny config trained on zoomed-in
        crops would look worse on whole images than it is). Two-view objectives: the training views of the first
        images, (count, 2, 1, H, W)."""
        count = min(self.config.log.images, len(self.dataset))
        if self.objective.views > 1:
            return torch.stack([self.dataset[(index, index)] for index in range(count)])
        middle = sum(self.config.data.crop_scale) / 2
        view = mim_pretrain_transform(self.config.data.image_size, scale=(middle, middle))
        images = []
        for index in range(count):
            view.set_random_seed(index)
            pixels = self.dataset.load(self.dataset.images[index].path).pixels
            images.append(torch.from_numpy(view(image=pixels)["image"]).unsqueeze(0))
        return torch.stack(images)

    def run(self) -> dict[str, Any]:
        try:
            outcome = self.engine.run(self)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._finish(outcome.seconds, outcome.steps_run)

    # -- the engine's task ----------------------------------------------------------------------------------

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        output = self.model(images.to(self.device, non_blocking=True))
        return {"total": output.loss, **output.parts}

    def after_update(self) -> None:
        # Called before the engine counts the step just taken.
        self.objective.after_update((self.position.step + 1) / max(1, self.engine.total))

    def is_milestone(self, step: int, last: bool) -> bool:
        return step % self.config.log.checkpoint_every == 0 or last

    def after_step(self, step: int, *, last: bool, milestone: bool, stopping: bool, bar) -> bool:
        if step % self.config.log.images_every == 0 or last:
            if isinstance(self.objective, MaskedImageObjective):
                self._write_reconstructions(step)
            else:
                self._write_views(step)
            self._write_diagnostics(step)
        if milestone or stopping:
            self._save_checkpoint()
        return False

    def log(self, means: dict[str, float], images_per_second: float, lr: float, grad_norm: float | None) -> None:
        loss = means["total"]
        step = self.position.step
        if self.first_loss is None:
            self.first_loss = loss
        self.last_loss = loss
        row = {"step": step, "epoch": self.position.epoch, "loss": loss, "lr": lr, "img_s": images_per_second}
        for name, value in means.items():
            if name != "total":  # the parts of a composite loss
                row[f"loss_{name}"] = value
                self.writer.add_scalar(f"train/loss_{name}", value, step)
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/images_per_second", images_per_second, step)
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
        append_metrics(self.out / "metrics.jsonl", row)

    def _write_reconstructions(self, step: int) -> None:
        if not self.context.is_main:
            return
        self.objective.eval()
        # A fixed mask draw for every picture (comparable across steps) without touching the training RNG stream.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            with self.run_state.precision.autocast(self.device):
                pictures = self.objective.reconstruct(self.preview.to(self.device))
        self.objective.train()
        cells = [
            Image.fromarray(to_uint8(batch[index, 0].float().cpu().numpy()))
            for index in range(pictures.original.shape[0])
            for batch in (pictures.original, pictures.masked, pictures.reconstruction)
        ]
        side = max(self.config.data.image_size, 256)  # small inputs are enlarged to be readable
        grid = tile(cells, columns=3, cell_width=side).convert("L")
        folder = self.out / "reconstructions"
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / f"step_{step:06d}.png") as temporary:
            grid.save(temporary, format="PNG")
        self.writer.add_image("reconstructions", np.asarray(grid), step, dataformats="HW")

    def _write_diagnostics(self, step: int) -> None:
        """The objective's own measurements (the hybrid's per-block gradient cosines) on the preview batch, into
        ``diagnostics.jsonl`` and TensorBoard. Rank 0 alone, with a fixed seed (comparable across steps), and
        without a trace in the run: the training RNG stream is forked and buffers (BatchNorm statistics) restored."""
        if not self.context.is_main:
            return
        saved = {name: buffer.clone() for name, buffer in self.objective.named_buffers()}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            with self.run_state.precision.autocast(self.device):
                values = self.objective.diagnostics(self.preview.to(self.device))
        with torch.no_grad():
            for name, buffer in self.objective.named_buffers():
                buffer.copy_(saved[name])
        if not values:
            return
        append_metrics(self.out / DIAGNOSTICS_NAME, {"step": step, **values})
        for name, value in values.items():
            self.writer.add_scalar(f"diagnostics/{name}", value, step)

    def _write_views(self, step: int) -> None:
        """A two-view objective's picture, once per run folder: each preview image's two training views side by side
        (the views are fixed, so later steps would draw the same picture)."""
        folder = self.out / "views"
        if not self.context.is_main or folder.exists():
            return
        cells = [
            Image.fromarray(to_uint8(self.preview[index, view, 0].numpy()))
            for index in range(self.preview.shape[0])
            for view in range(self.preview.shape[1])
        ]
        side = max(self.config.data.image_size, 256)
        grid = tile(cells, columns=self.preview.shape[1], cell_width=side).convert("L")
        folder.mkdir()
        with atomic_path(folder / f"step_{step:06d}.png") as temporary:
            grid.save(temporary, format="PNG")
        self.writer.add_image("views", np.asarray(grid), step, dataformats="HW")

    def _save_checkpoint(self) -> None:
        rng_states = distributed.gather_objects(capture_rng(self.device), self.context)
        if not self.context.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "position": dataclasses.asdict(self.position),
            "global_batch": self.config.optim.batch_size * self.context.world_size,
            "config": configs.to_dict(self.config),
        }
        save_checkpoint(self.run_state.checkpoint_path, payload)
        save_encoder(self.objective.encoder, self.out / "encoder.pt", self._encoder_metadata())

    def _encoder_metadata(self) -> dict[str, Any]:
        return {
            "objective": dict(self.config.objective),
            "steps": self.position.step,
            "last_loss": self.last_loss,
            "images": len(self.dataset),
            "image_size": self.config.data.image_size,
            "caries_mim_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _finish(self, seconds: float, steps_run: int) -> dict[str, Any]:
        config = self.config
        images = steps_run * config.optim.batch_size * config.optim.accumulate * self.context.world_size
        summary = {
            "out": str(self.out),
            "objective": config.objective["name"],
            "model": config.model.size,
            "steps": self.position.step,
            "steps_this_run": steps_run,
            "epochs": round(
                self.position.epoch + self.position.batch_in_epoch / max(1, self.sampler.batches_per_epoch), 3
            ),
            "images_in_dataset": len(self.dataset),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "encoder": str(self.out / "encoder.pt"),
        }
        return finish_summary(
            self.out,
            summary,
            seconds=seconds,
            images=images,
            device=self.device,
            processes=self.context.world_size,
            precision=self.run_state.precision.name,
            is_main=self.context.is_main,
        )
