"""``strassenkit native`` reports the kernels' state (here: disabled, so nothing is compiled)."""

from strassenkit.cli import main


def test_native_command_when_disabled(monkeypatch, capsys):
    monkeypatch.setenv("STRASSENKIT_NATIVE", "0")
    assert main(["native"]) == 0
    assert "disabled" in capsys.readouterr().out
