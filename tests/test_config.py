from pathlib import Path

import pytest

from loraclf.config import Config, load_config, parse_override_value, save_config
from loraclf.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_seed_config_is_the_seed_recipe():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "agnews-seed.yaml")
    assert cfg.model.name_or_path == "roberta-base"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (12, 32, 0.06)
    assert cfg.lora.target_modules == ["query", "value"] and cfg.lora.layers == [0, 1, 5, 10, 11]
    t = cfg.train
    assert (t.learning_rate, t.scheduler, t.warmup_ratio) == (3e-4, "cosine", 0.15)
    assert (t.batch_size, t.gradient_accumulation_steps, t.eval_batch_size, t.epochs, t.seed) == (16, 2, 32, 6, 42)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(load_config(path), Config)


def test_overrides_apply_with_yaml_values():
    cfg = load_config(None, {"lora.r": parse_override_value("lora.r", "8"),
                             "lora.layers": parse_override_value("lora.layers", "[0,1,5]"),
                             "data.max_train_samples": parse_override_value("data.max_train_samples", "100")})
    assert cfg.lora.r == 8 and cfg.lora.layers == [0, 1, 5] and cfg.data.max_train_samples == 100


def test_string_fields_keep_text_as_typed():
    assert parse_override_value("model.name_or_path", "123") == "123"
    assert parse_override_value("data.test", "null") is None
    assert parse_override_value("lora.r", "null") is None


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: abc\n  rank: 3\ntrain:\n  precision: fp16\nbogus: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, {"train.epochs": 0})
    msg = str(e.value)
    assert len(e.value.problems) == 5, e.value.problems
    for fragment in ("lora.r", "unknown key 'lora.rank'", "train.precision", "unknown key 'bogus'", "train.epochs"):
        assert fragment in msg
    assert "\n" not in msg and str(p) in msg
    # the one key typed on the command line is named as an option, and the place says both
    assert "--train.epochs" in msg and f"{p} and command line" in msg


def test_switches_and_nulls_keep_their_booleans():
    cfg = load_config(None, {"model.trust_remote_code": True, "train.cuda_graphs": False, "data.token_cache": False,
                             "train.cache_frozen_prefix": None})
    assert cfg.model.trust_remote_code is True and cfg.train.cuda_graphs is False and cfg.data.token_cache is False


def test_semantic_checks():
    with pytest.raises(ConfigError, match="layer indices must be >= 0"):
        load_config(None, {"lora.layers": [-1]})
    with pytest.raises(ConfigError, match="repeat"):
        load_config(None, {"lora.layers": [1, 1]})
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config(None, {"lora.dropout": 1.5})


def test_bad_override_key_shape():
    with pytest.raises(ConfigError, match="--section.key"):
        load_config(None, {"lora.a.b": 1})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    # a key given twice: YAML kept the last, so a second `lora:` replaced the first in silence
    dup = tmp_path / "dup.yaml"
    dup.write_text("lora:\n  r: 4\n  target_modules: [query]\nlora:\n  r: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4: not valid YAML \(key 'lora' appears twice in one mapping\)"
                                          r".*keep one of the two"):
        load_config(dup)
    dup.write_text("model:\n  head: linear\n  head: default\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:3: .*key 'head' appears twice"):
        load_config(dup)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_save_load_roundtrip(tmp_path):
    cfg = load_config(None, {"lora.r": 4, "lora.layers": [0, 2], "data.label_names": ["a", "b"]})
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_evaluate_data_options_are_validated_with_their_names():
    from loraclf.config import DataConfig, data_config

    base = DataConfig(train="t.csv").model_dump()
    assert data_config(base, {"max_eval_samples": 5}).max_eval_samples == 5
    with pytest.raises(ConfigError) as e:
        data_config(base, {"max_eval_samples": 0, "format": "xml"})
    assert e.value.where == "command line" and len(e.value.problems) == 2
    assert "--data.max_eval_samples" in str(e.value) and "--data.format" in str(e.value)


