"""The benchmark's picture: output tok/s against batch size, one line per context length,
one panel per node, as a PNG.

matplotlib is imported here, lazily, with the Agg backend (no display): only the API
process that draws a plot pays for it. A `Figure` made directly, not through pyplot,
holds no global state, so concurrent requests draw apart.
"""

from __future__ import annotations

import io
from typing import Sequence

from nexus.benchmarks.cells import Cell

MAX_COLUMNS = 3


def plot_png(cells: Sequence[Cell], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    nodes = sorted({cell.node for cell in cells}) or ["(no cells)"]
    columns = min(MAX_COLUMNS, len(nodes))
    rows = -(-len(nodes) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.6), dpi=100, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for panel, node in enumerate(nodes):
        ax = axes[panel // columns][panel % columns]
        mine = [cell for cell in cells if cell.node == node]
        for context in sorted({cell.context_length for cell in mine}):
            line = sorted((cell for cell in mine if cell.context_length == context), key=lambda c: c.batch_size)
            ax.plot([c.batch_size for c in line], [c.output_tok_s for c in line], marker="o",
                    label=f"context {context}")
        ax.set_title(node)
        ax.set_xlabel("batch size (requests at once)")
        ax.set_xscale("log", base=2)
        batches = sorted({cell.batch_size for cell in mine}) or [1]
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.grid(True, alpha=0.3)
        if panel % columns == 0:
            ax.set_ylabel("output tok/s")
        if mine:
            ax.legend(fontsize="small")
    for panel in range(len(nodes), rows * columns):
        axes[panel // columns][panel % columns].set_visible(False)
    figure.suptitle(title)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
