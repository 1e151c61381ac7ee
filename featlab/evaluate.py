"""Moved to :mod:`featlab.report.evaluate`; this name keeps working for a release (the same module)."""
import sys
from .report import evaluate
sys.modules[__name__] = evaluate
