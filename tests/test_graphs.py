"""StepGraphs' bookkeeping and the training loop's graph path, on CPU.

A real CUDA graph needs a GPU (bench/gpu_check.sh checks it there: graphed vs eager training on
the roberta-base architecture). Here a stand-in backend "replays" by running the recorded step
again into the captured output tensor — what a replay does — so the shape dispatch, the static
inputs, the in-place gradients and the loop's use of them are tested for real.
"""

import functools
import json

import fastapi.testclient as fastapi_testclient
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from loraclf.config import load_config
from loraclf.errors import ConfigError, TrainingError
from loraclf.graphs import StepGraphs
from loraclf.train import train
from test_train import SEED, _without_dropout


class Rerun:
    """Eager stand-in for CudaGraphBackend: capture records the step, replay re-runs it."""

    def __init__(self):
        self.captures = 0

    def eager(self, fn):
        return fn()

    def capture(self, fn):
        self.captures += 1
        out = fn()  # (a real capture executes nothing; running it here is harmless: a replay zeroes first)

        def replay():
            out.copy_(fn())

        return replay, out


class Refuses(Rerun):
    """A capture that fails the way a host synchronisation inside it does."""

    def capture(self, fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")


def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(0, -1))
    head = torch.nn.Linear(8, 3)
    params = [*model.parameters(), *head.parameters()]

    def step(b):
        logits = head(model[0](b["input_ids"]).mean(1))
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        loss.backward()
        return loss.detach()

    return params, step


def _batch(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 20, (rows, width), generator=g),
            "labels": torch.randint(0, 3, (rows,), generator=g)}


def test_step_graphs_match_eager_steps_shape_by_shape():
    params, step = _toy()
    ref_params, ref_step = _toy()
    backend = Rerun()
    graphs = StepGraphs(step, params, backend=backend, warmup=1)
    shapes = [(4, 6), (4, 6), (4, 8), (4, 6), (4, 6), (4, 8), (3, 6)]
    grad_ptrs = None
    for i, (rows, width) in enumerate(shapes):
        batch = _batch(rows, width, seed=i)
        loss = graphs(batch)
        for p in ref_params:
            p.grad = None
        ref_loss = ref_step(batch)
        assert torch.equal(loss, ref_loss), i
        for p, q in zip(params, ref_params):
            assert torch.equal(p.grad, q.grad), i
        ptrs = [p.grad.data_ptr() for p in params]
        assert grad_ptrs in (None, ptrs), "gradients must stay where a captured graph writes them"
        grad_ptrs = ptrs
    # (4,6) captured at its 2nd sighting, (4,8) at its 2nd, (3,6) seen once: eager
    assert backend.captures == len(graphs.graphs) == 2
    assert (graphs.eager_steps, graphs.replays) == (3, 4)


def test_step_graphs_cap_the_number_of_graphs():
    params, step = _toy()
    backend = Rerun()
    graphs = StepGraphs(step, params, backend=backend, warmup=0, max_graphs=1)
    for i, width in enumerate([5, 6, 6, 5]):
        graphs(_batch(2, width, seed=i))
    assert backend.captures == 1 and graphs.eager_steps == 2 and graphs.replays == 2


def test_failed_capture_is_one_clear_error():
    params, step = _toy()
    graphs = StepGraphs(step, params, backend=Refuses(), warmup=0)
    with pytest.raises(TrainingError, match=r"batch shape .*'input_ids': \(2, 5\).* failed \(CUDA error: operation "
                       r"not permitted when stream is capturing\)") as e:
        graphs(_batch(2, 5, seed=0))
    assert e.value.fix == "set --train.cuda_graphs false"


def _train_modes(tiny_roberta, agnews_files, tmp_path, monkeypatch, backend, modes, **extra):
    """One tiny training per ``train.cuda_graphs`` mode, graphs allowed on this CPU and captured
    through ``backend``, dropout off, lengths padded to 16 in every mode: {mode: (adapter, run.json)}."""
    import loraclf.train as t

    monkeypatch.setattr(t, "_cuda_graphs_unsupported", lambda: None)
    monkeypatch.setattr(t, "StepGraphs", functools.partial(StepGraphs, backend=backend))
    model = _without_dropout(tiny_roberta, tmp_path / "no-dropout")
    out = {}
    for mode in modes:
        run = tmp_path / str(mode)
        train(load_config(SEED, tiny_overrides(model, agnews_files, run, **{
            "train.cuda_graphs": mode, "lora.dropout": 0.0, "train.fuse_accumulation": True,
            # graphs round lengths to 16 by default: the run without them is told to
            **({"data.pad_to_multiple_of": 16} if mode is False else {}), **extra})))
        out[mode] = (load_file(run / "adapter" / "adapter_model.safetensors"),
                     json.loads((run / "run.json").read_text()))
    return out


