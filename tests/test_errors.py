"""User errors reach the user as one message: in a notebook and on the command line."""

import pytest

from cifarlib.core.errors import UserError, cli_errors, show_errors_briefly


def test_notebook_shows_a_user_error_as_its_message_alone(capsys):
    InteractiveShell = pytest.importorskip("IPython.core.interactiveshell", reason="needs IPython").InteractiveShell
    shell = InteractiveShell.instance()
    try:
        show_errors_briefly()
        result = shell.run_cell("from cifarlib.core.errors import UserError\nraise UserError('no data in data/')")
        out = capsys.readouterr()
        assert not result.success  # the cell still fails, so papermill stops there
        assert "UserError: no data in data/" in out.out + out.err
        assert "Traceback" not in out.out + out.err and "raise UserError" not in out.out + out.err
        # a bug still shows its traceback
        shell.run_cell("1/0")
        out = capsys.readouterr()
        assert "ZeroDivisionError" in out.out + out.err and "Traceback" in out.out + out.err
    finally:
        InteractiveShell.clear_instance()


def test_cli_turns_a_user_error_into_exit_2(capsys):
    with pytest.raises(SystemExit) as e, cli_errors("prog"):
        raise UserError("bad config")
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: bad config\n"
