"""The `popcorn` command: subcommands, one `error:` line for bad input, `--debug` for the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from popcorn.cli.main import COMMANDS, main
from popcorn.errors import DEBUG_ENV, PopcornInputError


def test_help_lists_every_subcommand(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "evaluate", "census", "download", "popvae",
                 "adapt-builtup", "pretrain-occupancy"):
        assert name in COMMANDS and f"  {name}" in out


def test_unknown_command_is_one_error_line(capsys) -> None:
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown command 'frobnicate'")


def test_bad_input_is_one_error_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys) -> None:
    missing = tmp_path / "nope.tif"
    args = ["evaluate", "--truth", str(missing), "--map", f"A={missing}", "--out", str(tmp_path / "o")]
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored (unset) after the test, also after --debug sets it
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.tif" in err[0]
    with pytest.raises(PopcornInputError, match="nope.tif"):
        main(["--debug", *args])


def test_console_script_and_python_m_popcorn_run() -> None:
    """`python -m popcorn` is the same command (the console script points at the same main)."""
    done = subprocess.run([sys.executable, "-m", "popcorn", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "adapt-builtup" in done.stdout
    done = subprocess.run([sys.executable, "-m", "popcorn", "census", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "prepare" in done.stdout