@pytest.mark.parametrize("compiled,layers", [(False, None), (True, None), (False, [2, 3])],
                         ids=["eager-layers", "compiled-layers", "frozen-prefix"])
def test_training_with_graphs_equals_training_without(compiled, layers, tiny_roberta, agnews_files, tmp_path,
                                                      monkeypatch):
    """The loop's graph path (gradients zeroed inside the step, clipping inside, the optimizer
    eager) trains the same adapter as the plain loop with the same padding; with train.compile
    the captured step runs the compiled layers; with a frozen prefix it starts from the cached
    hidden states, fed through a static buffer."""
    from test_train import _spy_compile

    backend, compiled_blocks = Rerun(), _spy_compile(monkeypatch)
    runs = _train_modes(tiny_roberta, agnews_files, tmp_path, monkeypatch, backend, (False, True),
                        **{"train.compile": compiled, "train.epochs": 1 if compiled else 2,
                           "data.max_train_samples": 48 if compiled else 64, "lora.layers": layers,
                           "train.max_grad_norm": 0.05})  # small: clipping acts
    assert compiled_blocks == ([("RobertaLayer", True)] * 8 if compiled else [])  # 4 blocks, in each run
    (plain, plain_info), (graphed, graphed_info) = runs[False], runs[True]
    assert graphed_info["throughput"]["frozen_prefix_layers"] == (2 if layers else 0)
    assert backend.captures > 0 and plain_info["throughput"]["cuda_graphs"] is None
    summary = graphed_info["throughput"]["cuda_graphs"]
    assert summary["replays"] > 0 and summary["graphs"] == backend.captures and summary["disabled"] is None
    for k in graphed:
        torch.testing.assert_close(graphed[k], plain[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in graphed.items() if "lora_B" in k)


def test_graphs_refused_on_cpu_before_anything_is_written(tiny_roberta, agnews_files, tmp_path):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r", **{"train.cuda_graphs": True}))
    with pytest.raises(ConfigError, match="needs one CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra,expected", [
    ({"train.compile": True, "train.compile_mode": "reduce-overhead"}, "records torch.compile's own CUDA graphs"),
    ({"train.compile": True, "train.compile_mode": "max-autotune"}, "records torch.compile's own CUDA graphs"),
    ({"train.fuse_accumulation": False, "train.gradient_accumulation_steps": 2}, "one optimizer step per batch"),
])
def test_graphs_config_conflicts(extra, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(SEED, {"train.cuda_graphs": True, **extra})


def test_failed_capture_falls_back_to_eager_when_not_strict():
    params, step = _toy()
    ref_params, ref_step = _toy()
    graphs = StepGraphs(step, params, backend=Refuses(), warmup=0, strict=False)
    for i, width in enumerate([5, 5, 6]):
        batch = _batch(2, width, seed=i)
        loss = graphs(batch)
        for p in ref_params:
            p.grad = None
        assert torch.equal(loss, ref_step(batch))
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, ref_params))
    summary = graphs.summary()
    assert summary["graphs"] == 0 and summary["eager_steps"] == 3
    assert "failed (CUDA error: operation not permitted" in summary["disabled"]


