"""Load test of ``loraclf serve``: N concurrent clients on loopback for a bounded time, with
micro-batching on and off against the same run; requests/s, p50/p90/p99 latency, errors.

Each client is a keep-alive HTTP/1.1 connection (raw asyncio streams: the load generator must
cost far less CPU than the service it measures) sending ``POST /predict {"text": ...}`` one
request after another, texts drawn from AG News (``../shared``, else made up). Requests that
start in the warm-up are not counted. The server is the real CLI in a subprocess:
``python -m loraclf.cli serve RUN --port 0 [--no-micro-batching]``.

Without ``--run``, a run is made first: the backbone (``--model``: ``roberta-tiny`` = the
roberta-base tokenizer with a 2-layer, hidden-64 encoder; ``roberta-base`` = the real
architecture with random weights; or a local model folder) is saved to a temporary folder
and trained for one short epoch with ``loraclf.train``.

    .venv/bin/python bench/load_test.py --model roberta-tiny --duration 10
    .venv/bin/python bench/load_test.py --run runs/agnews-seed --clients 64 --duration 30

On a GPU machine (``.bench`` carried, see ../shared/README.md), after the wheel install:

    python3 bench/load_test.py --model roberta-base --out "$OUT/load_test.json"

Writes bench/results/<name>.json and .md (``--out`` for another place).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py)

SRC = common.REPO_ROOT / "src"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a finished run directory (default: make one with --model)")
    p.add_argument("--model", default="roberta-tiny",
                   help="roberta-tiny | roberta-base (random weights) | a local model folder [default: %(default)s]")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per mode")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds per mode before measuring")
    p.add_argument("--modes", default="on,off", help="micro-batching modes to run, in order")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="the server's --cuda-graphs (auto: on a GPU since GPU check 4; off: as earlier load tests)")
    p.add_argument("--texts", type=int, default=2000, help="distinct texts to draw requests from")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as an error")
    p.add_argument("--name", default="load_test")
    p.add_argument("--out", help="JSON path (default bench/results/<name>.json)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- a run to serve


def request_texts(n: int, seed: int = 0) -> list[str]:
    csv = common.default_test_csv()
    if csv is not None:
        return [t for t, _ in common.shuffled_head(common.read_ag_news_csv(csv), n, seed)]
    rng = random.Random(seed)
    words = ("market shares profit league goal coach election minister chip software research space the a of "
             "to in on for with says report today after new").split()
    return [" ".join(rng.choices(words, k=rng.randint(8, 60))) for _ in range(n)]


def _roberta_dir() -> Path:
    for d in (common.SHARED_DIR / "models" / "roberta-base", common.CARRY_DIR / "models" / "roberta-base"):
        if (d / "config.json").is_file():
            return d
    raise SystemExit("roberta-base config/tokenizer not found in ../shared/models or .bench/models")


def build_backbone(kind: str, out: Path) -> Path:
    """Save a backbone with random weights (roberta-*) or return a local folder as is."""
    if kind not in ("roberta-tiny", "roberta-base"):
        if not Path(kind).is_dir():
            raise SystemExit(f"--model {kind}: not roberta-tiny, roberta-base or a folder")
        return Path(kind)
    import torch
    from transformers import AutoConfig, AutoTokenizer, RobertaModel

    src = _roberta_dir()
    config = AutoConfig.from_pretrained(src)
    if kind == "roberta-tiny":
        config.update({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                       "intermediate_size": 128})
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def make_run(model: Path, out: Path, precision: str) -> Path:
    """One short epoch of loraclf training, so the service loads a real run directory."""
    sys.path.insert(0, str(SRC))
    from loraclf.config import build_config
    from loraclf.train import train

    rows = request_texts(96, seed=1)
    labels = [i % 4 for i in range(len(rows))]
    train_csv = out / "train.csv"
    import csv as csv_mod

    with open(train_csv, "w", newline="", encoding="utf-8") as f:
        w = csv_mod.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(rows, labels))
    cfg = build_config({
        "model": {"name_or_path": str(model)},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"train": str(train_csv), "label_names": common.AG_NEWS_LABELS, "validation_size": 16,
                 "max_length": 256},
        "train": {"output_dir": str(out / "run"), "epochs": 1, "batch_size": 16, "precision": precision,
                  "max_trainable_params": 10_000_000, "log_every_steps": 1},
    })
    train(cfg)
    return out / "run"


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, run: Path, batching: bool, args: argparse.Namespace):
        cmd = [sys.executable, "-m", "loraclf.cli", "serve", str(run), "--port", "0", "--max-batch",
               str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--precision", args.precision,
               "--cuda-graphs", args.cuda_graphs, "--log-level", "error"]
        if not batching:
            cmd.append("--no-micro-batching")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line}{self.proc.stderr.read()}")
        url = line.split(" on ", 1)[1].split()[0].rstrip("/")
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(self.port)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)  # graceful: must exit 0 after draining
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return self.proc.returncode


# --------------------------------------------------------------------------- the clients


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, method: str, path: str,
                   body: bytes = b"") -> tuple[int, bytes]:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    writer.write(head + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    return status, await reader.readexactly(length)


async def _client(host: str, port: int, texts: list[str], seed: int, t_measure: float, t_end: float,
                  timeout: float, stats: dict[str, Any]) -> None:
    rng = random.Random(seed)
    reader = writer = None
    while time.perf_counter() < t_end:
        body = json.dumps({"text": rng.choice(texts)}).encode()
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            status, payload = await asyncio.wait_for(_request(reader, writer, host, "POST", "/predict", body), timeout)
            ok = status == 200 and "predictions" in json.loads(payload)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            ok, status = False, type(e).__name__
            if writer is not None:
                writer.close()
            reader = writer = None
        t1 = time.perf_counter()
        if t0 >= t_measure and t1 <= t_end:
            if ok:
                stats["latencies"].append(t1 - t0)
            else:
                stats["errors"] += 1
                stats["error_kinds"][str(status)] = stats["error_kinds"].get(str(status), 0) + 1
    if writer is not None:
        writer.close()


async def _get_json(host: str, port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        _, payload = await _request(reader, writer, host, "GET", path)
        return json.loads(payload)
    finally:
        writer.close()


async def load(host: str, port: int, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    stats: dict[str, Any] = {"latencies": [], "errors": 0, "error_kinds": {}}
    before = (await _get_json(host, port, "/info"))["micro_batching"]
    start = time.perf_counter()
    t_measure, t_end = start + args.warmup, start + args.warmup + args.duration
    await asyncio.gather(*(_client(host, port, texts, i, t_measure, t_end, args.timeout, stats)
                           for i in range(args.clients)))
    after = (await _get_json(host, port, "/info"))["micro_batching"]
    stats["server_batches"] = after["batches"] - before["batches"]
    stats["server_texts"] = after["texts"] - before["texts"]
    return stats


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _loop_factory():
    """uvloop where installed (the clients must not be the bottleneck), else asyncio's loop."""
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return None


