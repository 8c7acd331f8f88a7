"""Issue 16: torchrun data-parallel SVI, sharded evaluation, estimates fixed per datapoint.

The multi-process tests launch real processes (``torchrun``, or two plain processes with the
environment torchrun sets) with gloo on 127.0.0.1; they take tens of seconds on two cores, so
they are marked slow.  P = 1 and P = 2 are compared on the heteroscedastic regression, whose
maximum-likelihood objective has no latent draws: every difference is floating-point
reduction order (the ranks' half-batch gradients summed instead of one full-batch gradient).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from inference import distributed
from inference.importance import Estimate, estimate_log_marginal
from inference.runner import RunConfig, load_checkpoint, train
from models.vae import build_vae

ROOT = Path(__file__).resolve().parents[1]
#: Relative tolerance of P = 2 against P = 1 per-step losses (measured: about 3e-7 over 20
#: steps in float32; docs/distributed.md).
REL_TOL = 1e-5
HETERO = ["hetero", "--variant", "hetero", "--hidden", "16", "--n-train", "200", "--epochs",
          "2", "--batch-size", "20", "--seed", "1", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def torchrun(args, nproc=2, extra=(), timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *extra, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def plain(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def losses(run: Path) -> np.ndarray:
    lines = (run / "steps.csv").read_text().splitlines()[1:]
    return np.array([float(line.split(",")[2]) for line in lines])


# ----------------------------------------------------------------------------- fast, in-process
def test_world_size_that_does_not_divide_the_batch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = RunConfig(system="hetero", system_args=dict(variant="hetero", hidden=[4]),
                    data_args=dict(n_train=20), epochs=1, batch_size=10)
    with pytest.raises(distributed.Lockstep, match="--batch-size 10 does not split among 3 "
                       "processes: .* multiple of the world size"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_plain_run_records_its_layout(tmp_path):
    cfg = RunConfig(system="hetero", system_args=dict(variant="hetero", hidden=[4]),
                    data_args=dict(n_train=20), epochs=1, batch_size=10)
    train(cfg, tmp_path / "run", progress=False)
    d = json.loads((tmp_path / "run" / "config.json").read_text())["distributed"]
    assert d["world_size"] == 1 and d["backend"] is None and d["devices"] == ["cpu"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["world_size"] == 1


def _tiny_vae():
    torch.manual_seed(0)
    vae = build_vae(latent_dim=3, hidden=[16])
    x = torch.bernoulli(torch.full((70, 784), 0.3), generator=torch.Generator().manual_seed(1))
    return vae, x


def test_estimates_are_bitwise_the_same_for_any_memory_budget():
    vae, x = _tiny_vae()
    pyro.set_rng_seed(5)
    big = estimate_log_marginal(vae.model, vae.guide, x, num_samples=64, ks=(1, 8))
    pyro.set_rng_seed(5)
    small = estimate_log_marginal(vae.model, vae.guide, x, num_samples=64, ks=(1, 8), memory=1)
    for name in ("log_marginal", "elbo", "khat", "ess", "log_marginal_psis"):
        assert np.array_equal(getattr(big, name), getattr(small, name), equal_nan=True), name
    assert all(np.array_equal(big.iwae[k], small.iwae[k]) for k in big.iwae)
    pyro.set_rng_seed(6)  # another seed: other draws
    other = estimate_log_marginal(vae.model, vae.guide, x, num_samples=64, ks=(1, 8))
    assert not np.array_equal(big.log_marginal, other.log_marginal)


@pytest.mark.parametrize("size", [2, 3])
def test_shards_join_to_the_single_process_estimate(size):
    vae, x = _tiny_vae()  # 70 datapoints: 5 blocks of 16, the last short
    pyro.set_rng_seed(5)
    whole = estimate_log_marginal(vae.model, vae.guide, x, num_samples=32, ks=(1, 4))
    parts = []
    for rank in range(size):
        pyro.set_rng_seed(5)
        parts.append(estimate_log_marginal(vae.model, vae.guide, x, num_samples=32, ks=(1, 4),
                                           shard=(rank, size)))
    joined = Estimate.concat(parts)
    assert sum(p.n for p in parts) == 70
    for name in ("log_marginal", "elbo", "khat", "ess", "log_marginal_psis"):
        assert np.array_equal(getattr(whole, name), getattr(joined, name), equal_nan=True), name
    assert all(np.array_equal(whole.iwae[k], joined.iwae[k]) for k in whole.iwae)


def test_derived_seeds_are_stable_and_distinct():
    assert distributed.derive_seed(0, 1, 2) == distributed.derive_seed(0, 1, 2)
    assert len({distributed.derive_seed(0, b, c) for b in range(50) for c in range(50)}) == 2500
    assert [distributed.share(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


# ----------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_two_ranks_train_the_same_losses_as_one_and_evaluate_alike(tmp_path, data_dir):
    one, two = tmp_path / "p1", tmp_path / "p2"
    r1 = plain(["-m", "inference", *HETERO, "--out", str(one)])
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(["-m", "inference", *HETERO, "--out", str(two)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a.shape == b.shape == (20,)
    rel = np.abs(a - b) / np.abs(a)
    assert rel.max() < REL_TOL, rel.max()
    cfg = json.loads((two / "config.json").read_text())["distributed"]
    assert cfg["world_size"] == 2 and cfg["backend"] == "gloo" and cfg["devices"] == ["cpu"] * 2
    # a run trained at P = 2 resumes at P = 2 (more epochs) and says what happens at P = 1
    r = torchrun(["-m", "inference", *HETERO[:-1], "--epochs", "3", "--out", str(two),
                  "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = plain(["-m", "inference", "hetero", "--epochs", "4", "--out", str(two), "--resume"])
    assert r.returncode == 0 and "resumed at world size 1 from a checkpoint written at world " \
        "size 2" in r.stderr, r.stderr
    assert len(losses(two)) == 40
    earlier = json.loads((two / "config.json").read_text())["distributed"]["earlier"]
    assert earlier == [dict(cfg, until_global_step=30)]
    # sharded evaluation: the same .npz at world sizes 1 and 2
    ev = ["-m", "evaluation", str(two), "--k", "1,10", "--split", "valid", "--seed", "3"]
    r = plain(ev)
    assert r.returncode == 0, r.stderr
    single = dict(np.load(two / "eval_valid.npz"))
    (two / "eval_valid.npz").unlink()
    r = torchrun(ev)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("IWAE k=10") == 1, r.stdout  # only rank 0 reports
    sharded = dict(np.load(two / "eval_valid.npz"))
    assert sharded.keys() == single.keys()
    for k in single:
        assert np.array_equal(single[k], sharded[k], equal_nan=True), k


@pytest.mark.slow
def test_vae_trains_and_evaluates_at_two_ranks(tmp_path, data_dir):
    """Dynamic binarization is drawn for the global batch on every rank; latent draws come from
    each rank's own stream, so the losses agree with P = 1 in distribution only."""
    run = tmp_path / "vae"
    args = ["-m", "inference", "vae", "--epochs", "1", "--limit", "256", "--batch-size", "64",
            "--latent-dim", "2", "--hidden", "16", "--data-dir", data_dir, "--out", str(run),
            "--quiet"]
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    assert np.isfinite(losses(run)).all() and len(losses(run)) == 4


