import subprocess
import sys

import pytest

from fedlora.cli import main


def test_simulate_help_documents_every_section():
    out = subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for fragment in ("[model]", "[lora]", "[data]", "[federation]", "--set", "num-sites", "dirichlet-alpha"):
        assert fragment in out.stdout


def test_bad_overrides_exit_2_listing_every_problem(capsys):
    code = main(["simulate", "--set", "lora.rank=-1", "--set", "federation.rounds=0", "--set", "oops"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--set 'oops': expected section.key=value" in err


def test_all_value_problems_come_in_one_error(capsys):
    assert main(["simulate", "--set", "lora.rank=-1", "--set", "federation.rounds=0"]) == 2
    err = capsys.readouterr().err
    assert "lora.rank" in err and "federation.rounds" in err


def test_resume_needs_a_run_directory(capsys):
    assert main(["simulate", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--version"]])
def test_version(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "fedlora" in capsys.readouterr().out
