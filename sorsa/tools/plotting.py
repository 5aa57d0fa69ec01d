"""matplotlib for the figures of the analysis, the reports and the benchmarks: imported only when a figure is
drawn, on the file-only Agg backend."""
from __future__ import annotations

from ..core.errors import MissingPackageError


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or one clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise MissingPackageError("the analysis and report plots need matplotlib: pip install matplotlib "
                                  "(a dependency of the project)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