def _launch_pair(out: Path, port: int, extra=()):
    """Two plain processes with the variables torchrun sets: no agent to kill the survivor."""
    args = ["-m", "inference", "hetero", "--variant", "hetero", "--hidden", "16", "--n-train",
            "4000", "--batch-size", "4", "--epochs", "3", "--checkpoint-every", "1",
            "--out", str(out), "--quiet", *extra]
    procs = []
    for rank in range(2):
        e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_for_steps(out: Path, procs, n=5, limit=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        f = out / "steps.csv"
        if f.exists() and len(f.read_text().splitlines()) > n:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank ended early: " + procs[0].communicate()[1][-2000:])
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_lost_rank_stops_the_other_with_one_sentence(tmp_path, how):
    out = tmp_path / "run"
    procs = _launch_pair(out, free_port(), ["--dist-timeout", "8"])
    try:
        _wait_for_steps(out, procs)
        t0 = time.monotonic()
        procs[1].send_signal(signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()  # reap it and close its pipes
    assert procs[0].returncode == 4, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("genlab-train: error: rank 0 of 2 lost the other ranks during"), err
    assert "--dist-timeout 8 s" in lines[-1] and "Traceback" not in err
    assert waited < 8 + 30  # a dead socket is seen at once, a stalled rank after the timeout
    assert load_checkpoint(out / "checkpoint.pt")["world_size"] == 2  # the last one kept


@pytest.mark.slow
def test_two_nodes_sharing_one_rendezvous_endpoint(tmp_path):
    """How two machines run it: one torchrun per node, --nnodes 2, the same master address."""
    port = free_port()
    out, one = tmp_path / "nodes", tmp_path / "p1"
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "inference", *HETERO, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert plain(["-m", "inference", *HETERO, "--out", str(one)]).returncode == 0
    a, b = losses(one), losses(out)
    assert (np.abs(a - b) / np.abs(a)).max() < REL_TOL
    assert json.loads((out / "config.json").read_text())["distributed"]["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the "
                    "--device cuda path (training and evaluation) runs where one exists")
def test_cuda_trains_and_evaluates_end_to_end(tmp_path, data_dir):
    run = tmp_path / "cuda"
    r = plain(["-m", "inference", "vae", "--epochs", "1", "--limit", "256", "--batch-size", "64",
               "--latent-dim", "2", "--hidden", "16", "--data-dir", data_dir, "--device", "cuda",
               "--out", str(run), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["distributed"]["devices"][0].startswith("cuda")
    r = plain(["-m", "evaluation", str(run), "--k", "1,10", "--limit", "64", "--device", "cuda"])
    assert r.returncode == 0, r.stderr
    assert np.isfinite(np.load(run / "eval_test.npz")["log_marginal"]).all()
