"""The videolm command: registered entry points resolve, bad input gives one clear line."""
import importlib
import json
import os

import pytest

from videolm import cli

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


@pytest.mark.parametrize("table", ["TRAINERS", "EVALUATORS", "BENCHMARKS"])
def test_every_registered_entry_point_exists(table):
    for name, target in getattr(cli, table).items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), f"{table}[{name}] -> {target}"


def test_errors_are_one_line(capsys, tmp_path):
    assert cli.main(["train", "--workdir", str(tmp_path)]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'; known:" in capsys.readouterr().err
    config = os.path.join(CONFIGS, "soundshapes.py:64")
    assert cli.main(["eval", "--config", config, "--workdir", str(tmp_path), "--config.eval.nope=1"]) == 2
    assert "config has no key 'eval.nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--config", config, "--workdir", str(tmp_path), "--config.eval.num_clips=x"]) == 2
    assert "cannot parse 'x' as int" in capsys.readouterr().err
    assert cli.main(["train", "--config", os.path.join(CONFIGS, "soundshapes.py"), "--workdir", str(tmp_path)]) == 2
    assert "config kind 'soundshapes' has no trainer" in capsys.readouterr().err


def test_eval_ground_truth_prints_and_writes_json(capsys, tmp_path):
    config = os.path.join(CONFIGS, "soundshapes.py:64")
    assert cli.main(["eval", "--config", config, "--workdir", str(tmp_path), "--config.eval.num_clips=4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(tmp_path / "eval.json") as f:
        assert json.load(f) == printed
    assert printed["caption"]["exact_match"] == 1.0
