"""Moved to :mod:`featlab.report.explain`; this name keeps working for a release (the same module)."""
import sys
from .report import explain
sys.modules[__name__] = explain
