"""Property-based tests of the readers: whatever the texts and labels, what is written in any
supported format reads back identically, and junk bytes give a DataError, never a crash."""

import csv
import io
import json

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraclf.config import DataConfig
from loraclf.data import read_table, to_examples
from loraclf.errors import DataError

# Texts as users have them: any printable unicode, quotes, commas, tabs inside, but not blank.
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(lambda s: s.strip())
label = st.sampled_from(["World", "Sports", "Business", "Sci/Tech"])
rows = st.lists(st.tuples(text, label), min_size=1, max_size=25)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(tmp_path, fmt, data):
    p = tmp_path / f"d.{fmt}"
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows(data)
        p.write_text(buf.getvalue(), encoding="utf-8")
    elif fmt == "jsonl":
        p.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in data), encoding="utf-8")
    else:
        pd.DataFrame(data, columns=["text", "label"]).to_parquet(p)
    return p


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
@SETTINGS
@given(data=rows)
def test_roundtrip_any_format(tmp_path, fmt, data):
    cfg = DataConfig(label_names=["World", "Sports", "Business", "Sci/Tech"])
    ex, names = to_examples(read_table(str(_write(tmp_path, fmt, data)), "train", cfg), cfg)
    assert ex.texts == [t.strip() for t, _ in data]
    assert [names[i] for i in ex.labels] == [l for _, l in data]


@SETTINGS
@given(blob=st.binary(min_size=1, max_size=300))
def test_junk_bytes_never_crash(tmp_path, blob):
    for name in ("j.csv", "j.jsonl", "j.tsv"):
        p = tmp_path / name
        p.write_bytes(blob)
        try:
            ex, _ = to_examples(read_table(str(p), "train", DataConfig()), DataConfig())
        except DataError as e:
            assert "\n" not in str(e) and "fix:" in str(e)
        else:
            assert len(ex.texts) == len(ex.labels) > 0