def test_auto_graphs_fall_back_and_say_so(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """train.cuda_graphs null where graphs apply: a model whose step cannot be captured trains
    eagerly (the same adapter as with graphs off) and run.json says why."""
    runs = _train_modes(tiny_roberta, agnews_files, tmp_path, monkeypatch, Refuses(), (None, False),
                        **{"train.epochs": 1, "data.max_train_samples": 48})
    (auto, auto_info), (off, off_info) = runs[None], runs[False]
    graphs = auto_info["throughput"]["cuda_graphs"]
    assert graphs["graphs"] == 0 and graphs["eager_steps"] == auto_info["optimizer_steps"]
    assert "failed (CUDA error" in graphs["disabled"]
    assert off_info["throughput"]["cuda_graphs"] is None
    for k in auto:
        assert torch.equal(auto[k], off[k])


def test_auto_graphs_stay_off_on_cpu(trained_run):
    # the session's shared run trained with the default (null) on this CPU: no graphs
    info = json.loads((trained_run / "run.json").read_text())
    assert info["device"] == "cpu" and info["throughput"]["cuda_graphs"] is None


def test_inference_graphs_give_the_same_logits(trained_run):
    """Predictor with CUDA graphs (stand-in capture): lengths padded to 16, each shape eager once,
    then replayed; the logits equal plain inference's, call after call."""
    from loraclf.predict import Predictor

    plain = Predictor.from_run(trained_run, precision="fp32", batch_size=8)
    backend = Rerun()
    graphed = _graphed(trained_run, backend)
    texts = [f"{w} shares rise after the match report number {i}" for i, w in enumerate(["bank", "team", "chip"] * 7)]
    expected = torch.from_numpy(plain.logits(texts))
    for _ in range(3):
        torch.testing.assert_close(torch.from_numpy(graphed.logits(texts)), expected, atol=1e-5, rtol=1e-4)
    assert backend.captures > 0 and graphed.graphs.replays > 0


def _graphed(trained_run, backend=None, batch_size=8):
    from loraclf.predict import Predictor, forward_graphs

    pred = Predictor.from_run(trained_run, precision="fp32", batch_size=batch_size)
    pred.graphs = forward_graphs(pred.model, pred.device, pred.precision, backend=backend or Rerun())
    return pred


def test_inference_graphs_round_every_batch_even_a_call_of_one_batch(trained_run):
    """The widest batch of a call was left at its longest row's length, so a call of one batch
    (one text, a server's micro-batch) never rounded: almost every call a new shape, few replays."""
    pred = _graphed(trained_run)
    words = "bank shares rise after the match report".split()
    for n in range(1, 15):
        pred.logits(" ".join(words[: n % 7 + 1]) + f" number {n}")
    widths = {key[0][1][1] for key in pred.graphs.seen}  # (("attention_mask", (B, T), dtype), ...)
    assert widths and all(w % 16 == 0 or w == pred.max_length for w in widths), widths
    assert pred.graphs.replays > pred.graphs.eager_steps
    # never past the model's longest input (position embeddings end there)
    long = " ".join(["shares"] * 400)
    pred.logits(long)
    assert max(key[0][1][1] for key in pred.graphs.seen) == pred.max_length


def test_a_predictor_with_graphs_can_be_shared_by_threads(trained_run):
    """Two threads predicting the same shape with other texts: one thread's batch was copied into
    the graph's inputs between the other's copy and replay, which then returned its logits."""
    import threading

    from loraclf.predict import Predictor

    plain = Predictor.from_run(trained_run, precision="fp32", batch_size=8)
    texts = {"a": ["bank shares rise after the report"] * 8, "b": ["the report rise after bank shares"] * 8}
    want = {k: plain.logits(v) for k, v in texts.items()}
    assert np.abs(want["a"] - want["b"]).max() > 1e-4
    pred = _graphed(trained_run)
    for k in ("a", "a", "b"):  # warm-up and capture of the one shape
        pred.logits(texts[k])
    wrong = {"a": 0, "b": 0}

    def work(k):
        for _ in range(150):
            wrong[k] += not np.allclose(pred.logits(texts[k]), want[k], atol=1e-5)

    threads = [threading.Thread(target=work, args=(k,)) for k in texts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert wrong == {"a": 0, "b": 0} and pred.graphs.replays >= 300


def test_a_prediction_with_graphs_keeps_other_threads_off_the_gpu_while_it_captures(trained_run, monkeypatch):
    """A capture refuses other threads' GPU calls: another thread's batch copies while one thread
    captured would have failed the capture (and stopped graphs). Now a whole prediction holds
    the graphs' lock, so the other thread waits before it even pads a batch."""
    import threading
    import time

    import loraclf.predict as lp

    events, capturing = [], threading.Event()

    class SlowCapture(Rerun):
        def capture(self, fn):
            capturing.set()
            time.sleep(0.3)
            try:
                return super().capture(fn)
            finally:
                capturing.clear()

    real = lp.PadCollator.__call__
    monkeypatch.setattr(lp.PadCollator, "__call__", lambda self, items: (
        events.append((threading.current_thread().name, capturing.is_set())), real(self, items))[1])
    pred = _graphed(trained_run, backend=SlowCapture())
    texts = ["bank shares rise after the report"] * 8
    pred.logits(texts)  # first sight: eager; the next call captures
    threads = [threading.Thread(target=pred.logits, args=(texts,), name=n) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert pred.graphs.replays >= 1 and len(pred.graphs.graphs) == 1
    assert not any(busy for _, busy in events), events


def test_a_failed_inference_capture_stops_graphs_and_their_rounding(trained_run):
    from loraclf.serve import create_app

    pred = _graphed(trained_run, backend=Refuses())
    texts = ["bank shares rise after the match report number 7"] * 3
    first = pred.logits(texts)
    np.testing.assert_allclose(pred.logits(texts), first, atol=1e-6)  # the failed capture ran it eagerly
    assert not pred.graphs.active and "capturing the step" in pred.graphs.disabled
    n = len(pred.graphs.seen)
    pred.logits(texts)
    assert len(pred.graphs.seen) == n  # no longer even asked: eager, unrounded
    with fastapi_testclient.TestClient(create_app(pred)) as c:
        info = c.get("/info").json()
    assert info["cuda_graphs"] is False and "capturing the step" in info["cuda_graphs_stopped"]


def test_cuda_graph_backend_works_on_the_step_s_gpu_not_the_current_one(monkeypatch):
    """Predictor(device="cuda:1") with cuda:0 current: the side stream and the capture were on
    cuda:0 while the kernels went to cuda:1, which records an empty graph (replays do nothing)."""
    import contextlib
    import types

    import loraclf.graphs as g

    current = {"device": 0}
    log = []

    class Stream:
        def __init__(self, device=None, priority=0):
            self.device = torch.device("cuda", current["device"]) if device is None else device
            log.append(("stream", self.device))

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def device(d):
        before, current["device"] = current["device"], d.index
        try:
            yield
        finally:
            current["device"] = before

    # torch.cuda.graph: its own default capture stream is one per process, made on the GPU current
    # at the first capture; a stream passed in is the one captured (and becomes the current one)
    default_capture_stream = Stream(torch.device("cuda", 0))

    @contextlib.contextmanager
    def graph(graph, pool=None, stream=None):
        log.append(("capture on", (stream or default_capture_stream).device.index))
        yield

    class CUDAGraph:
        def pool(self):
            return "pool"

        def replay(self):
            pass

    fake = types.SimpleNamespace(
        Stream=Stream, device=device, graph=graph, CUDAGraph=CUDAGraph, current_device=lambda: current["device"],
        current_stream=lambda d=None: log.append(("current stream of", d)) or Stream(d),
        stream=lambda s: device(s.device), set_stream=lambda s: None)
    monkeypatch.setattr(g.torch, "cuda", fake)
    backend = g.CudaGraphBackend(torch.device("cuda", 1))
    ran_on = []
    backend.eager(lambda: ran_on.append(current["device"]))
    backend.capture(lambda: torch.zeros(1))
    assert ran_on == [1] and current["device"] == 0
    assert ("stream", torch.device("cuda", 1)) in log and ("capture on", 1) in log
    assert ("capture on", 0) not in log
    assert all(d == torch.device("cuda", 1) for what, d in log if what == "current stream of")
    assert g.CudaGraphBackend().device == torch.device("cuda", 0)  # none given: the current one


def test_inference_graphs_refused_on_cpu_and_off_there_by_default(trained_run):
    from loraclf.predict import Predictor

    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device, not cpu") as e:
        Predictor.from_run(trained_run, precision="fp32", cuda_graphs=True)
    assert "auto or off" in e.value.fix
    assert Predictor.from_run(trained_run, precision="fp32").graphs is None


def test_inference_graphs_default_on_for_cuda_but_not_as_trained():
    """None (the default of Predictor, `loraclf predict` and `serve`): graphs on a CUDA device
    (3.5-3.9x the eager forward on an H200), never for as_trained, which must compute as
    training's evaluation did (unrounded lengths)."""
    from loraclf.predict import use_cuda_graphs

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_cuda_graphs(None, cuda) is True
    assert use_cuda_graphs(None, cuda, as_trained=True) is False
    assert use_cuda_graphs(None, cpu) is False and use_cuda_graphs(False, cpu) is False
    assert use_cuda_graphs(False, cuda) is False and use_cuda_graphs(True, cuda) is True
    assert use_cuda_graphs(True, cuda, as_trained=True) is True  # asked for: as asked
    with pytest.raises(ConfigError):
        use_cuda_graphs(True, cpu)

