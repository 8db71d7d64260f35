"""Analysis of FNGD training runs: records -> tidy table -> comparison tables, plots, report.

    python -m fngd_analysis results/ --out report/
    tables = fngd_analysis.report(["results/"], "report/", targets={"digits": 90.0})
"""

from .compare import build_tables, default_targets
from .load import NoRunsError, load
from .output import report

__all__ = ["NoRunsError", "build_tables", "default_targets", "load", "report"]
