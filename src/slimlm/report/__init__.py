"""Turn recommend results into something people would rather look at than read: PNG plots and one HTML file."""

from slimlm.report.html import write_report
from slimlm.report.plots import plot_results

__all__ = ["plot_results", "write_report"]
