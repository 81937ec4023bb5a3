"""The ``loraclf`` command: argument parsing, printing and exit codes, nothing else.

Config keys are given as ``--section.key value`` (or ``--section.key=value``); they are
split off before argparse sees the command line, because no ordinary option has a dot in
its name, and validated together with the YAML file so every problem is reported at once.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config import SECTIONS, config_keys, load_config, parse_override_value
from .errors import ConfigError, DataError, LoraclfError

EXIT_USAGE = 2


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate ``--section.key value`` pairs from the other arguments."""
    rest: list[str] = []
    overrides: dict[str, Any] = {}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        head = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        if "." in head:
            if "=" in tok:
                key, raw = tok[2:].split("=", 1)
            elif i + 1 < len(argv):
                key, raw = tok[2:], argv[i + 1]
                i += 1
            else:
                problems.append(f"--{head} needs a value")
                i += 1
                continue
            if key.split(".", 1)[0] not in SECTIONS:
                problems.append(f"unknown section in '--{key}' (sections: {', '.join(SECTIONS)})")
            else:
                overrides[key] = parse_override_value(key, raw)
        else:
            rest.append(tok)
        i += 1
    if problems:
        raise ConfigError(problems, where="command line", fix="use --section.key value, e.g. --lora.r 8")
    return rest, overrides


def _keys_epilog() -> str:
    lines = ["config keys (override any with --section.key value):"]
    for key, desc, default in config_keys():
        lines.append(f"  --{key:<34} {desc} [default: {json.dumps(default)}]")
    return "\n".join(lines)


# what evaluate takes of the run's data settings: the test source and how to read it
EVALUATE_DATA_KEYS = ("data.test", "data.max_eval_samples", "data.format", "data.text_columns", "data.label_column",
                      "data.max_text_chars")


def _path(value: str) -> str:
    """A path option's value with ``~`` expanded: the shell leaves ``--output=~/x`` alone, and a
    path compared or written as ``~/x`` is another file than the one read as the home's ``x``
    (the --output = --input guard let a prediction replace its input)."""
    return value if value == "-" else os.path.expanduser(value)


def _count(value: str) -> int:
    """A parameter count as people write one: 1000000, 1_000_000, 1,000,000 or 1e6 (argparse's
    int refused the last three, the ones a budget is most often written as)."""
    text = value.strip()
    if "," in text:  # thousands separators only: "1,5" is no count (a decimal comma would read as 15)
        if not re.fullmatch(r"\d{1,3}(,\d{3})+", text):
            raise argparse.ArgumentTypeError(f"invalid count: {value!r} (commas only between groups of "
                                             "three digits, e.g. 1,000,000)")
        text = text.replace(",", "")
    text = text.replace("_", "")
    try:
        number = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count: {value!r} (e.g. 1000000 or 1e6)") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise argparse.ArgumentTypeError(f"invalid count: {value!r} is not a whole number")
    return int(number)


