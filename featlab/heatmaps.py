"""Moved to :mod:`featlab.report.heatmaps`; this name keeps working for a release (the same module)."""
import sys
from .report import heatmaps
sys.modules[__name__] = heatmaps
