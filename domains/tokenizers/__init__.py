"""Learned tokenizers: images -> token grids and back, trained with ``seqgen train`` (``task: tokenizer``)
and used by the image domain (``domain.tokenizer: RUN_DIR``).

    fsq    FSQTokenizer: conv autoencoder + finite scalar quantization (Mentzer et al., 2023); discrete
           codes on one h x w grid
    msfsq  MultiScaleFSQTokenizer: the same autoencoder with residual multi-scale quantization on the FSQ
           lattice for next-scale prediction (VAR, Tian et al., 2024); codes of a ladder of grids
    ae     AETokenizer: KL-regularised autoencoder; continuous latent vectors per patch, normalised per
           channel (the continuous tokens of MAR, Li et al., 2024)
"""
from .task import ImageBatch, TokenizerTask, code_statistics, is_continuous, latent_statistics, load_tokenizer

__all__ = ["ImageBatch", "TokenizerTask", "code_statistics", "is_continuous", "latent_statistics", "load_tokenizer"]
