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


@pytest.mark.parametrize("name", ["d.csv.gz", "d.jsonl.gz", "d.tsv.gz", "d.txt.gz"])
def test_damaged_gzip_data_is_one_error(tmp_path, name):
    """Damaged deflate data inside a .gz (not a bad header, checksum or end) raised zlib.error, a
    traceback from train, evaluate and predict, where a truncated file gave one error line."""
    import gzip
    import random
    import zlib

    from loraclf.data import read_lines

    rng = random.Random(0)
    plain = "text,label\n" + "".join(f"{' '.join(rng.choice(['war', 'goal', 'bank', 'chip', 'vote']) for _ in range(12))}"
                                     f",{rng.choice(['World', 'Sports'])}\n" for _ in range(300))
    good = gzip.compress(plain.encode())
    hit_zlib = 0
    for start in range(40, len(good) - 40, 97):
        bad = bytearray(good)
        bad[start:start + 30] = bytes(b ^ 0xA5 for b in bad[start:start + 30])
        try:
            gzip.decompress(bytes(bad))
        except zlib.error:
            hit_zlib += 1
        except Exception:  # noqa: BLE001 - other kinds of damage, already handled before
            pass
        p = tmp_path / name
        p.write_bytes(bytes(bad))
        try:
            if name.endswith(".txt.gz"):
                read_lines(p, "--input")
            else:
                to_examples(read_table(str(p), "train", DataConfig()), DataConfig())
        except DataError as e:
            assert "\n" not in str(e)
    assert hit_zlib  # the damage reached the deflate stream at least once
