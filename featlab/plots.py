"""Moved to :mod:`featlab.report.plots`; this name keeps working for a release (the same module)."""
import sys
from .report import plots
sys.modules[__name__] = plots