def _refuse_empty_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """An empty path ("$RUN" with RUN unset) means Path("."), so a run directory would be the working
    directory, --resume would start a new run, --input would read stdin: one check for every path option."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is _path and isinstance(value, str) and not value.strip():
            name = action.option_strings[0] if action.option_strings else action.metavar
            what = "the run directory" if action.metavar == "RUN_DIR" else "a file name"
            raise ConfigError([f"{name} is empty"], where="command line",
                              fix=f"give {name} {what}" + (", or - for stdin" if name == "--input" else ""))


def _unicode(encoding: str | None) -> bool:
    """Whether ``encoding`` can write every character (a Windows console or cp1252 pipe cannot)."""
    import codecs

    try:
        return codecs.lookup(encoding or "utf-8").name.startswith("utf")
    except LookupError:
        return False


_CUDA_GRAPHS_HELP = ("replay each batch shape's forward from a CUDA graph once the shape has been seen "
                     "(auto: on a CUDA GPU; on: insist, an error elsewhere; off: every batch eager)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraclf", description="LoRA text classifiers under a trainable-parameter budget.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a classifier; writes a run directory", epilog=_keys_epilog(),
                       formatter_class=fmt)
    t.add_argument("--config", type=_path, help="YAML recipe (e.g. configs/agnews-seed.yaml)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--resume", type=_path, metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")

    c = sub.add_parser("params", help="count trainable parameters of a config (no weights loaded)",
                       epilog=_keys_epilog(), formatter_class=fmt)
    c.add_argument("--config", type=_path, help="YAML recipe")
    c.add_argument("--json", action="store_true", help="machine-readable output")

    pl = sub.add_parser(
        "plan", help="list head + LoRA configurations that fit a parameter budget; write one as a config",
        description="Enumerates heads, adapted modules (attention q/k/v/output, FFN in/out), layer sets and ranks "
                    "(uniform, or one for attention and one for FFN via rank_pattern) that fit --budget, counted "
                    "exactly on the meta device. Ranked by breadth (adapted layer x module sites), then budget "
                    "use, then simplicity. --write turns one into a YAML config for loraclf train.",
        epilog="base config keys may be overridden with --section.key value (e.g. --model.name_or_path)",
        formatter_class=fmt)
    pl.add_argument("--config", type=_path, help="base YAML recipe: its model, data and train sections are kept")
    pl.add_argument("--budget", type=_count, help="trainable-parameter budget [default: train.max_trainable_params]")
    pl.add_argument("--top", type=int, default=10, help="show the best N (0 = all) [default: 10]")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--write", type=_path, metavar="FILE", help="write the chosen configuration as a YAML config")
    pl.add_argument("--pick", type=int, help="which one --write writes, by rank in the table [default: 1]")
    pl.add_argument("--overwrite", action="store_true", help="let --write replace an existing file")
    pl.add_argument("--heads", default="linear,mean,lowrank:16,default",
                    help="heads to consider, comma-separated; lowrank:K = rank K [default: %(default)s]")
    pl.add_argument("--min-rank", type=int, default=4, help="smallest LoRA rank considered [default: 4]")
    pl.add_argument("--max-rank", type=int, default=64, help="largest LoRA rank considered [default: 64]")

    e = sub.add_parser("evaluate", help="metrics of a run on its test split or any --data.test",
                       epilog="data keys accepted: " + ", ".join(f"--{k}" for k in EVALUATE_DATA_KEYS))
    e.add_argument("run_dir", metavar="RUN_DIR", type=_path)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="default: the precision the run trained in, whose metrics run.json holds")
    e.add_argument("--max-tokens", type=int, default=None,
                    help="also cap each batch at this many padded tokens (rows x longest row)")
    e.add_argument("--checkpoint", action="store_true",
                    help="use an unfinished run's newest checkpoint (its best epoch so far)")

    pr = sub.add_parser("predict", help="classify texts with a run")
    pr.add_argument("run_dir", metavar="RUN_DIR", type=_path)
    pr.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (else --input, else stdin)")
    pr.add_argument("--input", type=_path, help="file (- for stdin): one text per line (.txt, .txt.gz), or CSV/TSV/JSONL/Parquet "
                                    "(optionally .gz) with a text column")
    # one column per flag (repeat it for more): a list-taking flag swallowed a RUN_DIR written after it
    pr.add_argument("--text-column", action="append", default=None, metavar="COLUMN",
                    help="column holding the text in CSV/TSV/JSONL/Parquet input; repeat for several, joined with a "
                         "space as in training (default: the run's data.text_columns)")
    pr.add_argument("--output", type=_path, help="write here instead of stdout")
    pr.add_argument("--format", choices=["jsonl", "csv"], default=None,
                    help="output format (default: csv for an --output named .csv, else jsonl)")
    pr.add_argument("--top-k", type=int, default=1)
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    pr.add_argument("--max-tokens", type=int, default=None,
                    help="also cap each batch at this many padded tokens (rows x longest row)")
    pr.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help=_CUDA_GRAPHS_HELP)
    pr.add_argument("--checkpoint", action="store_true",
                    help="use an unfinished run's newest checkpoint (its best epoch so far)")

    sv = sub.add_parser("serve", help="HTTP service and web page for a run (FastAPI + uvicorn)",
                        description="POST /predict, GET /health, GET /info, the page at /, the schema at "
                                    "/openapi.json. Ctrl-C or SIGTERM: finish open requests, then stop (exit 0); "
                                    "Ctrl-C again: stop now, answering waiting requests 503 (exit 130).")
    sv.add_argument("run_dir", metavar="RUN_DIR", type=_path)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="0 picks a free port [default: 8000]")
    sv.add_argument("--no-micro-batching", action="store_true", help="answer requests one at a time")
    sv.add_argument("--max-batch", type=int, default=64, help="most texts in one micro-batch")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a micro-batch")
    sv.add_argument("--max-texts", type=int, default=256, help="most texts in one request")
    sv.add_argument("--max-text-chars", type=int, default=10_000, help="longest text, in characters")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body")
    sv.add_argument("--body-timeout", type=int, default=30,
                    help="seconds a request's headers, then its body, may take to arrive (a stalled client is "
                         "dropped; 408 for a body)")
    sv.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    sv.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    sv.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help=_CUDA_GRAPHS_HELP)
    sv.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                    help="info and debug also log a line per request")
    sv.add_argument("--graceful-timeout", type=float, default=30,
                    help="seconds a stop waits for the requests already received (those left get 503)")

    rp = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained) and report.md")
    rp.add_argument("run_dir", metavar="RUN_DIR", type=_path)
    rp.add_argument("--max-examples", type=int, default=2000,
                    help="rows of the test (else validation) split used for the per-class table and mistakes")
    rp.add_argument("--top-mistakes", type=int, default=10, help="how many confident mistakes to list")
    rp.add_argument("--batch-size", type=int, default=None, help="default: the run's train.eval_batch_size")
    rp.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                    help="default: the precision training evaluated with")
    return p


# ----------------------------------------------------------------------------- commands


class _Bar:
    """tqdm progress bar fed by the training loop's callback."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def on_start(self, total_steps: int, info: dict[str, Any]) -> None:
        print(f"training {info['train_rows']:,} rows, {info['trainable']:,} trainable parameters, "
              f"{info['device']}, {info['precision']}" + (", CUDA graphs" if info.get("cuda_graphs") else ""),
              file=sys.stderr)
        if not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_step(self, step: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if "loss" in record:  # log steps only: reading the loss every step would stall a GPU
                post = {"loss": f"{record['loss']:.4f}"}
                if "examples_per_s" in record:
                    post["ex/s"] = f"{record['examples_per_s']:.1f}"
                self.bar.set_postfix(post, refresh=False)

    def on_eval(self, record: dict[str, Any]) -> None:
        msg = (f"epoch {record['epoch']} {record['split']}: accuracy {record['accuracy']:.4f} "
               f"macro-F1 {record['macro_f1']:.4f} loss {record['loss']:.4f} (n={record['n']})")
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr))(msg)


def cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from . import distributed
    from .train import resume, train

    resuming = args.resume is not None
    if resuming and (args.config or overrides):
        raise ConfigError(["--resume continues a run with its own saved config"], where="command line",
                          fix="drop --config and --section.key options when resuming")
    cfg = None if resuming else load_config(args.config, overrides)
    # one of several processes (accelerate launch): the main one alone shows progress and results
    procs = distributed.state()
    bar = _Bar(args.quiet)
    stop = threading.Event()
    first_signal: list[float] = []

    def request_stop(signum: int, frame: Any) -> None:
        if stop.is_set():
            # a second signal stops at once, without a checkpoint; but a launcher (torchrun) passes
            # Ctrl-C on to processes the terminal has sent it to already: the same request, once
            if procs.num_processes > 1 and time.monotonic() - first_signal[0] < 2.0:
                return
            raise KeyboardInterrupt
        first_signal.append(time.monotonic())  # before stop is set: a second signal may come at any bytecode
        stop.set()
        if procs.is_main_process:
            when = "the next step" if procs.num_processes == 1 else "the next step (all processes together)"
            print(f"\n{signal.Signals(signum).name}: writing a checkpoint at {when}, then stopping "
                  f"(send again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        callback = bar if procs.is_main_process else None
        result = resume(args.resume, callback, stop) if resuming else train(cfg, callback, stop)
    except KeyboardInterrupt:  # a second signal: stopped without a new checkpoint
        _resume_hint(Path(args.resume if resuming else cfg.train.output_dir))
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if bar.bar is not None:
            bar.bar.close()
    if not procs.is_main_process:
        return 0
    print(f"run: {result.run_dir}")
    print(f"best epoch {result.best_epoch}: validation accuracy {result.validation['accuracy']:.4f}, "
          f"macro-F1 {result.validation['macro_f1']:.4f}")
    if result.test is not None:
        print(f"test (best epoch): accuracy {result.test['accuracy']:.4f}, macro-F1 {result.test['macro_f1']:.4f} "
              f"(n={result.test['n']})")
    from .report import HTML_FILE

    report = Path(result.run_dir) / HTML_FILE
    print(f"report: {report}" if report.is_file() else "report: not written (see report_error in run.json)")
    return 0


def cmd_params(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from . import budget
    from .data import load_splits
    from .model import check_default_head, load_model_config

    cfg = load_config(args.config, overrides)
    names = cfg.data.label_names or load_splits(cfg.data, need_test=False).label_names
    config = load_model_config(cfg.model, names)
    b = budget.count(cfg, names, config)
    check_default_head(cfg.model, config)  # what train would refuse, though the count is right
    if args.json:
        within = b.trainable <= cfg.train.max_trainable_params
        print(json.dumps({**b.to_dict(), "budget": cfg.train.max_trainable_params, "within_budget": within}, indent=2))
        return 0 if within else 1  # the same exit code as the table: scripts test it
    budget_ = cfg.train.max_trainable_params
    head = cfg.model.head + (f" (rank {cfg.model.head_rank or 16})" if cfg.model.head == "lowrank" else "")
    print(f"model      {cfg.model.name_or_path} ({len(names)} classes, head: {head})")
    print(f"total      {b.total:>12,}")
    print(f"trainable  {b.trainable:>12,}  ({100 * b.trainable / budget_:.1f}% of budget {budget_:,})")
    print(f"  LoRA     {b.lora_total:>12,}")
    for k, v in b.lora.items():
        print(f"    {k:<30} {v:>10,}")
    print(f"  head     {b.head_total:>12,}")
    for k, v in b.head.items():
        print(f"    {k:<30} {v:>10,}")
    if not b.head_total:  # XLM, T5, BART: PEFT trains a head only by the names classifier and score
        print("    (PEFT trains none of this model's own head: it keeps the checkpoint's weights, random in a base "
              "model, which train refuses)")
    if b.trainable > budget_:
        print(f"OVER BUDGET by {b.trainable - budget_:,}")
        return 1
    return 0


def _plan_run_dir(write: str, base_dir: str) -> str:
    """A written plan trains into runs/<file stem> ("best.r8.yaml" and "best.r16.yaml" apart),
    never into its base recipe's run directory."""
    path = Path(write)
    stem = (path.stem if path.suffix.lower() in (".yaml", ".yml") else path.name) or "plan"
    out = f"runs/{stem}"
    same = Path(out).resolve() == Path(base_dir).expanduser().resolve()  # "/abs/runs/x" is "runs/x" here
    return f"{out}-plan" if same else out


def cmd_plan(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from . import budget as budget_mod
    from . import plan as planner
    from .data import load_splits
    from .errors import BudgetError

    cfg = load_config(args.config, overrides)
    budget = cfg.train.max_trainable_params if args.budget is None else args.budget
    heads = planner.distinct_heads(h.strip() for h in args.heads.split(",") if h.strip())
    if args.pick is not None and not args.write:
        raise ConfigError(["--pick chooses what --write writes; give --write FILE too"], where="command line")
    pick = 1 if args.pick is None else args.pick
    if args.top < 0 or pick < 1 or not heads:
        raise ConfigError(["--top must be >= 0, --pick >= 1 and --heads name at least one head"], where="command line",
                          fix="e.g. --top 10 --pick 1 --heads linear,mean")
    _check_output(args.write, "--write")
    if args.write and Path(args.write).exists():
        # it replaced any file silently, the base recipe given as --config included
        if args.config and Path(args.write).resolve() == Path(args.config).resolve():
            raise ConfigError([f"--write {args.write} is the --config file: the plan would replace its base recipe"],
                              where="command line", fix="write the plan to a new file")
        if not args.overwrite:
            raise ConfigError([f"--write {args.write} already exists"], where="command line",
                              fix="choose a new file, or add --overwrite to replace it")
    names = cfg.data.label_names or load_splits(cfg.data, need_test=False).label_names
    left_out = planner.unusable_heads(cfg, names, heads)
    if left_out and not (heads := tuple(h for h in heads if h not in left_out)):
        others = [h for h in ("linear", "mean", "lowrank", "default") if h not in left_out
                  and not planner.unusable_heads(cfg, names, (h,))]
        raise ConfigError([f"--heads {spec}: {why}" for spec, why in left_out.items()], where="command line",
                          fix=f"plan with --heads {','.join(others)}" if others else
                          "this model has no head loraclf can train; choose another model")
    arch, plans = planner.make_plans(cfg, names, budget, heads, args.min_rank, args.max_rank)
    if not plans:
        raise BudgetError(f"nothing fits a budget of {budget:,} with LoRA rank >= {args.min_rank}",
                          where="--budget", fix=planner.nothing_fits_fix(arch, budget, heads, args.min_rank,
                                                              cfg.lora.use_dora))
    shown = plans if args.top == 0 else plans[: args.top]
    written = None
    if args.write:
        if pick > len(plans):
            raise ConfigError([f"--pick {pick}: only {len(plans)} configurations fit"], where="command line")
        chosen = plans[pick - 1]
        out_dir = None if "train.output_dir" in overrides else _plan_run_dir(args.write, cfg.train.output_dir)
        new_cfg = planner.plan_config(cfg, chosen, budget, output_dir=out_dir)
        counted = budget_mod.count(new_cfg, names).trainable
        if counted != chosen.trainable:  # the analytic count must be the model's; never write a wrong one
            raise BudgetError(f"planner counted {chosen.trainable:,} but the model has {counted:,} trainable "
                              "parameters", where="plan", fix="report this as a loraclf bug")
        planner.write_config(new_cfg, args.write, chosen, source=args.config, rank=pick, of=len(plans))
        written = {"file": args.write, "pick": pick, "trainable": counted}
    if args.json:
        print(json.dumps({"model": cfg.model.name_or_path, "model_type": arch.model_type, "layers": arch.num_layers,
                          "num_labels": arch.num_labels, "budget": budget, "candidates": len(plans),
                          "heads": arch.heads, "heads_left_out": left_out, "modules_left_out": arch.left_out,
                          "plans": [{"pick": i + 1, **p.to_dict()} for i, p in enumerate(shown)],
                          "written": written}, indent=2))
        return 0
    print(f"model   {cfg.model.name_or_path} ({arch.model_type}, {arch.num_layers} layers, {arch.num_labels} classes)")
    print(f"budget  {budget:,}: {len(plans)} configurations fit; best {len(shown)} (breadth, then budget use)")
    print("heads   " + ", ".join(f"{k} {v:,}" for k, v in arch.heads.items()))
    for spec, why in left_out.items():
        print(f"        {spec} left out: {why}")
    print("modules " + ", ".join(f"{planner.ROLE_NAMES[s.role]}={s.path}" for s in arch.sites))
    for path, why in arch.left_out.items():
        print(f"        {path} left out: {why}")
    print()
    print(f"{'#':>3}  {'trainable':>11}  {'budget':>6}  {'head':<11} {'modules':<7} {'layers':<22} {'rank':<15}"
          f" {'sites':>5}")
    for i, p in enumerate(shown, 1):
        print(f"{i:>3}  {p.trainable:>11,}  {100 * p.fill:5.1f}%  {p.head_label:<11} {p.role_set:<7} "
              f"{p.layer_set:<22} {p.rank_label:<15} {p.adapted:>5}")
    if written:
        print(f"\nwrote {args.write}: #{pick}, {written['trainable']:,} trainable parameters "
              f"(train it: loraclf train --config {args.write})")
    return 0


def cmd_evaluate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .evaluate import evaluate_run

    bad = sorted(set(overrides) - set(EVALUATE_DATA_KEYS))
    if bad:
        raise ConfigError([f"evaluate does not take --{k}" for k in bad], where="command line",
                          fix=f"evaluate accepts {', '.join('--' + k for k in EVALUATE_DATA_KEYS)}")
    data = {k.split(".", 1)[1]: v for k, v in overrides.items()}
    _check_max_tokens(args)
    r = evaluate_run(args.run_dir, data, batch_size=args.batch_size, precision=args.precision,
                     from_checkpoint=args.checkpoint, max_tokens=args.max_tokens)
    _evaluation_output(args, r)
    if r.get("same_data_as_training_test") is False:
        print(f"loraclf evaluate: warning: {r['source']} changed since training tested the run on it (its content "
              "differs from run.json's data fingerprint): these metrics are not comparable to run.json's",
              file=sys.stderr)
    if r.get("plot_error"):
        print(f"loraclf evaluate: warning: confusion-matrix figure not drawn: {r['plot_error']}", file=sys.stderr)
    if r.get("save_error"):  # the metrics are printed; a read-only run cannot keep them
        print(f"loraclf evaluate: warning: metrics not saved: {r['save_error']}", file=sys.stderr)
    return 0


def _evaluation_output(args: argparse.Namespace, r: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(r, indent=2))
        return
    names = list(r["per_class"])
    print(f"{r['split']} split: {r['source']} (n={r['n']}, {r['precision']})")
    print(f"accuracy  {r['accuracy']:.4f}\nmacro-F1  {r['macro_f1']:.4f}\nloss      {r['loss']:.4f}\n")
    w = max(len(n) for n in names + ["class"])
    print(f"{'class':<{w}}  precision  recall      f1  support")
    for n, m in r["per_class"].items():
        prec, rec, f1 = ("-" if m[k] is None else f"{m[k]:.4f}" for k in ("precision", "recall", "f1"))
        print(f"{n:<{w}}  {prec:>9}  {rec:>6}  {f1:>6}  {m['support']:7d}")
    print("\nconfusion matrix (rows: true, columns: predicted)")
    cw = max(7, *(len(n) for n in names))
    print(" " * w + "  " + "  ".join(f"{n[:cw]:>{cw}}" for n in names))
    for n, row in zip(names, r["confusion_matrix"]):
        print(f"{n:<{w}}  " + "  ".join(f"{v:>{cw}d}" for v in row))


def _read_inputs(args: argparse.Namespace) -> list[str]:
    if args.texts and args.input:
        # "predict RUN --input in.txt out.jsonl" (a forgotten --output) classified the string "out.jsonl"
        raise ConfigError([f"texts given both as arguments ({args.texts[0]!r}, ...) and with --input {args.input}"],
                          where="command line", fix="give one of them (to write a file, use --output FILE)")
    from .data import decode_lines, is_lines_file, read_lines, split_lines

    tables = args.input and args.input != "-" and not (Path(args.input).is_dir() or is_lines_file(Path(args.input)))
    if args.text_column and not tables:
        # it was ignored in silence, as if the texts had been read from that column
        raise ConfigError([f"--text-column applies to CSV/TSV/JSONL/Parquet --input files, not to "
                           f"{'texts given as arguments' if args.texts else 'one text per line'}"],
                          where="command line", fix="drop --text-column")
    if args.texts:
        return list(args.texts)
    if args.input and args.input != "-":
        from .config import DataConfig
        from .data import read_table, table_texts

        path = Path(args.input)
        if not tables:
            return read_lines(path, "--input")
        columns = args.text_column or _run_text_columns(args.run_dir)
        table = read_table(str(path), "input", DataConfig(text_columns=columns), flag="--input",
                           format_fix="name the file .txt, .csv, .tsv, .jsonl or .parquet (optionally .gz)")
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(f"no column(s) {missing} (columns: {list(table.columns)})", where=str(path),
                            fix="name the text column(s) with --text-column")
        # the same row checks as training data: a null or number is an error, not the text "None"
        return table_texts(table, columns)
    if sys.stdin is None or (sys.stdin.isatty() and args.input != "-"):
        raise DataError("no texts given", where="predict", fix="pass texts as arguments, --input FILE, or pipe them on stdin")
    # bytes, decoded here: the locale's decoding either raised a traceback (strict) or let
    # undecodable bytes through as surrogates, depending on the machine
    raw = getattr(sys.stdin, "buffer", None)
    if raw is not None:
        return decode_lines(raw.read(), "stdin")
    return split_lines(sys.stdin.read().removeprefix("\ufeff"), "stdin")


def _part_of_run(run_dir: str, path: str) -> bool:
    """Is ``path`` one of the files a run is made of (or in one of its folders)? Other files in
    the run folder (``RUN_DIR/predictions.jsonl``) are the user's."""
    from . import runs
    from .checkpoint import CHECKPOINT_DIR
    from .report import CONFUSION_FILE, HTML_FILE, MD_FILE

    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except (OSError, ValueError):
        return False
    files = {runs.RUN_FILE, runs.CONFIG_FILE, runs.LABELS_FILE, runs.METRICS_FILE, runs.CURVE_FILE, runs.LOCK_FILE,
             runs.EXAMPLES_FILE, HTML_FILE, MD_FILE, CONFUSION_FILE}
    folders = {runs.ADAPTER_DIR, runs.TOKENIZER_DIR, runs.EVAL_DIR, CHECKPOINT_DIR}
    return bool(rel.parts) and (rel.parts[0] in folders or (len(rel.parts) == 1 and rel.name in files))


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or os.path.samefile(a, b)
    except OSError:  # the output does not exist yet
        return False


def _process_label(e: LoraclfError) -> str | None:
    """How an error line names the process: "" in the main (or only) one, " (process N)" in
    another of several (accelerate launch), None where the main process reports it already:
    its failures, stops, and the mistakes every process finds alike (configuration, budget, a
    loss that all of them sum). Data and model errors may be one process's own (a file missing
    on one machine), so those are said."""
    rank = int(os.environ.get("RANK") or 0)
    if rank == 0:
        return ""
    from .distributed import OtherProcessFailed
    from .errors import BudgetError, TrainingError
    from .train import Interrupted

    alike = (OtherProcessFailed, Interrupted, ConfigError, BudgetError, TrainingError)
    return None if isinstance(e, alike) else f" (process {rank})"


def _resume_hint(run_dir: Path) -> None:
    from .checkpoint import latest

    if (run_dir / "run.json").is_file() and latest(run_dir) is not None:
        print(f"stopped at once; resume from the last checkpoint with: loraclf train --resume {run_dir}", file=sys.stderr)


def _run_text_columns(run_dir: str) -> list[str]:
    """The text columns the run trained on. A run that cannot be read is reported as such: a
    mistyped RUN_DIR is not a problem with the input's columns."""
    from .runs import open_run

    return open_run(run_dir, allow_incomplete=True).cfg.data.text_columns


def _check_output(path: str | None, flag: str) -> None:
    """Fail before any work, not after it, when an output file cannot be written."""
    if path is None:
        return
    p = Path(path)
    parent = p.parent  # Path("o.jsonl").parent is Path(".")
    if p.is_dir():
        raise ConfigError([f"{flag} {path} is a directory"], where="command line", fix=f"give {flag} a file name")
    if p.exists() and not p.is_file():  # a device or pipe (/dev/stdout): written to as it is
        if not os.access(p, os.W_OK):
            raise ConfigError([f"{flag} {path} is not writable"], where="command line", fix=f"choose another {flag}")
        return
    if parent.exists() and not parent.is_dir():
        raise ConfigError([f"{flag} {path}: {parent} is a file, not a folder"], where="command line",
                          fix=f"choose another {flag}")
    if not parent.is_dir():
        raise ConfigError([f"{flag} {path}: folder {parent} does not exist"], where="command line",
                          fix=f"create {parent} first, or choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise ConfigError([f"{flag} {path}: folder {parent} is not writable"], where="command line",
                          fix=f"choose another {flag}")


def _write_output(path: str, text: str) -> None:
    from .runs import write_text

    write_text(path, text)  # the machine's failure (disk full, file too large): an OSError naming the file


# --cuda-graphs: Predictor's cuda_graphs (None: on where the predictor runs on a CUDA GPU)
_CUDA_GRAPHS = {"auto": None, "on": True, "off": False}


def cmd_predict(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .predict import Predictor

    if overrides:
        raise ConfigError([f"predict does not take --{k}" for k in overrides], where="command line",
                          fix="see loraclf predict --help")
    if args.top_k < 1:
        raise ConfigError([f"--top-k must be >= 1 (got {args.top_k})"], where="command line",
                          fix="give --top-k 1 (the label only) or more")
    if args.output and _part_of_run(args.run_dir, args.output):
        raise ConfigError([f"--output {args.output} is one of the run's own files: the predictions would replace it"],
                          where="command line", fix="write the predictions to another file")
    _check_output(args.output, "--output")
    if args.output and args.input and args.input != "-" and _same_file(args.output, args.input):
        raise ConfigError([f"--output {args.output} is the --input file: the predictions would replace the texts"],
                          where="command line", fix="write the predictions to another file")
    if args.format is None:  # "--output p.csv" wrote JSON lines into p.csv
        args.format = "csv" if args.output and args.output.lower().endswith(".csv") else "jsonl"
    texts = _read_inputs(args)
    if not texts:
        raise DataError("no texts to classify", where="stdin" if args.input in (None, "-") else args.input,
                        fix="give texts as arguments, a non-empty --input FILE, or lines on stdin")
    _check_max_tokens(args)
    predictor = Predictor.from_run(args.run_dir, batch_size=args.batch_size, precision=args.precision,
                                   from_checkpoint=args.checkpoint, max_tokens=args.max_tokens,
                                   cuda_graphs=_CUDA_GRAPHS[args.cuda_graphs])
    results = predictor.predict(texts, top_k=args.top_k)
    buf = io.StringIO()
    if args.format == "jsonl":
        # \u escapes where stdout cannot carry every character: still the same JSON, losslessly
        ascii_only = not args.output and not _unicode(getattr(sys.stdout, "encoding", None))
        for r in results:
            buf.write(json.dumps(r, ensure_ascii=ascii_only) + "\n")
    else:
        # --top-k > 1 adds the k best classes in order (the p_ columns have every class's probability)
        k = len(results[0]["top_k"]) if args.top_k > 1 else 0
        w = csv.writer(buf)
        w.writerow(["text", "label", *[f"p_{n}" for n in predictor.label_names],
                    *[c for i in range(1, k + 1) for c in (f"top{i}_label", f"top{i}_probability")]])
        for r in results:
            w.writerow([r["text"], r["label"], *[f"{r['probabilities'][n]:.6f}" for n in predictor.label_names],
                        *[v for t in r["top_k"][:k] for v in (t["label"], f"{t['probability']:.6f}")]])
    if args.output:
        _write_output(args.output, buf.getvalue())
        print(f"wrote {len(results)} predictions to {args.output}", file=sys.stderr)
    else:
        _to_stdout(buf.getvalue())
    return 0


def _to_stdout(text: str) -> None:
    """Write ``text`` to stdout so that a reader that went away (``| head``) is noticed: CPython's
    buffered stdout drops the rest of one large write the pipe took only part of, without an
    error, and the command exited 0; os.write raises BrokenPipeError for it (see main)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a captured or replaced stdout
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    view = memoryview(text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict"))
    while view:
        view = view[os.write(fd, view):]


def _no_overrides(command: str, overrides: dict[str, Any]) -> None:
    if overrides:
        raise ConfigError([f"{command} does not take --{k}" for k in overrides], where="command line",
                          fix=f"see loraclf {command} --help")


def cmd_serve(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .runs import open_run
    from .serve import MAX_WAIT_MS, Limits, build_app, listen, run_server

    _no_overrides("serve", overrides)
    bad = [f"--{k.replace('_', '-')} must be >= 1 (got {v})" for k, v in
           (("max_batch", args.max_batch), ("max_texts", args.max_texts), ("max_text_chars", args.max_text_chars),
            ("max_body_bytes", args.max_body_bytes), ("batch_size", args.batch_size),
            ("body_timeout", args.body_timeout)) if v < 1]
    if not 0 <= args.max_wait_ms <= MAX_WAIT_MS:  # also refuses nan and inf (inf would hang every request)
        bad.append(f"--max-wait-ms must be between 0 and {MAX_WAIT_MS:,} (got {args.max_wait_ms:g})")
    if not 0 <= args.port <= 65535:
        bad.append(f"--port must be 0-65535 (got {args.port})")
    if not 0 <= args.graceful_timeout < float("inf"):  # nan and inf too: inf would never stop
        bad.append(f"--graceful-timeout must be a number of seconds >= 0 (got {args.graceful_timeout:g})")
    if bad:
        raise ConfigError(bad, where="command line")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_text_chars=args.max_text_chars,
                    body_timeout_s=args.body_timeout)
    # The run and the address first: a typo or a taken port should fail in a second, not after
    # loading the model (clients that connect meanwhile wait in the backlog until the app is up).
    run = open_run(args.run_dir)
    sock = listen(args.host, args.port)
    try:
        app = build_app(run, micro_batching=not args.no_micro_batching, max_batch=args.max_batch,
                        max_wait_ms=args.max_wait_ms, limits=limits, batch_size=args.batch_size,
                        precision=args.precision, cuda_graphs=_CUDA_GRAPHS[args.cuda_graphs])
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    mode = "off" if args.no_micro_batching else f"max {args.max_batch} texts / {args.max_wait_ms:g} ms"

    def started() -> None:  # printed once the signal handlers are in place: a stop is graceful from here on
        print(f"serving {args.run_dir} on http://{shown}:{port}/ (micro-batching {mode}); Ctrl-C to stop", flush=True)

    def stopping(forced: bool) -> None:
        # os.write, not print: this runs in a signal handler, which may interrupt a print to stderr
        os.write(2, b"stopping now: waiting requests are answered 503\n" if forced else
                 b"stopping: finishing the requests already received (Ctrl-C again to stop now)\n")

    forced = run_server(app, sock, log_level=args.log_level, on_started=started, on_stopping=stopping,
                        graceful_timeout_s=args.graceful_timeout)
    print("stopped" + (" (forced)" if forced else ""), file=sys.stderr)
    return 130 if forced else 0


def _check_max_tokens(args: argparse.Namespace) -> None:
    bad = [f"--{k.replace('_', '-')} must be >= 1 (got {v})" for k, v in
           (("batch_size", args.batch_size), ("max_tokens", args.max_tokens)) if v is not None and v < 1]
    if bad:
        raise ConfigError(bad, where="command line")


def cmd_report(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .report import write_report

    _no_overrides("report", overrides)
    if args.max_examples < 1 or args.top_mistakes < 0 or (args.batch_size is not None and args.batch_size < 1):
        raise ConfigError(["--max-examples and --batch-size must be >= 1, --top-mistakes >= 0"], where="command line")
    written = write_report(args.run_dir, max_examples=args.max_examples, top_mistakes=args.top_mistakes,
                           batch_size=args.batch_size, precision=args.precision)
    print(f"wrote {written.html}")
    print(f"wrote {written.md}")
    if written.problem:  # the files say "Not computed"; the exit code says so too
        print(f"loraclf report: warning: no metrics, confusion matrix or mistakes: {written.problem}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"train": cmd_train, "params": cmd_params, "plan": cmd_plan, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "serve": cmd_serve, "report": cmd_report}


def _quiet_libraries() -> None:
    """Library chatter (weight-init notices, hub progress bars) hides the messages that matter.
    Tokenizer parallelism stays on: loraclf never forks after tokenizing, and one thread
    tokenizes AG News at ~9,200 texts/s here against ~14,500 with both cores (BENCHMARKS.md),
    time a GPU's prediction would otherwise wait for."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, a container stop) ends a command like Ctrl-C: exit 130 with
    one line, outputs whole or absent, instead of Python's silent default death (exit 143).
    ``train`` and ``serve`` install their own handlers for the time they run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _prog(command: str) -> str:
    return f"loraclf {command}" if command else "loraclf"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # the command names the error lines; an override's value ("--lora.r 0 params") is not it
    command = next((a for a in argv if a in COMMANDS), "")
    try:
        after_dashes: list[str] = []
        if command == "predict" and "--" in argv:
            # everything after "--" is a text, even "-5% ..." or "--data.x"
            cut = argv.index("--")
            argv, after_dashes = argv[:cut], argv[cut + 1:]
        rest, overrides = split_overrides(argv)
        args, extra = parser.parse_known_args(rest)
        command = args.command
        if args.command == "predict":
            if args.texts == ["-"] and args.input is None:  # "-": stdin, as for every Unix filter
                args.texts, args.input = [], "-"
            # argparse binds TEXT... before later options; texts after them arrive here.
            args.texts += [a for a in extra if not a.startswith("-")] + after_dashes
            extra = [a for a in extra if a.startswith("-")]
        if extra:
            hint = (f" (a text starting with '-' goes after '--': loraclf predict RUN_DIR -- {extra[0]})"
                    if args.command == "predict" else "")
            # the subcommand's usage, not "loraclf [-h] COMMAND ...": the options it names are the ones to check
            _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        _refuse_empty_paths(args, _subparser(parser, args.command))
        _quiet_libraries()
        if isinstance(sys.stdout, io.TextIOWrapper) and not _unicode(sys.stdout.encoding):
            # a text or class name the console's code page lacks: an escape, not a traceback
            sys.stdout.reconfigure(errors="backslashreplace")
        with _sigterm_interrupts():
            return COMMANDS[args.command](args, overrides)
    except LoraclfError as e:
        who = _process_label(e)
        if who is not None:
            # a stop the user asked for (Ctrl-C, SIGTERM: exit 130) is not an error
            print(f"{_prog(command)}{who}:{'' if e.exit_code == 130 else ' error:'} {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{_prog(command)}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): end quietly, as other Unix tools do
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE: what a shell reports for a tool the signal ended
    except OSError as e:  # disk full, permission denied while writing outputs
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{_prog(command)}: error: {e.strerror or e}{where}{_os_fix(e, command)}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Several processes (accelerate launch, torchrun): leave the process group before the
    interpreter exits. Left to finalization, gloo's worker threads can still hold tensors there
    and abort the process after a run that succeeded ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489), which failed two two-process tests in one CI run."""
    dist = sys.modules.get("torch.distributed")  # (never imported: nothing to leave)
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway: a failure here must not replace the exit code
            dist.destroy_process_group()


def _os_fix(e: OSError, command: str) -> str:
    """The way out of the machine's failures that have one."""
    again = "run it again" + (" (an interrupted training continues with --resume RUN_DIR)" if command == "train" else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f" — fix: free disk space, then {again}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return " — fix: make that folder writable, or write elsewhere"
    return ""


if __name__ == "__main__":
    sys.exit(main())
