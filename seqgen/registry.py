"""Name -> component tables.

Built-ins are listed as "module:attribute" strings and imported only when first asked for, so
``import seqgen`` stays light and optional packages are never touched at import time.  Components
defined in a notebook register with a decorator; separately installed packages add components through
the entry-point groups ``seqgen.domains``, ``seqgen.backbones``, ``seqgen.heads``, ``seqgen.paradigms``
(and ``seqgen.datasets``, ``seqgen.tokenizers``), e.g. in their pyproject.toml:

    [project.entry-points."seqgen.domains"]
    weather = "my_pkg.weather:WeatherAdapter"

Every component class carries a nested ``Config`` dataclass; ``Registry.build(name, options)``
validates the options against it.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, Callable

from .types import SeqgenError

log = logging.getLogger(__name__)


class UnknownComponentError(SeqgenError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Registry:
    def __init__(self, kind: str, group: str, builtins: dict[str, str]):
        self.kind, self.group = kind, group
        self._builtins = dict(builtins)
        self._classes: dict[str, Any] = {}
        self._entry_points: dict[str, Any] | None = None

    # ------------------------------------------------------------ registration
    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: ``@BACKBONES.register("mine")`` (name defaults to the lower-cased class name)."""
        def deco(cls):
            key = name or cls.__name__.lower()
            old = self._classes.get(key)
            if old is not None and old is not cls and _qualname(old) != _qualname(cls):
                raise SeqgenError(f"{self.kind} {key!r} is already registered as {_qualname(old)}")
            self._classes[key] = cls
            return cls
        return deco

    def _load_entry_points(self) -> dict[str, Any]:
        if self._entry_points is None:
            try:
                self._entry_points = {ep.name: ep for ep in entry_points(group=self.group)}
            except Exception as e:  # pragma: no cover - broken metadata must not break seqgen
                log.warning("could not read entry points %s: %s", self.group, e)
                self._entry_points = {}
        return self._entry_points

    # ------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return sorted(set(self._builtins) | set(self._classes) | set(self._load_entry_points()))

    def get(self, name: str):
        if name in self._classes:
            return self._classes[name]
        if name in self._builtins:
            module, attr = self._builtins[name].split(":")
            cls = getattr(importlib.import_module(module), attr)
            self._classes.setdefault(name, cls)
            return self._classes[name]
        eps = self._load_entry_points()
        if name in eps:
            cls = eps[name].load()
            self._classes[name] = cls
            return cls
        raise UnknownComponentError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")

    def config_class(self, name: str):
        cls = self.get(name)
        cfg = getattr(cls, "Config", None)
        if cfg is None or not dataclasses.is_dataclass(cfg):
            raise SeqgenError(f"{self.kind} {name!r} ({_qualname(cls)}) must define a nested @dataclass Config")
        return cfg

    def make_config(self, name: str, options: dict | None = None):
        """Build ``cls.Config`` from a dict, rejecting unknown keys with the list of known ones."""
        cfg_cls = self.config_class(name)
        options = dict(options or {})
        options.pop("name", None)
        known = {f.name for f in dataclasses.fields(cfg_cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise SeqgenError(f"{self.kind} {name!r} has no option(s) {bad}; its options are: {sorted(known)}")
        try:
            return cfg_cls(**options)
        except TypeError as e:
            raise SeqgenError(f"{self.kind} {name!r}: bad options {options}: {e}") from None

    def build(self, name: str, options: dict | Any | None = None, *args, **kwargs):
        """Instantiate: ``cls(config, *args, **kwargs)``."""
        cls = self.get(name)
        cfg = options if dataclasses.is_dataclass(options) else self.make_config(name, options)
        return cls(cfg, *args, **kwargs)


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


DOMAINS = Registry("domain", "seqgen.domains", {
    "text": "seqgen.domains.text:TextDomain",
    "image": "seqgen.domains.image:ImageDomain",
    "label": "seqgen.domains.label:LabelDomain",
})
BACKBONES = Registry("backbone", "seqgen.backbones", {
    "transformer": "seqgen.backbones.transformer:Transformer",
})
HEADS = Registry("head", "seqgen.heads", {
    "categorical": "seqgen.heads.categorical:CategoricalHead",
    "diffusion": "seqgen.heads.diffusion:DiffusionHead",
})
PARADIGMS = Registry("paradigm", "seqgen.paradigms", {
    "ar": "seqgen.paradigms.ar:AutoRegressive",
    "masked": "seqgen.paradigms.masked:Masked",
    "next_scale": "seqgen.paradigms.next_scale:NextScale",
})
DATASETS = Registry("dataset", "seqgen.datasets", {
    "digits": "seqgen.datasets:Digits",
    "mnist": "seqgen.datasets:MNIST",
    "emoji": "seqgen.emoji:Emoji",
    "mnist_scenes": "seqgen.scenes:MNISTScenes",
    "image_folder": "seqgen.datasets:ImageFolder",
    "shakespeare": "seqgen.datasets:Shakespeare",
    "text_folder": "seqgen.datasets:TextFolder",
})

TOKENIZERS = Registry("tokenizer", "seqgen.tokenizers", {
    "fsq": "seqgen.domains.tokenizers.fsq:FSQTokenizer",
    "msfsq": "seqgen.domains.tokenizers.msfsq:MultiScaleFSQTokenizer",
    "ae": "seqgen.domains.tokenizers.ae:AETokenizer",
})

TASK_KINDS = Registry("task", "seqgen.tasks", {
    "generative": "seqgen.task:GenerativeTask",
    "tokenizer": "seqgen.domains.tokenizers:TokenizerTask",
})

REGISTRIES = {"domains": DOMAINS, "backbones": BACKBONES, "heads": HEADS, "paradigms": PARADIGMS,
              "datasets": DATASETS, "tokenizers": TOKENIZERS}

register_domain = DOMAINS.register
register_backbone = BACKBONES.register
register_head = HEADS.register
register_paradigm = PARADIGMS.register
register_dataset = DATASETS.register
register_tokenizer = TOKENIZERS.register
