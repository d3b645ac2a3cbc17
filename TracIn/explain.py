"""Explain new images: their proponents and opponents in the training set, from a finished run's cached factors.

    $ python -m TracIn.explain photo.jpg other.png                 # the run in TracIn/results, top-10 of each
    $ python -m TracIn.explain photo.jpg --label gatto --k 20      # explained under a label you give

Each image is transformed as the prepared test split was (another size or colour mode is resized and converted as
prepare_data.py did), scored with the run's own method (--score_fn, --normalize, --damping as efficient_tracin ran)
against the cached training factors: one forward/backward of the images per checkpoint, no training forward pass.
Without --label an image is explained under its label in the data set if it is one of the prepared files, else under
the model's prediction. Writes out_dir (default results_dir/explain/, replaced whole): explain.csv (one row per image,
kind and rank: label, label_source, prediction, train_idx, path, class, score) and explain_<i>.png (the image beside
its proponents and opponents), and prints the proponents. The same from Python: TracIn.open(...).explain(paths).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lib.cli import cli, positive_int
from lib.files import save_csv, save_figure
from TracIn.panels import influence_panel

log = logging.getLogger(__name__)
TOOL = "explain"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", help="image files to explain (any size or colour mode PIL reads)")
    p.add_argument("--results_dir", default="TracIn/results", help="a finished efficient_tracin run (default TracIn/results)")
    p.add_argument("--data_dir", default=None, help="its prepared data (default: the folder the run recorded)")
    p.add_argument("--label", nargs="+", default=None,
                   help="class name or index per image to explain it under (default: its data-set label, else the prediction)")
    p.add_argument("--k", type=positive_int, default=10, help="proponents and opponents per image (default 10)")
    p.add_argument("--out_dir", default=None, help="explain.csv and the panels (default results_dir/explain)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda[:N] (default cpu)")
    return p.parse_args(argv)


def main(argv=None):
    from TracIn.api import Results
    from TracIn.core.run_folder import tool_folder

    args = parse_args(argv)
    run = Results(args.results_dir, args.data_dir, args.device)
    table = run.explain(args.images, k=args.k, labels=args.label)  # a label: a class name, else digits of an index
    out = Path(args.out_dir or Path(args.results_dir) / "explain")
    with tool_folder(out, TOOL, {"tracin_run": run.run_id, "images": [str(p) for p in args.images]}) as build:
        save_csv(build / "explain.csv", table)
        for q, rows in table.groupby("query"):
            first = rows.iloc[0]
            lists = {kind: (rows[rows.kind == kind].score.to_numpy(), rows[rows.kind == kind].train_idx.to_numpy())
                     for kind in ("proponent", "opponent")}
            title = f"{Path(first.image).name}\n{first.label_source}: {first.label}\npred {first.prediction}"
            fig = influence_panel(run.prepared_image(args.images[q]), title, lists, run.train_list, min(args.k, 10))
            save_figure(build / f"explain_{q}.png", fig)
    for q, rows in table[table.kind == "proponent"].groupby("query"):
        first = rows.iloc[0]
        log.info(f"{first.image}: explained as {first.label} ({first.label_source}); predicted {first.prediction}")
        for rank, idx, name, score, path in rows[["rank", "train_idx", "class", "score", "path"]].itertuples(index=False, name=None):
            log.info(f"  {rank:3d}. train #{idx} ({name}) {score:+.4g}  {path}")
    log.info(f"explain: {len(args.images)} image(s), top-{args.k} proponents and opponents in {out}/explain.csv and explain_<i>.png")
    return 0


if __name__ == "__main__":
    cli(main)
