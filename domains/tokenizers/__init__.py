"""Learned tokenizers: images -> grids of discrete codes and back, trained with ``seqgen train``
(``task: tokenizer``) and used by the image domain (``domain.tokenizer: RUN_DIR``).

    fsq    FSQTokenizer: conv autoencoder + finite scalar quantization (Mentzer et al., 2023)
"""
from .task import ImageBatch, TokenizerTask, code_statistics, load_tokenizer

__all__ = ["ImageBatch", "TokenizerTask", "code_statistics", "load_tokenizer"]
