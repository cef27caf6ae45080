"""Settings: one image_size, files of earlier versions, metadata the CLI is generated from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MODEL, run_cli, run_main

from animeddim import checkpoint as ckpt
from animeddim.cli import build_parser
from animeddim.config import ConfigError, RunConfig, settings
from animeddim.config_files import load_config_file
from animeddim.unet import UNet

# What config.json held before image_size was one setting and model.channels was removed.
OLD_LAYOUT = {
    "data": {"path": "x", "image_size": 16, "val_fraction": 0.25},
    "model": {**TINY_MODEL, "channels": 3},
    "train": {"epochs": 2},
}


def test_earlier_layout_loads_as_today():
    cfg = RunConfig.from_dict(OLD_LAYOUT).validate()
    assert cfg.model.image_size == 16 and cfg.model.channels == 3
    assert "image_size" not in cfg.to_dict()["data"] and "channels" not in cfg.to_dict()["model"]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_earlier_checkpoint_loads(tmp_path):
    net = UNet(RunConfig.from_dict(OLD_LAYOUT).model)
    tensors = {
        **ckpt.with_prefix(net.state_dict(), "ema"),
        "norm.mean": torch.zeros(3),
        "norm.std": torch.ones(3),
    }
    f = ckpt.save(tmp_path / "old.safetensors", tensors, {"config": OLD_LAYOUT, "step": 0})
    loaded = ckpt.load_model(f)
    assert loaded.config.model.image_size == 16


@pytest.mark.parametrize(
    "d, message",
    [
        (
            {"data": {"image_size": 16}, "model": {"image_size": 32}},
            "differs from model.image_size",
        ),
        ({"model": {"channels": 1}}, "model.channels"),
        ({"model": {"channels": 4}}, "RGB"),
    ],
)
def test_conflicting_or_removed_settings_are_clear_errors(d, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(d)


def test_config_file_in_earlier_layout_sets_the_image_size(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data": {"image_size": 32}}))
    assert load_config_file(f) == {"data": {}, "model": {"image_size": 32}}


def test_every_setting_has_help_and_a_cli_option():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    for section, f in settings():
        assert f.metadata["help"], f.name
        if f.metadata["cli"]:
            assert f"{section}.{f.name}" in dests


def test_resume_refuses_fixed_settings_by_their_flag(avatars16, tmp_path):
    (tmp_path / "config.json").write_text(RunConfig().to_json())
    p = run_cli("train", "--resume", str(tmp_path), "--lr", "0.1", "--seed", "3", check=False)
    assert p.returncode == 2
    said = "--lr, --seed cannot change when resuming: --lr is 0.001 in the run, 0.1 given"
    assert said in p.stderr


def test_learning_rate_error_names_a_flag_that_exists(avatars16, tmp_path):
    p = run_cli(
        "train", "--data", str(avatars16), "--out", str(tmp_path / "r"), "--lr", "0", check=False
    )
    assert p.returncode == 2 and "--lr" in p.stderr
    assert "--learning-rate" in run_cli("train", "--help").stdout  # the alias exists too


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_time_limit_error_names_a_flag_that_exists(tmp_path, capsys, value):
    """`--time-limit -1` was refused as 'invalid time_limit_minutes', a name no flag has."""
    rc, _, err = run_main(capsys, "train", "--data", tmp_path, "--out", tmp_path / "r",
                          "--time-limit", value)  # fmt: skip
    assert rc == 2 and "time_limit_minutes (--time-limit)" in err and "a number >= 0" in err, err
    assert not (tmp_path / "r").exists()


def test_the_parser_and_every_commands_help_import_no_torch_nor_numpy():
    code = (
        "import sys, contextlib, io\n"
        "from animeddim.cli import build_parser\n"
        "parser = build_parser()\n"
        "for argv in ([], *[[c] for c in parser._subparsers._group_actions[0].choices]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            parser.parse_args([*argv, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.split() == ["False", "False"], "building the parser imported torch/numpy"


def test_every_option_with_a_default_shows_it_in_its_help():
    """`--help` names each default (steps --n, interpolate --frames, report --device, ...)."""
    import argparse

    skip = (argparse._HelpAction, argparse._VersionAction, argparse._StoreFalseAction)
    missing = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{path} {name}")
            elif a.option_strings and not isinstance(a, skip):
                if a.default not in (None, False, []) and "default" not in (a.help or ""):
                    missing.append(f"{path} {a.option_strings[-1]}")

    walk(build_parser(), "animeddim")
    assert not missing, missing


def test_a_config_built_in_python_is_type_checked_as_a_file_is(tmp_path):
    """RunConfig(...).validate() checked no types: epochs "2" failed in a comparison
    (TypeError), image_size 16.0 and flip "no" (taken as true) passed, a dict for a section
    raised AttributeError. Wrong types are now ConfigErrors naming the setting, and what
    Python code naturally passes (numpy numbers, a tuple, a Path) is converted, so
    config.json can still be written."""
    import numpy as np

    from animeddim.config import DataConfig, TrainConfig, UNetConfig

    for cfg, match in [
        (RunConfig(train=TrainConfig(epochs="2")), "invalid epochs = '2': expected an integer"),
        (RunConfig(model=UNetConfig(image_size=16.0)), "model.image_size = 16.0: expected an"),
        (RunConfig(data=DataConfig(flip="no")), "data.flip = 'no': expected true or false"),
        (RunConfig(train=TrainConfig(compile="yes")), "compile = 'yes': expected true or false"),
        (RunConfig(train=TrainConfig(learning_rate="1e-3")), "learning_rate = '1e-3': expected"),
        (RunConfig(model={"image_size": 16}), "model = {'image_size': 16}: expected a UNetConfig"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg.validate()
    cfg = RunConfig(
        data=DataConfig(path=tmp_path, val_fraction=np.float32(0.25)),
        model=UNetConfig(image_size=np.int64(16), widths=(8, np.int64(16))),
        train=TrainConfig(epochs=np.int64(2), learning_rate=1),
    ).validate()
    assert (cfg.data.path, cfg.model.widths, cfg.train.learning_rate) == (
        str(tmp_path),
        [8, 16],
        1.0,
    )
    assert type(cfg.model.image_size) is int and type(cfg.data.val_fraction) is float
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_true_or_false_for_a_number_setting_is_refused_not_taken_as_1_or_0(tmp_path, capsys):
    """Converting numpy numbers to float took a bool too (bool is a number to Python):
    `learning_rate = true` in a config file trained at learning rate 1.0 and
    `val_fraction = false` held nothing out, without a word; both were refused before."""
    from animeddim.config import DataConfig, TrainConfig

    for d, match in [
        ({"train": {"learning_rate": True}}, "train.learning_rate = True: expected a number"),
        ({"data": {"val_fraction": False}}, "data.val_fraction = False: expected a number"),
        ({"train": {"noise_focus_share": True}}, "noise_focus_share = True: expected a number"),
    ]:
        with pytest.raises(ConfigError, match=match):
            RunConfig.from_dict(d)
    for cfg, match in [
        (RunConfig(train=TrainConfig(time_limit_minutes=True)), "time_limit_minutes = True"),
        (RunConfig(data=DataConfig(val_fraction=False)), "data.val_fraction = False"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg.validate()
    config = tmp_path / "c.json"
    config.write_text('{"train": {"learning_rate": true}}')
    rc, _, err = run_main(capsys, "train", "--config", config, "--data", tmp_path, "--out",
                          tmp_path / "r")  # fmt: skip
    assert rc == 2 and "learning_rate = True: expected a number" in err, err
    assert not (tmp_path / "r").exists()


def test_a_leading_tilde_in_a_path_option_or_a_config_file_is_the_home_folder(
    tmp_path, monkeypatch, capsys
):
    """The shell leaves '~' alone after '=' (`--out=~/runs/x`) and a config file has no shell:
    `--out=~/runs/x` made a folder named '~' in the current one, and `--data=~/x` or
    `path = "~/x"` in a config file said the folder did not exist. A path option's or a path
    setting's leading '~' is the home folder."""
    from PIL import Image

    home, here = tmp_path / "home", tmp_path / "here"
    (home / "faces").mkdir(parents=True)
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(home / "faces" / f"{i}.png")
    (home / "tiny.json").write_text(
        json.dumps({"model": TINY_MODEL, "data": {"path": "~/faces", "val_fraction": 0.34}})
    )
    assert load_config_file(home / "tiny.json")["data"]["path"] == str(home / "faces")
    tiny = ("--max-steps", 1, "--no-kid", "--quiet", "--device", "cpu", "--batch-size", 2)
    rc, _, err = run_main(capsys, "train", "--config=~/tiny.json", "--out=~/runs/a", *tiny)
    assert rc == 0, err
    rc, _, err = run_main(capsys, "train", "--config", home / "tiny.json", "--data=~/faces",
                          "--out=~/runs/b", "--init=~/runs/a", *tiny)  # fmt: skip
    assert rc == 0, err
    for run in ("a", "b"):
        assert (home / "runs" / run / "checkpoints" / "last.safetensors").is_file()
        saved = json.loads((home / "runs" / run / "config.json").read_text())
        assert saved["data"]["path"] == str(home / "faces")
    assert saved["train"]["init"] == str(home / "runs" / "a")
    assert list(here.iterdir()) == []  # no folder named '~'
    parser = build_parser()
    got = parser.parse_args(["kid", "~/a", "~user-that-is-not/b", "--cache-dir=~/c"])
    assert (got.dir_a, got.dir_b, got.cache_dir) == (
        str(home / "a"),
        "~user-that-is-not/b",
        str(home / "c"),
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"train": {"epochs": 5}, "train": {"batch_size": 4}}', "'train'"),
        ('{"train": {"epochs": 5, "epochs": 2}}', "'epochs'"),
    ],
)
def test_a_json_config_file_giving_a_key_twice_is_one_line(tmp_path, capsys, text, key):
    """JSON readers keep the last of two equal keys (before: the first [train] section, or
    the first epochs, was dropped without a word and the run trained without it; TOML refuses
    the same file). Now exit 2 naming the key, no run folder; a run's config.json alike."""
    f = tmp_path / "c.json"
    f.write_text(text)
    out = tmp_path / "run"
    rc, _, err = run_main(capsys, "train", "--data", tmp_path, "--out", out, "--config", f)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"config file '{f}': {key} is given twice in one object" in err
    assert not out.exists()
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(text)
    rc, _, err = run_main(capsys, "train", "--resume", run)
    assert rc == 2 and f"{key} is given twice" in err and len(err.strip().splitlines()) == 1


