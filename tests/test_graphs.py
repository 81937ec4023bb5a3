"""StepGraphs' bookkeeping and the training loop's graph path, on CPU.

A real CUDA graph needs a GPU (bench/gpu_check.sh checks it there: graphed vs eager training on
the roberta-base architecture). Here a stand-in backend "replays" by running the recorded step
again into the captured output tensor — what a replay does — so the shape dispatch, the static
inputs, the in-place gradients and the loop's use of them are tested for real.
"""

import functools
import json

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


def test_training_with_graphs_equals_eager(tiny_roberta, agnews_files, tmp_path, monkeypatch):
    """The loop's graph path (gradients zeroed inside the step, clipping inside, the optimizer
    eager) trains the same adapter as the plain loop with the same padding."""
    import loraclf.train as t

    backend = Rerun()
    monkeypatch.setattr(t, "_cuda_graphs_unsupported", lambda: None)
    monkeypatch.setattr(t, "StepGraphs", functools.partial(StepGraphs, backend=backend))
    model = _without_dropout(tiny_roberta, tmp_path / "no-dropout")
    weights = {}
    for graphed in (False, True):
        cfg = load_config(SEED, tiny_overrides(model, agnews_files, tmp_path / str(graphed), **{
            "train.cuda_graphs": graphed, "train.epochs": 2, "lora.dropout": 0.0, "data.max_train_samples": 64,
            "data.pad_to_multiple_of": 16 if not graphed else None,  # graphs pad to 16 when unset
            "train.fuse_accumulation": True, "train.max_grad_norm": 0.05}))  # small: clipping acts
        train(cfg)
        weights[graphed] = load_file(tmp_path / str(graphed) / "adapter" / "adapter_model.safetensors")
    assert backend.captures > 0
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights[True].items() if "lora_B" in k)


def test_graphs_refused_on_cpu_before_anything_is_written(tiny_roberta, agnews_files, tmp_path):
    cfg = load_config(SEED, tiny_overrides(tiny_roberta, agnews_files, tmp_path / "r", **{"train.cuda_graphs": True}))
    with pytest.raises(ConfigError, match="needs one CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra,expected", [
    ({"train.compile": True}, "cuda_graphs and compile are both on"),
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
    import loraclf.train as t

    monkeypatch.setattr(t, "_cuda_graphs_unsupported", lambda: None)
    monkeypatch.setattr(t, "StepGraphs", functools.partial(StepGraphs, backend=Refuses()))
    model = _without_dropout(tiny_roberta, tmp_path / "no-dropout")
    weights, infos = {}, {}
    for mode in (None, False):
        out = tmp_path / str(mode)
        cfg = load_config(SEED, tiny_overrides(model, agnews_files, out, **{
            "train.cuda_graphs": mode, "train.epochs": 1, "lora.dropout": 0.0, "data.max_train_samples": 48,
            "data.pad_to_multiple_of": 16, "train.fuse_accumulation": True}))
        train(cfg)
        weights[mode] = load_file(out / "adapter" / "adapter_model.safetensors")
        infos[mode] = json.loads((out / "run.json").read_text())
    graphs = infos[None]["throughput"]["cuda_graphs"]
    assert graphs["graphs"] == 0 and graphs["eager_steps"] == infos[None]["optimizer_steps"]
    assert "failed (CUDA error" in graphs["disabled"]
    assert infos[False]["throughput"]["cuda_graphs"] is None
    for k in weights[None]:
        assert torch.equal(weights[None][k], weights[False][k])


def test_auto_graphs_stay_off_on_cpu(trained_run):
    # the session's shared run trained with the default (null) on this CPU: no graphs
    info = json.loads((trained_run / "run.json").read_text())
    assert info["device"] == "cpu" and info["throughput"]["cuda_graphs"] is None
