"""Paired comparison of trained classifiers on the same test rows: is a gap real or noise?

The accuracy study reports mean ± std over seeds, and on a 1,000-row test subset the standard
error of one accuracy (~0.9 points near 90 %) dwarfs the gaps between methods. Every method is
scored on the *same* rows, though, so most of that sampling noise is shared: this script scores
each run row by row and compares methods on the per-row differences.

Inputs, each ``METHOD:SEED=PATH``:
  * a loraclf run folder: its adapter predicts every test row as ``loraclf evaluate`` does
    (``Predictor.from_run(..., as_trained=True)``: the run's precision, computed as training
    evaluated, so its accuracy is run.json's), kept in the run's ``eval/`` folder for reuse;
  * a ``.tsv`` written by ``bench/baseline_trainer.py --predictions-out`` (full fine-tuning):
    ``<row index>\\t<label>`` for every test row;
or ``--study DIR``: every ``<method>-seed<N>`` run folder and ``<method>-seed<N>.predictions.tsv``
that ``bench/accuracy_study.py`` left in its work folder.

For each method: accuracy per seed on all rows (and on the first ``--subset-rows``, to check a
rerun against an earlier subset study), mean ± std. For each ``--compare A:B`` (default: ``best``
against every other method): the difference per seed, its mean, a 95 % paired bootstrap
interval over test rows of the seed-averaged difference (``scipy.stats.bootstrap``; it captures test-set sampling, the seeds' own spread is in
the per-seed column), and McNemar's exact test per seed (``scipy.stats.binomtest`` on the rows
where exactly one of the two is right).

Writes bench/results/<name>.json (with every run's per-row predictions) and <name>.md.

    .venv/bin/python bench/paired.py --test ../shared/data/ag_news/test.csv.gz --name paired_x \\
        --study /tmp/loraclf-bench/study-x      # or --run best:0=<run folder> --run full:0=<tsv> ...
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import harness  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test", default=None, help="canonical AG News test CSV (default: shared test.csv.gz)")
    p.add_argument("--run", action="append", default=[], metavar="METHOD:SEED=PATH",
                   help="a loraclf run folder or a baseline_trainer --predictions-out TSV")
    p.add_argument("--study", action="append", default=[], metavar="DIR",
                   help="an accuracy_study.py work folder: every <method>-seed<N> run folder and "
                   "<method>-seed<N>.predictions.tsv in it")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="methods to compare, A minus B (default: best against every other method)")
    p.add_argument("--subset-rows", type=int, default=None, help="also score the first N test rows")
    p.add_argument("--batch-size", type=int, default=None, help="default: each run's train.eval_batch_size")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--name", required=True)
    p.add_argument("--out-dir", default=None, help="where results go (default bench/results)")
    return p.parse_args(argv)


def study_runs(folder: Path) -> list[str]:
    """``METHOD:SEED=PATH`` for the runs an accuracy study left in its work folder."""
    specs = []
    for path in sorted(folder.iterdir()):
        m = re.fullmatch(r"(.+)-seed(\d+)(\.predictions\.tsv)?", path.name)
        if m and (path.suffix == ".tsv" or (path / "run.json").is_file()):
            specs.append(f"{m[1]}:{m[2]}={path}")
    return specs


def _spec(s: str) -> tuple[str, int, Path]:
    try:
        key, path = s.split("=", 1)
        method, seed = key.rsplit(":", 1)
        return method, int(seed), Path(path)
    except ValueError:
        raise SystemExit(f"--run {s!r}: expected METHOD:SEED=PATH") from None


def predict_run(run_dir: Path, test: str, labels: np.ndarray, batch_size: int | None) -> np.ndarray:
    """Predicted class index per test row, [N] int64, from a loraclf run's adapter.

    Kept in the run's own ``eval/`` folder (where ``loraclf evaluate`` writes) as
    ``predictions_<test file>_<its sha256 prefix>.as_trained.tsv`` and read back on later calls:
    a rerun of the comparison with one more run does not predict the others again, and retraining
    replaces the folder. (Files without ``.as_trained`` came from merged bf16 inference: not reused.)
    """
    from loraclf.config import DataConfig
    from loraclf.data import file_fingerprint, load_eval_split

    digest = file_fingerprint(Path(test))["sha256"][:12]
    cached = run_dir / "eval" / f"predictions_{Path(test).name.removesuffix('.gz')}_{digest}.as_trained.tsv"
    if cached.is_file():
        return common.read_row_predictions(cached, len(labels))
    from loraclf.predict import Predictor
    from loraclf.runs import open_run

    run = open_run(run_dir)
    cfg = DataConfig.model_validate({**run.cfg.data.model_dump(), "test": test, "max_eval_samples": None})
    examples = load_eval_split(cfg, test, run.label_names)
    # the study's ground truth and loraclf's label encoding must be the same classes in the same order
    if not np.array_equal(examples.labels, labels):
        raise SystemExit(f"{run_dir}: loraclf's labels of {test} differ from the canonical 0-3 reading")
    predictor = Predictor.from_run(run, batch_size=batch_size, as_trained=True)  # in the run's precision
    pred = predictor.logits(examples.texts).argmax(-1).astype(np.int64)
    cached.parent.mkdir(exist_ok=True)
    common.write_row_predictions(cached, enumerate(pred.tolist()))
    return pred


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def compare(correct: dict[str, dict[int, np.ndarray]], a: str, b: str, resamples: int) -> dict[str, Any]:
    from scipy.stats import binomtest, bootstrap

    for m in (a, b):
        if m not in correct:
            raise SystemExit(f"--compare {a}:{b}: no run of method {m!r} (have {sorted(correct)})")
    seeds = sorted(set(correct[a]) & set(correct[b]))
    if not seeds:
        raise SystemExit(f"--compare {a}:{b}: no seed has both methods")
    per_seed, mcnemar = {}, {}
    for s in seeds:
        ca, cb = correct[a][s], correct[b][s]
        per_seed[s] = 100 * float(ca.mean() - cb.mean())
        only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
        p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        mcnemar[s] = {"only_a_right": only_a, "only_b_right": only_b, "p_value": float(p)}
    # per-row difference averaged over seeds: its mean is the seed-averaged accuracy gap
    d = np.mean([correct[a][s].astype(np.float64) - correct[b][s] for s in seeds], axis=0) * 100
    ci = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval
    return {"a": a, "b": b, "seeds": seeds, "difference_per_seed": per_seed, "mean_difference": float(d.mean()),
            "ci95_over_rows": [float(ci.low), float(ci.high)], "mcnemar": mcnemar}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    test = args.test or str(common.default_test_csv())
    labels = np.asarray([y for _, y in common.read_ag_news_csv(test)], dtype=np.int64)
    preds: dict[str, dict[int, np.ndarray]] = {}
    sources: dict[str, str] = {}
    specs = args.run + [spec for folder in args.study for spec in study_runs(Path(folder))]
    if not specs:
        raise SystemExit("nothing to compare: give --run or --study")
    for spec in specs:
        method, seed, path = _spec(spec)
        t0 = time.perf_counter()
        pred = common.read_row_predictions(path, len(labels)) if path.suffix == ".tsv" else predict_run(path, test, labels, args.batch_size)
        preds.setdefault(method, {})[seed] = pred
        sources[f"{method}:{seed}"] = str(path)
        harness.log(f"{method}:{seed}: accuracy {100 * (pred == labels).mean():.2f} % ({time.perf_counter() - t0:.0f} s)")
    correct = {m: {s: p == labels for s, p in by_seed.items()} for m, by_seed in preds.items()}

    methods = []
    for m, by_seed in correct.items():
        accs = {s: 100 * float(c.mean()) for s, c in sorted(by_seed.items())}
        rec: dict[str, Any] = {"method": m, "accuracy_per_seed": accs}
        rec["mean"], rec["std"] = _mean_std(list(accs.values()))
        if args.subset_rows:
            sub = {s: 100 * float(c[: args.subset_rows].mean()) for s, c in sorted(by_seed.items())}
            rec["subset_accuracy_per_seed"] = sub
            rec["subset_mean"], _ = _mean_std(list(sub.values()))
        methods.append(rec)
    pairs = [c.split(":", 1) for c in args.compare] or [["best", m] for m in correct if m != "best" and "best" in correct]
    comparisons = [compare(correct, a, b, args.resamples) for a, b in pairs]

    out_dir = Path(args.out_dir) if args.out_dir else common.BENCH_DIR / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"test": test, "rows": len(labels), "subset_rows": args.subset_rows, "methods": methods,
              "comparisons": comparisons, "sources": sources, "machine": common.machine_info(),
              # one digit per test row: the class index each run predicted
              "predictions": {f"{m}:{s}": "".join(map(str, p.tolist())) for m, by in preds.items() for s, p in by.items()}}
    (out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    md = _markdown(record)
    (out_dir / f"{args.name}.md").write_text(md + "\n")
    print(md)


def _fmt(x: float | None, sign: bool = False) -> str:
    return "—" if x is None else f"{x:+.2f}" if sign else f"{x:.2f}"


def _joined(xs: Any, sign: bool = False) -> str:
    return ", ".join(_fmt(x, sign) for x in xs)


def _markdown(rec: dict[str, Any]) -> str:
    sub = bool(rec["subset_rows"])
    lines = [f"Test rows: {rec['rows']:,} ({rec['test']})", "",
             "| method | accuracy, mean ± std | per seed |" + (f" first {rec['subset_rows']:,} rows: mean | per seed |" if sub else ""),
             "| --- | --- | --- |" + (" --- | --- |" if sub else "")]
    for m in rec["methods"]:
        row = f"| {m['method']} | {_fmt(m['mean'])} ± {_fmt(m['std'])} % | {_joined(m['accuracy_per_seed'].values())} |"
        if sub:
            row += f" {_fmt(m['subset_mean'])} % | {_joined(m['subset_accuracy_per_seed'].values())} |"
        lines.append(row)
    if rec["comparisons"]:
        lines += ["", "| A − B | per seed (points) | mean | 95 % CI over test rows | McNemar p per seed |",
                  "| --- | --- | --- | --- | --- |"]
        for c in rec["comparisons"]:
            lo, hi = c["ci95_over_rows"]
            ps = ", ".join(f"{v['p_value']:.3f}" for v in c["mcnemar"].values())
            lines.append(f"| {c['a']} − {c['b']} | {_joined(c['difference_per_seed'].values(), True)} | "
                         f"{_fmt(c['mean_difference'], True)} | [{_fmt(lo, True)}, {_fmt(hi, True)}] | {ps} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
