"""TracIn influence for image classifiers: `influence_utils` (library), `efficient_tracin` (CLI),
and the analysis scripts. Run from the repo root, e.g. `python -m TracIn.efficient_tracin`."""
