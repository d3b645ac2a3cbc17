"""The method registry, the run object and the notebook API on a tiny trained run: the dense matrix the LDS measures
ranks exactly as efficient_tracin ships, explain() on test images reproduces the shipped arrays, new images of any
size and mode are explained, bad input gets one line, and the README's notebook examples run verbatim."""
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import TracIn
from lib.cli import UserError
from helpers import damage_npy, one_error_line, sh
from TracIn import efficient_tracin, explain
from TracIn.core.methods import METHODS, SCORE_FNS, method_for
from TracIn.core.run import InfluenceRun

README = Path(__file__).resolve().parents[2] / "README.md"
SHIPPED = [("influence_last", "none"), ("tracin", "train"), ("tracin", "none"), ("tracin_last", "none"), ("influence", "none"),
           ("trak", "none"), ("tracin", "both")]


@pytest.fixture(scope="module")
def runs(trained, prepared, tmp_path_factory):
    """efficient_tracin with each shipped method on the trained tiny run, sharing its factor cache."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for score_fn, normalize in SHIPPED:
        name = f"{score_fn}-{normalize}"
        assert efficient_tracin.main(["--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt"), "--output_dir",
                                      str(root / name), "--cache_dir", str(trained / "res" / "factors"), "--top_k", "5",
                                      "--score_fn", score_fn, "--normalize", normalize, "--num_workers", "0",
                                      "--trak_dim", "64"]) == 0
        out[(score_fn, normalize)] = root / name
    return out


def test_registry_names_are_the_clis_and_the_lds(runs):
    from TracIn import counterfactual_check, lds

    assert SCORE_FNS == ("tracin", "tracin_last", "influence", "influence_last", "trak")
    assert lds.METHODS == tuple(METHODS)
    assert set(counterfactual_check.METHODS) - {"knn", "random"} <= {m for m in METHODS if METHODS[m].shipped}
    with pytest.raises(UserError, match="choose one of"):
        method_for("nope")


@pytest.mark.parametrize("score_fn,normalize", SHIPPED)
def test_dense_matrix_ranks_as_the_cli_ships(runs, prepared, score_fn, normalize):
    """The LDS's dense matrix of a method (float64) and efficient_tracin's streamed top-k come from one definition."""
    res = runs[(score_fn, normalize)]
    run = InfluenceRun.from_results(res, str(prepared))
    fs = run.factors()
    sa = run.score_args()
    dense = fs.dense(method_for(score_fn, normalize), sa.damping, sa.trak_dim)  # (n_test, n_train)
    assert dense.shape == (run.n_test, run.n_train) and dense.dtype == np.float64 and np.isfinite(dense).all()
    values, indices = np.load(res / "top_k_influences_values.npy"), np.load(res / "top_k_influences_indices.npy")
    opp_values, opp_indices = np.load(res / "top_k_opponents_values.npy"), np.load(res / "top_k_opponents_indices.npy")
    k = values.shape[1]
    order = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(order, indices)
    np.testing.assert_allclose(np.take_along_axis(dense, indices, 1), values, rtol=1e-5, atol=1e-6 * np.abs(dense).max())
    np.testing.assert_array_equal(np.argsort(dense, axis=1, kind="stable")[:, :k], opp_indices)
    np.testing.assert_allclose(np.take_along_axis(dense, opp_indices, 1), opp_values, rtol=1e-5, atol=1e-6 * np.abs(dense).max())


@pytest.mark.parametrize("score_fn,normalize", [("influence_last", "none"), ("tracin", "train"), ("tracin", "none")])
def test_explain_on_test_images_equals_the_shipped_arrays(runs, prepared, score_fn, normalize):
    res = runs[(score_fn, normalize)]
    run = TracIn.open(res, data_dir=str(prepared))
    ids = np.array([0, 2, 3, 5])
    paths = [run.test_list.paths[i] for i in ids]
    table = run.explain(paths, k=5)
    assert (table.label_source == "data set").all()
    for kind, name in (("proponent", "influences"), ("opponent", "opponents")):
        got = table[table.kind == kind]
        idx = got.train_idx.to_numpy().reshape(len(ids), 5)
        val = got.score.to_numpy().reshape(len(ids), 5)
        np.testing.assert_array_equal(idx, np.load(res / f"top_k_{name}_indices.npy")[ids])
        np.testing.assert_allclose(val, np.load(res / f"top_k_{name}_values.npy")[ids], rtol=1e-6, atol=1e-6)
    # the same images as PIL objects, under their labels given by name
    pil = [Image.open(p) for p in paths]
    again = run.explain(pil, k=5, labels=[run.class_names[run.test_list.labels[i]] for i in ids])
    assert (again.label_source == "given").all()
    np.testing.assert_array_equal(again.train_idx.to_numpy(), table.train_idx.to_numpy())


def test_explain_new_image_of_another_size_and_mode(runs, prepared, tmp_path):
    run = TracIn.open(runs[("influence_last", "none")], data_dir=str(prepared))
    rng = np.random.default_rng(0)
    gray = tmp_path / "gray.png"
    Image.fromarray((rng.random((50, 41)) * 255).astype(np.uint8), "L").save(gray)
    rgba = Image.fromarray((rng.random((20, 20, 4)) * 255).astype(np.uint8), "RGBA")
    table = run.explain([gray, rgba], k=3)
    assert list(table.columns) == ["query", "image", "label", "label_source", "prediction", "kind", "rank", "train_idx",
                                   "path", "class", "score"]
    assert len(table) == 2 * 2 * 3 and (table.label_source == "prediction").all()
    assert (table.label == table.prediction).all() and np.isfinite(table.score).all()
    assert run.prepared_image(gray).size == run.prepared_image(run.test_list.paths[0]).size
    props = table[table.kind == "proponent"].score.to_numpy().reshape(2, 3)
    assert (np.diff(props, axis=1) <= 0).all()  # best first


def test_notebook_tables_join_the_arrays(runs, prepared):
    res = runs[("influence_last", "none")]
    run = TracIn.open(res, data_dir=str(prepared))
    idx, vals = np.load(res / "top_k_influences_indices.npy"), np.load(res / "top_k_influences_values.npy")
    p = run.proponents(3, k=4)
    assert list(p.columns) == ["rank", "train_idx", "path", "class", "score"]
    np.testing.assert_array_equal(p.train_idx, idx[3, :4])
    np.testing.assert_allclose(p.score, vals[3, :4])
    man = pd.read_csv(prepared / "manifest.csv")
    train = man[man.split == "train"].set_index("index")
    assert [Path(x).name for x in p.path] == [Path(x).name for x in train.loc[p.train_idx, "path"]]
    assert list(p["class"]) == list(train.loc[p.train_idx, "class_name"])
    o = run.opponents(3, k=2)
    np.testing.assert_array_equal(o.train_idx, np.load(res / "top_k_opponents_indices.npy")[3, :2])
    si = run.self_influence()
    np.testing.assert_allclose(si.self_influence, np.load(res / "self_influence.npy"))
    t = run.test_table()
    assert len(t) == run.run.n_test and ((t.margin > 0) == (t.label == t.prediction)).all()
    with pytest.raises(UserError, match="kept the top 5"):
        run.proponents(3, k=6)
    with pytest.raises(UserError, match="not among"):
        run.proponents(10 ** 6)
    with pytest.raises(UserError, match="mislabel_detection"):
        run.mislabel_candidates()
    with pytest.raises(UserError, match="TracIn.lds"):
        run.lds()


def test_explain_cli_writes_table_and_panel_and_refuses_bad_files(runs, prepared, tmp_path):
    res = runs[("tracin", "train")]
    img = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(1).random((64, 48, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "explained"
    assert explain.main([str(img), "--results_dir", str(res), "--data_dir", str(prepared), "--k", "3", "--out_dir", str(out),
                         "--label", "0"]) == 0
    table = pd.read_csv(out / "explain.csv")
    assert len(table) == 6 and (table.label_source == "given").all()
    assert (out / "explain_0.png").stat().st_size > 5000
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    before = (out / "explain.csv").read_bytes()
    r = sh("-m", "TracIn.explain", bad, "--results_dir", res, "--data_dir", prepared, "--out_dir", out)
    one_error_line(r, "cannot read image")
    assert (out / "explain.csv").read_bytes() == before  # nothing already written is lost
    r = sh("-m", "TracIn.explain", img, "--results_dir", res, "--data_dir", prepared, "--label", "nope")
    one_error_line(r, "not a class")


def test_explain_refuses_changed_checkpoints(runs, prepared, trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    res = tmp_path / "res"
    assert efficient_tracin.main(["--data_dir", str(prepared), "--checkpoint_dir", str(ckpt), "--output_dir", str(res),
                                  "--top_k", "2", "--num_workers", "0", "--all_checkpoints"]) == 0
    last = sorted(ckpt.glob("finetune_epoch_*.pth"))[-1]
    state = torch.load(last, weights_only=True)
    state["epoch"] = state["epoch"] + 100
    torch.save(state, last)
    with pytest.raises(UserError, match="changed since the TracIn run"):
        TracIn.open(res, data_dir=str(prepared)).explain([TracIn.open(res, data_dir=str(prepared)).test_list.paths[0]])


def test_explain_recomputes_a_damaged_cache_and_refuses_another(prepared, trained, tmp_path):
    """explain on a run whose cached A_fc.npy was cut short or had a byte changed gives the table it gave before (the
    cache is computed again); a cache whose rows agree with their own checksums but are not the run's is refused."""
    res = tmp_path / "res"
    assert efficient_tracin.main(["--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt"), "--output_dir",
                                  str(res), "--top_k", "2", "--score_fn", "tracin", "--normalize", "none",
                                  "--num_workers", "0"]) == 0
    image = TracIn.open(res, data_dir=str(prepared)).test_list.paths[1]
    before = TracIn.open(res, data_dir=str(prepared)).explain([image], k=2)
    a_fc = sorted((res / "factors").glob("train-*/*/A_fc.npy"))[-1]
    for how in ("truncate", "flip"):
        damage_npy(a_fc, how)
        pd.testing.assert_frame_equal(TracIn.open(res, data_dir=str(prepared)).explain([image], k=2), before)
    from TracIn.core.factors import row_sums

    a = np.load(a_fc, mmap_mode="r+")  # another cache: row 0 changed and its checksum with it
    a[0] *= 2
    a.flush()
    sums = np.load(a_fc.parent / "checksums.npy")
    sums[0, 0] = row_sums(np.asarray(a[:1]))[0]  # column 0: A_fc.npy
    np.save(a_fc.parent / "checksums.npy", sums)
    with pytest.raises(UserError) as e:
        explain.main([str(image), "--results_dir", str(res), "--data_dir", str(prepared), "--out_dir", str(tmp_path / "x")])
    assert "\n" not in str(e.value) and "checksums differ" in str(e.value) and "rerun efficient_tracin.py" in str(e.value)


