"""Optimizer parameter groups: weight-decay split and layer-wise learning-rate decay for fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caries_mim.errors import InvalidConfigError
from caries_mim.models import VisionTransformer, ViTConfig
from pipelines import training
from pipelines.training import (
    adamw_param_groups,
    cpu_has_bf16_matmul,
    freeze_encoder_layers,
    layer_decay_param_groups,
    resolve_precision,
    vit_layer_id,
    weight_average,
)

TINY = ViTConfig(image_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2)


class Detectorish(nn.Module):
    """An encoder under a prefix, as the detector nests it, plus a head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({"encoder": VisionTransformer(TINY)})
        self.head = nn.Linear(32, 4)


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("patch_embed.proj.weight", 0),
        ("cls_token", 0),
        ("backbone.encoder.pos_embed", 0),
        ("backbone.encoder.blocks.0.attn.qkv.weight", 1),
        ("blocks.2.norm1.bias", 3),
        ("backbone.encoder.norm.weight", 4),
        ("head.weight", 4),
        ("retinanet.network.classification_head.conv.0.weight", 4),
    ],
)
def test_vit_layer_id_numbers_layers_like_mae(name, layer):
    assert vit_layer_id(name, depth=3) == layer


def test_layer_decay_scales_each_layer_and_keeps_every_parameter_once():
    model = Detectorish()
    groups = layer_decay_param_groups(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5, depth=3)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(list(model.parameters()))
    assert len({id(p) for p in grouped}) == len(grouped)
    by_parameter = {id(p): group for group in groups for p in group["params"]}
    blocks = model.backbone["encoder"].blocks
    assert by_parameter[id(model.head.weight)]["lr"] == pytest.approx(1e-3)
    assert by_parameter[id(blocks[2].attn.qkv.weight)]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_parameter[id(blocks[0].attn.qkv.weight)]["lr"] == pytest.approx(1e-3 * 0.5**3)
    assert by_parameter[id(model.backbone["encoder"].cls_token)]["lr"] == pytest.approx(1e-3 * 0.5**4)
    # weight decay split as adamw_param_groups does it
    assert by_parameter[id(model.head.weight)]["weight_decay"] == 0.05
    assert by_parameter[id(model.head.bias)]["weight_decay"] == 0.0
    assert by_parameter[id(model.backbone["encoder"].cls_token)]["weight_decay"] == 0.0


def test_layer_decay_one_equals_plain_groups():
    model = Detectorish()
    decayed = layer_decay_param_groups(model, base_lr=1e-3, weight_decay=0.05, layer_decay=1.0, depth=3)
    plain = adamw_param_groups(model, 0.05)
    assert all(group["lr"] == 1e-3 for group in decayed)
    for weight_decay in (0.05, 0.0):
        mine = {id(p) for g in decayed if g["weight_decay"] == weight_decay for p in g["params"]}
        theirs = {id(p) for g in plain if g["weight_decay"] == weight_decay for p in g["params"]}
        assert mine == theirs


def test_groups_drive_a_scheduled_optimizer():
    model = Detectorish()
    groups = layer_decay_param_groups(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5, depth=3)
    optimizer = torch.optim.AdamW(groups)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1)  # multiplies each group's own initial lr
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["lr_scale"] * 1e-4 for g in groups])


@pytest.mark.parametrize("layer_decay", [0.0, -0.5, 1.5])
def test_bad_layer_decay_is_a_config_error(layer_decay):
    with pytest.raises(InvalidConfigError, match="layer_decay must be in"):
        layer_decay_param_groups(Detectorish(), base_lr=1e-3, weight_decay=0.05, layer_decay=layer_decay, depth=3)


def test_frozen_layers_are_the_first_ones_and_leave_the_optimizer():
    model = Detectorish()
    encoder = model.backbone["encoder"]
    frozen = freeze_encoder_layers(model, 2, depth=3)  # the patch embedding and block 0
    stem_and_block0 = [p for n, p in encoder.named_parameters() if vit_layer_id(n, 3) < 2]
    assert frozen == len(stem_and_block0) > 0
    assert not any(p.requires_grad for p in stem_and_block0)
    assert all(p.requires_grad for p in encoder.blocks[1].parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    groups = layer_decay_param_groups(model, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5, depth=3)
    grouped = {id(p) for group in groups for p in group["params"]}
    assert not grouped & {id(p) for p in stem_and_block0}
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())


