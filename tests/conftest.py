"""Fixtures: tiny random-initialised encoders and tokenizers built here, and synthetic data.

Nothing touches the network: HF_HUB_OFFLINE makes any accidental hub access fail at once.
"""

from __future__ import annotations

import atexit
import gzip
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches (token ids) go to a fresh folder per test session, never the user's ~/.cache, and the
# folder goes when the session ends (one was left in /tmp by every run before).
os.environ["LORACLF_CACHE"] = tempfile.mkdtemp(prefix="loraclf-test-cache-")
atexit.register(shutil.rmtree, os.environ["LORACLF_CACHE"], ignore_errors=True)
# An empty Hub cache of the session's own, set before transformers is imported (it reads this
# once): no test sees the user's downloads, and hub_snapshot() fakes hub repositories in it.
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="loraclf-test-hub-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)
for legacy in ("TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE"):
    os.environ.pop(legacy, None)  # transformers 4 reads these before HF_HUB_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
KEYWORDS = [
    ["war", "minister", "election", "treaty", "embassy", "refugees"],
    ["match", "goal", "coach", "league", "season", "striker"],
    ["shares", "profit", "market", "merger", "investors", "bank"],
    ["software", "chip", "internet", "research", "robot", "space"],
]
FILLER = "the a of to in on for with at by from today new says report after over".split()


def make_rows(n: int, seed: int = 0) -> list[tuple[int, str, str]]:
    """(class 0-3, title, description): each text carries words of its class, so models learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = i % 4
        title = " ".join(rng.sample(KEYWORDS[c], 2) + rng.sample(FILLER, 2))
        desc = " ".join(rng.sample(FILLER, rng.randint(2, 9)) + rng.sample(KEYWORDS[c], rng.randint(1, 3)))
        rows.append((c, title.capitalize(), desc + "."))
    rng.shuffle(rows)
    return rows


def write_agnews_csv(path: Path, rows: list[tuple[int, str, str]]) -> Path:
    """The canonical AG News form: no header, every field quoted (inner quotes doubled), classes 1-4."""
    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    text = "".join(f"{q(str(c + 1))},{q(t)},{q(d)}\n" for c, t, d in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _corpus() -> list[str]:
    words = sorted({w for ws in KEYWORDS for w in ws} | set(FILLER))
    return [" ".join(words)] + [f"{t} {d}" for _, t, d in make_rows(200, seed=1)]


def build_roberta(path: Path, num_layers: int = 4) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta's ids 0..4
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=128)
    fast.save_pretrained(path)
    config = RobertaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(path)
    return path


def build_bert(path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    fast.save_pretrained(path)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def hub_snapshot(repo_id: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """``folder`` as commit ``commit`` of hub model ``repo_id`` in the session's Hub cache, with
    ``ref`` (a branch or tag) pointing at it: what a download leaves, so that offline loads of
    ``repo_id`` resolve to it as they would online. Returns the repo's cache folder. The cache
    lives for the whole session: give each test a repo id of its own."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo


def bert_without_pooler(tiny_bert: Path, dest: Path) -> Path:
    """``tiny_bert`` saved without its pooler (add_pooling_layer=False): a checkpoint that lacks
    part of the model's own classification head (what DeBERTa's base checkpoints do)."""
    from transformers import BertModel

    shutil.copytree(tiny_bert, dest)
    for f in dest.glob("*.safetensors"):
        f.unlink()
    torch.manual_seed(0)
    BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def roberta_base_arch(tmp_path_factory) -> Path:
    """roberta-base's architecture (no weights): 12 layers, hidden 768, 12 heads, FFN 3072,
    vocab 50,265, 514 positions. Built on the meta device by the tests that count."""
    from transformers import RobertaConfig

    d = tmp_path_factory.mktemp("roberta-base-arch")
    RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return build_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def agnews_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("agnews")
    return {"train": write_agnews_csv(d / "train.csv.gz", make_rows(240, seed=2)),
            "test": write_agnews_csv(d / "test.csv", make_rows(80, seed=3))}


def tiny_overrides(model: Path, files: dict[str, Path], out: Path, **extra) -> dict:
    """Overrides that make any recipe a seconds-long run on a tiny model."""
    o = {"model.name_or_path": str(model), "data.train": str(files["train"]), "data.test": str(files["test"]),
         "data.validation_size": 0.2, "data.label_names": None, "lora.layers": None, "lora.r": 4, "lora.alpha": 8,
         "train.output_dir": str(out), "train.epochs": 2, "train.batch_size": 16,
         "train.gradient_accumulation_steps": 1, "train.learning_rate": 3e-2, "train.warmup_ratio": 0.1,
         "train.precision": "fp32", "train.log_every_steps": 2}
    o.update(extra)
    return o


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_roberta, agnews_files) -> Path:
    """One finished run shared by the read-only tests (evaluate, predict, run loading)."""
    from loraclf.config import load_config
    from loraclf.train import train

    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "agnews-seed.yaml",
                      tiny_overrides(tiny_roberta, agnews_files, out,
                                     **{"train.epochs": 12, "train.learning_rate": 1e-2}))
    train(cfg)
    return out