def test_readme_notebook_examples_run_verbatim(runs, prepared, tmp_path, monkeypatch, capsys):
    """The README's notebook examples, on a run laid out at the default paths."""
    blocks = re.findall(r"<!-- notebook example -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    (tmp_path / "TracIn").mkdir()
    shutil.copytree(runs[("influence_last", "none")], tmp_path / "TracIn" / "results", symlinks=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "processed").symlink_to(prepared)
    photo = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(2).random((40, 40, 3)) * 255).astype(np.uint8)).save(photo)
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "train_idx" in out and "photo.jpg" in out


def test_non_finite_scores_are_refused_before_anything_is_written(trained, prepared, tmp_path):
    out = tmp_path / "res"
    r = sh("-m", "TracIn.efficient_tracin", "--data_dir", prepared, "--checkpoint_dir", trained / "ckpt", "--output_dir", out,
           "--cache_dir", trained / "res" / "factors", "--score_fn", "influence_last", "--damping", "1e-300", "--top_k", "2",
           "--num_workers", "0")
    one_error_line(r, "not finite", "--damping")
    assert not (out / "run.json").exists() and not list(out.glob("*.npy"))


def bomb_png(path, side=20000):
    """A PNG whose header claims side x side pixels (beyond PIL's decompression-bomb limit); its pixels are never read."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_every_api_argument_is_checked_with_one_line(trained, prepared):
    """Floats are never truncated to an index (2.7 -> 2), and NaN, None, text, bools, a bare string as labels, a huge
    index or an object that is not an image raise the project's UserError (one line), not ValueError, TypeError,
    OverflowError or AttributeError."""
    run = TracIn.open(trained / "res", data_dir=str(prepared))
    bad = [(run.proponents, (3,), {"k": 2.7}, "k must be an integer"), (run.proponents, (2.7,), {}, "test_idx must be"),
           (run.proponents, (np.float64(2.0),), {}, "test_idx must be"), (run.opponents, (3,), {"k": float("nan")}, "k must"),
           (run.opponents, (None,), {}, "test_idx must be"), (run.opponents, ("x",), {}, "test_idx must be"),
           (run.opponents, (3,), {"k": True}, "k must be"), (run.opponents, (10 ** 20,), {}, "not among"),
           (run.opponents, (-1,), {}, "out of range"), (run.proponents, (3,), {"k": 0}, "out of range"),
           (run.explain, ([run.test_list.paths[0]],), {"k": 2.7}, "k must be"),
           (run.explain, ([run.test_list.paths[0]],), {"labels": [2.7]}, "label must be"),
           (run.explain, ([run.test_list.paths[0]],), {"labels": [None]}, "label must be"),
           (run.explain, ([run.test_list.paths[0]],), {"labels": ["²"]}, "not a class"),
           (run.explain, ([run.test_list.paths[0]],), {"labels": [len(run.class_names)]}, "out of range"),
           (run.explain, ([run.test_list.paths[0]],), {"labels": run.class_names[0]}, "one class name or index per image"),
           (run.explain, ([object()],), {}, "pass a path, a PIL image or an HxWx3 uint8 array"),
           (run.explain, (5,), {}, "images must be"), (run.explain, ([],), {}, "no images"),
           (run.explain, ([np.zeros((8, 8), np.uint8)],), {}, "HxWx3 uint8"),
           (run.explain, ([np.zeros((8, 8, 3), np.float32)],), {}, "HxWx3 uint8"),
           (TracIn.open, (None,), {}, "results_dir must be a folder path"),
           (TracIn.open, (trained / "res",), {"data_dir": 3}, "data_dir must be a folder path")]
    for fn, args, kwargs, needle in bad:
        with pytest.raises(UserError) as e:
            fn(*args, **kwargs)
        assert needle in str(e.value) and "\n" not in str(e.value), (fn.__name__, args, kwargs, str(e.value))
    # what is accepted: numpy integers, digits as text, a label by index or name, and an HxWx3 uint8 array as an image
    np.testing.assert_array_equal(run.proponents(np.int64(3), k="2").train_idx, run.proponents(3, k=2).train_idx)
    array = np.asarray(Image.open(run.test_list.paths[0]).convert("RGB"))
    table = run.explain(array, k=2, labels=["0"])
    by_path = run.explain([run.test_list.paths[0]], k=2, labels=[run.class_names[0]])
    assert (table.image == "<image 0>").all() and (table.label == run.class_names[0]).all()
    np.testing.assert_array_equal(table.train_idx, by_path.train_idx)


def test_explain_cli_refuses_a_superscript_label_and_a_decompression_bomb_with_one_line(trained, prepared, tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((20, 20, 3)) * 255).astype(np.uint8)).save(img)
    base = ["-m", "TracIn.explain", "--results_dir", trained / "res", "--data_dir", prepared, "--out_dir", tmp_path / "out"]
    one_error_line(sh(*base, img, "--label", "²"), "not a class")  # str.isdigit() trusts it, int() refuses it
    one_error_line(sh(*base, bomb_png(tmp_path / "bomb.png")), "bomb.png", "exceeds limit")
    assert not (tmp_path / "out").exists()


def test_the_apis_readers_of_tool_outputs_check_their_types(trained, prepared, tmp_path):
    """A hand-edited lds.json (methods of other types) or mislabel_candidates.csv (text in an index column) of this run
    is one line from run.lds() / run.mislabel_candidates(), not a KeyError, TypeError or a silently wrong table."""
    import json

    from TracIn import mislabel_detection

    res = tmp_path / "res"
    shutil.copytree(trained / "res", res, ignore=shutil.ignore_patterns("factors"))
    run = TracIn.open(res, data_dir=str(prepared))
    assert mislabel_detection.main(["--results_dir", str(res), "--data_dir", str(prepared), "--checkpoint_dir",
                                    str(trained / "ckpt")]) == 0
    table = res / "mislabel" / "mislabel_candidates.csv"
    frame = pd.read_csv(table)
    assert list(run.mislabel_candidates().train_idx) == list(frame.train_idx)
    frame["train_idx"] = frame["train_idx"].astype(object)
    frame.loc[0, "train_idx"] = "x"
    frame.to_csv(table, index=False)
    with pytest.raises(UserError, match="column train_idx"):
        run.mislabel_candidates()
    (res / "lds").mkdir()
    for methods in (None, {"tracin": {"lds": "0.5", "ci95": [0, 1]}}, {"tracin": {"lds": 0.5, "ci95": 0.1}}):
        (res / "lds" / "lds.json").write_text(json.dumps({"tracin_run": run.run_id, "methods": methods}))
        with pytest.raises(UserError, match="not an LDS table"):
            run.lds()
    (res / "lds" / "lds.json").write_text(json.dumps({"tracin_run": run.run_id, "methods": {
        "tracin": {"lds": 0.5, "ci95": [0.1, 0.9], "damping": None}}}))
    assert run.lds().lds.tolist() == [0.5]


def test_explain_loads_the_results_once_and_builds_one_hook_for_the_sizes(runs, prepared, monkeypatch):
    """The notebook object wraps one loaded results folder and one run: TracIn.open + explain reads run.json once, and
    the run builds one InfluenceHook to read the layers' sizes and factor key (besides the query's own, one per
    checkpoint it runs)."""
    from TracIn.core import results
    from TracIn.influence_utils import InfluenceHook

    res = runs[("influence_last", "none")]
    image = TracIn.open(res, data_dir=str(prepared)).test_list.paths[0]
    TracIn.open(res, data_dir=str(prepared)).explain(image, k=2)  # the factor cache complete before counting
    loads, hooks = [], []
    check_record, hook_init = results.check_record, InfluenceHook.__init__
    monkeypatch.setattr(results, "check_record", lambda *a: loads.append(1) or check_record(*a))
    monkeypatch.setattr(InfluenceHook, "__init__", lambda self, *a, **k: hooks.append(1) or hook_init(self, *a, **k))
    TracIn.open(res, data_dir=str(prepared)).explain(image, k=2)
    assert len(loads) == 1
    assert len(hooks) == 1 + 1  # the sizes, and the query at the last checkpoint (influence_last)


def test_a_run_from_results_takes_its_defaults_from_the_config_and_recomputes_the_stored_lists(runs, prepared):
    """from_results fills what the record does not fix from TracInConfig (device, loader workers), recompute_proponents
    defaults to the run's own method and gives the stored lists, and a run built from ready objects (no files: a data
    folder that does not exist) answers a query as the opened one does."""
    from TracIn.core.arguments import TracInConfig

    res = runs[("influence_last", "none")]
    run = InfluenceRun.from_results(res, str(prepared))
    assert (run.cfg.device, run.cfg.num_workers) == (TracInConfig().device, TracInConfig().num_workers)
    group = np.array([0, 3, 5])
    stored = np.load(res / "top_k_influences_indices.npy")[group, :4]
    np.testing.assert_array_equal(run.recompute_proponents(group, 4), stored)
    ready = InfluenceRun(TracInConfig(data_dir=str(prepared / "nowhere"), score_fn="influence_last"), device=run.device,
                         models=run.models(), lrs=run.lrs, members=run.members, factor_args=run.factor_args,
                         train_ids=run.train_ids, factor_set=run.factors())
    x = torch.randn(2, 3, 32, 32)
    y = np.array([0, 1])
    (want, _), (got, _) = run.query(x, y, 3), ready.query(x, y, 3)
    for a, b in zip(want.proponents() + want.opponents(), got.proponents() + got.opponents()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
