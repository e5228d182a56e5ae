"""Numbers out of range are refused by the flags and by the Python API with the same ranges; generated
files never overwrite each other or an earlier run's."""

import json
import math

import pytest
import torch

from unipers.inference import InputError
from unipers.inference.options import OPTION_RANGES, check_option
from unipers.inference.output import save_images
from unipers.io import write_new
from unipers.inference.session import GenerationOutput, GenerationSettings

ASK = ("ask", "hi")
RECOGNIZE = ("recognize", "--concept", "bo.safetensors", "--image", "a.jpg")
GENERATE = ("generate", "<bo> on a sofa")

# (command, flag, value): each refused by argparse before any model loads.
BAD_FLAGS = [
    (ASK, "--max-new-tokens", "0"), (ASK, "--max-new-tokens", "4097"), (ASK, "--max-new-tokens", "1.5"),
    (ASK, "--max-new-tokens", "many"),
    (ASK, "--temperature", "-1"), (ASK, "--temperature", "nan"), (ASK, "--temperature", "inf"),
    (ASK, "--temperature", "1e-40"), (ASK, "--temperature", "11"),
    (ASK, "--top-p", "0"), (ASK, "--top-p", "-0.5"), (ASK, "--top-p", "1.01"), (ASK, "--top-p", "nan"),
    (ASK, "--seed", str(2**64)), (ASK, "--seed", "x"),
    (RECOGNIZE, "--threshold", "nan"), (RECOGNIZE, "--threshold", "-0.1"), (RECOGNIZE, "--threshold", "1.5"),
    (GENERATE, "--num-images", "0"), (GENERATE, "--num-images", "-1"), (GENERATE, "--num-images", "100000"),
    (GENERATE, "--steps", "0"), (GENERATE, "--steps", "1001"), (GENERATE, "--steps", "2.5"),
    (GENERATE, "--guidance", "nan"), (GENERATE, "--guidance", "-1"), (GENERATE, "--guidance", "inf"),
    (GENERATE, "--guidance", "101"),
    (GENERATE, "--size", "0"), (GENERATE, "--size", "24"), (GENERATE, "--size", "100"), (GENERATE, "--size", "4096"),
    (GENERATE, "--size", "-64"),
    (GENERATE, "--seed", "1.5"),
]


@pytest.mark.parametrize("command,flag,value", BAD_FLAGS,
                         ids=[f"{c[0]}{f}={v}" for c, f, v in BAD_FLAGS])
def test_bad_flag_values_are_refused_naming_the_flag(unipers_cli, one_line_error, tmp_path, command, flag, value):
    out = tmp_path / "out"
    extra = ("--out", out) if command[0] == "generate" else ()
    code, stdout, err = unipers_cli(*command, *extra, flag, value)
    assert code == 2, err
    line = one_line_error(err, flag)
    assert "must be" in line and value in line
    assert not out.exists()


@pytest.mark.parametrize("command,flag,value", [
    (ASK, "--max-new-tokens", "4096"), (ASK, "--temperature", "0"), (ASK, "--temperature", "0.7"),
    (ASK, "--top-p", "1"), (ASK, "--seed", "-3"), (RECOGNIZE, "--threshold", "0"),
    (GENERATE, "--guidance", "0"), (GENERATE, "--size", "32"), (GENERATE, "--size", "2048"),
    (GENERATE, "--num-images", "1024"), (GENERATE, "--steps", "1000"),
])
def test_edge_values_pass_the_flags(command, flag, value):
    import argparse
    import importlib

    from unipers.cli import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command[0]][0]).add_arguments(parser)
    args = parser.parse_args([*command[1:], flag, value])
    got = getattr(args, flag[2:].replace("-", "_"))
    assert got == (int(value) if OPTION_RANGES[flag[2:].replace("-", "_")].integer else float(value))


@pytest.mark.parametrize("method,kwargs,name", [
    ("generate", dict(num_images=0), "num_images"),
    ("generate", dict(num_images=2.0), "num_images"),
    ("generate", dict(steps=0), "steps"),
    ("generate", dict(steps=True), "steps"),
    ("generate", dict(guidance=math.nan), "guidance"),
    ("generate", dict(guidance=-1.0), "guidance"),
    ("generate", dict(size=36), "size"),
    ("generate", dict(size=4096), "size"),
    ("generate", dict(seed=2**64), "seed"),
    ("ask", dict(max_new_tokens=0), "max_new_tokens"),
    ("ask", dict(max_new_tokens=10**6), "max_new_tokens"),
    ("ask", dict(temperature=math.nan), "temperature"),
    ("ask", dict(temperature=-0.5), "temperature"),
    ("ask", dict(top_p=0.0), "top_p"),
    ("ask", dict(top_p=1.5), "top_p"),
    ("ask", dict(seed="1"), "seed"),
])
def test_the_api_refuses_the_same_values_naming_the_argument(session, method, kwargs, name):
    first = ["<bo> on a sofa"] if method == "generate" else "What is <bo>?"
    with pytest.raises(InputError, match=rf"^{name} must be"):
        getattr(session, method)(first, **kwargs)


