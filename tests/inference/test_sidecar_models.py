"""Sidecars name the models an image was drawn with: `--from-sidecar` rebuilds them without the config,
and refuses models whose fingerprints differ from the ones it records."""

import json

import pytest

PROMPT = "a red circle on a table"


@pytest.fixture(scope="module")
def drawn(tmp_path_factory, other_backbone_dir, tiny_dirs):
    """An image drawn with non-default models (another base, a linear connector) given by a config file,
    from a folder of its own: (sidecar path, png path, config path)."""
    from unipers.cli import main

    root = tmp_path_factory.mktemp("drawn")
    config = root / "models.yaml"
    config.write_text(f"backbone:\n  path: {other_backbone_dir}\nconnector:\n  kind: linear\n")
    assert main(["generate", "--config", str(config), PROMPT, "--seed", "7", "--steps", "2",
                 "--out", str(root / "a")]) == 0
    png = root / "a" / "a_red_circle_on_a_table_seed7.png"
    return png.with_suffix(".json"), png, config


def test_the_sidecar_records_absolute_model_paths_and_every_fingerprint(drawn, other_backbone_dir):
    side = json.loads(drawn[0].read_text())
    models = side["models"]
    assert models["backbone"]["path"] == str(other_backbone_dir) and models["decoder"]["path"] == "tiny"
    assert models["connector"]["kind"] == "linear" and models["connector"]["path"] is None
    assert set(side["fingerprints"]) == {"backbone", "decoder", "connector"}


def test_from_sidecar_without_a_config_draws_the_same_image_from_another_folder(drawn, unipers_cli, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = unipers_cli("generate", "--from-sidecar", drawn[0], "--out", "b")
    assert code == 0, err
    again = tmp_path / "b" / drawn[1].name
    assert out.split() == [str(again.relative_to(tmp_path))]
    assert again.read_bytes() == drawn[1].read_bytes()
    assert json.loads(again.with_suffix(".json").read_text())["models"] == json.loads(drawn[0].read_text())["models"]


def test_from_sidecar_with_other_models_is_refused_in_one_line(drawn, unipers_cli, one_line_error, tmp_path):
    # The embedded default is not what the image was drawn with.
    code, _, err = unipers_cli("generate", "--from-sidecar", drawn[0], "--config", "base", "--out", tmp_path / "x")
    assert code == 2
    assert "leave out --config" in one_line_error(err, drawn[0], "backbone")
    assert not (tmp_path / "x").exists()
    # The config it was drawn with is fine.
    code, _, err = unipers_cli("generate", "--from-sidecar", drawn[0], "--config", drawn[2], "--out", tmp_path / "y")
    assert code == 0, err


def test_a_recorded_model_that_changed_on_disk_is_refused(drawn, unipers_cli, one_line_error, tmp_path):
    side = json.loads(drawn[0].read_text())
    side["fingerprints"]["connector"] = "0123456789abcdef"
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(side))
    code, _, err = unipers_cli("generate", "--from-sidecar", path, "--out", tmp_path / "x")
    assert code == 2
    assert "0123456789abcdef" in one_line_error(err, path, "connector", "the path it records")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("models,named", [
    ("checkpoints/anole-7b", "models"),
    ({"trainer": {"max_steps": 3}}, "models"),
    ({"backbone": {"pathh": "tiny"}}, "backbone.pathh"),
])
def test_bad_recorded_models_are_refused_naming_the_sidecar(drawn, unipers_cli, one_line_error, tmp_path, models,
                                                            named):
    side = json.loads(drawn[0].read_text())
    side["models"] = models
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(side))
    code, _, err = unipers_cli("generate", "--from-sidecar", path, "--out", tmp_path / "x")
    assert code == 2
    one_line_error(err, path, named)
    assert "unipers-sidecar-" not in err  # the temporary file is not what the user should look for
