"""An IPython extension the agent loads into every Python kernel: matplotlib figures also come back
as structured chart data (the `e2b/chart` MIME type, the SDK's `Result.chart`: type, title, axes,
elements), extracted by E2B's own `e2b-charts` library where the image has it.

Loaded with `--IPKernelApp.extensions=sandbox_operator.agent.kernel_charts`, so nothing appears in
the user's namespace; matplotlib and e2b_charts are imported only when a figure is displayed.
"""

from __future__ import annotations

import logging
from typing import Any

from IPython.core.formatters import BaseFormatter
from traitlets import ObjectName, Unicode

CHART_MIME = "e2b/chart"  # interpreter.MIME_FIELDS maps it to the result's `chart` field

log = logging.getLogger(__name__)


class ChartFormatter(BaseFormatter):
    """Formats a matplotlib Figure as chart JSON. It recognizes figures itself rather than through
    the type registry: IPython's select_figure_formats pops Figure from every formatter's registry
    whenever the inline backend is (re)configured."""

    format_type = Unicode(CHART_MIME)
    print_method = ObjectName("_repr_e2b_chart_")

    def __call__(self, obj: Any) -> dict[str, Any] | None:
        return figure_chart(obj) if self.enabled and is_figure(obj) else None


def is_figure(obj: Any) -> bool:
    """A matplotlib Figure (or subclass), told without importing matplotlib."""
    return any(cls.__module__ == "matplotlib.figure" and cls.__name__ == "Figure" for cls in type(obj).__mro__)


def figure_chart(figure: Any) -> dict[str, Any] | None:
    """The figure's chart data, or None (no library, a blank figure, one it cannot read): a chart
    is an addition to the PNG, so it never turns a working plot into an error."""
    try:
        from e2b_charts import chart_figure_to_chart
    except ImportError:
        return None
    try:
        # Tick labels of categorical axes exist only once the figure is laid out; the PNG
        # formatter usually drew it already, a figure displayed another way may not be.
        figure.draw_without_rendering()
        chart = chart_figure_to_chart(figure)
    except Exception as error:  # e2b_charts raises on figures it does not understand
        log.debug("no chart data for %r: %s", figure, error)
        return None
    return chart.model_dump(mode="json") if chart is not None else None


def load_ipython_extension(shell: Any) -> None:
    shell.display_formatter.formatters[CHART_MIME] = ChartFormatter(parent=shell.display_formatter)
