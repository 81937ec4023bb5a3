import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_rows, write_agnews_csv
from loraclf.config import DataConfig
from loraclf.data import (AG_NEWS_LABELS, LengthGroupedBatchSampler, PadCollator, detect_format, is_lines_file,
                          load_eval_split, load_splits, read_lines, read_table, sorted_batches, split_lines,
                          table_texts, to_examples, tokenize, tokenize_cached)
import loraclf.data as data_mod
from loraclf.errors import DataError


def _cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_canonical_agnews_gz(tmp_path):
    p = write_agnews_csv(tmp_path / "t.csv.gz", [(0, "Title one", "desc, with comma"), (3, 'A "quoted" t', "d")])
    assert detect_format(p) == "agnews"
    ex, names = to_examples(read_table(str(p), "train", _cfg()), _cfg())
    assert names == AG_NEWS_LABELS
    assert ex.texts == ["Title one desc, with comma", 'A "quoted" t d']
    assert ex.labels.tolist() == [0, 3]


def test_csv_with_header_joins_text_columns_and_string_labels(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("title,body,topic\nHello,world,sports\nFoo,bar,news\nBaz,qux,sports\n")
    cfg = _cfg(text_columns=["title", "body"], label_column="topic")
    ex, names = to_examples(read_table(str(p), "train", cfg), cfg)
    assert names == ["news", "sports"] and ex.texts[0] == "Hello world" and ex.labels.tolist() == [1, 0, 1]


def test_tsv_jsonl_parquet_agree(tmp_path):
    rows = [("first text", "a"), ("second text", "b"), ("third", "a")]
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows)
    pd.DataFrame(rows, columns=["text", "label"]).to_parquet(tmp_path / "d.parquet")
    results = []
    for name in ("d.tsv", "d.jsonl.gz", "d.parquet"):
        ex, names = to_examples(read_table(str(tmp_path / name), "train", _cfg()), _cfg())
        results.append((ex.texts, ex.labels.tolist(), names))
    assert results[0] == results[1] == results[2]


