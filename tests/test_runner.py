import math

import pytest
import torch

from inference.runner import (
    Diverged,
    Interrupted,
    RunConfig,
    atomic_save,
    load_checkpoint,
    read_metrics,
    train,
)
from models.common import GenlabError


def small(data_dir, **kw):
    base = dict(system="vae", system_args=dict(latent_dim=2, hidden=[16]),
                data_args=dict(dataset="mnist", binarization="dynamic"), epochs=2, batch_size=64,
                limit=256, data_dir=data_dir, seed=3)
    base.update(kw)
    return RunConfig(**base)


def steps_of(path):
    return (path / "steps.csv").read_text()


def test_training_raises_the_elbo_and_writes_the_run(data_dir, tmp_path):
    res = train(small(data_dir, epochs=3), tmp_path / "run", progress=False)
    m = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in m] == [1, 2, 3]
    assert m[-1]["train_elbo"] > m[0]["train_elbo"] and m[-1]["val_elbo"] > m[0]["val_elbo"]
    assert len(res.steps) == 3 * 4  # 256 / 64 batches per epoch
    for f in ("config.json", "metrics.csv", "steps.csv", "checkpoint.pt", "best.pt"):
        assert (tmp_path / "run" / f).exists()


def test_same_seed_same_losses(data_dir, tmp_path):
    train(small(data_dir), tmp_path / "a", progress=False)
    train(small(data_dir), tmp_path / "b", progress=False)
    assert steps_of(tmp_path / "a") == steps_of(tmp_path / "b")
    train(small(data_dir, seed=4), tmp_path / "c", progress=False)
    assert steps_of(tmp_path / "a") != steps_of(tmp_path / "c")


@pytest.mark.parametrize("loss,k", [("Trace_ELBO", 1), ("IWAE", 3)])
def test_resume_equals_uninterrupted(data_dir, tmp_path, loss, k):
    cfg = small(data_dir, epochs=3, loss=loss, k=k)
    train(cfg, tmp_path / "whole", progress=False)
    # stop mid-epoch (after 6 of 12 steps) exactly as Ctrl-C does, then resume twice
    with pytest.raises(Interrupted, match="interrupted at epoch 2, step 2; state saved"):
        train(cfg, tmp_path / "parts", progress=False, stop_after_steps=6)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "parts", resume=True, progress=False, stop_after_steps=3)
    train(cfg, tmp_path / "parts", resume=True, progress=False)
    assert steps_of(tmp_path / "whole") == steps_of(tmp_path / "parts")
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [(r["train_elbo"], r["val_elbo"]) for r in whole] == [
        (r["train_elbo"], r["val_elbo"]) for r in parts]


def test_resume_extends_epochs(data_dir, tmp_path):
    train(small(data_dir, epochs=3), tmp_path / "whole", progress=False)
    train(small(data_dir, epochs=1), tmp_path / "grow", progress=False)
    train(small(data_dir, epochs=3), tmp_path / "grow", resume=True, progress=False)
    assert steps_of(tmp_path / "whole") == steps_of(tmp_path / "grow")


def test_existing_run_is_not_overwritten(data_dir, tmp_path):
    train(small(data_dir, epochs=1), tmp_path / "r", progress=False)
    with pytest.raises(GenlabError, match="already holds a run; pass --resume"):
        train(small(data_dir, epochs=1), tmp_path / "r", progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    from models.vae import VAE

    calls = {"n": 0}
    real = VAE.decode

    def poisoned(self, z):  # the 8th gradient pass: 1 parameter-discovery pass + 7 steps
        calls["n"] += torch.is_grad_enabled()
        out = real(self, z)
        return out * float("nan") if calls["n"] >= 8 else out  # and stays broken

    cfg = small(data_dir, epochs=3)
    monkeypatch.setattr(VAE, "decode", poisoned)
    with pytest.raises(Diverged) as e:
        train(cfg, tmp_path / "r", progress=False)
    msg = str(e.value)
    assert msg.startswith("non-finite loss (nan) at epoch 2, step 2 (global step 6), model site 'x';")
    assert str(tmp_path / "r" / "checkpoint.pt") in msg
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert state["loop"]["epoch"] == 1 and state["loop"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["module"].values())


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"a": torch.ones(3)}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_iwae_training_objective_is_per_datapoint_and_unscaled(data_dir):
    """The runner's IWAE loss on a full batch equals -sum_i log mean_k w_ik (no N/B inside)."""
    import pyro

    from inference.importance import log_weights, probe
    from inference.runner import Objective
    from models.vae import VAE

    vae = VAE(latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    obj = Objective("RenyiELBO", k=5)
    pyro.set_rng_seed(1)
    loss = obj(vae.model, vae.guide, (x,), 600)  # a batch of 6 out of 600: scale 100 outside
    pyro.set_rng_seed(1)
    st = probe(vae.model, vae.guide, (x,), {"data_size": 600})
    lw = log_weights(vae.model, vae.guide, (x,), {"data_size": 600}, 5, st)
    expect = -(torch.logsumexp(lw, 0) - math.log(5)).sum() * 100
    assert torch.allclose(loss, expect)


def test_config_checks():
    for kw, msg in [(dict(batch_size=0), "--batch-size must be a positive integer"),
                    (dict(lr=-1.0), "--lr must be a positive number"),
                    (dict(k=0), "--k must be a positive integer"),
                    (dict(loss="ELBO"), "unknown loss 'ELBO'"),
                    (dict(limit=-5), "--limit must be a positive integer")]:
        with pytest.raises(GenlabError, match=msg):
            RunConfig(system="vae", **kw).check()


def test_early_stopping_on_validation(data_dir, tmp_path, monkeypatch):
    import inference.runner as runner

    vals = iter([-100.0, -99.0, -99.5, -99.2, -98.0])  # best at epoch 2, then two worse epochs
    monkeypatch.setattr(runner, "full_data_elbo", lambda *a, **k: next(vals))
    res = train(small(data_dir, epochs=5, patience=2), tmp_path / "r", progress=False)
    assert res.stopped_early and [m["epoch"] for m in res.metrics] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] == 2
    # a finished (early-stopped) run is not trained again
    from inference.runner import train_if_missing

    before = (tmp_path / "r" / "steps.csv").read_text()
    train_if_missing(small(data_dir, epochs=5, patience=2), tmp_path / "r")
    assert (tmp_path / "r" / "steps.csv").read_text() == before


