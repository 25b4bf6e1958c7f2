"""MAE pretraining throughput: our training step against MONAI's, against a matmul peak, and the data pipeline.

In one run, on the same ViT-S/16 MAE (embed 384, depth 12, 6 heads, MLP 1536; decoder 256 wide, 4 deep, 8 heads,
MLP 1024; 224 x 224 x 1 input, mask ratio 0.75, qkv bias) with the same batch, input and loss:

  * ours   - ``caries_mim.mim.MaskedAutoencoder`` around ``caries_mim.models.VisionTransformer``;
  * monai  - ``monai.networks.nets.MaskedAutoEncoderViT`` with the same masked MSE on its (prediction, mask),
             against the same patchified (optionally per-patch normalized) targets;
  * peak   - the best square matmul rate of this device in this process (fp32 on CPU, bf16 on a GPU);
  * loader - ``UnlabeledRadiographs`` + ``mim_pretrain_transform`` through a DataLoader, decode cache warm.

With ``--objectives`` (e.g. ``simmim,moco,hybrid,semantic_mim``) the run also times a step of each of those
objectives on the same encoder, batch and optimizer, beside ours (MAE) in alternating rounds, with its FLOPs; a
two-view objective (MoCo, the hybrid) trains on two views of each of the batch's images. The loader line then also
times the two-view dataset (``views=2``, ``contrastive_view_transform``): each image is decoded once and augmented
twice, so it should deliver about as many images per second as the one-view loader, not half.

A training step is zero_grad, forward, loss, backward and one AdamW step (the same optimizer for both: fused when
the device supports it). fp32 on CPU, bf16 autocast on CUDA. Ours and MONAI are timed in alternating rounds (the
order flips every round) and each reports the median round, so machine noise hits both alike. FLOPs per step come
from torch's FlopCounterMode over one forward + backward, with attention counted the same way for both (see
``ATTENTION_NOTE``). Prints human-readable lines, then a final JSON line.

    python benchmarks/pretrain_throughput.py [--device auto] [--batch 16] [--steps 2] [--rounds 4] [--threads N]
        [--data DIR] [--workers 2] [--compile] [--objectives simmim,moco,hybrid,semantic_mim]

Defaults on a GPU: batch 256, 20 steps per round, 5 warmup steps, 8 loader workers. On a CPU the run also reports
the smallest share of the cores this process got during the timed rounds: under ~90% another process was competing
and the figures are low and noisy. Needs ``einops`` (MONAI's attention block imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import monai
import torch
from machine import cpu_name  # benchmarks/machine.py (this folder is on sys.path when run as a script)
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from caries_mim.data import DecodeCache, UnlabeledRadiographs, contrastive_view_transform, mim_pretrain_transform
from caries_mim.mim import PretrainingObjective, build_objective
from caries_mim.mim.mae import MAEOptions, MaskedAutoencoder, normalize_patches
from caries_mim.mim.patches import patchify
from caries_mim.models.config import ViTConfig
from caries_mim.models.vit import VisionTransformer
from caries_mim.synth import generate_dataset

IMAGE_SIZE = 224
PATCH = 16
ENCODER = {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536}
DECODER = {"dim": 256, "depth": 4, "heads": 8, "mlp_dim": 1024}
MASK_RATIO = 0.75
#: MAE's AdamW settings (the learning rate does not change the cost of a step).
ADAMW = {"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05}
TARGETS = {"cpu": {"ratio": 1.1, "peak_fraction": 0.8}, "cuda": {"ratio": 1.5, "peak_fraction": None}}

ATTENTION_NOTE = (
    "attention FLOPs are counted as the math of softmax(QK^T)V (2 matmuls forward, 4 backward) for both models; "
    "torch's own table skips the CPU fused kernel and counts a recompute in fused backward kernels"
)

Step = Callable[[], None]


# ---------------------------------------------------------------------------------------------------------- models


def encoder_config() -> ViTConfig:
    return ViTConfig(
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        patch_size=PATCH,
        in_channels=1,
        embed_dim=ENCODER["embed_dim"],
        depth=ENCODER["depth"],
        num_heads=ENCODER["num_heads"],
        mlp_ratio=ENCODER["mlp_dim"] / ENCODER["embed_dim"],
        qkv_bias=True,
    )


#: Options of the other objectives for ViT-S (MoCo v3's reference MLP widths; the hybrid's weight is the paper's
#: fine-tuning choice; SemanticMIM with 8 proxies).
OBJECTIVE_OPTIONS = {
    "simmim": {},
    "moco": {},
    "hybrid": {"contrastive_weight": 0.2},
    "semantic_mim": {"proxy_tokens": 8, "mask_ratio": MASK_RATIO},
}


def build_ours(norm_pix_loss: bool) -> MaskedAutoencoder:
    config = encoder_config()
    options = MAEOptions(
        mask_ratio=MASK_RATIO,
        decoder_dim=DECODER["dim"],
        decoder_depth=DECODER["depth"],
        decoder_heads=DECODER["heads"],
        norm_pix_loss=norm_pix_loss,
    )
    return MaskedAutoencoder(VisionTransformer(config), options)


def build_monai() -> torch.nn.Module:
    from monai.networks.nets import MaskedAutoEncoderViT

    try:
        return MaskedAutoEncoderViT(
            in_channels=1,
            img_size=IMAGE_SIZE,
            patch_size=PATCH,
            hidden_size=ENCODER["embed_dim"],
            mlp_dim=ENCODER["mlp_dim"],
            num_layers=ENCODER["depth"],
            num_heads=ENCODER["num_heads"],
            masking_ratio=MASK_RATIO,
            decoder_hidden_size=DECODER["dim"],
            decoder_mlp_dim=DECODER["mlp_dim"],
            decoder_num_layers=DECODER["depth"],
            decoder_num_heads=DECODER["heads"],
            proj_type="conv",
            pos_embed_type="sincos",
            decoder_pos_embed_type="sincos",
            spatial_dims=2,
            qkv_bias=True,
        )
    except monai.utils.OptionalImportError as exc:
        raise SystemExit(f"MONAI's MaskedAutoEncoderViT needs einops (pip install einops): {exc}") from None


def cast_decoder_input_to_fp32(model: torch.nn.Module) -> None:
    """Let MONAI's MaskedAutoEncoderViT run under autocast: its forward writes the (autocast, bf16) decoder_embed
    output into an fp32 copy of the mask token with index_put, which refuses mixed dtypes. Casting that output back
    to fp32 (one small copy) is the least change; the decoder blocks' linears autocast to bf16 again."""
    model.decoder_embed.register_forward_hook(lambda module, inputs, output: output.float())


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss of :class:`MaskedAutoencoder`: per-patch MSE averaged over removed patches (mask 1 = removed)."""
    per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def ours_loss(model: MaskedAutoencoder) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: model(images).loss


def objective_loss(objective: PretrainingObjective) -> Callable[[torch.Tensor], torch.Tensor]:
    """The objective's loss on the benchmark's (B, 1, H, W) batch; a two-view objective gets (B, 2, 1, H, W): the
    batch and its mirror image (the step's cost does not depend on how the views differ)."""
    if objective.views == 1:
        return lambda images: objective(images).loss
    return lambda images: objective(torch.stack([images, images.flip(-1)], dim=1)).loss


def monai_loss(model: torch.nn.Module, norm_pix_loss: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(images: torch.Tensor) -> torch.Tensor:
        prediction, mask = model(images)  # (B, N, p*p*C) in patch order, (B, N) int 1 = removed
        target = patchify(images, PATCH)
        if norm_pix_loss:
            target = normalize_patches(target)[0]
        return masked_mse(prediction, target, mask)

    return loss


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(parameters: list[torch.nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, **ADAMW, **({"fused": True} if fused else {"foreach": True}))


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch.optim.AdamW(fused=True) builds and steps on ``device`` (CPU since torch 2.4, CUDA since 2.0)."""
    try:
        weight = torch.zeros(4, device=device, requires_grad=True)
        optimizer = torch.optim.AdamW([weight], fused=True)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def make_step(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Step:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of(images)
        loss.backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests so far, all cores summed (Linux /proc/stat), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def images_per_second(step: Step, steps: int, batch: int, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """softmax(Q K^T) V: two batched matmuls, (B*H, Tq, d) x (B*H, d, Tk) and (B*H, Tq, Tk) x (B*H, Tk, dv)."""
    *lead, t_q, d_q = query_shape
    t_k, d_v = key_shape[-2], value_shape[-1]
    heads = 1
    for size in lead:
        heads *= size
    return 2 * heads * t_q * t_k * (d_q + d_v)


def attention_flop_mapping() -> dict[object, Callable[..., int]]:
    """FlopCounterMode formulas so a fused attention kernel counts what the explicit einsum/softmax path counts:
    the forward's two matmuls, and twice that backward (no recompute); covers the CPU kernel torch omits."""

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return _attention_flops(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _attention_flops(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    names = {
        "_scaled_dot_product_flash_attention_for_cpu": forward,
        "_scaled_dot_product_flash_attention": forward,
        "_scaled_dot_product_efficient_attention": forward,
        "_scaled_dot_product_cudnn_attention": forward,
        "_scaled_dot_product_flash_attention_for_cpu_backward": backward,
        "_scaled_dot_product_flash_attention_backward": backward,
        "_scaled_dot_product_efficient_attention_backward": backward,
        "_scaled_dot_product_cudnn_attention_backward": backward,
    }
    return {getattr(aten, name): formula for name, formula in names.items() if hasattr(aten, name)}


def flops_per_step(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    images: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> int:
    """FLOPs of one forward + loss + backward (the optimizer's elementwise work is not counted)."""
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())
    with counter:
        with autocast():
            loss = loss_of(images)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], seconds: float) -> float:
    """Best FLOP/s of square ``n x n @ n x n`` matmuls over ``sizes``, each timed for about ``seconds``."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        synchronize(device)
        calls, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            calls += 1
            if device.type == "cuda" and calls % 10:
                continue
            synchronize(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, 2 * n**3 * calls / elapsed)
        del a, b
    return best


def loader_images_per_second(
    dataset: UnlabeledRadiographs, batch: int, workers: int, pin_memory: bool, seconds: float
) -> float:
    """Images/s of the DataLoader alone, after one warm epoch (workers started, cache entries read once)."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )
    for _ in loader:
        pass
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for images in loader:
            count += images.shape[0]
    rate = count / (time.perf_counter() - started)
    del loader
    return rate


# ---------------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--batch", type=int, help="images per step (default 16 on CPU, 256 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default 2 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps per model first (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per model (median taken)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on CUDA")
    parser.add_argument("--no-norm-pix", dest="norm_pix", action="store_false", help="raw-pixel targets for both")
    parser.add_argument("--data", type=Path, help="folder of radiographs for the loader (default: synthesize)")
    parser.add_argument("--images", type=int, default=32, help="synthetic images to generate without --data")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default 2 on CPU, 8 on CUDA)")
    parser.add_argument("--loader-seconds", type=float, default=3.0, help="how long to time the loader")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of ours")
    parser.add_argument(
        "--objectives",
        default="",
        help=f"also time these objectives' steps beside MAE, comma-separated ({', '.join(OBJECTIVE_OPTIONS)})",
    )
    args = parser.parse_args()
    args.objectives = [name for name in args.objectives.split(",") if name.strip()]
    unknown = [name for name in args.objectives if name not in OBJECTIVE_OPTIONS]
    if unknown:
        parser.error(f"--objectives: unknown {', '.join(unknown)}; choose from {', '.join(OBJECTIVE_OPTIONS)}")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--rounds and --steps must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # MONAI's sin-cos position embedding
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (256 if on_gpu else 16)
    steps = args.steps or (20 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    workers = args.workers if args.workers is not None else (8 if on_gpu else 2)
    precision = args.precision if args.precision != "auto" else ("bf16" if on_gpu else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # ---- data: the loader's dataset, and the one batch both models train on
        started = time.perf_counter()
        if args.data is None:
            generate_dataset(root / "synth", n_unlabeled=args.images, n_labeled=0, seed=0, progress=False)
            data_root = root / "synth" / "unlabeled"
        else:
            data_root = args.data
        dataset = UnlabeledRadiographs(
            data_root, cache=DecodeCache(root / "cache"), transform=mim_pretrain_transform(IMAGE_SIZE), progress=False
        )
        data_seconds = time.perf_counter() - started
        torch.manual_seed(0)
        images = torch.stack([dataset[i % len(dataset)] for i in range(batch)]).to(device)

        # ---- models, optimizers, steps
        torch.manual_seed(0)
        ours = build_ours(args.norm_pix).to(device).train()
        theirs = build_monai().to(device).train()
        if precision != "fp32":
            cast_decoder_input_to_fp32(theirs)
        fused = fused_adamw_supported(device)
        losses = {"ours": ours_loss(ours), "monai": monai_loss(theirs, args.norm_pix)}
        models = {"ours": ours, "monai": theirs}
        step_of = {
            name: make_step(losses[name], make_optimizer(trainable(model), fused), images, autocast)
            for name, model in models.items()
        }
        params = {name: sum(p.numel() for p in trainable(model)) for name, model in models.items()}
        flops = {name: flops_per_step(losses[name], models[name], images, autocast) for name in models}
        others: dict[str, torch.nn.Module] = {}
        for name in args.objectives:
            torch.manual_seed(0)
            others[name] = build_objective(name, VisionTransformer(encoder_config()), OBJECTIVE_OPTIONS[name])
            others[name] = others[name].to(device).train()
            losses[name] = objective_loss(others[name])
            step_of[name] = make_step(losses[name], make_optimizer(trainable(others[name]), fused), images, autocast)
            flops[name] = flops_per_step(losses[name], others[name], images, autocast)

        # ---- the matmul peak (before and after the models, best taken), warmup, alternating rounds
        # CPUs without bf16 units emulate it at a few GFLOP/s: keep those sizes small.
        sizes = (4096, 8192) if on_gpu else (1024, 2048, 4096) if precision == "fp32" else (256, 512)
        peak_seconds = 0.5 if on_gpu else 1.0
        peak = matmul_peak(device, dtype, sizes, peak_seconds)
        timed = [*models, *others]
        for name in timed:
            for _ in range(warmup):
                step_of[name]()
        rounds: dict[str, list[float]] = {name: [] for name in timed}
        cpu_share: list[float] = []  # process CPU time / (wall time x threads): under 1 when others took cores
        steal_share: list[float] = []  # hypervisor steal / (wall time x cores): above 0 when other VMs took them
        for index in range(args.rounds):
            for name in timed if index % 2 == 0 else timed[::-1]:
                cpu_started, wall_started, steal_started = time.process_time(), time.perf_counter(), steal_seconds()
                rounds[name].append(images_per_second(step_of[name], steps, batch, device))
                wall = time.perf_counter() - wall_started
                cpu_share.append((time.process_time() - cpu_started) / (wall * torch.get_num_threads()))
                steal_ended = steal_seconds()
                if steal_started is not None and steal_ended is not None:
                    steal_share.append((steal_ended - steal_started) / (wall * (os.cpu_count() or 1)))
        peak = max(peak, matmul_peak(device, dtype, sizes, peak_seconds))

        compiled_img_s = None
        if args.compile:
            compiled = torch.compile(ours)
            step = make_step(lambda x: compiled(x).loss, make_optimizer(trainable(ours), fused), images, autocast)
            for _ in range(max(2, warmup)):
                step()
            compiled_img_s = statistics.median(
                images_per_second(step, steps, batch, device) for _ in range(args.rounds)
            )

        # ---- the data pipeline alone (on a small machine its workers would compete with the step)
        loader_img_s = loader_images_per_second(dataset, batch, workers, on_gpu, args.loader_seconds)
        two_view_img_s = None
        if any(others[name].views > 1 for name in others):
            # Images (each with both its views) per second: decoded once, augmented twice.
            two_views = UnlabeledRadiographs(
                data_root,
                cache=DecodeCache(root / "cache"),
                transform=contrastive_view_transform(IMAGE_SIZE),
                views=2,
                progress=False,
            )
            two_view_img_s = loader_images_per_second(two_views, batch, workers, on_gpu, args.loader_seconds)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    img_s = {name: statistics.median(values) for name, values in rounds.items()}
    achieved = {name: flops[name] * img_s[name] / batch for name in models}
    fraction = {name: achieved[name] / peak for name in models}
    ratio = img_s["ours"] / img_s["monai"]
    round_ratios = [a / b for a, b in zip(rounds["ours"], rounds["monai"], strict=True)]
    threads = torch.get_num_threads()
    target = TARGETS["cuda" if on_gpu else "cpu"]

    def gflops(value: float) -> str:
        return f"{value / 1e12:.1f} TFLOP/s" if on_gpu else f"{value / 1e9:.1f} GFLOP/s"

    name_of_device = torch.cuda.get_device_name(device) if on_gpu else cpu_name()
    print(
        f"device {device} ({name_of_device}), {threads} threads, {precision}, torch {torch.__version__}, "
        f"monai {monai.__version__}; load average {load_before and round(load_before[0], 2)} before, "
        f"{load_after and round(load_after[0], 2)} after"
    )
    print(
        f"ViT-S/{PATCH} {IMAGE_SIZE}x{IMAGE_SIZE}x1, mask {MASK_RATIO}, decoder {DECODER['dim']} wide x "
        f"{DECODER['depth']} ({DECODER['heads']} heads), norm_pix_loss {'on' if args.norm_pix else 'off'} for both, "
        f"batch {batch}; AdamW {'fused' if fused else 'foreach'} for both; trainable params ours "
        f"{params['ours'] / 1e6:.2f}M, monai {params['monai'] / 1e6:.2f}M"
    )
    print(f"data: {len(dataset)} images ready in {data_seconds:.1f} s ({data_root})")
    print(f"matmul peak: {gflops(peak)} ({precision}, best square matmul of {', '.join(map(str, sizes))})")
    print(f"{'':8}{'img/s':>9}  {'rounds (img/s)':<24}{'GFLOP/step':>12}{'achieved':>16}{'of peak':>9}")
    for name in models:
        rounds_text = " ".join(f"{value:.2f}" for value in rounds[name])
        print(
            f"{name:<8}{img_s[name]:>9.2f}  {rounds_text:<24}{flops[name] / 1e9:>12.1f}{gflops(achieved[name]):>16}"
            f"{fraction[name]:>9.1%}"
        )
    print(f"FLOPs: {ATTENTION_NOTE}")
    verdict = "met" if ratio >= target["ratio"] else "NOT met"
    print(
        f"ours / monai: {ratio:.2f}x (target >= {target['ratio']}x: {verdict}); per round "
        + " ".join(f"{value:.2f}" for value in round_ratios)
    )
    if target["peak_fraction"] is not None:
        verdict = "met" if fraction["ours"] >= target["peak_fraction"] else "NOT met"
        print(f"ours of matmul peak: {fraction['ours']:.1%} (target >= {target['peak_fraction']:.0%}: {verdict})")
    if not on_gpu:
        share, steal = min(cpu_share), max(steal_share, default=0.0)
        noisy = share < 0.9 or steal > 0.05
        print(
            f"CPU share of this process during the timed rounds: min {share:.0%} of {threads} threads; hypervisor "
            f"steal max {steal:.0%}"
            + (" - others took CPU time: figures are low and noisy, rerun when idle" if noisy else "")
        )
    for name in others:
        print(
            f"{name:<13}{img_s[name]:>7.2f} img/s ({img_s[name] / img_s['ours']:.2f}x MAE), "
            f"{flops[name] / 1e9:.1f} GFLOP/step ({flops[name] / flops['ours']:.2f}x MAE), "
            f"{gflops(flops[name] * img_s[name] / batch)} achieved"
        )
    if two_view_img_s is not None:
        print(
            f"two-view loader: {two_view_img_s:.1f} images/s (each with both views), "
            f"{two_view_img_s / loader_img_s:.2f}x the one-view loader: one decode serves both views"
        )
    if compiled_img_s is not None:
        print(f"ours, torch.compile: {compiled_img_s:.2f} img/s ({compiled_img_s / img_s['monai']:.2f}x monai)")
    print(
        f"loader: {loader_img_s:.1f} img/s with {workers} worker(s), decode cache warm, measured alone = "
        f"{loader_img_s / img_s['ours']:.1f}x what our step consumes ({img_s['ours']:.2f} img/s)"
    )

    summary = {
        "benchmark": "pretrain_throughput",
        "device": str(device),
        "device_name": name_of_device,
        "threads": threads,
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "rounds": args.rounds,
        "optimizer": "AdamW fused" if fused else "AdamW foreach",
        "norm_pix_loss": args.norm_pix,
        "ours_img_s": round(img_s["ours"], 3),
        "monai_img_s": round(img_s["monai"], 3),
        "ours_best_img_s": round(max(rounds["ours"]), 3),
        "monai_best_img_s": round(max(rounds["monai"]), 3),
        "ratio": round(ratio, 3),
        "round_ratios": [round(value, 3) for value in round_ratios],
        "flops_per_step_ours": flops["ours"],
        "flops_per_step_monai": flops["monai"],
        "ours_tflops": round(achieved["ours"] / 1e12, 5),
        "monai_tflops": round(achieved["monai"] / 1e12, 5),
        "matmul_peak_tflops": round(peak / 1e12, 5),
        "ours_peak_fraction": round(fraction["ours"], 4),
        "monai_peak_fraction": round(fraction["monai"], 4),
        "ours_compiled_img_s": None if compiled_img_s is None else round(compiled_img_s, 3),
        "objectives": {
            name: {
                "img_s": round(img_s[name], 3),
                "relative_to_mae": round(img_s[name] / img_s["ours"], 3),
                "flops_per_step": flops[name],
                "flops_relative_to_mae": round(flops[name] / flops["ours"], 3),
            }
            for name in others
        },
        "two_view_loader_img_s": None if two_view_img_s is None else round(two_view_img_s, 2),
        "loader_img_s": round(loader_img_s, 2),
        "loader_workers": workers,
        "loader_headroom": round(loader_img_s / img_s["ours"], 2),
        "min_cpu_share": None if on_gpu else round(min(cpu_share), 3),
        "max_steal_share": None if on_gpu else round(max(steal_share, default=0.0), 3),
        "load_avg_before": load_before and round(load_before[0], 2),
        "load_avg_after": load_after and round(load_after[0], 2),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
