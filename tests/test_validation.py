"""Validation split carved from the training split, and best-on-validation weights (train.keep_best)."""
import csv
import json

import numpy as np
import pytest
import torch

from seqgen.checkpoint import BEST_DIR, latest_checkpoint, read_train_state, read_weights
from seqgen.config import RunConfig
from seqgen.task import GenerativeTask, load_run
from seqgen.train import train
from seqgen.types import SeqgenError

from conftest import tiny_digits_config, tiny_text_config


def text_config(path, **train):
    return tiny_text_config(path, backbone={"layers": 1, "heads": 2},
                            train={"steps": 6, "batch_size": 8, "eval_every": 3, "log_every": 1, **train})


def test_text_validation_is_the_end_of_the_training_text(text_dir):
    plain = GenerativeTask(RunConfig.from_dict(text_config(text_dir)))
    task = GenerativeTask(RunConfig.from_dict(text_config(text_dir, val_fraction=0.1)))
    assert not plain.has_val and task.has_val
    p, e = plain.entry().streams, task.entry().streams
    assert set(p) == {"train", "heldout"} and set(e) == {"train", "val", "heldout"}
    n = len(p["train"])
    k = n - int(round(n * 0.9))
    assert len(e["val"]) == k and len(e["train"]) == n - k
    assert torch.equal(torch.cat([e["train"], e["val"]]), p["train"])
    assert torch.equal(e["heldout"], p["heldout"])  # the held-out split is never touched
    res = task.evaluate_nll(split="val", batch_size=4)
    assert res["val_tokens"] == k - 1  # every byte but the first scored
    assert res["text/text/bits_per_byte"] == res["bits_per_byte"]
    # it scores the validation text, not the held-out text
    assert res["bits_per_byte"] != task.evaluate_nll(batch_size=4)["bits_per_byte"]
    # the trainer samples windows of the (shortened) training stream only
    assert task.train_sampler(8).samplers[0].n == n - k
    with pytest.raises(SeqgenError, match="no validation split"):
        plain.evaluate_nll(split="val")
    with pytest.raises(SeqgenError, match="unknown split"):
        task.evaluate_nll(split="test")


def _rows(records: dict) -> list[tuple]:
    """One hashable (image bytes, label) per record."""
    return [(img.tobytes(), int(y)) for img, y in zip(records["image"], records["label"])]


def test_image_validation_is_a_seeded_disjoint_subset():
    cfg = RunConfig.from_dict(tiny_digits_config(train={"val_fraction": 0.2}))
    a, b = GenerativeTask(cfg), GenerativeTask(cfg)
    plain = GenerativeTask(RunConfig.from_dict(tiny_digits_config()))
    ea, eb, ep = a.entry(), b.entry(), plain.entry()
    n = ep.size("train")
    assert set(ea.records) == {"train", "val", "heldout"} and set(ep.records) == {"train", "heldout"}
    assert ea.size("val") == round(0.2 * n) and ea.size("train") + ea.size("val") == n
    # same seed, same split
    assert np.array_equal(ea.records["val"]["image"], eb.records["val"]["image"])
    assert np.array_equal(ea.records["val"]["label"], eb.records["val"]["label"])
    # disjoint, and together the training split record for record, images and labels still aligned
    # (the digits images are all distinct)
    train_rows, val_rows, all_rows = (set(_rows(r)) for r in (ea.records["train"], ea.records["val"],
                                                                ep.records["train"]))
    assert len(all_rows) == n and len(train_rows) == ea.size("train") and len(val_rows) == ea.size("val")
    assert not train_rows & val_rows and train_rows | val_rows == all_rows
    # the encoded columns are those of the split's own records
    for split in ("train", "val"):
        seq = ea.columns[split]["image"].seq
        assert torch.equal(seq.ids, a.adapters["image"].encode(ea.records[split]["image"]).ids)
        assert torch.equal(ea.columns[split]["label"].seq.ids[:, 0], torch.as_tensor(ea.records[split]["label"]))
    assert np.array_equal(ea.records["heldout"]["image"], ep.records["heldout"]["image"])
    assert torch.equal(ea.columns["heldout"]["image"].seq.ids, ep.columns["heldout"]["image"].seq.ids)
    other = GenerativeTask(RunConfig.from_dict(tiny_digits_config(seed=1, train={"val_fraction": 0.2})))
    assert not np.array_equal(other.entry().records["val"]["image"], ea.records["val"]["image"])
    # the trainer draws from the training part only
    assert a.train_sampler(16).samplers[0].n == ea.size("train")
    assert a.evaluate_nll(split="val")["val_tokens"] == ea.size("val") * 64


