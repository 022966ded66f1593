"""Shared helpers of the CLI tests: run ``fewflow`` in-process and check one-line errors."""

from __future__ import annotations

from click.testing import CliRunner

from fewflow.cli.main import cli


def invoke(args: list):
    """``fewflow ARGS`` in-process (arguments converted to strings); exceptions propagate."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *words: str) -> None:
    """Exit status 2, exactly one ``error: ...`` line on stderr containing ``words``, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    for w in words:
        assert w in err, (w, err)