def test_size_must_fit_the_decoders_downsampling(session, monkeypatch):
    decoder = type(session.model.decoder)
    monkeypatch.setattr(decoder, "vae_scale_factor", property(lambda self: 16))
    with pytest.raises(InputError, match="size must be a multiple of 16"):
        session.generate(["<bo> on a sofa"], size=40, steps=1)


def test_check_option_passes_good_values_through():
    assert check_option("steps", 25) == 25 and check_option("size", 512) == 512
    assert check_option("temperature", 0) == 0 and check_option("top_p", 1) == 1
    with pytest.raises(InputError, match="^steps must be an integer from 1 to 1000; got 0$"):
        check_option("steps", 0)


def _sidecar(tmp_path, **changes):
    side = dict(prompt="<bo> on a sofa", negative="", seed=0, steps=3, guidance=5.0, size=None, scheduler=None,
                concept_files=[])
    side.update(changes)
    path = tmp_path / "side.json"
    path.write_text(json.dumps({k: v for k, v in side.items() if v != "DROP"}))
    return path


@pytest.mark.parametrize("changes,named", [
    (dict(steps=0), "steps"), (dict(guidance=None), "guidance"), (dict(size=20), "size"),
    (dict(seed="0"), "seed"), (dict(steps="DROP"), "'steps'"),
])
def test_a_bad_sidecar_is_refused_naming_it_and_the_setting(unipers_cli, one_line_error, tmp_path, changes, named):
    side = _sidecar(tmp_path, **changes)
    code, _, err = unipers_cli("generate", "--from-sidecar", side, "--out", tmp_path / "out")
    assert code == 2
    one_line_error(err, side, named)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_before_generating(unipers_cli, one_line_error, tmp_path):
    (tmp_path / "taken").write_text("mine\n")
    code, _, err = unipers_cli("generate", "<bo> on a sofa", "--out", tmp_path / "taken")
    assert code == 2
    one_line_error(err, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine\n"


# ---- file names -----------------------------------------------------------------------------------------
def _output(*prompts, seed=0):
    images = torch.rand(len(prompts), 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return GenerationOutput(images, [GenerationSettings(p, seed=seed) for p in prompts])


def test_names_get_a_suffix_never_replacing_a_file(tmp_path, tree_digest):
    saved = save_images(_output("<bo> reading", "<bo>  reading!"), tmp_path, {})
    assert [p.name for p in saved] == ["bo_reading_seed0.png", "bo_reading_seed0_2.png"]
    assert json.loads((tmp_path / "bo_reading_seed0_2.json").read_text())["prompt"] == "<bo>  reading!"
    assert saved.grid == tmp_path / "grid.png"
    (tmp_path / "bo_reading_seed0_3.json").write_text("a sidecar whose image was deleted\n")
    before = tree_digest(tmp_path)
    again = save_images(_output("<bo> reading", seed=0), tmp_path, {})
    assert [p.name for p in again] == ["bo_reading_seed0_4.png"] and again.grid.name == "grid_2.png"
    after = tree_digest(tmp_path)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["bo_reading_seed0_4.json", "bo_reading_seed0_4.png", "grid_2.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_write_new_refuses_an_existing_name_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    assert write_new(target, lambda tmp: tmp.write_text("first\n"))
    assert not write_new(target, lambda tmp: tmp.write_text("second\n"))
    assert target.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(RuntimeError):
        write_new(tmp_path / "b.json", lambda tmp: (_ for _ in ()).throw(RuntimeError("killed")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_cli_colliding_prompts_and_reruns_keep_every_file(unipers_cli, concept_files, tmp_path, tree_digest):
    out = tmp_path / "out"
    run = ("generate", "--concept", concept_files["bo"], "<bo> reading", "<bo>  reading!", "--steps", "2",
           "--out", out)
    code, stdout, err = unipers_cli(*run)
    assert code == 0, err
    assert stdout.split() == [str(out / "bo_reading_seed0.png"), str(out / "bo_reading_seed0_2.png")]
    assert sorted(p.name for p in out.iterdir()) == ["bo_reading_seed0.json", "bo_reading_seed0.png",
                                                     "bo_reading_seed0_2.json", "bo_reading_seed0_2.png", "grid.png"]
    prompts = [json.loads((out / f"bo_reading_seed0{s}.json").read_text())["prompt"] for s in ("", "_2")]
    assert prompts == ["<bo> reading", "<bo>  reading!"]
    before = tree_digest(out)
    code, stdout, err = unipers_cli(*run)
    assert code == 0, err
    after = tree_digest(out)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["bo_reading_seed0_3.json", "bo_reading_seed0_3.png",
                                                "bo_reading_seed0_4.json", "bo_reading_seed0_4.png", "grid_2.png"]
    assert after["bo_reading_seed0_3.png"] == before["bo_reading_seed0.png"]  # same prompt and seed, same image
    assert f"grid: {out / 'grid_2.png'}" in err
