"""Operators with a pure-PyTorch reference beside each fast path."""
