from loraclf.errors import DataError, brief


def test_brief_is_the_first_line_or_the_type_name():
    assert brief(ValueError("bad header\nstack details")) == "bad header"
    assert brief(ValueError("  \n")) == "ValueError"  # an empty message: `splitlines()[0]` used to raise
    assert brief(OSError("x" * 300), 120) == "x" * 120
    msg = str(DataError(f"cannot read ({brief(KeyError())})", where="f.csv", fix="check it"))
    assert msg == "f.csv: cannot read (KeyError) — fix: check it"
