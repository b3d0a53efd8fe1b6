"""The one-error-line contract, as the tests of the train scripts check it."""


def assert_clean_error(capsys, excinfo) -> str:
    """The script exited non-zero with exactly one `error: ...` line on stderr; returns it."""
    assert excinfo.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]
