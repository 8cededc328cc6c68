"""End to end through the `seqgen` command: train, sample (a file a person opens), eval, list, data."""
import json

import numpy as np
import yaml
from PIL import Image

from seqgen.cli import main

from conftest import tiny_digits_config


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


def test_train_sample_eval_digits(tmp_path, capsys):
    cfg = write(tmp_path, tiny_digits_config(train={"steps": 30}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--train.lr=0.004"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.004
    assert main(["sample", str(run), "--n", "20", "--cfg_scale", "2"]) == 0
    img = Image.open(run / "samples" / "samples.png")
    assert img.size[1] > 10 * 32 and np.asarray(img).std() > 0  # one row per class
    assert main(["sample", str(run), "--labels", "3,3,7", "--temperature", "0", "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()
    assert main(["eval", str(run)]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert 0 < res["bits_per_dim"] < 4.1
    for tag in ("temperature_1", "guided"):
        assert 0 <= res[tag]["conditional_accuracy"] <= 1 and res[tag]["samples"] == 50
    out = capsys.readouterr().out
    assert "bits_per_dim" in out and "accuracy" in out
    # a second train into the same folder must not silently clobber it
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 2


def test_train_sample_eval_text_folder(tmp_path, text_dir, capsys):
    cfg = {"name": "tiny_text", "data": {"name": "text_folder", "path": str(text_dir)},
           "domain": {"name": "text", "tokenizer": "bpe", "vocab_size": 300, "context": 32},
           "backbone": {"name": "transformer", "dim": 32, "layers": 2, "heads": 4},
           "train": {"steps": 30, "batch_size": 8, "eval_every": 0, "log_every": 5},
           "sample": {"num": 2, "length": 40, "prompt": "to be"}}
    run = tmp_path / "run"
    assert main(["train", str(write(tmp_path, cfg)), "--out", str(run), "--no-progress"]) == 0
    assert (run / "tokenizer.json").exists()
    assert main(["sample", str(run)]) == 0
    text = (run / "samples" / "samples.txt").read_text()
    assert text.startswith("to be") and len(text) > 40
    assert main(["eval", str(run)]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert 0 < res["bits_per_byte"] < 8
    comp = res["compressors_bits_per_byte"]
    assert set(comp) == {"bz2 -9 (train as context)", "xz -9 (train as context)", "gzip -9 (held-out alone)"}
    assert all(0 < v < 8 for v in comp.values())
    assert "bits/byte" in capsys.readouterr().out
