"""The ``psma-pfs`` entry point: every stage is reachable and bad input exits with code 2."""

import sys

import pytest

from psma_lib import cli


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_data_commands_do_not_import_torch():
    # Data-only stages must stay light; run in a fresh interpreter to see its imports.
    import subprocess

    code = (
        "import sys; from psma_lib import cli; cli.build_parser('validate'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_manifest_exits_2_with_one_message(tmp_path, capsys):
    code = cli.main(["validate", str(tmp_path / "nope" / "manifest.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    assert "manifest.yaml" in err
    assert "Traceback" not in err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
