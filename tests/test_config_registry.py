"""Registries (built-ins, decorator, entry points), a quick conformance pass over every registered
component (tests/test_conformance.py trains through every adapter), and run configs."""
import dataclasses
from importlib.metadata import EntryPoint

import pytest
import torch

from seqgen import registry
from seqgen.config import RunConfig, normalize_multi, resolve_config
from seqgen.examples import Piece
from seqgen.interfaces import Backbone, DomainAdapter, Head, Paradigm
from seqgen.masks import causal
from seqgen.registry import BACKBONES, DOMAINS, HEADS, PARADIGMS, Registry, UnknownComponentError
from seqgen.types import DomainSpec, SeqgenError, line_positions

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
        continuous = getattr(cls, "continuous", False)  # a head for value tokens (diffusion) says so
        h = cls(cls.Config.tiny(), 16, DomainSpec("v", value_dim=3) if continuous else spec)
        assert isinstance(h, Head), name
        targets = torch.randn(4, 3) if continuous else torch.randint(0, 7, (4,))
        loss, _ = h.loss(torch.randn(4, 16), targets)
        assert loss.dim() == 0
        out = h.sample(torch.randn(4, 16), generator=torch.Generator().manual_seed(0))
        assert out.shape == targets.shape and out.is_floating_point() == continuous, name
    for name in PARADIGMS.names():
        cls = PARADIGMS.get(name)
        p = cls(cls.Config.tiny())
        assert isinstance(p, Paradigm), name
        examples = [[Piece(0, torch.randint(0, 7, (n,)), line_positions(n)[0], torch.ones(n))] for n in (6, 4)]
        b = p.prepare(examples, specs=[spec], generator=torch.Generator().manual_seed(0))
        assert b.inputs.batch_size == 2 and int(b.loss_mask.sum()) > 0
        b.inputs.validate([spec], allow_special=True)
    for name in DOMAINS.names():
        cls = DOMAINS.get(name)
        d = cls(cls.Config.tiny())  # adapters are built from their config alone (no modality index)
        assert isinstance(d, DomainAdapter), name
        items = d.example_batch(3, torch.Generator().manual_seed(0))
        seq = d.encode(items)
        assert seq.batch_size == 3 and len(d.decode(seq)) == 3, name
        seq.validate([d.spec])


def test_overrides_and_round_trip(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_digits_config()))
    d = resolve_config(path, ["--backbone.dim=64", "--train.lr", "0.01", "--paradigm.order=random",
                              "--domains.image.height=4", "--domains.image.scan=column"])
    assert d["backbone"]["dim"] == 64 and d["train"]["lr"] == 0.01 and d["paradigm"]["order"] == "random"
    assert d["domains"]["image"]["height"] == 4 and d["domains"]["image"]["scan"] == "column"
    assert d["domains"]["image"]["width"] == 8 and d["domains"]["label"]["num_classes"] == 10
    cfg = RunConfig.from_dict(d)
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.build_domain("image").spec.vocab_size == 17 and cfg.build_domain("image").length == 32
    with pytest.raises(SeqgenError, match="bad config.*scan|unknown scan"):
        RunConfig.from_dict(resolve_config(path, ["--domains.image.scann=column"]))
    with pytest.raises(SeqgenError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(SeqgenError, match="not valid YAML"):
        resolve_config(bad)


def test_new_format_is_normalised():
    d = normalize_multi({"domains": {"label": "label", "image": {"height": 4}},
                         "mixture": [{"source": "digits", "cond": "label", "target": ["image"]}]})
    assert d["domains"] == {"label": {"adapter": "label"}, "image": {"adapter": "image", "height": 4}}
    assert d["heads"] == {"image": {"name": "categorical"}}  # one default head per target domain
    (e,) = d["mixture"]
    assert e == {"name": "label_to_image", "source": {"name": "digits"}, "cond": ["label"], "target": ["image"],
                 "fields": {}, "weight": 1.0, "stream": False}
    cfg = RunConfig.from_dict(tiny_digits_config())
    assert list(cfg.domains) == ["label", "image"]  # the order of keys is the modality order
    assert cfg.mixture[0]["source"] == {"name": "digits", "heldout": 300}


@pytest.mark.parametrize("old", [
    {"condition": "class"},
    {"data": {"name": "digits"}},
    {"domain": {"name": "image", "height": 8}},
    {"head": {"name": "categorical"}},
])
def test_old_single_domain_configs_name_the_new_format(old):
    cfg = {k: v for k, v in tiny_digits_config().items() if k not in ("domains", "heads", "mixture")}
    with pytest.raises(SeqgenError, match=r"single-domain format.*domains.*mixture") as err:
        RunConfig.from_dict({**cfg, **old})
    assert repr(sorted(old)) in str(err.value)
    # even next to new sections, an old one is refused (never silently ignored)
    with pytest.raises(SeqgenError, match="single-domain format"):
        RunConfig.from_dict({**tiny_digits_config(), **old})


def test_generative_configs_need_domains_and_a_mixture():
    cfg = tiny_digits_config()
    with pytest.raises(SeqgenError, match="needs a `domains:` mapping"):
        RunConfig.from_dict({k: v for k, v in cfg.items() if k != "domains"})
    with pytest.raises(SeqgenError, match="needs a `mixture:` list"):
        RunConfig.from_dict({k: v for k, v in cfg.items() if k != "mixture"})
    with pytest.raises(SeqgenError, match="unknown domain 'audio'; known domains: .*image.*label"):
        RunConfig.from_dict(tiny_digits_config(domains={"label": {"adapter": "label"}, "image": {"adapter": "audio"}}))
    with pytest.raises(SeqgenError, match=r"target domain\(s\) \['image'\] have no head"):
        RunConfig.from_dict(tiny_digits_config(heads={}))
    with pytest.raises(SeqgenError, match="heads.caption: no such domain"):
        RunConfig.from_dict(tiny_digits_config(heads={"image": "categorical", "caption": "categorical"}))
    with pytest.raises(SeqgenError, match="loss_weights maps head domains"):
        RunConfig.from_dict(tiny_digits_config(loss_weights={"label": 1.0}))
    with pytest.raises(SeqgenError, match=r"mixture\[0\] has unknown key\(s\) \['targets'\]"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "targets": ["image"]}]))
    with pytest.raises(SeqgenError, match="no target domain"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "cond": ["label"]}]))
    with pytest.raises(SeqgenError, match="unknown dataset 'digitz'"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digitz", "target": ["image"]}]))
    with pytest.raises(SeqgenError, match=r"weight must be > 0"):
        RunConfig.from_dict(tiny_digits_config(mixture=[{"source": "digits", "target": ["image"], "weight": 0}]))
    two = [{"source": "digits", "target": ["image"]}, {"source": "digits", "target": ["image"]}]
    with pytest.raises(SeqgenError, match="two mixture entries are named 'image'"):
        RunConfig.from_dict(tiny_digits_config(mixture=two))
