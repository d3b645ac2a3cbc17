"""Dashboards of TracIn results: score distributions, class structure, most influential images, panels.

    $ python -m TracIn.analyze_topk_results --results_dir TracIn/results     # -> TracIn/results/analysis

Writes to --out_dir: score_distribution.png, class_proponent_share.{csv,png} (row: a test
image's true class, column: its proponents' class, share of proponents), most_influential.csv
and most_influential.png (how often each training image appears in the top-k lists),
panels/test_<idx>.png (a test image beside its top proponents and opponents) for a few
correctly and all (up to --max_panels) mispredicted test images, and dashboard.png.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.cli import cli, positive_int
from lib.data_utils import list_split, load_rgb
from lib.files import read_json, save_csv, save_figure, save_json
from lib.ownership import Owner
from TracIn.core.results import appearances, explained_model, load_results, run_id
from TracIn.core.run_folder import tool_folder, tool_output
from TracIn.panels import influence_panel, pyplot

log = logging.getLogger(__name__)
TOOL = "analyze_topk_results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--out_dir", default=None, help="this tool's folder, replaced whole (default: results_dir/analysis)")
    p.add_argument("--num_correct", type=positive_int, default=3, help="correctly predicted test images given a panel (default 3)")
    p.add_argument("--max_panels", type=positive_int, default=12, help="most mispredicted test images given a panel (default 12)")
    p.add_argument("--panel_k", type=positive_int, default=5, help="proponents and opponents per panel (default 5)")
    p.add_argument("--top_n", type=positive_int, default=20, help="training images in the most-influential chart (default 20)")
    args = p.parse_args(argv)
    if args.out_dir is None:  # beside the run it analyses: analysing normalized/ or a copy never replaces another's
        args.out_dir = str(Path(args.results_dir) / "analysis")
    return args


def score_distribution(r, ax=None):
    plt = pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    prop, opp = np.asarray(r["top_k_influences_values"]).ravel(), np.asarray(r["top_k_opponents_values"]).ravel()
    lo, hi = min(prop.min(), opp.min()), max(prop.max(), opp.max())
    bins = np.linspace(lo, hi, 60)
    ax.hist(prop, bins=bins, alpha=0.6, label=f"proponents ({(prop < 0).mean():.1%} negative)", color="tab:green")
    ax.hist(opp, bins=bins, alpha=0.6, label=f"opponents ({(opp < 0).mean():.1%} negative)", color="tab:red")
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel("TracIn influence")
    ax.set_ylabel("count")
    ax.set_yscale("log")
    ax.set_title("Top-k influence scores")
    ax.legend(fontsize=8)
    return fig


def class_share(r, train_list, test_list) -> pd.DataFrame:
    names = train_list.class_names
    test_cls = test_list.labels[np.asarray(r["test_indices"])]
    prop_cls = train_list.labels[np.asarray(r["top_k_influences_indices"])]  # (n_test, k)
    counts = np.zeros((len(names), len(names)))
    for c in range(len(names)):
        rows = prop_cls[test_cls == c]
        if rows.size:
            counts[c] = np.bincount(rows.ravel(), minlength=len(names)) / rows.size
    return pd.DataFrame(counts, index=pd.Index(names, name="test_class"), columns=names)


def heatmap(share: pd.DataFrame, ax=None):
    import seaborn as sns

    plt = pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(share), 1.0 + 0.5 * len(share)))
    sns.heatmap(share, annot=len(share) <= 12, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax, cbar=fig is not None,
                annot_kws={"fontsize": 7})
    ax.set_xlabel("class of proponent")
    ax.set_ylabel("class of test image")
    ax.set_title(f"Proponents sharing the test image's class: {np.mean(np.diag(share.to_numpy())):.1%} (class mean)")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    return fig


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when all equal, (n-1)/n when one holds everything."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def concentration(indices: np.ndarray, train_ids: np.ndarray, k: int = 10) -> dict:
    """How concentrated the top-k lists (n_test, >= k) are on a few training images.

    Returns: distinct training images in the lists, the largest share of test images whose list one
    training image is in, and the Gini coefficient of appearances over all scored training images.
    """
    top = np.asarray(indices)[:, :k]
    counts = pd.Series(top.ravel()).value_counts()  # a list holds each image once: count = test lists it is in
    per_image = counts.reindex(np.asarray(train_ids), fill_value=0).to_numpy()
    return {"k": int(top.shape[1]), "distinct": int(len(counts)), "max_test_share": float(counts.max() / len(top)),
            "max_train_idx": int(counts.idxmax()), "gini": gini(per_image)}


def lorenz(r, k: int = 10, ax=None):
    """Share of all top-k appearances held by the most frequent training images."""
    plt = pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 4))
    ids = np.asarray(r["train_indices"])
    for kind, key, color in (("proponents", "top_k_influences_indices", "tab:green"), ("opponents", "top_k_opponents_indices", "tab:red")):
        top = np.asarray(r[key])[:, :k]
        counts = np.sort(pd.Series(top.ravel()).value_counts().reindex(ids, fill_value=0).to_numpy())[::-1]
        c = concentration(r[key], ids, k)
        ax.plot(np.arange(1, len(counts) + 1) / len(counts), np.cumsum(counts) / counts.sum(), color=color,
                label=f"{kind}: {c['distinct']} distinct, Gini {c['gini']:.2f}, max {c['max_test_share']:.0%} of tests")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="every image equally often")
    ax.set_xlabel("share of training images (most frequent first)")
    ax.set_ylabel(f"share of top-{k} appearances")
    ax.set_title(f"Concentration of the top-{k} lists")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def most_influential(r, train_list) -> pd.DataFrame:
    n = len(train_list.paths)
    prop, opp = appearances(r, "proponents", n), appearances(r, "opponents", n)
    ids = np.asarray(r["train_indices"])
    names = np.asarray(train_list.class_names)
    t = pd.DataFrame({"train_idx": ids, "path": np.asarray(train_list.paths)[ids], "class_name": names[train_list.labels[ids]],
                      "proponent_count": prop[ids], "opponent_count": opp[ids]})
    t["total_count"] = t.proponent_count + t.opponent_count
    if "self_influence" in r:
        t["self_influence"] = r["self_influence"]
    return t.sort_values(["total_count", "proponent_count"], ascending=False, kind="stable")


def bar_chart(table: pd.DataFrame, top_n: int, ax=None):
    plt = pyplot()
    fig = None
    top = table.head(top_n)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(top) + 1.2))
    labels = [f"#{i} {c}" for i, c in zip(top.train_idx, top.class_name)]
    y = np.arange(len(top))
    ax.barh(y, top.proponent_count, color="tab:green", label="as proponent")
    ax.barh(y, top.opponent_count, left=top.proponent_count, color="tab:red", label="as opponent")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("appearances in top-k lists")
    ax.set_title(f"Most influential training images (top {len(top)})")
    ax.legend(fontsize=7)
    return fig


def panel(row: int, r, train_list, test_list, k: int, pred_name: str | None):
    t = int(r["test_indices"][row])
    names = train_list.class_names
    title = f"test #{t}\ntrue {names[test_list.labels[t]]}" + (f"\npred {pred_name}" if pred_name else "")
    lists = {kind: (np.asarray(r[f"top_k_{name}_values"][row]), np.asarray(r[f"top_k_{name}_indices"][row]))
             for kind, name in (("proponent", "influences"), ("opponent", "opponents"))}
    return influence_panel(load_rgb(test_list.paths[t]), title, lists, train_list, k)


def analyze(args) -> dict:
    plt = pyplot()
    Owner(TOOL).folder(args.out_dir, "--out_dir")  # refused before any work
    r = load_results(args.results_dir, data_dir=args.data_dir)
    train_list, test_list = list_split(args.data_dir, "train"), list_split(args.data_dir, "test")
    # built beside and swapped in whole: no panel of an earlier run stays next to the new ones
    with tool_folder(args.out_dir, TOOL, {"tracin_run": run_id(r.record)}) as out:
        save_figure(out / "score_distribution.png", score_distribution(r))
        share = class_share(r, train_list, test_list)
        save_csv(out / "class_proponent_share.csv", share.reset_index())
        save_figure(out / "class_proponent_share.png", heatmap(share))
        table = most_influential(r, train_list)
        save_csv(out / "most_influential.csv", table)
        save_figure(out / "most_influential.png", bar_chart(table, args.top_n))

        # test predictions at the last checkpoint, as efficient_tracin recorded them
        test_ids = np.asarray(r["test_indices"])
        pred = dict(zip(test_ids.tolist(), np.asarray(test_list.class_names)[np.asarray(r["test_pred"])]))
        wrong = [i for i, t in enumerate(test_ids) if pred.get(t) != test_list.class_names[test_list.labels[t]]]
        right = [i for i, t in enumerate(test_ids) if pred.get(t) == test_list.class_names[test_list.labels[t]]]
        chosen = right[: args.num_correct] + wrong[: args.max_panels]
        for row in chosen:
            save_figure(out / "panels" / f"test_{int(test_ids[row])}.png", panel(row, r, train_list, test_list, args.panel_k, pred.get(int(test_ids[row]))))

        fig = plt.figure(figsize=(13, 8.5))
        gs = fig.add_gridspec(2, 2, width_ratios=[1.1, 1])
        score_distribution(r, fig.add_subplot(gs[0, 0]))
        heatmap(share, fig.add_subplot(gs[:, 1]))
        bar_chart(table, min(args.top_n, 12), fig.add_subplot(gs[1, 0]))
        prop, opp = np.asarray(r["top_k_influences_values"]), np.asarray(r["top_k_opponents_values"])
        fig.suptitle(f"TracIn: {len(test_ids)} test x {len(r['train_indices'])} train, top-{prop.shape[1]}; "
                     f"{len(wrong)} mispredicted test images by {explained_model(r.record)}; negative scores: "
                     f"{(prop < 0).mean():.1%} of proponents, {(opp < 0).mean():.1%} of opponents", fontsize=10)
        fig.tight_layout()
        save_figure(out / "dashboard.png", fig)
        save_figure(out / "concentration.png", lorenz(r))
        summary = {"concentration": {kind: concentration(r[key], r["train_indices"], 10) for kind, key in
                                     (("proponents", "top_k_influences_indices"), ("opponents", "top_k_opponents_indices"))},
                   "normalize": r.record["args"]["normalize"],
                   "proponent_negative_share": float((prop < 0).mean()), "opponent_negative_share": float((opp < 0).mean()),
                   "same_class_proponent_share": float(np.mean(np.diag(share.to_numpy()))), "panels": len(chosen),
                   "mispredicted_test": len(wrong)}
        summary["tracin_run"] = run_id(r.record)  # what this folder was computed from
        save_json(out / "summary.json", summary)
    return summary


@dataclass
class Analysis:
    """This tool's output for a run: summary.json's figures, and its charts by name (those that exist)."""

    folder: Path
    summary: dict
    figures: dict  # "dashboard", "concentration", ... -> Path

    def figure(self, name: str) -> Path | None:
        return self.figures.get(name)


def load(results, notes: list[str] | None = None, folder=None) -> Analysis | None:
    """The dashboards of a run (a TracInResults or its folder; `folder`: another --out_dir than run/analysis).
    Missing or stale: one UserError line, or with `notes` a line there and None; unreadable: refused."""
    found = tool_output(results, "analysis", TOOL, "no dashboards: run python -m TracIn.analyze_topk_results", notes, folder)
    if found is None:
        return None
    figures = {p.stem: p for p in sorted(found.glob("*.png"))}
    return Analysis(found, read_json(found / "summary.json", "rerun python -m TracIn.analyze_topk_results"), figures)


def main(argv=None):
    args = parse_args(argv)
    s = analyze(args)
    log.info(f"top-k analysis: negative scores {s['proponent_negative_share']:.1%} of proponents, {s['opponent_negative_share']:.1%} "
             f"of opponents; proponents share the test image's class {s['same_class_proponent_share']:.1%} of the time; "
             f"{s['panels']} panels; outputs in {args.out_dir} (dashboard.png)")
    for kind, c in s["concentration"].items():
        log.info(f"top-{c['k']} {kind} (--normalize {s['normalize']}): {c['distinct']} distinct training images; train #{c['max_train_idx']} "
                 f"is in {c['max_test_share']:.1%} of the test images' lists; Gini of appearances {c['gini']:.3f}")
    return 0


if __name__ == "__main__":
    cli(main)