def test_integer_labels_are_indices_with_configured_names(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    cfg = _cfg(label_names=["neg", "pos"])
    ex, names = to_examples(read_table(str(p), "train", cfg), cfg)
    assert names == ["neg", "pos"] and ex.labels.tolist() == [1, 0]


def test_validation_carved_deterministically_and_disjoint(agnews_files):
    cfg = _cfg(train=str(agnews_files["train"]), test=str(agnews_files["test"]), validation_size=0.25)
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.validation.texts == b.validation.texts and len(a.validation) == 60 and len(a.train) == 180
    assert len(a.test) == 80
    assert a.fingerprints["train"]["sha256"] == b.fingerprints["train"]["sha256"]
    c = load_splits(cfg.model_copy(update={"split_seed": 7}))
    assert c.validation.texts != a.validation.texts
    # disjoint, and together every row once (each text is unique here), whatever the seed
    rows = sorted(zip(a.train.texts + a.validation.texts, [*a.train.labels, *a.validation.labels]))
    assert len({t for t, _ in rows}) == 240 and not set(a.train.texts) & set(a.validation.texts)
    assert rows == sorted(zip(c.train.texts + c.validation.texts, [*c.train.labels, *c.validation.labels]))


def test_sample_limits(agnews_files):
    cfg = _cfg(train=str(agnews_files["train"]), test=str(agnews_files["test"]), max_train_samples=50,
               max_eval_samples=10)
    s = load_splits(cfg)
    assert (len(s.train), len(s.validation), len(s.test)) == (50, 10, 10)


def test_a_sample_limit_that_leaves_one_class_is_refused(agnews_files):
    """--data.max_train_samples 1 trained a 'classifier' on one row of one class, exit 0."""
    with pytest.raises(DataError, match=r"the 1 training row\(s\) left after --data.max_train_samples hold only one "
                                        r"class .*raise --data.max_train_samples"):
        load_splits(_cfg(train=str(agnews_files["train"]), max_train_samples=1))


def test_label_names_written_as_yaml_numbers_are_names():
    assert _cfg(label_names=[1, 2, 3, 4, 5]).label_names == ["1", "2", "3", "4", "5"]


def test_eval_split_rejects_unseen_label(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("text,label\nok,a\nbad,zzz\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): label 'zzz' is not one of the classes"):
        load_eval_split(_cfg(), str(p), ["a", "b"])


def _write(tmp_path, name, content: bytes | str):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return str(p)


BAD_INPUTS = [
    ("missing.csv", None, {}, "file not found"),
    ("empty.csv", "", {}, "file is empty"),
    ("header.csv", "text,label\n", {}, "no data rows"),
    ("ragged.csv", "text,label\na,1\nb,1,extra\n", {}, "row 2 (line 3) has 3 fields"),
    ("semi.csv", "text;label\na;1\n", {}, "looks delimited by ';'"),
    ("tabs.csv", "text\tlabel\na\t1\n", {}, "looks delimited by '\\t'"),
    ("huge.csv", "text,label\n" + "x" * 1_000_001 + ",0\n", {}, "row 1 (line 2): text is 1,000,001 characters"),
    ("ws.jsonl", '{"text": " \\t ", "label": 0}\n', {}, "row 1: empty text"),
    ("nulltext.jsonl", '{"text": null, "label": 0}\n', {}, "holds NoneType"),
    ("nolabel.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', {}, "row 2: label None is not a class"),
    ("boollabel.jsonl", '{"text": "a", "label": true}\n', {}, "label True is not a class"),
    ("neg.csv", "text,label\na,-1\nb,0\n", {"label_names": ["x", "y"]}, "row 1 (line 2): label -1 out of range"),
    ("emptylabel.csv", "text,label\na,\n", {}, "row 1 (line 2): empty label"),
    ("dir.csv/", None, {}, "is a directory"),
    ("utf.csv", b"text,label\n\xff\xfe,1\n", {}, "not valid UTF-8"),
    ("nul.csv", "text,label\na\x00b,1\n", {}, "NUL bytes"),
    ("quote.csv", 'text,label\n"never closed,1\n', {}, "malformed CSV"),
    ("dup.csv", "text,text,label\na,b,1\n", {}, "duplicate column"),
    ("nocol.csv", "body,label\na,1\n", {}, "no column(s) ['text']"),
    ("nolabel.csv", "text,y\na,1\n", {}, "no label column 'label'"),
    ("emptytext.csv", "text,label\na,0\n   ,1\n", {}, "row 2 (line 3): empty text"),
    ("mixed.csv", "text,label\na,0\nb,sports\n", {}, "mixed label types"),
    ("range.csv", "text,label\na,0\nb,7\n", {"label_names": ["x", "y"]}, "row 2 (line 3): label 7 out of range"),
    ("gaps.csv", "text,label\na,0\nb,2\n", {}, "no training row has class [1]"),
    ("bad.jsonl", '{"text": "a", "label": 0}\n{oops\n', {}, "line 2 is not valid JSON"),
    ("arr.jsonl", '[1, 2]\n', {}, "not an object"),
    ("types.jsonl", '{"text": 5, "label": 0}\n', {}, "holds int"),
    ("floatlabel.jsonl", '{"text": "a", "label": 0.5}\n', {}, "is not a class"),
    ("blank.jsonl", "\n\n", {}, "no records"),
    ("notgz.csv.gz", "text,label\na,1\n", {}, "gzip"),
    ("weird.xyz", "x", {}, "cannot tell the format"),
    ("bad.parquet", b"PAR1garbage", {}, "cannot read Parquet"),
    # a lone surrogate (valid JSON) would make the tokenizer raise a TypeError after training
    ("surrogate.jsonl", '{"text": "ok", "label": 0}\n{"text": "bad \\ud800", "label": 1}\n', {"validation_size": 1},
     "row 2: text is not valid Unicode"),
    # one huge class id: the gaps are named without building range(k) (which ran out of memory)
    ("bigint.csv", "text,label\na,0\nb,1\nc,300000000\n", {}, "no training row has class [2, 3, 4, 5, 6] (and more)"),
    # negative labels are not classes: the gaps named are 0..k-1's, and the range check names the -3
    ("negative.csv", "text,label\na,-3\nb,0\nc,2\n", {}, "no training row has class [1] —"),
    ("bigfloat.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1e20}\n', {}, "no training row has class [1, 2"),
    ("oneclass.csv", "text,label\na,spam\nb,spam\nc,spam\n", {"validation_size": 1},
     "the training rows hold only one class ('spam')"),
    ("zero.csv", '"0","t","d"\n"1","t","d"\n', {}, "to read the labels as they are, and set --data.text_columns "
     "[title,description]"),
    ("utfline.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "\xff", "label": 0}\n', {},
     "line 3 is not valid UTF-8 (byte 62 of the file)"),
    ("badarr.json", '[{"text": "a", "label": 0}, 5]', {}, "element 2 of the array is a JSON int"),
    # Python's JSON parser recurses per level: a RecursionError traceback, exit 1
    ("deep.jsonl", '{"text": "a", "label": 0}\n' + "[" * 200_000 + "\n", {}, "line 2 is nested too deeply to read"),
    ("deep.json", "[" * 200_000, {}, "JSON nested too deeply to read"),
    # a named pipe was opened again after the format check had drained it: hung for ever
    ("pipe.csv|", None, {}, "is not a regular file (a named pipe or a device)"),
]


@pytest.mark.parametrize("name,content,kw,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_give_one_clear_line(tmp_path, name, content, kw, expected):
    if name.endswith("/"):
        (tmp_path / name).mkdir()
    if name.endswith("|"):
        name = name[:-1]
        os.mkfifo(tmp_path / name)  # nothing writes to it: opening it to read would block
    path = str(tmp_path / name) if content is None else _write(tmp_path, name, content)
    cfg = _cfg(train=path, **kw)
    with pytest.raises(DataError) as e:
        load_splits(cfg)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg and "fix:" in msg
    assert name.rstrip("/") in msg  # names the file


def test_bom_is_ignored(tmp_path):
    p = _write(tmp_path, "bom.csv", "\ufefftext,label\nhello,a\nworld,b\n".encode("utf-8"))
    ex, _ = to_examples(read_table(p, "train", _cfg()), _cfg())
    assert ex.texts == ["hello", "world"]


def test_length_grouped_sampler_covers_every_row_once_and_groups():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1000)
    s = LengthGroupedBatchSampler(lengths, batch_size=16, seed=3, mega=50)
    s.begin_epoch(1)
    batches = list(s)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000)) and len(batches) == len(s)
    padded = sum(len(b) * max(lengths[b]) for b in batches)
    random_batches = [list(range(i, min(i + 16, 1000))) for i in range(0, 1000, 16)]
    padded_random = sum(len(b) * max(lengths[b]) for b in random_batches)
    assert padded < 0.7 * padded_random  # grouping removes most padding
    assert list(s) == batches  # same epoch -> same order
    s.begin_epoch(2)
    assert list(s) != batches


@pytest.mark.parametrize("group", [True, False])
def test_token_budget_batches_fit_the_budget_and_cover_every_row_once(group):
    lengths = np.random.default_rng(1).integers(3, 120, size=700)
    s = LengthGroupedBatchSampler(lengths, batch_size=16, seed=5, group_by_length=group, mega=8, max_tokens=600)
    for epoch in (1, 2):
        s.begin_epoch(epoch)
        batches = list(s)
        assert sorted(i for b in batches for i in b) == list(range(700))
        assert all(len(b) * max(lengths[b]) <= 600 for b in batches)
        assert len(batches) == s.batches_in_epoch(epoch) == len(s)
    if group:  # sorted chunks: short rows come in bigger batches than long rows
        sizes = {len(b): max(lengths[b]) for b in batches}
        assert max(sizes) > 16 and sizes[max(sizes)] < sizes[min(sizes)]
    one = LengthGroupedBatchSampler([500, 900, 10], batch_size=4, seed=0, max_tokens=100)
    one.begin_epoch(1)
    assert sorted(map(sorted, one)) == [[0], [1], [2]]  # a row over the budget still gets a batch


@pytest.mark.parametrize("group", [True, False])
def test_token_budgets_count_the_padding_a_multiple_adds(group):
    """Lengths rounded up to a multiple (pad_to_multiple_of, CUDA graphs) were not counted: 16 rows
    of ~16 tokens passed a 256-token budget, then became 16 x 64 = 1,024 padded tokens."""
    lengths = np.random.default_rng(2).integers(3, 40, size=300)
    collate = PadCollator(1, multiple=64, max_width=48)  # rounding stops at max_width
    items = [([7] * int(n), 0) for n in lengths]
    s = LengthGroupedBatchSampler(lengths, batch_size=64, seed=5, group_by_length=group, max_tokens=256,
                                  width=collate.width)
    s.begin_epoch(1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(300))
    shapes = [collate([items[i] for i in b])["input_ids"].shape for b in batches]
    assert all(rows * width <= 256 for rows, width in shapes) and max(r for r, _ in shapes) == 5  # 5 x 48
    inference = sorted_batches(lengths, batch_size=64, max_tokens=256, width=collate.width)
    assert sorted(i for b in inference for i in b) == list(range(300))
    assert all(len(b) * collate.width(max(lengths[b])) <= 256 for b in inference)
    assert [collate.width(n) for n in (3, 47, 48, 49)] == [48, 48, 48, 49]  # never cuts a row


def test_sorted_batches_under_a_token_budget():
    lengths = [10, 50, 3, 50, 7, 9]
    batches = sorted_batches(lengths, batch_size=4, max_tokens=100)
    assert batches == [[1, 3], [0, 5, 4, 2]]
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in batches)
    assert sorted_batches(lengths, batch_size=4) == [[1, 3, 0, 5], [4, 2]]


def test_token_cache_hits_misses_and_survives_damage(tiny_roberta, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    texts = ["war minister says", "goal goal", "shares rose"]
    first = tokenize_cached(texts, tok, 64, tmp_path)
    assert first == tokenize(texts, tok, 64)
    files = list((tmp_path / "tokens").glob("*.npz"))
    assert len(files) == 1

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized although cached")

    monkeypatch.setattr(data_mod, "tokenize", no_tokenizing)
    assert tokenize_cached(texts, tok, 64, tmp_path) == first  # a hit: no tokenizer call
    monkeypatch.undo()
    # other texts or another max_length are other entries
    assert tokenize_cached(texts[:2], tok, 64, tmp_path) == first[:2]
    assert tokenize_cached(texts, tok, 3, tmp_path) == tokenize(texts, tok, 3)
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 3
    files[0].write_bytes(b"not a zip")  # damaged entry: tokenized again, rewritten
    assert tokenize_cached(texts, tok, 64, tmp_path) == first
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated (a full disk, a killed copy): a BadZipFile
    assert tokenize_cached(texts, tok, 64, tmp_path) == first
    assert len(files[0].read_bytes()) > 100  # rewritten whole
    assert tokenize_cached(texts, tok, 64, None) == first  # no cache at all
    # a cache "folder" that is a file (LORACLF_CACHE set wrong): not an error either (it was:
    # NotADirectoryError from removing the temporary file that could not be made)
    (tmp_path / "a-file").write_text("x")
    assert tokenize_cached(texts, tok, 64, tmp_path / "a-file") == first
    # temporaries of writers killed mid-write stayed forever; a day-old one is swept at the next
    # write, a younger one (maybe another process's write in progress) is left alone
    import os
    import time

    stale, fresh = tmp_path / "tokens" / ".dead.123.npz", tmp_path / "tokens" / ".busy.456.npz"
    for f in (stale, fresh):
        f.write_bytes(b"half a cache file")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    tokenize_cached(["a text not cached yet"], tok, 64, tmp_path)
    assert not stale.exists() and fresh.exists()


def test_pad_collator_and_sorted_batches():
    batch = PadCollator(pad_id=1)([([5, 6, 7], 0), ([8], 2)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [0, 2]
    assert batch["n_tokens"] == 4 and type(batch["n_tokens"]) is int
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
    # rows as NumPy arrays (the token cache's) pad the same
    same = PadCollator(pad_id=1)([(np.array([5, 6, 7]), 0), (np.array([8]), 2)])
    assert all(torch.equal(same[k], batch[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert sorted_batches([3, 9, 1, 5], 2) == [[1, 3], [0, 2]]


def test_pad_collator_rounds_width_up_to_a_multiple_but_not_past_max_width():
    items = [([5, 6, 7], 0), ([8], 2)]
    assert PadCollator(1, multiple=8)(items)["input_ids"].shape == (2, 8)
    assert PadCollator(1, multiple=8)(items)["attention_mask"].sum() == 4
    assert PadCollator(1, multiple=8, max_width=6)(items)["input_ids"].shape == (2, 6)
    assert PadCollator(1, multiple=2, max_width=2)(items)["input_ids"].shape == (2, 3)  # never cuts a row
    assert PadCollator(1, multiple=3)(items)["input_ids"].shape == (2, 3)


def test_ag_news_rows_fixture_is_balanced():
    labels = [c for c, _, _ in make_rows(80)]
    assert all(labels.count(c) == 20 for c in range(4))


def test_parquet_with_duplicate_column_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array([1])], names=["text", "text", "label"])
    pq.write_table(t, tmp_path / "dup.parquet")
    with pytest.raises(DataError, match=r"duplicate column name\(s\) \['text'\]"):
        read_table(str(tmp_path / "dup.parquet"), "train", _cfg())


def test_parquet_with_wrong_types(tmp_path):
    pd.DataFrame({"text": [1.5, 2.5], "label": ["a", "b"]}).to_parquet(tmp_path / "w.parquet")
    with pytest.raises(DataError, match="row 1: column 'text' holds float"):
        load_splits(_cfg(train=str(tmp_path / "w.parquet")))


def test_validation_size_that_leaves_nothing(agnews_files):
    with pytest.raises(DataError, match="validation_size 240"):
        load_splits(_cfg(train=str(agnews_files["train"]), validation_size=240))
    with pytest.raises(DataError, match="validation_size 0.001 of 240 rows gives no validation row"):
        load_splits(_cfg(train=str(agnews_files["train"]), validation_size=0.001))


LINES_BAD = [
    ("t.txt", b"a\n\nb\n", "line 2 is empty"),
    ("t.txt", b"ok\n\xff\n", "not valid UTF-8"),
    ("t.txt.gz", b"not gzip at all", "not a valid gzip file"),
    ("missing.txt", None, "file not found"),
    ("d.txt/", None, "is a directory"),
]


@pytest.mark.parametrize("name,content,expected", LINES_BAD, ids=[b[2] for b in LINES_BAD])
def test_read_lines_errors_name_file_and_flag(tmp_path, name, content, expected):
    path = tmp_path / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_lines(path, "--input")
    msg = str(e.value)
    assert expected in msg and str(path) in msg and "\n" not in msg
    if expected in ("file not found", "is a directory"):
        assert "--input" in msg


def test_read_lines_gz_bom_and_crlf(tmp_path):
    with gzip.open(tmp_path / "t.txt.gz", "wb") as f:
        f.write("\ufefffirst\r\nsecond\u2028half\n\n".encode())
    assert read_lines(tmp_path / "t.txt.gz", "--input") == ["first", "second\u2028half"]
    assert is_lines_file(Path("a.TXT.gz")) and is_lines_file(Path("texts")) and not is_lines_file(Path("a.csv.gz"))
    assert split_lines("", "stdin") == []


def test_integer_like_label_spellings(tmp_path):
    """pandas writes an integer column holding a missing value as 1.0: still class 1."""
    p = _write(tmp_path, "f.csv", "text,label\na,0\nb,1.0\nc,+2\n")
    ex, names = to_examples(read_table(p, "train", _cfg()), _cfg())
    assert ex.labels.tolist() == [0, 1, 2] and names == ["0", "1", "2"]


def test_headerless_files_other_than_ag_news_keep_their_class_numbers(tmp_path):
    """Zhang et al.'s DBpedia or Amazon polarity share AG News's layout but not its classes."""
    p = _write(tmp_path, "amazon.csv", '"2","great","loved it"\n"1","bad","broke"\n"2","fine","ok"\n')
    assert detect_format(Path(p)) == "agnews"
    ex, names = to_examples(read_table(p, "train", _cfg()), _cfg())
    assert names == ["1", "2"] and ex.labels.tolist() == [1, 0, 1]
    p14 = _write(tmp_path, "dbpedia.csv", "".join(f'"{c}","t{c}","d"\n' for c in range(1, 15)))
    ex, names = to_examples(read_table(p14, "train", _cfg()), _cfg())
    assert names == [str(c) for c in range(1, 15)] and ex.labels.tolist() == list(range(14))
    with pytest.raises(DataError, match=r"indices 1\.\.3, but no training row has class \[2\].*relabel the classes from 1"):
        to_examples(read_table(_write(tmp_path, "gap.csv", '"1","t","d"\n"3","t","d"\n'), "train", _cfg()), _cfg())
    # refused where the classes were learnt as names: the label as the file writes it, not shifted
    with pytest.raises(DataError, match=r"row 1: label 3 is an integer, but the classes were learnt as names"):
        to_examples(read_table(_write(tmp_path, "three.csv", '"3","t","d"\n'), "test", _cfg()), _cfg(),
                    ["x", "y", "z"], int_labels=False)


def test_gzip_suffix_in_any_case_and_gzipped_parquet(tmp_path):
    rows = "text,label\nhello,a\nworld,b\n"
    up = tmp_path / "UP.CSV.GZ"
    up.write_bytes(gzip.compress(rows.encode()))
    assert to_examples(read_table(str(up), "train", _cfg()), _cfg())[0].texts == ["hello", "world"]
    pq_path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["hello", "world"], "label": ["a", "b"]}).to_parquet(pq_path)
    gz = tmp_path / "t.parquet.gz"
    gz.write_bytes(gzip.compress(pq_path.read_bytes()))
    assert to_examples(read_table(str(gz), "train", _cfg()), _cfg())[0].texts == ["hello", "world"]


def test_json_array_of_records(tmp_path):
    """What pandas' to_json(orient="records", indent=2) writes; datasets' json loader reads it too."""
    p = tmp_path / "r.json"
    pd.DataFrame({"text": ["hello", "world"], "label": ["a", "b"]}).to_json(p, orient="records", indent=2)
    ex, names = to_examples(read_table(str(p), "train", _cfg()), _cfg())
    assert ex.texts == ["hello", "world"] and names == ["a", "b"]


def test_unquoted_tsv_whose_text_starts_with_a_quote(tmp_path):
    p = _write(tmp_path, "q.tsv", 'sentence\tlabel\n"the greatest" film ever\t1\nplain\t0\n')
    ex, _ = to_examples(read_table(p, "train", _cfg()), _cfg(text_columns=["sentence"]))
    assert ex.texts == ['"the greatest" film ever', "plain"]
    # still an error when reading it unquoted does not give a regular table
    bad = _write(tmp_path, "b.tsv", 'sentence\tlabel\n"never closed\t1\nx\ty\tz\n')
    with pytest.raises(DataError, match="malformed TSV"):
        read_table(bad, "train", _cfg())


@pytest.mark.parametrize("name, content, where", [
    ("q.csv", 'text,label\n"two\nlines",a\n\nbad,zzz\n', "row 2 (line 5):"),  # header, a quoted line break, a blank
    ("q.jsonl", '{"text": "a", "label": "a"}\n\n{"text": "b", "label": "zzz"}\n', "row 2 (line 3):"),
    ("q.json", '[{"text": "a", "label": "a"},\n {"text": "b", "label": "zzz"}]', "row 2:"),  # an array has no lines
    ("q.tsv", "text\tlabel\nok\ta\nbad\tzzz\n", "row 2 (line 3):"),
])
def test_a_row_s_message_names_its_line_in_the_file(tmp_path, name, content, where):
    # "row 81" was data row 81: a user opening the file at line 81 found a valid row (the header
    # is line 1; blank lines and quoted line breaks move it further)
    with pytest.raises(DataError) as e:
        load_eval_split(_cfg(), _write(tmp_path, name, content), ["a", "b"])
    assert f"{where} label 'zzz' is not one of the classes" in str(e.value)


def test_integer_labels_refused_where_the_classes_were_names(tmp_path):
    """Trained on names (sorted: no index order anyone chose), an integer in other data says no class."""
    train = _write(tmp_path, "tr.csv", "text,label\na,World\nb,Sports\nc,World\nd,Sports\n")
    ints = _write(tmp_path, "te.csv", "text,label\na,0\nb,1\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): label 0 is an integer, but the classes were learnt as names"):
        load_splits(_cfg(train=train, test=ints, validation_size=1))
    splits = load_splits(_cfg(train=train, validation_size=1))
    assert splits.int_labels is False
    # with configured names the indices are the user's: allowed
    named = load_splits(_cfg(train=train, test=ints, validation_size=1, label_names=["World", "Sports"]))
    assert named.int_labels and named.test.labels.tolist() == [0, 1]


def test_local_path_in_an_existing_folder_is_not_a_hub_name(tmp_path):
    (tmp_path / "data").mkdir()
    assert not data_mod.is_hub_name(str(tmp_path / "data" / "missing"))
    assert data_mod.is_hub_name("org/dataset")  # no such local folder: a hub name
    with pytest.raises(DataError, match="file not found"):
        load_splits(_cfg(train=str(tmp_path / "data" / "missing")))


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    # a relative data path in a YAML config is read from the working directory, not the YAML's
    # folder: the error said only "check the path given to --data.train"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"read from the working directory, {re.escape(str(tmp_path))}\)$"):
        load_splits(_cfg(train="train.csv"))
    with pytest.raises(DataError) as e:
        load_splits(_cfg(train=str(tmp_path / "train.csv")))
    assert "working directory" not in str(e.value)


def test_token_cache_key_tells_apart_text_boundaries_and_truncation_side(tiny_roberta, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    a = tokenize_cached(["war\x00goal", "chip"], tok, 32, tmp_path)
    b = tokenize_cached(["war", "goal\x00chip"], tok, 32, tmp_path)
    assert b == tokenize(["war", "goal\x00chip"], tok, 32) and a != b
    long = ["war minister says shares rose goal goal chip"]
    right = tokenize_cached(long, tok, 5, tmp_path)
    tok.truncation_side = "left"
    left = tokenize_cached(long, tok, 5, tmp_path)
    assert left == tokenize(long, tok, 5) and left != right
    # split_special_tokens changes how "</s>" written in a text is tokenized
    marked = ["war </s> goal"]
    whole = tokenize_cached(marked, tok, 32, tmp_path)
    tok.split_special_tokens = True
    split = tokenize_cached(marked, tok, 32, tmp_path)
    assert split == tokenize(marked, tok, 32) and split != whole


def test_token_cache_key_tells_apart_vocabularies_with_the_same_special_tokens(tiny_roberta, tmp_path):
    """Two tokenizers of one class and one set of special tokens but other ids for a word must
    not share cached ids (the key's serialised tokenizer could be dropped with every test passing)."""
    import shutil

    from transformers import AutoTokenizer

    texts = ["war goal", "goal war chip"]
    one = AutoTokenizer.from_pretrained(tiny_roberta)
    other = shutil.copytree(tiny_roberta, tmp_path / "other", ignore=shutil.ignore_patterns("*.safetensors"))
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = one.convert_ids_to_tokens(tokenize(texts[:1], one, 32)[0][1:3])  # swap two words' ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    two = AutoTokenizer.from_pretrained(other)
    assert tokenize(texts, one, 32) != tokenize(texts, two, 32)
    for tok in (one, two):
        assert tokenize_cached(texts, tok, 32, tmp_path / "cache") == tokenize(texts, tok, 32)


def test_out_of_range_label_in_a_headerless_file_is_named_as_the_file_has_it(tmp_path):
    p = _write(tmp_path, "t5.csv", '"5","t","d"\n')
    with pytest.raises(DataError, match=r"row 1: label 5 out of range for 4 classes \(1\.\.4\)"):
        load_eval_split(_cfg(), p, list(AG_NEWS_LABELS))


def test_numbers_written_as_names_are_names(tmp_path):
    """Star ratings "1".."5" as JSON strings were read as class indices (no class 0: refused), and
    the fix offered, --data.label_names ["1",...,"5"], then failed with 'label 5 out of range'."""
    from loraclf.data import Table, to_examples

    stars = tmp_path / "stars.jsonl"
    stars.write_text("".join(json.dumps({"text": f"review {i}", "label": str(i % 5 + 1)}) + "\n" for i in range(20)))
    ex, names = to_examples(read_table(str(stars), "train", DataConfig()), DataConfig())
    assert names == ["1", "2", "3", "4", "5"] and ex.labels[:5].tolist() == [0, 1, 2, 3, 4]
    # in CSV every value is text: numbers are indices, unless the names given make them names
    csv_stars = tmp_path / "stars.csv"
    csv_stars.write_text("text,label\n" + "".join(f"review {i},{i % 5 + 1}\n" for i in range(20)))
    cfg = DataConfig(label_names=["1", "2", "3", "4", "5"])
    ex, names = to_examples(read_table(str(csv_stars), "train", cfg), cfg)
    assert names == ["1", "2", "3", "4", "5"] and ex.labels[:5].tolist() == [0, 1, 2, 3, 4]
    # ... in every file alike, also one that lacks a class (it was read as indices: "1" -> "2")
    val = Table({"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, source="v")
    assert to_examples(val, cfg, names)[0].labels.tolist() == [0, 1, 2, 3]
    # names "0".."K-1" are their own indices; a JSONL run with "0".."3" names takes CSV's 0..3
    table = Table({"text": ["a", "b"], "label": ["1", "0"]}, source="t")
    assert to_examples(table, DataConfig(), ["0", "1", "2", "3"], int_labels=False)[0].labels.tolist() == [1, 0]


def test_a_source_that_names_its_classes_is_read_by_name():
    """A hub split's ClassLabel names were ignored where the names were already known (evaluate, a
    validation or test split): a run that learnt names refused its integers, and names in another
    order mislabelled every row in silence."""
    from loraclf.data import Table, to_examples

    hub = Table({"text": ["war", "goal", "bank", "chip"], "label": [0, 1, 2, 3]}, source="ag:test",
                label_names=["World", "Sports", "Business", "Sci/Tech"], typed=True)
    run_names = ["Business", "Sci/Tech", "Sports", "World"]
    for int_labels in (True, False):
        ex, _ = to_examples(hub, DataConfig(), run_names, int_labels=int_labels)
        assert [run_names[i] for i in ex.labels] == ["World", "Sports", "Business", "Sci/Tech"]
    # other names rename the classes by index (data.label_names on a hub dataset), as documented
    ex, names = to_examples(hub, DataConfig(label_names=["w", "s", "b", "t"]))
    assert names == ["w", "s", "b", "t"] and ex.labels.tolist() == [0, 1, 2, 3]


def test_rows_ending_in_a_bare_carriage_return_are_read(tmp_path):
    """Old-Mac line ends (Excel's "CSV (Macintosh)"): a traceback in detect_format, and with
    --data.format csv a "check quoting" error for a file without quotes."""
    for name, fmt in (("mac.csv", "auto"), ("mac2.csv", "csv"), ("mac.tsv", "auto")):
        sep = "\t" if name.endswith(".tsv") else ","
        p = _write(tmp_path, name, f"text{sep}label\rthe match goal{sep}a\rbank shares{sep}b\r")
        ex, _ = to_examples(read_table(p, "train", _cfg(format=fmt)), _cfg(format=fmt))
        assert ex.texts == ["the match goal", "bank shares"]
    p = _write(tmp_path, "mac_agnews.csv", '"3","Wall St.","shares up"\r"2","Cup","goal"\r')
    ex, _ = to_examples(read_table(p, "train", _cfg()), _cfg(label_names=AG_NEWS_LABELS))
    assert ex.texts == ["Wall St. shares up", "Cup goal"] and list(ex.labels) == [2, 1]


@pytest.mark.parametrize("name", ["cr.tsv", "cr.csv"])
def test_a_carriage_return_inside_a_text_is_one_clear_line(tmp_path, name):
    sep = "\t" if name.endswith(".tsv") else ","
    p = _write(tmp_path, name, f'text{sep}label\nthe "match" goal{sep}a\nbank shares\rmore{sep}b\n')
    with pytest.raises(DataError, match=r"row 2 \(line 3\) has 1 fields.*carriage return") as e:
        load_splits(_cfg(train=p))
    assert "\n" not in str(e.value)


def test_a_blank_line_in_a_table_of_one_column_is_an_empty_text_not_skipped(tmp_path):
    """Texts to predict from a one-column CSV: a skipped blank line shifted every later
    prediction against its input row (predictions carry no row number)."""
    p = _write(tmp_path, "one.csv", "text\nthe match goal\n\nbank shares\n\n\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): empty text"):  # the header, a text, then the blank line
        table_texts(read_table(p, "input", _cfg()), ["text"])
    p = _write(tmp_path, "ok.csv", "\ntext\nthe match goal\nbank shares\n\n")  # blank lines around are no rows
    assert table_texts(read_table(p, "input", _cfg()), ["text"]) == ["the match goal", "bank shares"]
    p = _write(tmp_path, "two.csv", "text,label\na,x\n\nb,y\n")  # several columns: a blank line is no row
    assert table_texts(read_table(p, "train", _cfg()), ["text"]) == ["a", "b"]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("budget", [None, 600])
@pytest.mark.parametrize("accumulate", [2, 3])
def test_accumulation_micro_batches_are_the_fused_steps_split(group, budget, accumulate):
    """Unfused accumulation grouped each micro-batch on its own, so an optimizer step trained on
    rows of unrelated lengths where the fused step (one batch of batch_size x steps) trained on
    one group: a CPU and a GPU run of one config (fused on GPUs only) saw different steps. Now
    every ``accumulate`` consecutive micro-batches are one fused batch, split into equal parts."""
    lengths = np.random.default_rng(4).integers(3, 120, size=701)  # 701: a short last step remains
    kw = dict(batch_size=16, seed=5, group_by_length=group, mega=8, max_tokens=budget, accumulate=accumulate)
    fused, split = LengthGroupedBatchSampler(lengths, split=False, **kw), LengthGroupedBatchSampler(lengths, **kw)
    for epoch in (1, 2):
        fused.begin_epoch(epoch)
        split.begin_epoch(epoch)
        steps, parts = list(fused), list(split)
        assert len(steps) == fused.batches_in_epoch(epoch) == len(fused)
        assert len(parts) == split.batches_in_epoch(epoch) == len(split)
        assert sorted(i for b in parts for i in b) == list(range(701))
        # all steps but the last: `accumulate` micro-batches of equal rows, together the fused batch
        *full, last = steps
        assert all(len(s) % accumulate == 0 for s in full) and len(last) == 701 % accumulate
        regrouped = [sum(parts[j * accumulate : (j + 1) * accumulate], []) for j in range(len(full))]
        assert regrouped == full
        assert all(len({len(p) for p in parts[j * accumulate : (j + 1) * accumulate]}) == 1 for j in range(len(full)))
        assert sum(parts[len(full) * accumulate :], []) == last  # the short last step, one row per part
        if budget:
            assert all(len(p) * max(lengths[p]) <= budget for p in parts)
            assert all(len(s) * max(lengths[s]) <= budget * accumulate for s in steps)
        else:
            # batch_size rows, but for the data's last rows: one smaller group (shuffled in) and the short step
            odd = [len(p) for p in parts[: len(full) * accumulate] if len(p) != 16]
            assert len(odd) in (0, accumulate) and len(set(odd)) <= 1
    # one step per micro-batch: the grouping of a run without accumulation is unchanged
    one = LengthGroupedBatchSampler(lengths, batch_size=16, seed=5, group_by_length=group, mega=8, max_tokens=budget)
    assert list(one) == list(LengthGroupedBatchSampler(lengths, split=False, **{**kw, "accumulate": 1}))


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("budget", [None, 600])
@pytest.mark.parametrize("group", [True, False])
def test_every_process_trains_the_group_a_fused_run_gives_it(processes, budget, group):
    """With several processes the epoch's micro-batches were padded and dealt out one by one, so
    in an epoch's last step the processes of an unfused run trained other rows (a repeat of the
    first micro-batch, the short tail's rows at another weight) than those of a fused run."""
    lengths = np.random.default_rng(6).integers(3, 120, size=73)
    for accumulate in (2, 3):
        kw = dict(batch_size=4, seed=5, group_by_length=group, mega=8, max_tokens=budget, accumulate=accumulate,
                  processes=processes)
        fused, split = LengthGroupedBatchSampler(lengths, split=False, **kw), LengthGroupedBatchSampler(lengths, **kw)
        for epoch in (1, 2):
            fused.begin_epoch(epoch)
            split.begin_epoch(epoch)
            steps, parts = list(fused), list(split)
            assert len(steps) % processes == 0 and len(parts) == len(steps) * accumulate
            assert set(i for b in parts for i in b) == set(range(73))
            for q in range(processes):  # accelerate deals batches out in turn: process q's share
                mine, theirs = parts[q::processes], steps[q::processes]
                assert [sum(mine[j * accumulate : (j + 1) * accumulate], []) for j in range(len(theirs))] == theirs
                assert all(len({len(p) for p in mine[j * accumulate : (j + 1) * accumulate]}) == 1
                           for j in range(len(theirs)))
