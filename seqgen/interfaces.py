"""The component protocols (structural: a class conforms without inheriting from anything).

This file is the contract: it lists everything the runtime calls on a component.  Methods marked
*optional* may be missing; the runtime checks with ``hasattr`` and says what it cannot do without them.
``tests/test_conformance.py`` pushes every registered adapter (and the README's example adapter)
through a real training step, held-out NLL and sampling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .masks import MaskSpec
from .types import Batch, DomainSpec, TokenSequence


@runtime_checkable
class DomainAdapter(Protocol):
    """Raw items of one domain <-> tokens.  An adapter owns representation only: it knows nothing of
    losses, batches, other domains or modality indices (the runtime assigns those, and renames
    ``spec`` to the run's key for the domain, so two domains may share one adapter class).

    Required:

    ``spec``                 DomainSpec: vocab_size (discrete) or value_dim (continuous), pos_axes.
    ``Config``               a nested @dataclass of the adapter's options (``__init__(config)``).
    ``encode(items)``        a sequence of raw items -> TokenSequence (N, L): ids or values, *local*
                             coordinates (``pos``), ``valid`` False on the tail of items shorter
                             than the longest (variable-length domains).  ``modality`` is ignored.
    ``decode(seq)``          TokenSequence (N, L) -> list of N raw items.  Tokens may come in any
                             order (their ``pos`` says where they go) and ``valid`` marks which exist.
    ``layout(n, length)``    TokenSequence (n, L) of what to generate: local coordinates in the
                             default generation order (ids ignored).  ``length`` is the number of
                             tokens for a variable-length domain (ignored by a fixed-length one).
    ``variable_length``      True when items differ in length (text): the segment then ends itself
                             with the domain's END id and ``layout`` takes a length limit.
    ``unit``                 what one raw unit is ("byte", "dim") for per-unit likelihoods.
    ``units(seq)``           (N, L) float: raw units each token stands for (bits per unit =
                             NLL / ln 2 / units).
    ``write_samples(items, path, **kw) -> Path``   write generated items to a file a person opens
                             (``sample_suffix`` gives its extension: ".png", ".txt").
    ``example_batch(n, generator)``  n small synthetic raw items (tests, docs).

    Optional:

    ``fit(train_items, run_dir)``     learn what the adapter needs from the training split (a BPE, a
                                      tokenizer run) and save it in run_dir; called before ``spec``
                                      is read, also when a run is reloaded (then it loads).
    ``encode_stream(items) -> (N,)``  many texts -> one long id stream (runs that cut windows).
    ``from_prompt(text) -> item``     read an item from a command-line prompt (text, a class name).
    ``read_file(path) -> item``       read an item from a file a person gives (a PNG).
    ``encode_cache() -> (dir, key)``  where encodings of a data set may be cached, and a key that
                                      changes whenever the encoding would (tokenizer, scan order).
    ``token_features() -> (V, F) or None``  a feature vector for each of the V vocabulary ids (a
                                      code's quantized vector); the model embeds an id as its own row
                                      plus a learned linear map of its features, so ids that stand
                                      for similar things start out similar.
    ``baselines(train_items, heldout_items) -> dict``  reference bits per unit (text compressors).
    ``default_prompts(n) -> (items, nrow)``  conditions for a sample grid when none are given.
    """

    spec: DomainSpec
    variable_length: bool
    unit: str
    sample_suffix: str

    def encode(self, items: Sequence[Any]) -> TokenSequence: ...

    def decode(self, seq: TokenSequence) -> list[Any]: ...

    def layout(self, n: int, length: int | None = None) -> TokenSequence: ...

    def units(self, seq: TokenSequence) -> Tensor: ...

    def write_samples(self, items: Sequence[Any], path: str | Path, **kw) -> Path: ...

    def example_batch(self, n: int, generator: torch.Generator | None = None) -> list[Any]: ...


@runtime_checkable
class Source(Protocol):
    """A data set: records in columns, per split.  Knows files and splits, nothing of tokens.

    ``records(split)``   split "train" or "heldout" -> dict of equal-length columns
                         ({"image": (N, H, W) array, "label": (N,) array} or {"text": [str]} ...).
    Optional: ``fetch()`` (download what is missing), ``score(field, records, generated) -> dict``
    (sample-based metrics of items generated for ``field`` from those records' conditions),
    ``reference_scores(field) -> dict`` (the same metrics for the real held-out items).
    """

    def records(self, split: str) -> dict[str, Sequence[Any]]: ...


@runtime_checkable
class Cache(Protocol):
    """What ``Backbone.init_cache`` returns: a KV cache or a recurrent state."""

    length: int

    def advance(self, n: int) -> None: ...

    def truncate(self, n: int) -> None: ...

    def select(self, index) -> "Cache": ...


@runtime_checkable
class Backbone(Protocol):
    """(B, L, D) embedded tokens + (B, L, 3) coordinates + a mask spec -> (B, L, D)."""

    dim: int

    def forward(self, x: Tensor, *, pos: Tensor, mask: MaskSpec, cache: Any = None,
                valid: Tensor | None = None) -> Tensor: ...

    def init_cache(self, batch_size: int, max_len: int) -> Cache: ...


@runtime_checkable
class Head(Protocol):
    """Hidden states -> loss and samples.  Built as ``cls(config, dim, spec)``.

    ``loss(h (N, D), targets)``   targets are ids (N,) for a discrete domain (vocabulary or END) or
                                  values (N, C) for a continuous one -> (mean loss, {"nll_sum", "count"}).
    ``sample(h, generator=, temperature=, top_k=, top_p=, allowed=, h_uncond=, cfg_scale=,
             with_logprob=False)``  -> ids (N,) or values (N, C); ``allowed`` (N, V + 1) bool restricts
                                  discrete outputs; guidance combines ``h`` with ``h_uncond``.  With
                                  ``with_logprob`` a discrete head returns (ids, log-probabilities of
                                  the drawn ids under the distribution it drew from): the confidences
                                  of masked parallel decoding.  ``sample`` is the one place that draws.

    Optional: ``defines_nll`` (default True): False for heads whose loss is not a negative
    log-likelihood (a diffusion / flow-matching head): ``nll_sum`` then holds the summed training loss,
    and evaluation reports it as a loss, never as bits.
    """

    def loss(self, h: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> tuple[Tensor, dict]: ...

    def sample(self, h: Tensor, *, generator: torch.Generator | None = None, **knobs) -> Tensor: ...


@runtime_checkable
class Paradigm(Protocol):
    """How a training example is arranged and how a target segment is filled at sampling time.

    ``prepare(examples, generator=, progress=, null=)``  encoded examples (lists of pieces, see
        ``seqgen.examples``) -> a Batch (shift-by-one for AR; in-place targets for masked paradigms).
    ``fill(model, plan, ...)``  fill the target slots of a ``seqgen.generate.Plan`` after its prompt
        has been prefilled (the AR token loop today).
    ``prompt_mask(plan)``  optional: the attention pattern of the prompt's prefill, the same as the
        condition's pattern in training (causal when absent).
    """

    def prepare(self, examples: list, **kw) -> Batch: ...

    def fill(self, model, plan, **knobs) -> Any: ...
