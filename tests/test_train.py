"""The trainer: determinism, resume after a kill, DDP replicas, checkpoints."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from seqgen.checkpoint import CheckpointError, latest_checkpoint, read_train_state, read_weights
from seqgen.config import RunConfig
from seqgen.task import build_task
from seqgen.train import lr_lambda, train

from conftest import tiny_digits_config


def curve(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r.get("train_loss")]


def run(cfg: dict, out: Path, **kw) -> dict:
    return train(RunConfig.from_dict(cfg), out, progress_bar=False, **kw)


def test_same_seed_same_loss_curve_for_20_steps(tmp_path):
    cfg = tiny_digits_config(paradigm={"name": "ar", "order": "random"}, backbone={"dropout": 0.1})
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert len(a) == 20 and a == b
    assert a[-1][1] < a[0][1]  # and it learns
    other = run(tiny_digits_config(seed=1), tmp_path / "c")
    assert curve(tmp_path / "c") != a and other["steps"] == 20


def test_stopped_and_resumed_run_lands_on_the_same_curve(tmp_path):
    cfg = tiny_digits_config(paradigm={"name": "ar", "order": "random"}, backbone={"dropout": 0.1},
                             train={"ema": 0.9})
    run(cfg, tmp_path / "full")
    run(cfg, tmp_path / "part", stop_after=10)
    assert curve(tmp_path / "part")[-1][0] == 10
    run(cfg, tmp_path / "part", resume=True)
    assert curve(tmp_path / "part") == curve(tmp_path / "full")
    wa = read_weights(latest_checkpoint(tmp_path / "full") / "model.safetensors")
    wb = read_weights(latest_checkpoint(tmp_path / "part") / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = read_weights(latest_checkpoint(tmp_path / "full") / "ema.safetensors")
    eb = read_weights(latest_checkpoint(tmp_path / "part") / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.slow
def test_killed_process_resumes_on_the_same_curve(tmp_path):
    """SIGKILL a real `seqgen train` between checkpoints; --resume must reproduce the uninterrupted curve."""
    cfg = tiny_digits_config(train={"steps": 400, "ckpt_every": 50, "batch_size": 32}, backbone={"dim": 48})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "seqgen.cli", "train", str(path), "--no-progress"]
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "logs" / "metrics.csv"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        rows = curve(tmp_path / "killed") if metrics.exists() else []
        if rows and rows[-1][0] >= 130:
            proc.send_signal(signal.SIGKILL)
            killed_at = rows[-1][0]
            break
        time.sleep(0.02)
    proc.wait()
    if killed_at is None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    assert killed_at < 400 and latest_checkpoint(tmp_path / "killed").name < "step_00000400"
    subprocess.run(cmd + ["--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True)
    assert curve(tmp_path / "killed") == curve(tmp_path / "full")


@pytest.mark.slow
def test_two_process_ddp_on_cpu_keeps_replicas_identical(tmp_path):
    from conftest import run_ddp

    cfg = tiny_digits_config(train={"steps": 6, "devices": 2, "strategy": "ddp", "accelerator": "cpu"})
    summary, out = run_ddp(cfg, tmp_path)
    assert summary["world_size"] == 2 and summary["replicas_identical"] is True and summary["steps"] == 6
    state = read_train_state(latest_checkpoint(out))
    assert isinstance(state["sampler"], list) and len(state["sampler"]) == 2  # each rank's data position


def test_checkpoint_contents_and_atomic_layout(tmp_path):
    cfg = tiny_digits_config(train={"steps": 12, "ckpt_every": 5, "keep_checkpoints": 2})
    run(cfg, tmp_path / "r")
    ck = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000010", "step_00000012"]
    assert (ck / "latest").read_text() == "step_00000012"
    assert not list(ck.glob(".tmp*"))
    state = read_train_state(ck / "step_00000012")  # weights_only=True
    assert state["step"] == 12 and "optimizer" in state and "scheduler" in state
    saved = json.loads((ck / "step_00000012" / "config.json").read_text())
    assert RunConfig.from_dict(saved).to_dict() == RunConfig.from_dict(cfg).to_dict()


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    cfg = tiny_digits_config(train={"steps": 2})
    run(cfg, tmp_path / "r")
    with pytest.raises(Exception, match="--resume"):
        run(cfg, tmp_path / "r")
    assert run(cfg, tmp_path / "r", overwrite=True)["steps"] == 2


def test_resume_with_a_different_model_config_is_refused(tmp_path):
    run(tiny_digits_config(train={"steps": 4}), tmp_path / "r")
    with pytest.raises(CheckpointError, match="backbone.dim: 32 -> 64"):
        run(tiny_digits_config(train={"steps": 8}, backbone={"dim": 64}), tmp_path / "r", resume=True)
    # changing only the step budget is fine: training continues
    assert run(tiny_digits_config(train={"steps": 6}), tmp_path / "r", resume=True)["steps"] == 6


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    run(tiny_digits_config(train={"steps": 3}), tmp_path / "r")
    assert list((tmp_path / "r" / "tensorboard").rglob("events.out.tfevents.*"))


def test_csv_log_without_tensorboard(tmp_path, monkeypatch):
    import seqgen.train as T

    monkeypatch.setattr(T, "_tensorboard", lambda run_dir: None)
    run(tiny_digits_config(train={"steps": 3}), tmp_path / "r")
    rows = curve(tmp_path / "r")
    assert [s for s, _ in rows] == [1, 2, 3]


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    big = run(tiny_digits_config(train={"steps": 6, "batch_size": 16, "grad_accum": 1}), tmp_path / "a")
    small = run(tiny_digits_config(train={"steps": 6, "batch_size": 8, "grad_accum": 2}), tmp_path / "b")
    a, b = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-4)
    assert big["heldout_nll"] == pytest.approx(small["heldout_nll"], rel=1e-3)


def untrained_bits_per_dim(cfg: dict) -> float:
    """The held-out bits/dim of the model the trainer starts from (same seed, no step taken)."""
    rc = RunConfig.from_dict(cfg)
    torch.manual_seed(rc.seed)
    return build_task(rc).evaluate_nll()["bits_per_dim"]


def test_periodic_heldout_evaluation_is_logged(tmp_path):
    cfg = tiny_digits_config(train={"steps": 10, "eval_every": 4, "eval_batches": 2})
    summary = run(cfg, tmp_path / "r")
    with open(tmp_path / "r" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval_bits_per_dim")]
    evals = [(int(r["step"]), float(r["eval_bits_per_dim"])) for r in rows]
    assert [s for s, _ in evals] == [4, 8, 10]  # every 4 steps, and the full held-out split at the end
    # the per-entry, per-domain key is logged beside the plain one (one entry, one target domain)
    assert all(float(r["eval_label_to_image/image/bits_per_dim"]) == pytest.approx(v, rel=1e-5)
               for r, (_, v) in zip(rows, evals))
    assert int(float(rows[-1]["eval_heldout_tokens"])) == 300 * 64  # the whole held-out split, every pixel
    assert int(float(rows[0]["eval_heldout_tokens"])) == 2 * 64 * 64  # eval_batches=2 of 64 images
    assert evals[-1][1] == pytest.approx(summary["bits_per_dim"], rel=1e-4)
    assert evals[-1][1] < untrained_bits_per_dim(cfg) - 0.2  # it scored a model that learnt


def test_compiled_training_follows_the_eager_curve(tmp_path):
    """train.compile on CPU builds Inductor kernels (C++) and trains the same curve as eager, to float32
    rounding; the run really was compiled (dynamo captured graphs)."""
    from torch._dynamo.utils import counters

    cfg = dict(train={"steps": 6, "ckpt_every": 6})
    run(tiny_digits_config(**cfg), tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    run(tiny_digits_config(train={**cfg["train"], "compile": True}), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    a, b = curve(tmp_path / "eager"), curve(tmp_path / "compiled")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, rel=2e-4)


def test_compile_that_cannot_build_falls_back_to_eager_and_says_so(tmp_path, monkeypatch, capsys):
    """Where torch.compile cannot build kernels (no C++ compiler on a laptop), a config that asks for it
    still trains, eagerly, and prints why."""
    import seqgen.train as T

    def broken(*a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(T.torch, "compile", broken)
    summary = run(tiny_digits_config(train={"steps": 3, "compile": True}), tmp_path / "r")
    assert summary["steps"] == 3 and [s for s, _ in curve(tmp_path / "r")] == [1, 2, 3]
    out = capsys.readouterr().out
    assert "torch.compile does not work on cpu" in out and "training uncompiled" in out
    assert "No working C++ compiler" in out
