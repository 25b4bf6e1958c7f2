"""Pipeline configs: shipped YAML files, --set overrides, and errors that name the key and where it came from."""

from __future__ import annotations

import pytest

from caries_mim.errors import InvalidConfigError
from pipelines.config import SHIPPED_CONFIGS, parse_overrides, read_yaml_mapping
from pipelines.pretrain import PretrainConfig, load_pretrain_config


@pytest.mark.parametrize("name", ["tiny", "vit_small", "vit_base"])
def test_every_shipped_pretrain_config_is_valid(name):
    config = load_pretrain_config(name, None)
    assert config.encoder_config().image_size == (config.data.image_size, config.data.image_size)
    assert config.objective["name"] in {"mae", "simmim"}


def test_every_shipped_file_is_reachable_by_name():
    names = sorted(path.stem for path in SHIPPED_CONFIGS.glob("pretrain_*.yaml"))
    assert names == [
        "pretrain_demo", "pretrain_reference", "pretrain_reference_cpu", "pretrain_tiny", "pretrain_vit_base",
        "pretrain_vit_small",
    ]  # fmt: skip
    for name in ("demo", "reference", "reference_cpu", "tiny", "vit_base", "vit_small"):
        load_pretrain_config(name, None)


def test_defaults_are_the_mae_vit_small_recipe():
    config = load_pretrain_config(None, None)
    assert config == PretrainConfig()
    assert (config.model.size, config.objective["name"], config.optim.base_lr) == ("vit_small", "mae", 1.5e-4)
    assert config.optim.betas == (0.9, 0.95)


def test_overrides_win_over_the_file_and_parse_as_yaml():
    config = load_pretrain_config(
        "tiny", ["optim.batch_size=4", "data.crop_scale=[0.5, 1]", "optim.clip_grad=null", "objective.name=simmim"]
    )
    assert config.optim.batch_size == 4
    assert config.data.crop_scale == (0.5, 1.0)
    assert config.optim.clip_grad is None
    assert config.objective["name"] == "simmim"
    # Another objective named: the file's MAE options (decoder width, ...) do not carry over to SimMIM.
    assert config.objective == {"name": "simmim"}


def test_objective_options_on_the_defaults_keep_the_default_objective_and_are_checked_by_name():
    # No config file: the default objective (mae) takes the option, it is not dropped for having no name.
    assert load_pretrain_config(None, ["objective.mask_ratio=0.6"]).objective == {"name": "mae", "mask_ratio": 0.6}
    with pytest.raises(InvalidConfigError, match=r"unknown key\(s\) no_such_key"):
        load_pretrain_config("tiny", ["objective.no_such_key=1"])
    with pytest.raises(InvalidConfigError, match="unknown objective 'byol'"):
        load_pretrain_config(None, ["objective.name=byol"])
    with pytest.raises(InvalidConfigError, match="proxy_tokens must be >= 1"):
        load_pretrain_config(None, ["objective.name=semantic_mim", "objective.proxy_tokens=0"])


def test_model_depth_replaces_the_named_size_depth_only():
    assert load_pretrain_config("tiny", None).encoder_config().depth == 6
    config = load_pretrain_config("tiny", ["model.depth=null"]).encoder_config()
    assert (config.embed_dim, config.depth, config.num_heads) == (192, 12, 3)
    with pytest.raises(InvalidConfigError, match=r"depth .*must be >= 1"):
        load_pretrain_config("tiny", ["model.depth=0"])


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides_are_rejected(bad):
    with pytest.raises(InvalidConfigError, match="--set expects key=value"):
        parse_overrides([bad])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=1"], r"optim\.lr: unknown key \(.*--set\); optim accepts: .*base_lr"),
        (["train.steps=0"], "steps must be >= 1"),
        (["train.steps=1.5"], "train.steps: expected a whole number"),
        (["train.compile=yes please"], "train.compile: expected true or false"),
        (["data.crop_scale=[0.5]"], "data.crop_scale: expected 2 values"),
        (["data.crop_scale=[0.9, 0.5]"], "crop_scale must satisfy"),
        (["model=3"], "model: expected a mapping"),
        (["widgets.size=3"], "widgets: unknown key"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(InvalidConfigError, match=message):
        load_pretrain_config(None, overrides)


def test_a_missing_config_lists_the_shipped_ones():
    with pytest.raises(
        InvalidConfigError,
        match=r"neither a file nor a shipped config \(demo, reference, reference_cpu, tiny, vit_base, vit_small\)",
    ):
        load_pretrain_config("huge", None)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  size: [vit_tiny\n")
    with pytest.raises(InvalidConfigError, match=r"broken\.yaml is not valid YAML at line"):
        read_yaml_mapping(path)


def test_a_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InvalidConfigError, match="must hold a mapping"):
        load_pretrain_config(str(path), None)


def test_a_user_file_is_validated_with_its_name_in_the_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  batch_size: many\n")
    with pytest.raises(
        InvalidConfigError, match=r"optim\.batch_size: expected a whole number, got 'many' \(.*mine\.yaml\)"
    ):
        load_pretrain_config(str(path), None)


def test_naming_another_objective_drops_the_old_one_s_options():
    switched = load_pretrain_config("tiny", ["objective.name=moco", "objective.out_dim=32"])
    assert switched.objective == {"name": "moco", "out_dim": 32}
    # The same name keeps the file's options and changes only what is set.
    tuned = load_pretrain_config("tiny", ["objective.mask_ratio=0.6"])
    assert tuned.objective["name"] == "mae"
    assert tuned.objective["mask_ratio"] == 0.6
    assert tuned.objective["decoder_dim"] == 128
