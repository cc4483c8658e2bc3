"""``strassenkit experiment``: the launcher finds the experiments folder, runs it, and says clearly when it cannot."""

import sys
from pathlib import Path

import pytest

import strassenkit
from strassenkit.cli import COMMANDS, main
from strassenkit.commands import experiment


@pytest.fixture
def no_experiments_modules():
    """Unload the experiments package for one test and put the original modules back afterwards."""
    def ours():
        return [k for k in sys.modules if k == "experiments" or k.startswith("experiments.")]

    saved = {k: sys.modules.pop(k) for k in ours()}
    yield
    for k in ours():
        del sys.modules[k]
    sys.modules.update(saved)


def test_finds_the_checkout_folder_from_the_repo_root_and_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv(experiment.ENV, raising=False)
    if not (Path(strassenkit.__file__).resolve().parents[2] / "experiments" / "run.py").is_file():
        pytest.skip("strassenkit is not installed in editable mode from this checkout")
    here = experiment.find_experiments()
    assert (here / "run.py").is_file() and here.name == "experiments"
    monkeypatch.chdir(tmp_path)  # no ./experiments: the editable install's checkout is used
    assert experiment.find_experiments() == here


def test_clear_error_naming_every_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(experiment.ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError) as e:
        experiment.find_experiments()
    msg = str(e.value)
    assert experiment.ENV in msg and "./experiments" in msg and "pip install -e ." in msg
    with pytest.raises(SystemExit) as e:
        main(["experiment", "report"])
    assert experiment.ENV in str(e.value.code)


def test_env_folder_is_loaded_as_the_experiments_package(tmp_path, monkeypatch, no_experiments_modules):
    folder = tmp_path / "my_experiments"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text("CALLS = []\n\ndef main(argv, prog):\n    CALLS.append((argv, prog))\n    return 3\n")
    monkeypatch.setenv(experiment.ENV, str(folder))
    assert main(["experiment", "vit", "--quick", "--seeds", "1"]) == 3
    runner = sys.modules["experiments.run"]
    assert runner.CALLS == [(["vit", "--quick", "--seeds", "1"], "strassenkit experiment")]
    assert str(folder) in runner.__file__


def test_approx_and_rediscover_are_experiments_not_commands():
    assert "approx" not in COMMANDS and "rediscover" not in COMMANDS
    with pytest.raises(SystemExit):
        main(["approx", "--help"])
