"""The report of a run: one self-contained HTML page (figures inlined as base64 PNG) and the
same content as Markdown, written into the run directory as report.html and report.md.

What it shows: the summary (base model, classes, best epoch, device, wall time, throughput),
validation/test metrics from run.json, the trainable-parameter breakdown, the learning curve
and the per-epoch validation records, a per-class table, the confusion matrix and the most
confident mistakes, and the resolved config.

The per-class table, confusion matrix and mistakes are recomputed with :class:`Predictor`
(the one prediction path) on the run's test split when it has one, else on its validation
rows carved exactly as in training, capped at ``max_examples`` rows (a seeded sample).
When that data cannot be read (a hub dataset offline), the report says so and keeps the rest.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import plots
from .data import Examples, limit, load_eval_split, load_splits, same_data
from .errors import DataError, LoraclfError
from .evaluate import classification_metrics
from .predict import Predictor, softmax
from .runs import CONFIG_FILE, CURVE_FILE, METRICS_FILE, Run, open_run, write_text

HTML_FILE = "report.html"
MD_FILE = "report.md"
CONFUSION_FILE = "report_confusion.png"


@dataclass
class Analysis:
    """Predictions of the run on one split: metrics, the confusion matrix, the worst mistakes."""

    split: str
    source: str
    n: int
    n_total: int
    metrics: dict[str, Any]
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    precision: str = ""
    device: str = ""


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a torn last line of a crashed run
    except OSError:
        pass
    return records


def eval_examples(run: Run) -> tuple[str, str, Examples]:
    """(split, source, examples): the configured test split, else validation carved as in training."""
    d = run.cfg.data
    then = run.info.get("data") or {}
    if d.test is not None:
        examples = load_eval_split(d, d.test, run.label_names, int_labels=run.info.get("int_labels", True))
        _unchanged({"test": examples.fingerprint}, then, ("test",), d.test)  # type: ignore[attr-defined]
        return "test", d.test, examples
    splits = load_splits(d, run.label_names, need_test=False)
    _unchanged(splits.fingerprints, then, ("train", "validation"), d.validation or d.train)
    return "validation", d.validation or f"{d.train} (carved, seed {d.split_seed})", splits.validation


def _unchanged(now: dict[str, Any], then: dict[str, Any], roles: tuple[str, ...], where: str) -> None:
    """The report sets training's metrics beside an analysis computed now: on a data file that
    changed since, the two would disagree without saying why."""
    changed = [r for r in roles if r in then and not same_data(now.get(r), then[r])]
    if changed:
        raise DataError(f"the {' and '.join(changed)} data differs from the data the run was trained and tested on "
                        "(fingerprints in run.json)", where=where,
                        fix="restore the file, or measure other data with: loraclf evaluate RUN_DIR --data.test FILE")


def analyse(predictor: Predictor, examples: Examples, split: str, source: str, max_examples: int | None = 2000,
            top_mistakes: int = 10, seed: int = 0) -> Analysis:
    """Metrics and the most confident mistakes of ``predictor`` on (a seeded sample of) ``examples``."""
    n_total = len(examples)
    sample = limit(examples, max_examples, seed)
    t0 = time.perf_counter()
    probs = softmax(predictor.logits(sample.texts)) if len(sample) else np.zeros((0, len(predictor.label_names)))
    seconds = time.perf_counter() - t0
    pred = probs.argmax(-1) if len(sample) else np.zeros(0, dtype=np.int64)
    metrics = classification_metrics(sample.labels, pred, predictor.label_names)
    wrong = np.flatnonzero(pred != sample.labels)
    conf = probs[wrong, pred[wrong]] if len(wrong) else np.zeros(0)
    order = wrong[np.argsort(-conf, kind="stable")][:top_mistakes]
    names = predictor.label_names
    mistakes = [{"text": sample.texts[i], "true": names[int(sample.labels[i])], "predicted": names[int(pred[i])],
                 "confidence": float(probs[i, pred[i]]), "p_true": float(probs[i, sample.labels[i]])} for i in order]
    return Analysis(split, source, len(sample), n_total, metrics, mistakes, seconds, predictor.precision,
                    str(predictor.device))


class Written(NamedTuple):
    html: Path
    md: Path
    problem: str | None  # why the analysis is missing (the report says "Not computed"), or None


def write_report(run_dir: str | Path, *, info: dict[str, Any] | None = None, examples: Examples | None = None,
                 split: str | None = None, source: str | None = None, max_examples: int | None = 2000,
                 top_mistakes: int = 10, batch_size: int | None = None, precision: str | None = None) -> Written:
    """Write RUN_DIR/report.html and RUN_DIR/report.md; returns their paths and, when the
    analysis (metrics, confusion matrix, mistakes) could not be computed, why. Asked for by hand
    (``info`` None) where a report exists already, a missing analysis raises instead: the
    existing report is kept rather than replaced by one without its numbers.

    ``info`` replaces run.json's content (training passes its final record before marking the
    run complete); ``examples`` (with ``split``/``source``) spares re-reading the data.
    ``precision`` defaults to the one training evaluated with, and the model computes as
    training evaluated (``Predictor(as_trained=True)``; ``batch_size`` None = the run's
    ``train.eval_batch_size``): on the same rows the numbers are run.json's.
    """
    run = open_run(run_dir, allow_incomplete=info is not None)
    if info is not None:
        run.info = info
    analysis, problem = None, None
    try:
        if examples is None:
            split, source, examples = eval_examples(run)
        predictor = Predictor.from_run(run, batch_size=batch_size, precision=precision, as_trained=True)
        analysis = analyse(predictor, examples, split or "test", source or "", max_examples, top_mistakes,
                           run.cfg.data.split_seed)
    except LoraclfError as e:
        if info is None and (run.path / HTML_FILE).exists():
            # by hand (not at the end of training): a report saying "Not computed" must not
            # replace one that has the numbers; the user fixes the problem, or deletes the old report
            e.what += f" (no analysis, so the existing {HTML_FILE} and {MD_FILE} were kept)"
            e.args = (e.message,)
            raise
        problem = str(e)
    if analysis is not None:
        plots.confusion_matrix(analysis.metrics["confusion_matrix"], run.label_names, run.path / CONFUSION_FILE,
                               f"confusion matrix: {analysis.split} (n={analysis.n})")
    else:
        # a plot from an earlier report would sit beside a report that says it was not computed
        (run.path / CONFUSION_FILE).unlink(missing_ok=True)
    content = _Content(run, _read_records(run.path / METRICS_FILE), analysis, problem)
    html_path, md_path = run.path / HTML_FILE, run.path / MD_FILE
    write_text(html_path, content.html())
    write_text(md_path, content.markdown())
    return Written(html_path, md_path, problem)


# ----------------------------------------------------------------------------- content


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _Content:
    """The report as sections of (title, tables, images, paragraphs), rendered to HTML or Markdown."""

    def __init__(self, run: Run, records: list[dict[str, Any]], analysis: Analysis | None, problem: str | None):
        self.run, self.records, self.a, self.problem = run, records, analysis, problem
        self.info = run.info

    # -- pieces shared by both renderings
    def summary(self) -> list[tuple[str, str]]:
        i, tp = self.info, self.info.get("throughput") or {}
        params = i.get("params") or {}
        rows = [("run", str(self.run.path)), ("status", str(i.get("status"))),
                ("base model", str(i.get("base_model") or self.run.cfg.model.name_or_path)),
                ("classes", ", ".join(self.run.label_names)),
                ("trainable parameters", f"{_num(params.get('trainable'))} of {_num(params.get('total'))} "
                                         f"(budget {self.run.cfg.train.max_trainable_params:,})"),
                ("best epoch", f"{_num(i.get('best_epoch'))} of {self.run.cfg.train.epochs}"
                               + (f" (stopped early after epoch {i['stopped_early_at_epoch']}: "
                                  f"early_stopping_patience {self.run.cfg.train.early_stopping_patience})"
                                  if i.get("stopped_early_at_epoch") else "")),
                ("optimizer steps", _num(i.get("optimizer_steps"))),
                ("rows", ", ".join(f"{k} {_num(v)}" for k, v in (i.get("rows") or {}).items())),
                ("device / precision", f"{i.get('device', '–')} / {i.get('precision', '–')}"),
                ("wall time", _duration(i.get("wall_time_s"))),
                ("training time", _duration(tp.get("train_seconds"))),
                ("training throughput", f"{_num(tp.get('train_examples_per_s'), 1)} examples/s, "
                                        f"{_num(tp.get('train_tokens_per_s'), 1)} tokens/s")]
        if self.a is not None and self.a.seconds > 0:
            rows.append(("inference throughput", f"{self.a.n / self.a.seconds:,.1f} texts/s ({self.a.n:,} texts, "
                                                 f"{self.a.device}, {self.a.precision}, as training evaluated: LoRA not merged)"))
        seed = i.get("seed")
        if seed is not None:
            rows.append(("seed", str(seed)))
        return rows

    def metrics_table(self) -> tuple[list[str], list[list[str]]]:
        rows = []
        for split, m in (self.info.get("metrics") or {}).items():
            if m:
                rows.append([split, _pct(m.get("accuracy")), _num(m.get("macro_f1")), _num(m.get("loss")),
                             _num(m.get("n"))])
        return ["split", "accuracy", "macro-F1", "loss", "n"], rows

    def params_tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        p = self.info.get("params") or {}
        if not p:
            return []
        total, trainable = p.get("total") or 0, p.get("trainable") or 0
        budget = self.run.cfg.train.max_trainable_params
        overview = [["total", _num(total), ""], ["trainable", _num(trainable),
                                                 f"{100 * trainable / total:.3f} % of total, "
                                                 f"{100 * trainable / budget:.1f} % of budget" if total else ""],
                    ["LoRA", _num(p.get("lora_total")), ""], ["head", _num(p.get("head_total")), ""]]
        out = [("overview", ["", "parameters", ""], overview)]
        if p.get("lora"):
            out.append(("LoRA by module", ["module", "parameters"], [[k, _num(v)] for k, v in p["lora"].items()]))
        if p.get("head"):
            out.append(("head", ["module", "parameters"], [[k, _num(v)] for k, v in p["head"].items()]))
        return out

    def epochs_table(self) -> tuple[list[str], list[list[str]]]:
        rows = [[_num(r.get("epoch")), _num(r.get("step")), _num(r.get("loss")), _pct(r.get("accuracy")),
                 _num(r.get("macro_f1")), r.get("split", "")]
                for r in self.records if r.get("event") == "eval"]
        return ["epoch", "step", "loss", "accuracy", "macro-F1", "split"], rows

    def per_class_table(self) -> tuple[list[str], list[list[str]]]:
        assert self.a is not None
        rows = [[n, _num(m["precision"]), _num(m["recall"]), _num(m["f1"]), _num(m["support"])]
                for n, m in self.a.metrics["per_class"].items()]
        return ["class", "precision", "recall", "F1", "support"], rows

    def confusion_table(self) -> tuple[list[str], list[list[str]]]:
        assert self.a is not None
        names = self.run.label_names
        return (["true \\ predicted", *names],
                [[n, *[_num(v) for v in row]] for n, row in zip(names, self.a.metrics["confusion_matrix"])])

    def mistakes_table(self) -> tuple[list[str], list[list[str]]]:
        assert self.a is not None
        return (["#", "text", "true", "predicted", "confidence", "p(true)"],
                [[str(k + 1), _short(m["text"]), m["true"], m["predicted"], _pct(m["confidence"]), _pct(m["p_true"])]
                 for k, m in enumerate(self.a.mistakes)])

    def analysis_caption(self) -> str:
        a = self.a
        assert a is not None
        sampled = f"a seeded sample of {a.n:,} of {a.n_total:,} rows" if a.n < a.n_total else f"all {a.n:,} rows"
        return (f"Recomputed with the saved adapter, as training evaluated, on the {a.split} split ({a.source}), {sampled}: "
                f"accuracy {_pct(a.metrics['accuracy'])}, macro-F1 {a.metrics['macro_f1']:.4f}.")

    def config_text(self) -> str:
        try:
            return (self.run.path / CONFIG_FILE).read_text(encoding="utf-8")
        except OSError:
            return json.dumps(self.run.cfg.to_dict(), indent=2)

    def title(self) -> str:
        return f"loraclf run report: {self.run.path.name}"

    def _image(self, name: str) -> str | None:
        p = self.run.path / name
        return base64.b64encode(p.read_bytes()).decode("ascii") if p.is_file() else None

    # -- HTML
    def html(self) -> str:
        e = html.escape
        out = io.StringIO()
        w = out.write
        w(f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(self.title())}</title>\n"
          f"<style>{_CSS}</style></head><body>\n<h1>{e(self.title())}</h1>\n")
        w(f"<p class=\"muted\">generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>\n<h2>Summary</h2>\n")
        w(_html_table(["", ""], [list(r) for r in self.summary()], header=False))
        w("<h2>Metrics</h2>\n<p>Best epoch chosen on validation accuracy; test evaluated with the best epoch's "
          "weights only.</p>\n")
        w(_html_table(*self.metrics_table()))
        w("<h2>Trainable parameters</h2>\n")
        for caption, head, rows in self.params_tables():
            w(f"<h3>{e(caption)}</h3>\n" + _html_table(head, rows))
        w("<h2>Learning curve</h2>\n")
        img = self._image(CURVE_FILE)
        w(f'<img alt="learning curve" src="data:image/png;base64,{img}">\n' if img else "<p>no learning curve</p>\n")
        w(_html_table(*self.epochs_table()))
        if self.a is not None:
            w(f"<h2>Per class ({e(self.a.split)})</h2>\n<p>{e(self.analysis_caption())}</p>\n")
            w(_html_table(*self.per_class_table()))
            w("<h2>Confusion matrix</h2>\n<p>Rows: true class; columns: predicted class.</p>\n")
            img = self._image(CONFUSION_FILE)
            if img:
                w(f'<img alt="confusion matrix" src="data:image/png;base64,{img}">\n')
            w(_html_table(*self.confusion_table()))
            w(f"<h2>Most confident mistakes ({e(self.a.split)})</h2>\n")
            if self.a.mistakes:
                w(_html_table(*self.mistakes_table()))
            else:
                w("<p>No mistakes on these rows.</p>\n")
        else:
            w(f"<h2>Per class, confusion matrix, mistakes</h2>\n<p class=\"warn\">Not computed: "
              f"{e(self.problem or 'no evaluation data')}</p>\n")
        w(f"<h2>Config</h2>\n<pre>{e(self.config_text())}</pre>\n")
        versions = self.info.get("versions") or {}
        if versions:
            w("<h2>Versions</h2>\n" + _html_table(["", ""], [[k, str(v)] for k, v in versions.items()], header=False))
        w("</body></html>\n")
        return out.getvalue()

    # -- Markdown
    def markdown(self) -> str:
        out = io.StringIO()
        w = out.write
        w(f"# {self.title()}\n\n## Summary\n\n")
        w(_md_table(["", ""], [list(r) for r in self.summary()]))
        w("\n## Metrics\n\nBest epoch chosen on validation accuracy; test evaluated with the best epoch's "
          "weights only.\n\n")
        w(_md_table(*self.metrics_table()))
        w("\n## Trainable parameters\n")
        for caption, head, rows in self.params_tables():
            w(f"\n### {caption}\n\n" + _md_table(head, rows))
        w("\n## Learning curve\n\n")
        if (self.run.path / CURVE_FILE).is_file():
            w(f"![learning curve]({CURVE_FILE})\n\n")
        w(_md_table(*self.epochs_table()))
        if self.a is not None:
            w(f"\n## Per class ({self.a.split})\n\n{self.analysis_caption()}\n\n")
            w(_md_table(*self.per_class_table()))
            w(f"\n## Confusion matrix\n\nRows: true class; columns: predicted class.\n\n![confusion matrix]"
              f"({CONFUSION_FILE})\n\n")
            w(_md_table(*self.confusion_table()))
            w(f"\n## Most confident mistakes ({self.a.split})\n\n")
            w(_md_table(*self.mistakes_table()) if self.a.mistakes else "No mistakes on these rows.\n")
        else:
            w(f"\n## Per class, confusion matrix, mistakes\n\nNot computed: {self.problem or 'no evaluation data'}\n")
        w(f"\n## Config\n\n```yaml\n{self.config_text().rstrip()}\n```\n")
        return out.getvalue()


_CSS = """body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#1d1d1f}h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem;
text-align:left;vertical-align:top}th{background:#f5f5f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%}pre{background:#f5f5f7;padding:.8rem;overflow:auto}.muted{color:#6e6e73}.warn{color:#b00020}"""


def _is_number(s: str) -> bool:
    t = s.replace(",", "").replace(" %", "").replace("–", "")
    try:
        float(t)
        return bool(t)
    except ValueError:
        return False


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> str:
    """Numbers right-aligned in tables with a header; key/value tables (no header) stay left."""
    e = html.escape
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"n\">{e(c)}</td>" if header and _is_number(c) else f"<td>{e(c)}</td>"
                                    for c in r) + "</tr>")
    out.append("</table>\n")
    return "".join(out)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def _md_cell(s: str) -> str:
    """One line, Markdown's special characters escaped: a class named "<script>" or a text with
    "</td>" or "**" is shown as written, not rendered as HTML or emphasis by a viewer."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(s).split()))


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
