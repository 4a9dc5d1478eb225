"""Configs: validation errors that name the key, overrides, YAML round trip, the presets CLI."""

import pytest
import yaml

from modalmoe.cli import main
from modalmoe.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    apply_overrides,
    load_config,
    to_yaml,
    validate,
)
from modalmoe.model.presets import get_preset, preset_names


def test_unknown_keys_name_the_key_and_the_closest_valid_ones():
    with pytest.raises(ConfigError) as err:
        validate({"task": "mfeat", "model": {"moe": {"num_expert": 4}, "encoders": {"x": {"nme": "v"}}}})
    text = str(err.value)
    assert "unknown key 'model.moe.num_expert'; did you mean num_experts" in text  # the closest first
    assert "unknown key 'model.encoders.x.nme'; did you mean name?" in text
    with pytest.raises(ConfigError, match="did you mean 'token_choice'"):
        validate({"task": "mfeat", "model": {"moe": {"router": "token-choice"}}})
    with pytest.raises(ConfigError, match="k=9 is larger than num_experts=8"):
        validate({"task": "mfeat", "model": {"moe": {"k": 9}}})
    with pytest.raises(ConfigError, match="multiple of heads"):
        validate({"task": "mfeat", "model": {"dim": 30, "heads": 4}})


def test_overrides_parse_yaml_values_and_reject_malformed_ones():
    data = apply_overrides({"model": {"moe": {}}}, ["model.moe.num_experts=16", "model.moe.router_options={groups: 2}"])
    assert data["model"]["moe"] == {"num_experts": 16, "router_options": {"groups": 2}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["model.moe.num_experts"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"model": {"dim": 3}}, ["model.dim.x=1"])


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = get_preset("watch-imu/per-modality")
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert load_config(path, overrides=["model.depth=3"]).model.depth == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(path)
    path.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert ModelConfig().moe.aux_losses == ["load_balance", "z_loss"]


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == name


def test_presets_cli_lists_shows_and_explains(capsys):
    assert main(["presets", "tiny"]) == 0
    assert "tiny/token-choice" in capsys.readouterr().out
    assert main(["presets", "tiny/soft", "--set", "model.moe.num_experts=6"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["moe"]["num_experts"] == 6 and shown["model"]["moe"]["router"] == "soft"
    assert main(["presets", "av-digits/token-choise"]) == 2
    assert "Did you mean 'token-choice'" in capsys.readouterr().out
    assert main(["presets", "tiny/dense-early", "--cost"]) == 0
    assert "tiny/dense-early" in capsys.readouterr().out
