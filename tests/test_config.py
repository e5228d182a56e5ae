"""The typed config: every shipped YAML loads, typos fail with the key and a suggestion."""

from pathlib import Path

import pytest

from unipers.config import Config, ConfigError, load_config, to_yaml

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_yaml_loads(path, tmp_path):
    cfg = load_config([path])
    assert isinstance(cfg, Config)
    # Round trip: the resolved YAML saved beside a run loads back to the same config.
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(cfg))
    assert load_config([resolved]) == cfg


def test_defaults_compose_and_overrides_win():
    base = Path(__file__).parents[1] / "configs" / "base.yaml"
    cfg = load_config([base, base.parent / "bank" / "yochameleon.yaml"], ["seed=7", "bank.num_gen=3", "data.concepts=[a,b]"])
    assert cfg.backbone.path == "tiny" and cfg.connector.kind == "mlp"
    assert (cfg.bank.num_shared, cfg.bank.num_und, cfg.bank.num_gen) == (0, 16, 3)
    assert cfg.seed == 7 and cfg.data.concepts == ["a", "b"]


def test_unknown_key_names_key_and_closest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bank:\n  num_shraed: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config([bad])
    msg = str(err.value)
    assert "bank.num_shraed" in msg and "bank.num_shared" in msg and str(bad) in msg


def test_unknown_override_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_step'.*did you mean 'trainer\.max_steps'"):
        load_config([], ["trainer.max_step=5"])


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match="seed"):
        load_config([], ["seed=abc"])
    with pytest.raises(ConfigError, match="connector.kind"):
        load_config([], ["connector.kind=resampler"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config([], ["seed"])


def test_section_given_a_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bank: 3\n")
    with pytest.raises(ConfigError, match="'bank'.*section"):
        load_config([bad])


def test_defaults_cycle_and_missing_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("defaults: [b.yaml]\n")
    b.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([a])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])


def test_command_line_items_split_into_configs_and_overrides_in_order(tmp_path, monkeypatch):
    from unipers.config import split_config_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "site=a.yaml").write_text("seed: 3\n")  # a file whose name holds '=' is still a file
    items = ["personalize", "backbone/anole-7b", "seed=1", "site=a.yaml", "bank.num_gen=2"]
    assert split_config_args(items) == (["personalize", "backbone/anole-7b", "site=a.yaml"], ["seed=1", "bank.num_gen=2"])
    cfg = load_config(*split_config_args(items))
    assert cfg.seed == 1 and cfg.bank.num_gen == 2 and cfg.backbone.dtype == "bfloat16"


@pytest.mark.parametrize("override,key", [
    ("trainer.lr=1e30", "trainer.lr"), ("trainer.lr=nan", "trainer.lr"), ("trainer.lr=0", "trainer.lr"),
    ("data.batch_size=0", "data.batch_size"), ("trainer.devices=0", "trainer.devices"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.max_steps=-1", "trainer.max_steps"), ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val"),
    ("eval.guidance=nan", "eval.guidance"), ("eval.steps=0", "eval.steps"),
    ("bank.num_und=1000000000", "bank.num_und"), ("bank.init_noise=-1", "bank.init_noise"),
    ("data.task_weights.qa=-1", "data.task_weights.qa"), ("connector.num_heads=0", "connector.num_heads"),
    ("align.caption_dropout=2", "align.caption_dropout"), ("personalize.decision_weight=0", "personalize.decision_weight"),
])
def test_a_number_out_of_its_range_fails_at_load_naming_the_key(override, key, unipers_cli, one_line_error, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])
    code, _, err = unipers_cli("train", "personalize", override, f"run_dir={tmp_path / 'run'}")
    assert code == 2
    one_line_error(err, key)
    assert not (tmp_path / "run").exists()
