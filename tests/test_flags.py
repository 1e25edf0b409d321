"""The flags the tools share are defined once (utils/flags.py, datasets.refer.add_data_path_args): every tool
that takes one takes it with the same choices and help, and its default differs only where the tool asks."""
import argparse

import pytest

import app
import eval as eval_script
import predict
import train_hivg
from datasets.refer import DATA_PATHS, add_data_path_args
from tests.conftest import REPO, is_project_source
from utils.flags import DEVICES

SHARED = ("--device", "--amp", "--tf32", "--compile", "--hf_clip_config", "--num_workers", "--data_root",
          "--split_root")


def options(parser: argparse.ArgumentParser) -> dict:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_each_shared_flag_is_defined_once_in_the_project():
    counts = dict.fromkeys(SHARED, 0)
    for path in REPO.rglob("*.py"):
        if is_project_source(path):
            text = path.read_text(encoding="utf-8")
            for flag in SHARED:
                counts[flag] += text.count(f'add_argument("{flag}"')
    assert counts == {**dict.fromkeys(SHARED[:6], 1), "--data_root": 0, "--split_root": 0}
    assert [f"--{name}" for name in DATA_PATHS] == list(SHARED[6:])    # one loop over DATA_PATHS defines them


def test_the_tools_take_a_shared_flag_alike():
    tools = {"train_hivg.py": train_hivg.get_args_parser(), "eval.py": eval_script.get_args_parser(),
             "predict.py": predict.get_args_parser(), "app.py": app.get_args_parser()}
    for flag in SHARED[:6]:
        actions = {name: options(parser)[flag] for name, parser in tools.items() if flag in options(parser)}
        assert len({(a.help, tuple(a.choices or ()), type(a)) for a in actions.values()}) == 1, flag
    assert options(tools["app.py"])["--device"].choices == DEVICES
    assert options(tools["train_hivg.py"])["--hf_clip_config"].default == ""      # kept in args.json as before
    assert options(tools["predict.py"])["--hf_clip_config"].default is None


def test_data_paths_training_defaults_eval_fallback_verify_required(capsys):
    args = train_hivg.get_args_parser().parse_args([])
    assert (args.data_root, args.split_root) == tuple(default for default, _ in DATA_PATHS.values())
    opts = eval_script.get_args_parser().parse_args(["--eval_model", "x.pth"])
    assert opts.data_root is None and opts.split_root is None
    assert "default: the checkpoint's, else ./data/image_data/" in options(eval_script.get_args_parser())[
        "--data_root"].help
    with pytest.raises(SystemExit):
        add_data_path_args(argparse.ArgumentParser(), required=True).parse_args(["--data_root", "d"])
    assert "the following arguments are required: --split_root" in capsys.readouterr().err