def test_a_config_section_that_is_not_a_section_is_one_line(avatars16, tmp_path, capsys):
    """`train = 5` in TOML or `"train": null` in JSON ended, with any option of that section
    also given (`--max-steps 1`), in a TypeError traceback ('int' object does not support
    item assignment) as the option was put into it; alone, it said `train. must be a
    table/object, got int`, naming neither the file nor the remedy."""
    for name, text, got in (
        ("c.toml", "train = 5\n", "5"),
        ("c.json", '{"train": null}', "null"),
        ("d.json", '{"model": [32, 64]}', "[32, 64]"),
    ):
        config = tmp_path / name
        config.write_text(text)
        section = "model" if "model" in text else "train"
        for extra in ([], ["--max-steps", "1", "--image-size", "16"]):
            out = tmp_path / "r"
            args = ["train", "--data", avatars16, "--out", out, "--config", config, *extra]
            rc, _, err = run_main(capsys, *args)
            assert (rc, err) == (
                2,
                f"animeddim: error: config file '{config}': '{section}' must be a section "
                f"([{section}] in TOML, an object in JSON) of settings, got {got}\n",
            )
            assert not out.exists()
    with pytest.raises(ConfigError, match="'train' must be a section"):
        load_config_file(tmp_path / "c.toml")


def test_a_config_path_found_only_beside_the_config_file_names_it(
    avatars16, tmp_path, capsys, monkeypatch
):
    """Relative paths in a config file are read from the working folder (a run records them
    so, and its resumes read them so). One that is not there but is beside the config file
    said only `image folder 'faces' does not exist`; now the error names the place meant."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "faces").symlink_to(avatars16)
    (tmp_path / "configs" / "l.csv").write_text("file,hair\n")
    for section, name, value in (("data", "path", "faces"), ("data", "labels", "l.csv")):
        config = {"data": {"path": str(avatars16), name: value}, "model": TINY_MODEL}
        (tmp_path / "configs" / "c.json").write_text(json.dumps(config))
        monkeypatch.chdir(tmp_path)
        rc, _, err = run_main(capsys, "train", "--config", "configs/c.json", "--out", "run")
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert (
            f"config file 'configs/c.json': {section}.{name} '{value}' does not exist in the "
            f"working folder '{tmp_path}', where relative paths in a config file are read "
            f"from; 'configs/{value}', beside the config file, does: write that path (or an "
            "absolute one) in the config file"
        ) in err
        assert not (tmp_path / "run").exists()
