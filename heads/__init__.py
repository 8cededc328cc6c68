"""Heads: hidden states -> loss and samples.  Installed as ``seqgen.heads``."""