def test_freezing_every_layer_keeps_the_final_norm_and_the_head_trainable():
    model = Detectorish()
    encoder = model.backbone["encoder"]
    freeze_encoder_layers(model, 4, depth=3)
    assert not any(p.requires_grad for block in encoder.blocks for p in block.parameters())
    assert all(p.requires_grad for p in encoder.norm.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert freeze_encoder_layers(Detectorish(), 0, depth=3) == 0


@pytest.mark.parametrize("layers", [-1, 5])
def test_a_frozen_layer_count_outside_the_encoder_is_a_config_error(layers):
    with pytest.raises(InvalidConfigError, match="frozen_layers must be in"):
        freeze_encoder_layers(Detectorish(), layers, depth=3)


def test_bf16_matrix_hardware_is_read_from_the_cpu_flags(tmp_path):
    cpus = {
        "sapphire_rapids": "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n",
        "zen4": "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n",
        "plain": "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16x avx512_bf16x\nbugs\t\t: amx_bf16\n",
    }
    for name, text in cpus.items():
        (tmp_path / name).write_text(text)
    assert cpu_has_bf16_matmul(str(tmp_path / "sapphire_rapids"))
    assert cpu_has_bf16_matmul(str(tmp_path / "zen4"))
    assert not cpu_has_bf16_matmul(str(tmp_path / "plain"))  # flags are whole words, and only on the flags line
    assert not cpu_has_bf16_matmul(str(tmp_path / "missing"))


@pytest.mark.parametrize(("hardware", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_is_bf16_only_with_bf16_hardware(monkeypatch, hardware, expected):
    monkeypatch.setattr(training, "cpu_has_bf16_matmul", lambda: hardware)
    precision = resolve_precision("auto", torch.device("cpu"))
    assert precision.name == expected
    assert precision.autocast_dtype == (torch.bfloat16 if hardware else None)
    assert not precision.needs_scaler
    assert resolve_precision("fp32", torch.device("cpu")).autocast_dtype is None


def test_fp16_and_unknown_precisions_are_config_errors_on_cpu():
    with pytest.raises(InvalidConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(InvalidConfigError, match="'half' is not one of auto, fp32, bf16, fp16"):
        resolve_precision("half", torch.device("cpu"))


def test_the_weight_average_warms_up_then_decays_at_the_configured_rate():
    """Weights 0, 1, 2, 3 after successive steps: the first update copies, update n (n >= 1 done before it)
    moves 1 - min(decay, (1 + n) / (10 + n)) of the way; integer buffers are copied."""
    model = nn.BatchNorm1d(1)
    average = weight_average(model, decay=0.5)
    expected = None
    for step, value in enumerate([0.0, 1.0, 2.0, 3.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        model.num_batches_tracked.fill_(step + 7)
        average.update_parameters(model)
        if expected is None:
            expected = value
        else:
            decay = min(0.5, (1 + step) / (10 + step))
            expected = decay * expected + (1 - decay) * value
        assert average.module.weight.item() == pytest.approx(expected)
        assert average.module.num_batches_tracked.item() == step + 7
    # Updates 1 and 2 are still warming up (2/11 and 3/12 under 0.5); update 3 uses 4/13 as well.
    assert expected == pytest.approx(((0 * 2 / 11 + 1 * 9 / 11) * 3 / 12 + 2 * 9 / 12) * 4 / 13 + 3 * 9 / 13)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_weight_average_decay_outside_zero_one_is_a_config_error(decay):
    with pytest.raises(InvalidConfigError, match=rf"optim.ema_decay must be in \(0, 1\) or null, got {decay}"):
        weight_average(nn.Linear(1, 1), decay)