@pytest.mark.parametrize("train_over, match", [
    ({"keep_best": True, "eval_every": 5}, "needs train.val_fraction > 0"),
    ({"keep_best": True, "val_fraction": 0.1, "eval_every": 0}, "eval_every > 0"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
    ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
])
def test_bad_validation_settings_are_refused(train_over, match):
    with pytest.raises(SeqgenError, match=match):
        RunConfig.from_dict(tiny_digits_config(train=train_over))


def test_a_validation_split_that_leaves_nothing_is_refused():
    with pytest.raises(SeqgenError, match="empty split"):
        GenerativeTask(RunConfig.from_dict(tiny_digits_config(train={"val_fraction": 1e-5})))


def _val_curve(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["val_nll"])) for r in csv.DictReader(f) if r.get("val_nll")]


def test_keep_best_keeps_the_weights_with_the_lowest_validation_nll(tmp_path):
    # float32, so that the scores computed here (float32) match the trainer's to rounding
    cfg = tiny_digits_config(train={"steps": 24, "lr": 3e-2, "warmup_steps": 1, "eval_every": 3, "ema": 0.5,
                                    "val_fraction": 0.2, "keep_best": True, "eval_batches": 0,
                                    "precision": "32-true"})
    summary = train(RunConfig.from_dict(cfg), tmp_path / "r", progress_bar=False)
    curve = _val_curve(tmp_path / "r")
    assert [s for s, _ in curve] == list(range(3, 25, 3))  # every 3 steps and at the end
    step, nll = min(curve, key=lambda x: x[1])
    kept = latest_checkpoint(tmp_path / "r", BEST_DIR)
    state = read_train_state(kept)
    assert state["step"] == step == summary["best_step"] and state["val_nll"] == pytest.approx(nll, rel=1e-4)
    assert kept.name == f"step_{step:08d}" and len(list(kept.parent.glob("step_*"))) == 1
    # eval and sample load the kept weights, and score them as the trainer did
    best_task = load_run(tmp_path / "r")
    kept_w = read_weights(kept / "model.safetensors")
    assert all(torch.equal(v, kept_w[k]) for k, v in best_task.model.state_dict().items())
    assert best_task.evaluate_nll()["bits_per_dim"] == pytest.approx(summary["bits_per_dim"], rel=1e-5)
    assert best_task.evaluate_nll(split="val")["val_nll"] == pytest.approx(state["val_nll"], rel=1e-5)


def test_keep_best_picks_an_earlier_step_over_a_worse_end(tmp_path, monkeypatch):
    """A scripted validation curve (best at step 6 of 12) drives the real selection, saving and loading."""
    scripted = iter([2.0, 1.0, 1.5, 1.8])  # steps 3, 6, 9 and the end (12)
    real = GenerativeTask.heldout_metrics

    def fake(self, *a, **kw):
        res = real(self, *a, **kw)
        if kw.get("split") == "val":
            res["val_nll"] = next(scripted)
        return res

    monkeypatch.setattr(GenerativeTask, "heldout_metrics", fake)
    cfg = tiny_digits_config(train={"steps": 12, "eval_every": 3, "ckpt_every": 6, "keep_checkpoints": 5,
                                    "ema": 0.5, "val_fraction": 0.2, "keep_best": True, "precision": "32-true"})
    summary = train(RunConfig.from_dict(cfg), tmp_path / "r", progress_bar=False)
    assert summary["best_step"] == 6 and summary["best_val_nll"] == 1.0
    kept = latest_checkpoint(tmp_path / "r", BEST_DIR)
    kept_w = read_weights(kept / "model.safetensors")
    ema_6 = read_weights(tmp_path / "r" / "checkpoints" / "step_00000006" / "ema.safetensors")
    ema_12 = read_weights(latest_checkpoint(tmp_path / "r") / "ema.safetensors")
    assert all(torch.equal(kept_w[k], ema_6[k]) for k in ema_6)  # the EMA weights that were scored at step 6
    assert not all(torch.equal(kept_w[k], ema_12[k]) for k in ema_12)
    model = load_run(tmp_path / "r").model.state_dict()
    assert all(torch.equal(model[k], ema_6[k]) for k in ema_6)
    model = load_run(tmp_path / "r", best=False).model.state_dict()  # --last
    assert all(torch.equal(model[k], ema_12[k]) for k in ema_12)
    # the summary's held-out score is that of the kept weights
    monkeypatch.setattr(GenerativeTask, "heldout_metrics", real)
    assert load_run(tmp_path / "r").evaluate_nll()["bits_per_dim"] == pytest.approx(summary["bits_per_dim"], rel=1e-5)


