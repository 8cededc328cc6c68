"""seqgen-co2: an example seqgen plugin package.

``SeriesAdapter`` (domain ``series``): fixed-length windows of a series in [0, 1], one token per value.
``CO2`` (data set ``co2``): windows of the weekly Mauna Loa CO2 record.
seqgen finds both through the entry points in pyproject.toml; nothing here imports seqgen's internals.
"""
from .adapter import SeriesAdapter
from .source import CO2

__all__ = ["SeriesAdapter", "CO2"]
