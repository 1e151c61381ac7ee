"""Moved to :mod:`featlab.report.compare`; this name keeps working for a release (the same module)."""
import sys
from .report import compare
sys.modules[__name__] = compare