def test_keep_best_survives_a_resume(tmp_path):
    cfg = RunConfig.from_dict(tiny_digits_config(train={"steps": 24, "lr": 3e-2, "warmup_steps": 1, "eval_every": 3,
                                                        "ckpt_every": 6, "val_fraction": 0.2, "keep_best": True}))
    whole = train(cfg, tmp_path / "a", progress_bar=False)
    train(cfg, tmp_path / "b", progress_bar=False, stop_after=12)
    resumed = train(cfg, tmp_path / "b", progress_bar=False, resume=True)
    assert resumed["best_step"] == whole["best_step"]
    assert resumed["best_val_nll"] == pytest.approx(whole["best_val_nll"], rel=1e-6)
    assert resumed["bits_per_dim"] == pytest.approx(whole["bits_per_dim"], rel=1e-6)


def test_cli_eval_reports_the_kept_weights(tmp_path, text_dir):
    from seqgen.cli import main

    cfg = text_config(text_dir, val_fraction=0.1, keep_best=True, ema=0.9)
    summary = train(RunConfig.from_dict(cfg), tmp_path / "t", progress_bar=False)
    assert main(["eval", str(tmp_path / "t"), "--device", "cpu", "--no-compressors"]) == 0
    res = json.loads((tmp_path / "t" / "eval.json").read_text())
    assert res["checkpoint"].startswith(f"{BEST_DIR}/step_")
    # 1e-4: under bf16 autocast (precision auto on a CPU with native bf16) a fresh process may sum in
    # another order (seen on an AMX CPU: 1.1e-5 apart)
    assert res["bits_per_byte"] == pytest.approx(summary["bits_per_byte"], rel=1e-4)
    assert main(["eval", str(tmp_path / "t"), "--device", "cpu", "--no-compressors", "--last",
                 "--out", str(tmp_path / "last.json")]) == 0
    assert json.loads((tmp_path / "last.json").read_text())["checkpoint"].startswith("checkpoints/step_")


def test_tokenizer_runs_refuse_a_validation_split():
    from seqgen.domains.tokenizers import TokenizerTask

    cfg = RunConfig.from_dict({"name": "tk", "task": "tokenizer", "data": {"name": "digits"},
                               "tokenizer": {"name": "fsq"}, "train": {"val_fraction": 0.1}})
    with pytest.raises(SeqgenError, match="generative runs"):
        TokenizerTask(cfg)


# ------------------------------------------------------------------ dynamic evaluation
def _text_task(text_dir, **train):
    return GenerativeTask(RunConfig.from_dict(text_config(text_dir, **train)))


def test_dynamic_evaluation_without_steps_is_the_static_evaluation(text_dir):
    task = _text_task(text_dir)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    static = task.evaluate_nll(stride=8)
    for opt in ("sgd", "adam"):
        dyn = task.evaluate_dynamic(lr=0.0, segment=8, optimizer=opt)
        assert dyn["heldout_tokens"] == static["heldout_tokens"] == len(task.entry().streams["heldout"]) - 1
        assert dyn["bits_per_byte"] == pytest.approx(static["bits_per_byte"], rel=1e-5)
    adapted = task.evaluate_dynamic(lr=1e-2, segment=8, optimizer="adam")
    assert adapted["heldout_tokens"] == static["heldout_tokens"]
    assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())  # weights restored