def run_mode(run: Path, batching: bool, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    server = Server(run, batching, args)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            stats = runner.run(load(server.host, server.port, texts, args))
    finally:
        code = server.stop()
    lat = stats["latencies"]
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    return {
        "micro_batching": "on" if batching else "off",
        "clients": args.clients,
        "seconds": args.duration,
        "requests": len(lat),
        "requests_per_s": round(len(lat) / args.duration, 1),
        "p50_ms": ms(_pct(lat, 50)),
        "p90_ms": ms(_pct(lat, 90)),
        "p99_ms": ms(_pct(lat, 99)),
        "mean_ms": ms(sum(lat) / len(lat)) if lat else None,
        "errors": stats["errors"],
        "error_kinds": stats["error_kinds"] or None,
        "mean_batch": round(stats["server_texts"] / stats["server_batches"], 1) if stats["server_batches"] else None,
        "server_exit": code,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    texts = request_texts(args.texts)
    with tempfile.TemporaryDirectory(prefix="loraclf-load-") as tmp:
        if args.run:
            run, model_name = Path(args.run), f"run {args.run}"
        else:
            t0 = time.perf_counter()
            backbone = build_backbone(args.model, Path(tmp) / "model")
            run = make_run(backbone, Path(tmp), args.precision)
            model_name = args.model
            print(f"made a run on {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        records = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            r = run_mode(run, mode == "on", texts, args)
            r["model"] = model_name
            records.append(r)
            print(json.dumps(r), file=sys.stderr)
    by = {r["micro_batching"]: r for r in records}
    notes = [f"{args.clients} keep-alive clients on loopback, {args.warmup:g} s warm-up then {args.duration:g} s "
             f"measured per mode; one text per request (AG News test texts when available); server "
             f"`loraclf serve --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g} "
             f"--precision {args.precision} --cuda-graphs {args.cuda_graphs}`; load generator in the same machine "
             f"({'uvloop' if _loop_factory() else 'asyncio'} event loop)."]
    if "on" in by and "off" in by and by["off"]["requests_per_s"]:
        speedup = by["on"]["requests_per_s"] / by["off"]["requests_per_s"]
        for r in records:
            r["speedup_vs_off"] = round(r["requests_per_s"] / by["off"]["requests_per_s"], 2)
        notes.append(f"Micro-batching speed-up: {speedup:.2f}x requests/s.")
    jp, mp = common.write_results(
        args.name, records,
        ["model", "micro_batching", "clients", "requests", "requests_per_s", "speedup_vs_off", "p50_ms", "p90_ms",
         "p99_ms", "mean_batch", "errors", "server_exit"],
        title="loraclf serve: load test", notes="\n".join(notes), json_path=args.out)
    print(mp.read_text())
    print(f"wrote {jp} and {mp}", file=sys.stderr)
    return 0 if all(r["errors"] == 0 and r["server_exit"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