@pytest.mark.parametrize("key,value,fragment", [
    ("train.seed", -1, "--train.seed"),
    ("train.seed", 2**32, "--train.seed"),
    ("data.split_seed", -1, "--data.split_seed"),
    ("data.validation_size", float("inf"), "--data.validation_size"),
    ("train.learning_rate", float("inf"), "--train.learning_rate"),
    ("lora.alpha", float("nan"), "--lora.alpha"),
    # an oversized rank overflowed inside PEFT (a TypeError traceback from `params`)
    ("lora.r", 10**20, "--lora.r: Input should be less than or equal to 1048576"),
    # true/false where a number is meant: pydantic read them as 1 and 0 (`r: on` trained with r 1)
    ("lora.r", True, "--lora.r: a number is expected, not true/false (got true)"),
    ("train.epochs", True, "--train.epochs: a number is expected"),
    ("data.validation_size", True, "--data.validation_size: a number is expected"),
    ("lora.layers", [True, 1], "--lora.layers: a number is expected, not true/false (got [true, 1])"),
    ("lora.rank_pattern", {"query": True}, "--lora.rank_pattern: a number is expected"),
    ("train.max_trainable_params", False, "--train.max_trainable_params: a number is expected"),
    # fewer than two class names: [] read as null, one name trained a one-class head
    ("data.label_names", [], "--data.label_names: 0 class name(s) []: a classifier needs at least two"),
    ("data.label_names", ["x"], "--data.label_names: 1 class name(s) ['x']"),
])
def test_out_of_range_numbers_are_refused_by_name(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert fragment in str(e.value) and "command line" in str(e.value)


def test_override_errors_blame_the_command_line_not_the_file(tmp_path):
    seed = Path(__file__).parents[1] / "configs" / "agnews-seed.yaml"
    for overrides, fragment in (({"lora.layers": []}, "--lora.layers: empty list"),
                                ({"lora.rank_pattern": {"query": 0}}, "--lora.rank_pattern"),
                                ({"data.label_names": ["a", "a"]}, "--data.label_names: names repeat"),
                                ({"model.head_rank": 8}, "head_rank applies only")):
        with pytest.raises(ConfigError) as e:
            load_config(seed, overrides)
        msg = str(e.value)
        assert fragment in msg and "command line" in msg and str(seed) not in msg, msg


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  # r: 8\ntrain:\n")
    assert load_config(p, {"lora.r": 4}).lora.r == 4
    assert load_config(p).train.seed == 42


def test_a_section_that_is_not_a_mapping_is_the_file_s_error_even_with_an_override(tmp_path):
    """``lora: 5`` in the file plus ``--lora.r 8`` was blamed on the command line ("'lora' is not
    a section; --lora: ..."): the file is what to correct."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: 5\n")
    for overrides in ({}, {"lora.r": 8}):
        with pytest.raises(ConfigError) as e:
            load_config(bad, overrides)
        msg = str(e.value)
        assert msg.startswith(f"{bad}: lora: Input should be a valid dictionary") and "command line" not in msg
    with pytest.raises(ConfigError, match=r"and command line: .*--train.epochs"):  # each blamed on its own source
        load_config(bad, {"lora.r": 8, "train.epochs": 0})


def test_yaml_merge_keys_are_not_duplicate_keys(tmp_path):
    """The duplicate-key check constructed '<<' as a key and refused every merge key."""
    f = tmp_path / "merge.yaml"
    f.write_text("lora:\n  rank_pattern: &rp {query: 16}\n  alpha_pattern: {<<: *rp, value: 8}\n")
    assert load_config(f).lora.alpha_pattern == {"query": 16, "value": 8}


def test_a_check_across_keys_the_file_fails_alone_is_the_file_s(tmp_path):
    """``head: linear`` + ``head_rank: 8`` in the file, with ``--model.name_or_path`` (the README's
    offline recipe) on the command line, was blamed on the command line."""
    f = tmp_path / "hr.yaml"
    f.write_text("model:\n  head: linear\n  head_rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, {"model.name_or_path": "somewhere"})
    msg = str(e.value)
    assert msg.startswith(f"{f}: model: head_rank applies only") and "command line" not in msg, msg
    f.write_text("model:\n  head: lowrank\n  head_rank: 8\n")  # the override makes the combination
    with pytest.raises(ConfigError, match=r"^command line: --model: head_rank applies only"):
        load_config(f, {"model.head": "linear"})


def test_a_list_as_a_yaml_key_is_one_line(tmp_path):
    f = tmp_path / "k.yaml"
    for text in ("{[a]: 1}\n", "lora:\n  ? [a, b]\n  : 1\n"):
        f.write_text(text)
        with pytest.raises(ConfigError, match="unhashable key"):  # a TypeError traceback before
            load_config(f)


def test_an_output_dir_under_the_home_folder(tmp_path, monkeypatch):
    """``output_dir: ~/runs/x`` made a folder named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  output_dir: ~/runs/x\n")
    assert load_config(f).train.output_dir == str(tmp_path / "runs" / "x")
    assert load_config(None, {"train.output_dir": "~/y"}).train.output_dir == str(tmp_path / "y")


def test_config_paths_that_are_no_regular_file(tmp_path):
    """A directory and /dev/null were both "config file not found"; --config <(...) (a pipe) too."""
    import os
    import threading

    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)
    assert load_config("/dev/null").lora.r == load_config(None).lora.r  # empty: every default
    fifo = tmp_path / "cfg"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("lora:\n  r: 5\n"), daemon=True)
    writer.start()
    assert load_config(fifo).lora.r == 5
    writer.join(10)


def test_a_config_that_is_not_utf8_says_so(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  r: 5\n", encoding="utf-16")  # what some Windows editors save
    with pytest.raises(ConfigError, match=r"not UTF-8 text .*save the file as UTF-8"):
        load_config(f)


def test_a_full_disk_writing_config_yaml_names_the_file(tmp_path, monkeypatch):
    """write() reports ENOSPC without a file name: the CLI's line said only "No space left on device"."""
    import errno

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        save_config(load_config(None), tmp_path / "config.yaml")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "config.yaml")