def test_dynamic_evaluation_adapts_to_text_it_has_already_scored(text_dir):
    task = _text_task(text_dir)
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(97, 123, (24,), generator=g)  # a random "word" no training text contains
    task.entry().streams["heldout"] = motif.repeat(12)
    static = task.evaluate_nll(stride=8)["bits_per_byte"]
    dynamic = task.evaluate_dynamic(lr=3e-2, segment=8, optimizer="adam")["bits_per_byte"]
    assert dynamic < 0.7 * static, (static, dynamic)


def test_dynamic_evaluation_never_sees_text_before_scoring_it(text_dir):
    task = _text_task(text_dir)
    ids = task.entry().streams["heldout"][:200].clone()
    changed = ids.clone()
    changed[120:] = (changed[120:] + 7) % 256  # different text from byte 120 on
    a, b = [], []
    task.entry().streams["heldout"] = ids
    task.evaluate_dynamic(lr=1e-2, segment=8, optimizer="adam", windows=a)
    task.entry().streams["heldout"] = changed
    task.evaluate_dynamic(lr=1e-2, segment=8, optimizer="adam", windows=b)
    # windows whose scored targets all lie before byte 120 (context 32, stride 8: targets up to start + 32)
    same = [i for i in range(len(a)) if (0 if i == 0 else 8 * i) + 32 < 120]
    assert len(same) >= 10 and all(a[i] == b[i] for i in same)
    assert a[len(same) + 1:] != b[len(same) + 1:]


def test_eval_chooses_the_dynamic_rate_on_validation(tmp_path, text_dir):
    from seqgen.evaluate import evaluate_run, format_table

    cfg = text_config(text_dir, val_fraction=0.1)
    cfg["eval"] = {"dynamic": True, "dynamic_lrs": [0.0, 1e-3, 1e-2], "dynamic_segment": 16, "compressors": False}
    train(RunConfig.from_dict(cfg), tmp_path / "t", progress_bar=False)
    res = evaluate_run(tmp_path / "t")
    d = res["dynamic"]
    by_lr = d["val_bits_per_byte_by_lr"]
    assert set(by_lr) == {"0", "0.001", "0.01"} and d["lr"] == float(min(by_lr, key=by_lr.get))
    assert by_lr["0"] == pytest.approx(d["val_static_bits_per_byte"], rel=1e-5)
    assert "dynamic eval" in format_table(res)
    cfg["train"]["val_fraction"] = 0.0
    train(RunConfig.from_dict(cfg), tmp_path / "u", progress_bar=False)
    with pytest.raises(SeqgenError, match="needs a validation split"):
        evaluate_run(tmp_path / "u")
    from seqgen.cli import main

    assert main(["eval", str(tmp_path / "u"), "--device", "cpu", "--dynamic_lr", "0.01"]) == 0
    d = json.loads((tmp_path / "u" / "eval.json").read_text())["dynamic"]
    assert d["lr"] == 0.01 and "val_bits_per_byte_by_lr" not in d and d["heldout_tokens"] > 0


def test_dynamic_evaluation_refuses_images_and_bad_settings(text_dir):
    img = GenerativeTask(RunConfig.from_dict(tiny_digits_config()))
    with pytest.raises(SeqgenError, match="stream: true"):
        img.evaluate_dynamic()
    task = _text_task(text_dir)
    with pytest.raises(SeqgenError, match="optimizer must be"):
        task.evaluate_dynamic(optimizer="lbfgs")
    with pytest.raises(SeqgenError, match="longer than the context"):
        task.evaluate_dynamic(segment=64)


def test_resuming_with_a_different_validation_split_is_refused(tmp_path):
    from seqgen.checkpoint import CheckpointError

    cfg = tiny_digits_config(train={"steps": 6, "ckpt_every": 3, "val_fraction": 0.1, "eval_every": 3})
    train(RunConfig.from_dict(cfg), tmp_path / "r", progress_bar=False, stop_after=3)
    cfg["train"]["val_fraction"] = 0.2
    with pytest.raises(CheckpointError, match="train.val_fraction"):
        train(RunConfig.from_dict(cfg), tmp_path / "r", progress_bar=False, resume=True)
