"""An IPython extension the agent loads into every Python kernel: the extra representations E2B's
code interpreter gives results.

- matplotlib figures also come back as structured chart data (`e2b/chart`, the SDK's
  `Result.chart`: type, title, axes, elements), extracted by E2B's own `e2b-charts` library where
  the image has it;
- pandas DataFrames also come back as data (`e2b/data`, `Result.data`: column → list of values);
- a PIL image's `show()`, and `save()` to a file, display it (a PNG result), as E2B's interpreter
  does: there is no screen to show it on.

Loaded with `--IPKernelApp.extensions=sandbox_operator.agent.kernel_display`, so nothing appears
in the user's namespace; matplotlib, pandas, PIL and e2b_charts are never imported by it: it acts on
objects of theirs only once user code made them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from IPython.core.formatters import BaseFormatter
from traitlets import ObjectName, Unicode

CHART_MIME = "e2b/chart"  # interpreter.MIME_FIELDS maps these to the result's fields
DATA_MIME = "e2b/data"

log = logging.getLogger(__name__)


def is_instance_of(obj: Any, package: str, name: str) -> bool:
    """`obj` is of a class `name` defined in `package` (pandas 3 says `pandas`, pandas 2
    `pandas.core.frame`) or of a subclass, told without importing the package."""
    return any(
        cls.__name__ == name and (cls.__module__ == package or cls.__module__.startswith(package + "."))
        for cls in type(obj).__mro__
    )


class ChartFormatter(BaseFormatter):
    """Formats a matplotlib Figure as chart JSON. It recognizes figures itself rather than through
    the type registry: IPython's select_figure_formats pops Figure from every formatter's registry
    whenever the inline backend is (re)configured."""

    format_type = Unicode(CHART_MIME)
    print_method = ObjectName("_repr_e2b_chart_")

    def __call__(self, obj: Any) -> dict[str, Any] | None:
        return figure_chart(obj) if self.enabled and is_instance_of(obj, "matplotlib", "Figure") else None


class DataFormatter(BaseFormatter):
    """Formats a pandas DataFrame as {column: [values]}."""

    format_type = Unicode(DATA_MIME)
    print_method = ObjectName("_repr_e2b_data_")

    def __call__(self, obj: Any) -> dict[str, Any] | None:
        return frame_data(obj) if self.enabled and is_instance_of(obj, "pandas", "DataFrame") else None


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


def frame_data(frame: Any) -> dict[str, Any] | None:
    """Column name → its values as JSON (pandas' own encoding: dates as epoch ms, NaN as null)."""
    try:
        return {str(name): json.loads(frame[name].to_json(orient="values")) for name in frame.columns}
    except Exception as error:  # duplicate column names, values pandas cannot encode
        log.debug("no data for a frame: %s", error)
        return None


def _display_image(image: Any) -> None:
    from IPython.display import display

    display(image)  # type: ignore[no-untyped-call]


def patch_pil(image_module: Any) -> None:
    """show() and save() of PIL images also display the image."""
    image_class = image_module.Image
    show, save = image_class.show, image_class.save

    @functools.wraps(show)
    def show_displays(self: Any, *args: Any, **kwargs: Any) -> None:
        _display_image(self)

    @functools.wraps(save)
    def save_displays(self: Any, fp: Any, *args: Any, **kwargs: Any) -> Any:
        result = save(self, fp, *args, **kwargs)
        if isinstance(fp, str | os.PathLike):  # a file of the user's; PNG rendering saves to a buffer
            _display_image(self)
        return result

    image_class.show, image_class.save = show_displays, save_displays


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` once the module named `name` has been executed by an import, then
    leaves sys.meta_path: nothing is imported before user code imports it."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            try:
                self.then(module)
            except Exception as error:  # a PIL of another shape: images still work, undisplayed
                log.debug("could not hook %s: %s", fullname, error)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def load_ipython_extension(shell: Any) -> None:
    formatters = shell.display_formatter.formatters
    formatters[CHART_MIME] = ChartFormatter(parent=shell.display_formatter)
    formatters[DATA_MIME] = DataFormatter(parent=shell.display_formatter)
    if "PIL.Image" in sys.modules:
        patch_pil(sys.modules["PIL.Image"])
    else:
        sys.meta_path.insert(0, AfterImport("PIL.Image", patch_pil))
