from strassenkit.cli import main


def test_algorithms_command_verifies_catalogue(capsys):
    assert main(["algorithms"]) == 0
    text = capsys.readouterr().out
    assert "laderman" in text and "True" in text
