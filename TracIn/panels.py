"""The figures' shared parts, each drawn in one place: a query image beside its proponents and opponents.

    from TracIn.panels import influence_panel
    fig = influence_panel(image, "test #4", {"proponent": (values, ids), "opponent": (values, ids)}, train_list, k=5)
"""
from __future__ import annotations

from lib.data_utils import load_rgb


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def influence_panel(image, title: str, lists: dict, train_list, k: int):
    """A query image (left, both rows) beside its proponents (top row, green) and opponents (bottom, red).
    lists: {"proponent": (values, split indices), "opponent": (values, split indices)}, each best first."""
    plt = pyplot()
    names = train_list.class_names
    fig, axes = plt.subplots(2, k + 1, figsize=((k + 1) * 1.75, 4.3))
    for ax in axes.ravel():
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.imshow(image)
    axes[0, 0].set_title(title, fontsize=8)
    for line, (kind, color) in enumerate((("proponent", "green"), ("opponent", "red"))):
        vals, idx = lists[kind]
        for j in range(min(k, len(idx))):
            ax = axes[line, j + 1]
            tr = int(idx[j])
            ax.imshow(load_rgb(train_list.paths[tr]))
            ax.set_title(f"{kind} {j + 1}\n#{tr} {names[train_list.labels[tr]]}\n{float(vals[j]):.3g}", fontsize=7, color=color)
    fig.tight_layout()
    return fig
