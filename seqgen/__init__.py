"""seqgen: every kind of data becomes a sequence; one runtime trains and samples all of them.

    raw data --adapter.encode--> TokenSequence --paradigm.prepare--> Batch
    Batch --embed--> (B, L, D) --backbone(mask, pos, cache)--> (B, L, D) --head--> loss | samples
    samples --adapter.decode--> raw data (PNG, text, ...)

Components are found by name through registries (``seqgen.registry``); optional packages are
imported only when a component that needs them is used.
"""
from .masks import MaskSpec, block_causal, causal, full, prefix, same_document, sliding_window
from .registry import (BACKBONES, DATASETS, DOMAINS, HEADS, PARADIGMS, register_backbone, register_dataset,
                       register_domain, register_head, register_paradigm)
from .types import Batch, DomainSpec, SeqgenError, TokenSequence

__version__ = "0.1.0"

__all__ = [
    "Batch", "DomainSpec", "TokenSequence", "SeqgenError", "MaskSpec",
    "causal", "full", "prefix", "block_causal", "same_document", "sliding_window",
    "DOMAINS", "BACKBONES", "HEADS", "PARADIGMS", "DATASETS",
    "register_domain", "register_backbone", "register_head", "register_paradigm", "register_dataset",
    "build_model", "load_run",
]


def __getattr__(name):  # lazy: these pull in the trainer's dependencies
    if name == "build_model":
        from .task import build_model
        return build_model
    if name == "load_run":
        from .task import load_run
        return load_run
    raise AttributeError(f"module 'seqgen' has no attribute {name!r}")
