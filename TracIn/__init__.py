"""TracIn influence for image classifiers. From a notebook (TracIn/api.py):

    import TracIn
    run = TracIn.open("TracIn/results")
    run.proponents(100, k=10)

From the shell, the tools run from the repo root: `python -m TracIn.efficient_tracin`, `python -m TracIn.explain`, ...
"""


def open(results_dir="TracIn/results", data_dir=None, device: str = "cpu"):  # noqa: A001 (the notebook's TracIn.open)
    """A finished run as a TracIn.api.Results object (imported here on first use, so the tools start without it)."""
    from TracIn.api import Results

    return Results(results_dir, data_dir, device)
