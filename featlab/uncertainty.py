"""Moved to :mod:`featlab.report.uncertainty`; this name keeps working for a release (the same module)."""
import sys
from .report import uncertainty
sys.modules[__name__] = uncertainty
