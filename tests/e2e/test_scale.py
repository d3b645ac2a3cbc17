"""Scale-out for real: torchrun training with 2 CPU processes, and the SLURM scripts on a
one-node Slurm cluster started on localhost (skipped, with the reason, where it cannot start)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lib.checkpoints import find_checkpoints, load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_cpu_processes(prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "2", "--batch_size", "4", "--weights", "none",
           "--learning_rate", "1e-3", "--num_workers", "0", "--device", "cpu", "--save_checkpoints_every", "1",
           "--checkpoint_dir", str(tmp_path / "ckpt"), "--models_dir", str(tmp_path / "models")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("epoch ") and "| lr" in l]
    assert len(lines) == 2, lines  # rank 0 logs, once per epoch
    ckpts = find_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in ckpts] == ["finetune_epoch_1.pth", "finetune_epoch_2.pth"]
    c = load_checkpoint(ckpts[-1])
    assert not any(k.startswith("module.") for k in c["model_state"])  # the unwrapped model is saved
    # metrics cover the whole split, reduced across ranks: val accuracy is a multiple of 1/6 (6 test images)
    assert abs(c["metrics"]["val_acc"] * 6 - round(c["metrics"]["val_acc"] * 6)) < 1e-9


def test_bench_gpu_runs_in_smoke_mode(tmp_path):
    """The GPU benchmark gets one short run on a lent GPU: it must not die there of plumbing."""
    cmd = [sys.executable, "-m", "bench.bench_gpu", "--smoke", "--work_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["agree"] and report["e2e_seconds_total"] > 0
    labels = [label.split(",")[0].split(" (")[0] for label, _, _ in report["rows"]]
    assert labels == ["training step", "factor pass alone", "scoring + top-k both ways + self-influence", "loader alone: decode + resize",
                      "efficient_tracin end to end: factors", "efficient_tracin end to end: scores"], labels
    assert all(rate > 0 for _, rate, _ in report["rows"])
    assert (tmp_path / "e2e" / "top_k_influences.csv").exists()  # the end-to-end run wrote real outputs
    assert len(np.load(tmp_path / "e2e" / "self_influence.npy")) == 120


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    script = REPO / "tests" / "slurm" / "cluster.sh"
    out = subprocess.run(["bash", str(script), "start", str(d)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.skip(f"no local Slurm cluster: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    yield {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    subprocess.run(["bash", str(script), "stop", str(d)], capture_output=True)


def wait_for(job_ids, env, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=env).stdout
        if not any(line.split()[0].split("_")[0] in job_ids for line in q.splitlines() if line.strip()):
            return
        time.sleep(1)
    raise TimeoutError(f"jobs {job_ids} still queued after {timeout}s")


def job_states(job_id, env):
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return [tok.split("=", 1)[1] for line in out.splitlines() for tok in line.split() if tok.startswith("JobState=")]


@pytest.mark.slurm
def test_slurm_train_then_tracin_array_and_merge(slurm, prepared, tmp_path):
    env = {**slurm, "PYTHON": sys.executable, "DATA_DIR": str(prepared), "ARCH": "resnet18", "EPOCHS": "2", "EVERY": "1",
           "BATCH_SIZE": "8", "LR": "1e-3", "WEIGHTS": "none", "NUM_WORKERS": "0",
           "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "MODELS_DIR": str(tmp_path / "models")}
    sub = subprocess.run(["sbatch", "--parsable", "--gres=none", "--cpus-per-task=1", "--mem=2G",
                          f"--output={tmp_path}/%x_%j.out", "slurm_train_short.sh"],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    train_id = sub.stdout.strip().split(";")[0]
    wait_for({train_id}, env)
    log = next(tmp_path.glob("*.out")).read_text()
    assert job_states(train_id, env) == ["COMPLETED"], log[-2000:]
    assert "epoch 2/2 |" in log
    assert [p.name for p in find_checkpoints(tmp_path / "ckpt")] == ["finetune_epoch_1.pth", "finetune_epoch_2.pth"]

    tr_env = {**env, "NUM_SHARDS": "3", "OUTPUT_DIR": str(tmp_path / "sharded"),
              "TRACIN_ARGS": "--top_k 5 --batch_size 4 --train_block 4 --test_block 4",
              "LOG_DIR": str(tmp_path), "SBATCH_EXTRA_ARGS": "--gres=none --cpus-per-task=1 --mem=2G"}
    sub = subprocess.run(["bash", "slurm_tracin.sh"], cwd=REPO, capture_output=True, text=True, env=tr_env)
    assert sub.returncode == 0, sub.stderr
    ids = [w for w in sub.stdout.split() if w.isdigit()]
    assert len(ids) == 2, sub.stdout
    wait_for(set(ids), env)
    assert job_states(ids[0], env) == ["COMPLETED"] * 3 and job_states(ids[1], env) == ["COMPLETED"]

    from TracIn.core.arguments import TracInConfig
    from TracIn.core.job import tracin_job

    tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "one"), top_k=5,
                            batch_size=4, train_block=4, test_block=4, num_workers=0, score_fn="tracin"))
    for name in ("top_k_influences_values", "top_k_influences_indices", "top_k_opponents_values",
                 "top_k_opponents_indices", "self_influence"):
        np.testing.assert_array_equal(np.load(tmp_path / "one" / f"{name}.npy"), np.load(tmp_path / "sharded" / f"{name}.npy"))


@pytest.mark.slurm
def test_slurm_lds_array_and_merge(slurm, prepared, trained, tmp_path):
    """slurm_lds.sh: two array tasks retrain their subsets (fc on cached features), the merge job scores; the records equal
    one local run's."""
    from TracIn import lds

    args = "--num_subsets 4 --select_subsets 1 --n_test 6 --methods tracin influence_last"
    env = {**slurm, "PYTHON": sys.executable, "DATA_DIR": str(prepared), "RESULTS_DIR": str(trained / "res"), "NUM_SHARDS": "2",
           "LDS_ARGS": f"{args} --out_dir {tmp_path / 'sharded'}", "LOG_DIR": str(tmp_path),
           "SBATCH_EXTRA_ARGS": "--gres=none --cpus-per-task=1 --mem=2G"}
    sub = subprocess.run(["bash", "slurm_lds.sh"], cwd=REPO, capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    ids = [w for w in sub.stdout.split() if w.isdigit()]
    assert len(ids) == 2, sub.stdout
    wait_for(set(ids), env)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert job_states(ids[0], env) == ["COMPLETED"] * 2 and job_states(ids[1], env) == ["COMPLETED"], logs[-3000:]
    merged = json.loads((tmp_path / "sharded" / "lds.json").read_text())
    one = lds.evaluate(lds.parse_args([*args.split(), "--results_dir", str(trained / "res"), "--data_dir", str(prepared),
                                       "--num_workers", "0", "--out_dir", str(tmp_path / "one")]))
    assert merged["retrained_now"] == 0 and merged["num_subsets"] == 4
    for m in ("tracin", "influence_last"):
        assert merged["methods"][m]["lds"] == one["methods"][m]["lds"]


@pytest.mark.slurm
def test_slurm_ensemble_array_trains_each_member(slurm, trained, tmp_path):
    """slurm_train_ensemble.sh: array tasks 1 and 2 train members 1 and 2 of the original run (seed + k), each in its
    folder; efficient_tracin then scores the three runs as one ensemble."""
    from TracIn import efficient_tracin

    env = {**slurm, "PYTHON": sys.executable, "MEMBERS": "3", "CHECKPOINT_DIR": str(trained / "ckpt"),
           "OUT_DIR": str(tmp_path / "members"), "LOG_DIR": str(tmp_path), "SBATCH_EXTRA_ARGS": "--gres=none --cpus-per-task=1 --mem=2G"}
    sub = subprocess.run(["bash", "slurm_train_ensemble.sh"], cwd=REPO, capture_output=True, text=True, env=env)
    assert sub.returncode == 0, sub.stderr
    ids = [w for w in sub.stdout.split() if w.isdigit()]
    assert len(ids) == 1, sub.stdout
    wait_for(set(ids), env)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert job_states(ids[0], env) == ["COMPLETED"] * 2, logs[-3000:]
    seed = json.loads((trained / "ckpt" / "train_args.json").read_text())["seed"]
    folders = [trained / "ckpt"]
    for k in (1, 2):
        member = tmp_path / "members" / f"member_{k}" / "checkpoints"
        assert json.loads((member / "train_args.json").read_text())["seed"] == seed + k
        assert (member / "finetune_epoch_2.pth").exists()
        folders.append(member)
    data = json.loads((trained / "ckpt" / "train_args.json").read_text())["data_dir"]
    assert efficient_tracin.main(["--data_dir", data, "--members", *map(str, folders), "--output_dir", str(tmp_path / "res"),
                                  "--top_k", "3", "--num_workers", "0", "--all_checkpoints"]) == 0
    assert json.loads((tmp_path / "res" / "run.json").read_text())["args"]["member_sizes"] == [2, 2, 2]


def test_bench_tracin_phases_come_from_the_job_with_no_patching(prepared, trained, tmp_path):
    """bench_tracin's phase table: every phase of a real run is timed by the job itself (its returned seconds_*), the
    factor pass's parts lie inside it, the phases do not overlap (their sum stays within the run's wall time), and the
    benchmark replaces none of the job's functions (it holds no setattr)."""
    import inspect
    import time

    import bench.bench_tracin as bench_tracin
    import TracIn.core.factors as factors
    import TracIn.core.job as job
    from TracIn.core.arguments import TracInConfig
    from TracIn.core.ghost import InfluenceHook

    before = (job.InfluenceRun, job.check_images, job.write_run, InfluenceHook.factors, factors.CheckpointFactors.write)
    t0 = time.perf_counter()
    summary = job.tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(trained / "ckpt"),
                                          output_dir=str(tmp_path / "res"), top_k=2, num_workers=0, score_fn="tracin"))
    wall = time.perf_counter() - t0
    parts = ("setup", "image_check", "factors", "models", "forward_backward", "cache_writes", "scores", "outputs")
    assert all(summary[f"seconds_{k}"] > 0 for k in parts), summary
    inside = summary["seconds_forward_backward"] + summary["seconds_cache_writes"] + summary["seconds_models"]
    assert inside <= summary["seconds_factors"] + 1e-3  # the factor pass's parts lie inside it
    rows = dict(bench_tracin.phase_rows([summary], wall))
    top = sum(summary[f"seconds_{k}"] for k in ("setup", "image_check", "factors", "scores", "outputs"))
    assert top <= wall + 1e-3 and rows["rest (folders, ownership, identity)"] == pytest.approx(wall - top)
    assert rows["factor pass"] == summary["seconds_factors"] and rows["outputs: tables, arrays, run.json"] == summary["seconds_outputs"]
    assert "setattr" not in inspect.getsource(bench_tracin) and not hasattr(bench_tracin, "timed_phases")
    assert before == (job.InfluenceRun, job.check_images, job.write_run, InfluenceHook.factors, factors.CheckpointFactors.write)