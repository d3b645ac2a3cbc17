"""How the main job (efficient_tracin) moves between the repository's files: a structural measure, not a timing.

    $ python bench/bench_crossings.py --data_dir data/processed --checkpoint_dir models/checkpoints

Runs one small TracIn job (--train_subset/--test_subset, into a temporary folder) under a profiler that sees every
call between functions of this repository (not of torch or the standard library) and prints:
- files: the repository files whose functions ran;
- crossings: distinct calls from a function of one file into a function of another;
- re-entries: distinct calls into a file that is already on the call stack below the caller's file (A -> B -> A:
  control returns to a file it left before that file's call has finished);
- per file, how many distinct functions ran and how many re-entries land in it.
Counted once per distinct (caller, callee) pair, so loops and batch counts do not weigh in.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_file(code) -> str | None:
    path = Path(code.co_filename)
    if not path.is_absolute():  # <frozen ...>, <string>: the interpreter's own
        return None
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    return None if rel.parts[0] in (".venv", "tests", "bench") else str(rel)


def trace(job) -> tuple[set, set, set]:
    """Run job() under sys.setprofile; (files, crossings, re-entries) as sets of names and (caller, callee) pairs."""
    files, crossings, reentries = set(), set(), set()
    stack: list[tuple[str | None, str]] = []  # (file, function) of the Python frames entered

    def profile(frame, event, arg):
        if event == "call":
            f = repo_file(frame.f_code)
            here = (f, frame.f_code.co_qualname)
            caller = next((s for s in reversed(stack) if s[0] is not None), None)
            if f is not None:
                files.add(f)
                if caller is not None and caller[0] != f:
                    edge = (f"{caller[0]}:{caller[1]}", f"{f}:{here[1]}")
                    crossings.add(edge)
                    chain = [s[0] for s in stack if s[0] is not None]
                    chain = [x for i, x in enumerate(chain) if i == 0 or chain[i - 1] != x]  # files, runs collapsed
                    if f in chain[:-1]:  # below the caller's file: control comes back into a file it left
                        reentries.add(edge)
            stack.append(here)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        job()
    finally:
        sys.setprofile(None)
    return files, crossings, reentries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="a training run's checkpoints (default models/checkpoints)")
    p.add_argument("--train_subset", type=int, default=64, help="training images scored (default 64)")
    p.add_argument("--test_subset", type=int, default=16, help="test images scored (default 16)")
    p.add_argument("--score_fn", default="", help="efficient_tracin's --score_fn (default: its default)")
    args = p.parse_args(argv)
    from TracIn import efficient_tracin

    with tempfile.TemporaryDirectory() as out:
        argv = ["--data_dir", args.data_dir, "--checkpoint_dir", args.checkpoint_dir, "--output_dir", out, "--train_subset",
                str(args.train_subset), "--test_subset", str(args.test_subset), "--top_k", "5", "--num_workers", "0",
                "--device", "cpu"] + (["--score_fn", args.score_fn] if args.score_fn else [])
        files, crossings, reentries = trace(lambda: efficient_tracin.main(argv))
    into = Counter(callee.split(":")[0] for _, callee in reentries)
    funcs = Counter(callee.split(":")[0] for _, callee in crossings)
    print("| files | crossings (distinct calls between files) | re-entries (control back in a file it left) |")
    print("|---|---|---|")
    print(f"| {len(files)} | {len(crossings)} | {len(reentries)} |")
    print()
    print("| file | distinct calls into it | re-entries into it |")
    print("|---|---|---|")
    for f in sorted(files):
        print(f"| {f} | {funcs.get(f, 0)} | {into.get(f, 0)} |")
    print()
    for caller, callee in sorted(reentries):
        print(f"re-entry: {caller} -> {callee}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
