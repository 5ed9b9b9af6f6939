import pytest

from lowlight.config import ConfigError, dump_config, load_config, preset_names


def test_presets_load_and_overrides_apply():
    assert {"sample_raw", "sample_srgb", "sid_sony", "lol"} <= set(preset_names())
    cfg = load_config("sample_raw", ["preprocess.crop_size=256", "preprocess.columns=[raw_in, z_gt]"])
    assert cfg.preprocess.crop_size == 256
    assert cfg.preprocess.columns == ["raw_in", "z_gt"]
    assert cfg.dataset.layout == "sid"


def test_yaml_file_round_trips(tmp_path):
    cfg = load_config("sample_srgb", ["preprocess.seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, key", [
    ("preprocess.crop_szie=64", "preprocess.crop_szie"),
    ("preprocess.crop_size=100", "preprocess.crop_size"),
    ("preprocess.crop_size=abc", "preprocess.crop_size"),
    ("preprocess.columns=[raw_in, nope]", "preprocess.columns"),
    ("datset.root=x", "datset"),
])
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("sample_raw", [override])


def test_unknown_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no_such_preset")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["preprocess.crop_size"])
