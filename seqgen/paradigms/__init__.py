"""Paradigms: how a training example is arranged and how generation proceeds."""