def test_train_if_missing_continues_to_the_epochs_asked_for(data_dir, tmp_path):
    from inference.runner import train_if_missing

    train(small(data_dir, epochs=3), tmp_path / "whole", progress=False)
    train_if_missing(small(data_dir, epochs=1), tmp_path / "grow")
    train_if_missing(small(data_dir, epochs=3), tmp_path / "grow")
    assert steps_of(tmp_path / "whole") == steps_of(tmp_path / "grow")


def test_flush_denormals_nests_and_restores():
    from inference.importance import flush_denormals

    tiny = torch.tensor([1e-39])  # a float32 denormal
    assert (tiny * 1.5).item() > 0
    with flush_denormals():
        with flush_denormals():
            pass
        assert (tiny * 1.5).item() == 0  # still on after the inner block
    assert (tiny * 1.5).item() > 0  # off again after the outer one


def test_flushing_denormals_changes_no_number(monkeypatch):
    """A VAE with a sharp decoder, whose IWAE k = 50 weights fall below 1e-38 (denormals: a
    precondition checked here): the runner's IWAE training steps and an estimate, with and
    without flushing, give the same losses and estimates, bit for bit."""
    import contextlib
    import copy

    import numpy as np
    import pyro

    import inference.importance
    from inference.importance import estimate_log_marginal, flush_denormals, log_weights, probe
    from inference.runner import Objective
    from models.vae import VAE

    torch.manual_seed(0)
    sharp = VAE(784, 2, (16,), "relu")
    with torch.no_grad():
        sharp.decoder[-1].weight.mul_(5.0)
        sharp.decoder[-1].bias.mul_(5.0)
    x = torch.bernoulli(torch.full((8, 784), 0.3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lw = log_weights(sharp.model, sharp.guide, (x,), {}, 50,
                         probe(sharp.model, sharp.guide, (x,), {}, "data"), "data")
    w = torch.softmax(lw.float(), 0)
    assert ((w > 0) & (w < torch.finfo(torch.float32).tiny)).any()  # there is something to flush

    def run(flushing):
        vae = copy.deepcopy(sharp)
        pyro.clear_param_store()
        objective = Objective("IWAE", 50)
        torch.manual_seed(1)
        with flushing():
            objective(vae.model, vae.guide, (x,), 64)  # parameter discovery, as the runner does
            opt = torch.optim.Adam(list(pyro.get_param_store().values()), lr=1e-2)
            losses = []
            for _ in range(5):
                loss = objective(vae.model, vae.guide, (x,), 64)
                losses.append(loss.item())
                opt.zero_grad()
                loss.backward()
                opt.step()
            torch.manual_seed(2)
            est = estimate_log_marginal(vae.model, vae.guide, x, num_samples=500)
        return losses, np.asarray(est.log_marginal)

    flushed = run(flush_denormals)
    monkeypatch.setattr(inference.importance, "flush_denormals", contextlib.nullcontext)
    plain = run(contextlib.nullcontext)
    assert flushed[0] == plain[0]
    assert np.array_equal(flushed[1], plain[1])


def test_command_line_processes_flush_denormals_for_good_unless_opted_out():
    """The process-wide setting (python -m inference/evaluation) survives flush_denormals
    blocks; GENLAB_FLUSH_DENORMALS=0 leaves the default."""
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from inference.importance import flush_denormals, flush_denormals_in_process\n"
            "applied = flush_denormals_in_process()\n"
            "with flush_denormals():\n"
            "    pass\n"
            "print(applied, (torch.tensor([1e-39]) * 1.5).item() == 0)\n")
    for env, want in (("1", "True True"), ("0", "False False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "GENLAB_FLUSH_DENORMALS": env}, check=True)
        assert out.stdout.split() == want.split()
