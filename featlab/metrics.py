"""Moved to :mod:`featlab.report.metrics`; this name keeps working for a release (the same module)."""
import sys
from .report import metrics
sys.modules[__name__] = metrics
