import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Test models are tiny: one thread is fastest, and it keeps parallel processes (DDP tests, a second
# job on the machine) from oversubscribing the cores, which slows OpenMP down by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _merge(cfg: dict, over: dict) -> dict:
    """Override sections: plain sections merge key by key; domains, heads and lists are replaced whole."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict) and k not in ("domains", "heads"):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def tiny_digits_config(**over) -> dict:
    """A class-conditional digits run small enough for a unit test (seconds on a CPU): [label | image]."""
    cfg = {
        "name": "tiny_digits",
        "seed": 0,
        "domains": {"label": {"adapter": "label", "num_classes": 10},
                    "image": {"adapter": "image", "height": 8, "width": 8, "levels": 17}},
        "heads": {"image": "categorical"},
        "mixture": [{"name": "label_to_image", "source": {"name": "digits", "heldout": 300},
                     "cond": ["label"], "target": ["image"]}],
        "backbone": {"name": "transformer", "dim": 32, "layers": 2, "heads": 4, "kv_heads": 2},
        "paradigm": {"name": "ar"},
        "train": {"steps": 20, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0,
                  "log_every": 1, "ckpt_every": 10, "eval_batches": 1},
        "sample": {"num": 10},
        "eval": {"samples": 50},
    }
    return _merge(cfg, over)


def tiny_text_config(path, **over) -> dict:
    """A byte-level language model over a folder of .txt files (one stream cut into windows)."""
    cfg = {
        "name": "tiny_text",
        "seed": 0,
        "domains": {"text": {"adapter": "text", "tokenizer": "bytes", "context": 32}},
        "mixture": [{"name": "text", "source": {"name": "text_folder", "path": str(path)}, "target": ["text"],
                     "stream": True}],
        "backbone": {"name": "transformer", "dim": 32, "layers": 2, "heads": 4},
        "paradigm": {"name": "ar"},
        "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 0, "log_every": 1,
                  "ckpt_every": 10, "eval_batches": 1},
        "sample": {"num": 2, "length": 20},
        "eval": {"compressors": False},
    }
    return _merge(cfg, over)


def run_ddp(cfg: dict, tmp_path) -> tuple[dict, Path]:
    """Train ``cfg`` with 2 CPU processes (gloo DDP) through the CLI; (train summary, run folder)."""
    import json
    import subprocess
    import sys

    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "seqgen.cli", "train", str(path), "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "train_summary.json").read_text()), out


@pytest.fixture
def tiny_cfg():
    return tiny_digits_config


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        idx = torch.randint(0, len(words), (600,), generator=g).tolist()
        (d / f"part{i}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return d
