"""Domain adapters: raw data <-> TokenSequence.  Installed as ``seqgen.domains``."""
