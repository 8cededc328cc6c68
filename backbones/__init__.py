"""Backbones: (B, L, D) embedded tokens -> (B, L, D) hidden states.  Installed as ``seqgen.backbones``."""
