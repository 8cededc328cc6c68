"""End to end through the `seqgen` command: train, sample (a file a person opens), eval, list, data."""
import json

import numpy as np
import yaml
from PIL import Image

from seqgen.cli import main

from conftest import tiny_digits_config, tiny_text_config


def write(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_list_shows_components_and_attention(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("transformer", "categorical", "ar", "image", "text", "digits", "shakespeare", "sdpa", "flex"):
        assert word in out
    assert main(["data", "list"]) == 0
    assert "shakespeare" in capsys.readouterr().out


def test_data_get_reports_failures(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGEN_DATA", str(tmp_path))
    assert main(["data", "get", "text_folder"]) == 1
    assert "cannot fetch" in capsys.readouterr().err
    assert main(["data", "get", "digits"]) == 0


def untrained(run, **kw) -> dict:
    """Held-out scores of the model a run starts from (its config and seed, no training step)."""
    import torch

    from seqgen.config import RunConfig
    from seqgen.task import build_task

    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    torch.manual_seed(cfg.seed)
    return build_task(cfg, run).evaluate_nll(**kw)


def test_train_sample_eval_digits(tmp_path, capsys):
    cfg = write(tmp_path, tiny_digits_config(train={"steps": 30}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--train.lr=0.004"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.004
    assert main(["sample", str(run), "--n", "20", "--cfg_scale", "2"]) == 0
    img = Image.open(run / "samples" / "samples.png")
    # 20 samples: 2 of every class, one row per class (8x8 cells scaled to 32 px, 2 px padding)
    assert img.size == (2 * 34 + 2, 10 * 34 + 2) and np.asarray(img).std() > 0
    assert main(["sample", str(run), "--labels", "3,3,7", "--temperature", "0", "--out", str(tmp_path / "x.png")]) == 0
    x = np.asarray(Image.open(tmp_path / "x.png"))
    cell = lambda r, c: x[2 + r * 34: 2 + r * 34 + 32, 2 + c * 34: 2 + c * 34 + 32]  # noqa: E731
    assert x.shape[:2] == (70, 70)  # three samples on a 2x2 grid
    assert np.array_equal(cell(0, 0), cell(0, 1))  # greedy: the same label, the same image
    assert main(["sample", str(run), "--labels", "3,12"]) == 2  # a class outside 0..9
    assert "outside 0..9" in capsys.readouterr().err
    assert main(["eval", str(run)]) == 0
    res = json.loads((run / "eval.json").read_text())
    entry = res["label_to_image"]
    assert entry["cond"] == ["label"] and entry["target"] == ["image"]
    assert entry["image"]["bits_per_dim"] == res["bits_per_dim"]
    assert res["bits_per_dim"] < untrained(run)["bits_per_dim"] - 0.3  # it learnt
    # the condition is scored against the null condition
    assert entry["image"]["bits_per_dim_null_condition"] != entry["image"]["bits_per_dim"]
    assert entry["reference"]["classifier_heldout_accuracy"] > 0.9
    for tag, scale in (("temperature_1", 1.0), ("guided", 2.0)):
        r = entry[tag]
        assert 0 <= r["accuracy"] <= 1 and r["fd_vs_heldout"] > 0 and r["samples"] == 50 and r["cfg_scale"] == scale
    out = capsys.readouterr().out
    assert "bits_per_dim" in out and "accuracy" in out and "label_to_image" in out
    # a second train into the same folder must not silently clobber it
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 2


def test_train_sample_eval_text_folder(tmp_path, text_dir, capsys):
    cfg = tiny_text_config(text_dir, domains={"text": {"adapter": "text", "tokenizer": "bpe", "vocab_size": 300,
                                                       "context": 32}},
                           train={"steps": 30, "log_every": 5}, sample={"num": 2, "length": 40, "prompt": "to be"},
                           eval={"compressors": True})
    run = tmp_path / "run"
    assert main(["train", str(write(tmp_path, cfg)), "--out", str(run), "--no-progress"]) == 0
    assert (run / "tokenizer.json").exists()
    assert main(["sample", str(run)]) == 0
    text = (run / "samples" / "samples.txt").read_text()
    assert text.startswith("to be") and len(text) > 40
    assert "to be" in capsys.readouterr().out  # two short samples are printed too
    assert main(["sample", str(run), "--prompt", "whether", "--n", "1", "--out", str(tmp_path / "w.txt")]) == 0
    assert (tmp_path / "w.txt").read_text().startswith("whether")
    assert main(["eval", str(run)]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["text"]["text"]["bits_per_byte"] == res["bits_per_byte"]
    assert res["bits_per_byte"] < untrained(run)["bits_per_byte"] - 0.5  # it learnt
    assert "bits_per_byte_null_condition" not in res["text"]["text"]  # nothing conditions a stream
    comp = res["text"]["baselines"]
    assert set(comp) == {"bz2 -9 (train as context)", "xz -9 (train as context)", "gzip -9 (held-out alone)"}
    assert all(0 < v < 8 for v in comp.values())
    assert "bits/byte" in capsys.readouterr().out
