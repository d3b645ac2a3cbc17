"""The analysis scripts end to end on a tiny real pipeline laid out at the default paths,
and the README's worked examples executed verbatim on those outputs."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import false_prediction
import gradCAM_evaluation
import prepare_data
import train
from helpers import make_raw_tree
from TracIn import analyze_misprediction_influences, analyze_topk_results, efficient_tracin, mislabel_detection
from TracIn.detectors import recall_at, roc_auc

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """prepare (510 images, 127 test) -> train 2 epochs -> TracIn -> every analysis, default paths."""
    import os

    root = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(root)
    try:
        make_raw_tree(root / "raw", per_class=170)
        assert prepare_data.main(["--raw_dir", "raw", "--image_size", "16", "--label_noise", "0.1", "--test_fraction", "0.25",
                                  "--num_workers", "2"]) == 0
        assert train.main(["--arch", "resnet18", "--epochs", "2", "--save_checkpoints_every", "1", "--batch_size", "32",
                           "--learning_rate", "1e-3", "--weights", "none", "--num_workers", "0"]) == 0
        assert efficient_tracin.main(["--top_k", "20", "--batch_size", "64", "--num_workers", "0"]) == 0
        assert false_prediction.main(["--num_workers", "0"]) == 0
        assert mislabel_detection.main([]) == 0
        assert analyze_topk_results.main(["--max_panels", "2", "--num_correct", "1"]) == 0
        assert analyze_misprediction_influences.main(["--high_impact", "1"]) == 0
        assert gradCAM_evaluation.main(["--max_images", "4", "--num_proponents", "3"]) == 0
        yield root
    finally:
        os.chdir(old)


def test_false_predictions_csv_matches_evaluation(workdir):
    fp = pd.read_csv(workdir / "false_predictions" / "false_predictions.csv")
    assert list(fp.columns) == ["split", "index", "path", "true_label", "pred_label", "confidence", "true_class_prob"]
    assert (fp.true_label != fp.pred_label).all()
    assert (fp.true_class_prob < fp.confidence).all()
    assert (workdir / "false_predictions" / "combined_mispredictions.png").stat().st_size > 5000


def test_topk_analysis_outputs(workdir):
    out = workdir / "TracIn" / "results" / "analysis"
    share = pd.read_csv(out / "class_proponent_share.csv").set_index("test_class")
    np.testing.assert_allclose(share.sum(axis=1).to_numpy(), 1.0)
    mi = pd.read_csv(out / "most_influential.csv")
    idx = np.load(workdir / "TracIn/results/top_k_influences_indices.npy")
    assert mi.proponent_count.sum() == idx.size
    top = mi.iloc[0]
    assert top.proponent_count == (idx == top.train_idx).sum()
    for name in ("dashboard.png", "score_distribution.png", "most_influential.png", "class_proponent_share.png"):
        assert (out / name).stat().st_size > 5000
    assert len(list((out / "panels").glob("test_*.png"))) >= 1
    s = json.loads((out / "summary.json").read_text())
    opp = np.load(workdir / "TracIn/results/top_k_opponents_values.npy")
    assert s["opponent_negative_share"] == pytest.approx((opp < 0).mean())


def test_misprediction_analysis_joins_correctly(workdir):
    res = workdir / "TracIn" / "results"
    cross = pd.read_csv(res / "misprediction" / "misprediction_cross_analysis.csv")
    fp = pd.read_csv(workdir / "false_predictions" / "false_predictions.csv")
    idx = np.load(res / "top_k_influences_indices.npy")
    vals = np.load(res / "top_k_influences_values.npy")
    wrong_train = set(fp[fp.split == "train"]["index"])
    wrong_test = set(fp[fp.split == "test"]["index"])
    expected = sum(1 for t in wrong_test for j in idx[t] if j in wrong_train)
    assert len(cross) == expected
    for _, r in cross.head(20).iterrows():
        assert idx[r.test_idx, r["rank"] - 1] == r.train_idx
        assert vals[r.test_idx, r["rank"] - 1] == pytest.approx(r.influence)
        assert r.same_error == (r.test_true == r.train_true and r.test_pred == r.train_pred)
    per = pd.read_csv(res / "misprediction_influence_analysis.csv")
    assert set(per.train_idx) == wrong_train
    assert (per.proponent_count.to_numpy() == np.array([(idx == j).sum() for j in per.train_idx])).all()


def test_mislabel_detection_outputs(workdir):
    res = workdir / "TracIn" / "results"
    cand = pd.read_csv(res / "mislabel_candidates.csv")
    assert list(cand["rank"]) == list(range(1, len(cand) + 1))
    report = json.loads((res / "mislabel" / "mislabel_detection.json").read_text())
    assert (np.diff(cand[report["score"]]) <= 0).all()  # ranked by the default detector
    assert set(report["detectors"]) <= set(cand.columns) and {"aum", "forgetting", "self_influence"} <= set(report["detectors"])
    gt = pd.read_csv(workdir / "data/processed/mislabeled_ground_truth.csv")
    assert report["n_mislabeled"] == len(gt) == cand.truly_mislabeled.sum()
    for m in report["metrics"].values():
        assert 0 <= m["recall_at_10pct"] <= 1 and 0 <= m["roc_auc"] <= 1


def test_gradcam_script_outputs(workdir):
    assert (workdir / "false_predictions" / "gradcam_mispredictions.png").exists() or \
        not (pd.read_csv(workdir / "false_predictions/false_predictions.csv").split == "test").any()
    assert list((workdir / "TracIn" / "results" / "gradcam").glob("gradcam_test_*_proponents.png"))


def test_recall_and_auc_against_hand_computed_values():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.05, 0.3, 0.2, 0.6, 0.4, 0.5])
    bad = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    assert recall_at(scores, bad, 0.2) == pytest.approx(1 / 3)  # top 2: 0.9 (bad), 0.8
    assert recall_at(scores, bad, 0.5) == pytest.approx(1.0)  # top 5 holds 0.9, 0.7, 0.5
    # bad scores 0.9, 0.7, 0.5 beat 7, 6 and 5 of the 7 good ones: (7 + 6 + 5) / 21
    assert roc_auc(scores, bad) == pytest.approx(18 / 21)


def readme_examples():
    text = README.read_text()
    return re.findall(r"<!-- example -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_worked_examples_run_verbatim(workdir, monkeypatch, capsys):
    blocks = readme_examples()
    assert len(blocks) == 3
    monkeypatch.chdir(workdir)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "test image 100" in out and "negative" in out


def test_the_seed_readmes_examples_run_verbatim(workdir, monkeypatch, capsys):
    """The seed's README read the misprediction CSV at TracIn/results/ (now a link into misprediction/); its three
    examples, kept verbatim in tests/data, still run on the default layout."""
    text = (Path(__file__).resolve().parents[1] / "data" / "seed_readme_examples.md").read_text()
    blocks = re.findall(r"<!-- example -->\s*```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3 and "TracIn/results/misprediction_cross_analysis.csv" in blocks[1]
    monkeypatch.chdir(workdir)
    assert (workdir / "TracIn/results/misprediction_cross_analysis.csv").is_symlink()
    for code in blocks:
        exec(compile(code, "seed_readme_examples.md", "exec"), {})
    out = capsys.readouterr().out
    assert "test image 100" in out and "negative" in out and "n_test" in out


def test_concentration_diagnostics_against_direct_counts():
    from TracIn.analyze_topk_results import concentration, gini

    lists = np.array([[3, 1, 4], [3, 5, 9], [3, 1, 2], [6, 1, 0]])  # 4 test images, top-3
    c = concentration(lists, train_ids=np.arange(12), k=3)
    assert c["distinct"] == len({3, 1, 4, 5, 9, 2, 6, 0}) == 8
    assert c["max_train_idx"] == 3 and c["max_test_share"] == pytest.approx(3 / 4)
    counts = np.array([1, 3, 1, 3, 1, 1, 1, 0, 0, 1, 0, 0], dtype=float)  # appearances of train 0..11
    want = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * len(counts) ** 2 * counts.mean())
    assert c["gini"] == pytest.approx(want)
    assert concentration(lists, np.arange(12), k=1)["distinct"] == 2  # only the first column: 3 and 6
    assert gini(np.ones(5)) == 0 and gini(np.array([0, 0, 0, 4])) == pytest.approx(3 / 4)


def test_topk_summary_reports_concentration(workdir):
    s = json.loads((workdir / "TracIn/results/analysis/summary.json").read_text())
    idx = np.load(workdir / "TracIn/results/top_k_influences_indices.npy")[:, :10]
    assert s["concentration"]["proponents"]["distinct"] == len(np.unique(idx))
    assert (workdir / "TracIn/results/analysis/concentration.png").stat().st_size > 5000
