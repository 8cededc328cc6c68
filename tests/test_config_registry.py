"""Registries (built-ins, decorator, entry points), the conformance suite, and run configs."""
import dataclasses
from importlib.metadata import EntryPoint

import pytest
import torch

from seqgen import registry
from seqgen.config import RunConfig, resolve_config
from seqgen.interfaces import Backbone, DomainAdapter, Head, Paradigm
from seqgen.masks import causal
from seqgen.registry import BACKBONES, DOMAINS, HEADS, PARADIGMS, Registry, UnknownComponentError
from seqgen.types import DomainSpec, SeqgenError, TokenSequence, line_positions

from conftest import tiny_digits_config


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownComponentError, match="unknown backbone 'mamba9'; known backbones: .*transformer"):
        BACKBONES.get("mamba9")
    with pytest.raises(SeqgenError, match="known paradigms: ar"):
        RunConfig.from_dict(tiny_digits_config(paradigm={"name": "diffusion"}))


def test_unknown_option_names_the_accepted_keys():
    with pytest.raises(SeqgenError, match="has no option"):
        BACKBONES.build("transformer", {"dimm": 3})
    with pytest.raises(SeqgenError, match="bad config.*dimm"):
        RunConfig.from_dict(tiny_digits_config(backbone={"dimm": 3}))
    with pytest.raises(SeqgenError, match="bad config.*backbone.dim"):
        RunConfig.from_dict(tiny_digits_config(backbone={"dim": "wide"}))
    with pytest.raises(SeqgenError, match="unknown config section"):
        RunConfig.from_dict({**tiny_digits_config(), "optimiser": {}})


def test_decorator_registers_a_notebook_component():
    reg = Registry("widget", "seqgen.widgets", {})

    @reg.register("spinner")
    class Spinner:
        @dataclasses.dataclass
        class Config:
            speed: int = 1

        def __init__(self, config):
            self.config = config

    assert reg.names() == ["spinner"]
    assert reg.build("spinner", {"speed": 3}).config.speed == 3
    with pytest.raises(SeqgenError, match="already registered"):
        @reg.register("spinner")
        class Other:
            pass


def test_entry_points_add_components(monkeypatch):
    ep = EntryPoint(name="fake_backbone", value="seqgen.backbones.transformer:Transformer", group="seqgen.backbones")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "seqgen.backbones" else [])
    reg = Registry("backbone", "seqgen.backbones", {})
    assert "fake_backbone" in reg.names()
    assert reg.get("fake_backbone").__name__ == "Transformer"


def test_every_registered_component_conforms():
    spec = DomainSpec("x", vocab_size=7)
    for name in BACKBONES.names():
        cls = BACKBONES.get(name)
        bb = cls(cls.Config.tiny())
        assert isinstance(bb, Backbone), name
        x = torch.randn(2, 5, bb.dim)
        assert bb(x, pos=line_positions(5, 2), mask=causal()).shape == (2, 5, bb.dim)
        cache = bb.init_cache(2, 5)
        bb(x[:, :3], pos=line_positions(3, 2), mask=causal(), cache=cache)
        assert cache.length == 3
    for name in HEADS.names():
        cls = HEADS.get(name)
        h = cls(cls.Config.tiny(), 16, spec)
        assert isinstance(h, Head), name
        loss, _ = h.loss(torch.randn(4, 16), torch.randint(0, 7, (4,)))
        assert loss.dim() == 0
        assert h.sample(torch.randn(4, 16), generator=torch.Generator().manual_seed(0)).shape == (4,)
    for name in PARADIGMS.names():
        cls = PARADIGMS.get(name)
        p = cls(cls.Config.tiny())
        assert isinstance(p, Paradigm), name
        b = p.prepare(TokenSequence.from_ids(torch.randint(0, 7, (2, 6))))
        assert b.inputs.batch_size == 2
    for name in DOMAINS.names():
        cls = DOMAINS.get(name)
        d = cls(cls.Config.tiny())
        assert isinstance(d, DomainAdapter), name
        assert d.encode(d.example_batch(3, torch.Generator().manual_seed(0))).batch_size == 3


def test_overrides_and_round_trip(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_digits_config()))
    d = resolve_config(path, ["--backbone.dim=64", "--train.lr", "0.01", "--paradigm.order=random"])
    assert d["backbone"]["dim"] == 64 and d["train"]["lr"] == 0.01 and d["paradigm"]["order"] == "random"
    cfg = RunConfig.from_dict(d)
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(SeqgenError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(SeqgenError, match="not valid YAML"):
        resolve_config(bad)
