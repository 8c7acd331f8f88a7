"""Issue 15: the IWAE paper's two-layer pair, DReG/STL gradients, the burda schedule, reproduce."""

import dataclasses
import json
import math
import re

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.util import site_is_subsample

from inference import runner as runner_module
from inference.importance import estimate_log_marginal
from inference.losses import IWAE, LOSSES, STL_ELBO, DReG_IWAE, make_loss
from inference.schedules import burda, get_schedule
from inference.systems import SYSTEMS
from models.common import GenlabError, data_plate
from models.iwae import IWAE2Config, TwoLayerVAE, active_units, build_iwae2, hidden_pair, iwae2_args
from models.vae import build_vae


# ----------------------------------------------------------------------------- the two-layer pair
def test_two_layer_pair_sites_and_shapes():
    m = build_iwae2(preset="iwae-2layer")
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    guide_tr = pyro.poutine.trace(m.guide).get_trace(x)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(m.model, trace=guide_tr)).get_trace(x)
    shapes = {}
    for where, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                assert [f.name for f in site["cond_indep_stack"]] == ["data"]
                shapes[where, name] = (tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape))
    assert shapes == {("guide", "z1"): ((3,), (100,)), ("guide", "z2"): ((3,), (50,)),
                      ("model", "z2"): ((3,), (50,)), ("model", "z1"): ((3,), (100,)),
                      ("model", "x"): ((3,), (784,))}
    assert list(guide_tr.nodes).index("z1") < list(guide_tr.nodes).index("z2")  # q(z1|x) q(z2|z1)
    assert list(model_tr.nodes).index("z2") < list(model_tr.nodes).index("z1")  # p(z2) p(z1|z2)
    assert model_tr.nodes["x"]["is_observed"]
    linear = lambda net: [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert linear(m.q_z1) == [200, 200, 100, 100] and linear(m.q_z2) == [100, 100, 50, 50]
    assert linear(m.p_z1) == [100, 100, 100, 100] and linear(m.p_x) == [200, 200, 784]
    assert isinstance(m.q_z1.hidden[-1], torch.nn.Tanh)  # h = tanh(...) before both heads
    # the paper's scale: exp of a linear output
    loc, scale = m.encode(x)
    assert torch.allclose(scale, m.q_z1.raw_scale(m.q_z1.hidden(x)).exp())


def test_two_layer_args_config_and_errors():
    assert iwae2_args() == dict(preset=None, latent_dims=[100, 50], hidden=[[200, 200], [100, 100]],
                                activation="tanh", scale="exp")
    assert iwae2_args(preset="iwae-2layer", scale="softplus")["scale"] == "softplus"
    assert {k: v for k, v in IWAE2Config().__dict__.items() if k != "preset"} == {
        k: v for k, v in iwae2_args().items() if k != "preset"}
    assert hidden_pair("8,8/4") == [[8, 8], [4]]
    small = build_iwae2(latent_dims=[3, 2], hidden=[[8], [4]], scale="softplus")
    assert small.latent_dims == (3, 2)
    with pytest.raises(GenlabError, match="unknown two-layer preset"):
        iwae2_args(preset="nope")
    with pytest.raises(GenlabError, match="images must be 0/1"):
        small.model(torch.full((2, 784), 0.5))
    with pytest.raises(GenlabError, match="images must be 0/1"):
        small.check_data(torch.full((2, 784), 0.5))
    with pytest.raises(GenlabError, match=r"images must be a \(N, 784\) batch"):
        small.model(torch.zeros(2, 28, 28))


def test_estimator_gives_per_image_values_for_the_two_layer_pair():
    m = TwoLayerVAE(latent_dims=(4, 3), hidden=((16,), (8,)))
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    est = estimate_log_marginal(m.model, m.guide, x, num_samples=20, ks=[1, 5])
    assert est.per_datapoint and est.log_marginal.shape == (5,)
    assert (est.log_marginal >= est.elbo).all()
    # the runner's IWAE loss and DReG loss both accept it
    for name in ("IWAE", "DReG", "STL"):
        assert torch.isfinite(make_loss(name, 3).differentiable_loss(m.model, m.guide, x))


def test_active_units_per_stochastic_layer():
    m = TwoLayerVAE(latent_dims=(4, 3), hidden=((16,), (8,)))
    with torch.no_grad():
        m.q_z1.loc.weight.mul_(50)  # z1's mean moves with x
        m.q_z1.loc.weight[1].zero_()  # unit 1 of z1: constant mean
        m.q_z1.loc.bias[1] = 0.0
        m.q_z2.loc.weight.zero_()  # z2's mean ignores z1: no active unit
    x = torch.bernoulli(torch.full((200, 784), 0.3))
    au = active_units(m, x, threshold=1e-3, samples=10, chunk=64)
    assert set(au) == {"z1", "z2"}
    assert au["z1"][0] == 3 and au["z1"][1][1] == 0 and au["z2"][0] == 0
    one = active_units(build_vae(latent_dim=5, hidden=[16]), x)
    assert set(one) == {"z"} and one["z"][1].shape == (5,)


# ----------------------------------------------------------------------------- DReG and STL
def test_dreg_has_iwae_value_and_model_gradient_on_both_architectures():
    for build in (lambda: TwoLayerVAE(latent_dims=(4, 3), hidden=((16,), (8,))),
                  lambda: build_vae(latent_dim=3, hidden=[16], activation="tanh")):
        torch.manual_seed(1)
        m = build()
        x = torch.bernoulli(torch.full((6, 784), 0.3))
        out = {}
        for name in ("IWAE", "DReG"):
            pyro.clear_param_store()
            m.zero_grad()
            pyro.set_rng_seed(5)
            loss_fn = make_loss(name, 4)
            first = loss_fn.loss(m.model, m.guide, x, data_size=60)  # no_grad path
            value = loss_fn.loss_and_grads(m.model, m.guide, x, data_size=60)
            out[name] = (first, value, {k: p.grad.clone() for k, p in m.named_parameters()})
        assert out["IWAE"][:2] == out["DReG"][:2]  # the same value, bit for bit, same RNG use
        model_names = [k for k in out["IWAE"][2] if k.startswith(("p_", "decoder"))]
        guide_names = [k for k in out["IWAE"][2] if k.startswith(("q_", "encoder"))]
        assert model_names and guide_names
        for k in model_names:  # the model's parameters get the IWAE gradient itself
            assert torch.equal(out["IWAE"][2][k], out["DReG"][2][k])
        assert any(not torch.allclose(out["IWAE"][2][k], out["DReG"][2][k]) for k in guide_names)


class Gauss:
    """A 1-D Gaussian model with one guide per datapoint, so that each datapoint's guide
    gradient is an independent replicate of the estimator: p(z) = N(mu, 1), x | z ~ N(z, 1),
    q(z) = N(a_b, exp(s_b)) for datapoint b.  ``hier``: a second latent, z2 | z1 ~ N(z1, 1)
    and x | z2 ~ N(z2, 1), with q(z2 | z1) = N(c_b z1 + d_b, exp(t_b))."""

    def __init__(self, n, x0=1.5, hier=False):
        self.n, self.x = n, torch.full((n,), x0)
        self.hier = hier
        self.init = dict(a=0.3, s=-0.5, c=0.6, d=0.2, t=-0.7)

    def model(self, x):
        mu = pyro.param("mu", torch.tensor(0.2))
        with data_plate(self.n):
            z = pyro.sample("z1", dist.Normal(mu, 1.0))
            if self.hier:
                z = pyro.sample("z2", dist.Normal(z, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x):
        p = {k: pyro.param(k, torch.full((self.n,), v)) for k, v in self.init.items()
             if self.hier or k in "as"}
        with data_plate(self.n):
            z1 = pyro.sample("z1", dist.Normal(p["a"], p["s"].exp()))
            if self.hier:
                pyro.sample("z2", dist.Normal(p["c"] * z1 + p["d"], p["t"].exp()))

    def grads(self, loss_fn, seed):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        loss = loss_fn.differentiable_loss(self.model, self.guide, self.x)
        names = sorted(k for k in pyro.get_param_store().keys() if k != "mu")
        params = [pyro.param(k) for k in names]
        gs = torch.autograd.grad(loss, params)
        return {k: -g.double() for k, g in zip(names, gs)}  # per-replicate bound gradients


def _compare(a: dict, b: dict, z: float = 4.5) -> dict:
    """Means agree within z combined standard errors; returns variance ratios var(a)/var(b)."""
    ratios = {}
    for k in a:
        n = a[k].numel()
        diff = (a[k].mean() - b[k].mean()).item()
        se = math.sqrt(a[k].var().item() / n + b[k].var().item() / n)
        assert abs(diff) < z * se + 1e-9, (k, diff, se)
        ratios[k] = (a[k].var() / b[k].var()).item()
    return ratios


def test_dreg_guide_gradient_is_unbiased_with_lower_variance(capsys):
    """Mean of 200,000 replicate DReG gradients against 200,000 IWAE ones (independent draws),
    within 4.5 standard errors; the variance ratio is printed and must be below 1."""
    g = Gauss(200_000)
    k = 5
    ref = g.grads(IWAE(k), seed=1)
    dreg = g.grads(DReG_IWAE(k), seed=2)
    ratios = _compare(dreg, ref)
    with capsys.disabled():
        print(f"\nDReG/IWAE encoder-gradient variance, K={k}: " +
              ", ".join(f"{n}: {r:.3f}" for n, r in ratios.items()))
    assert all(r < 1 for r in ratios.values())


def test_dreg_is_unbiased_for_a_hierarchical_guide(capsys):
    """q(z1) q(z2 | z1): the path through z1 into q(z2 | z1) must be kept (re-scoring each site
    with its distribution's parameters detached would drop it and be biased)."""
    g = Gauss(200_000, hier=True)
    ratios = _compare(g.grads(DReG_IWAE(5), seed=3), g.grads(IWAE(5), seed=4))
    with capsys.disabled():
        print("\nDReG/IWAE variance, hierarchical guide, K=5: " +
              ", ".join(f"{n}: {r:.3f}" for n, r in ratios.items()))


def test_stl_matches_the_analytic_elbo_gradient():
    """K = 1: E[grad] of the ELBO in closed form, a: -(a - mu) + (x - a), s: 1 - 2 exp(2 s)."""
    g = Gauss(200_000)
    stl = g.grads(STL_ELBO(1), seed=5)
    a, s, mu, x = 0.3, -0.5, 0.2, 1.5
    exact = {"a": -(a - mu) + (x - a), "s": 1 - 2 * math.exp(2 * s)}
    for name, want in exact.items():
        se = stl[name].std().item() / math.sqrt(stl[name].numel())
        assert abs(stl[name].mean().item() - want) < 4.5 * se + 1e-9
    # the value is the ELBO, the mean log weight: at k = 1 the IWAE bound, bit for bit
    pyro.set_rng_seed(0)
    v_stl = STL_ELBO(1).loss(g.model, g.guide, g.x)
    pyro.set_rng_seed(0)
    assert v_stl == IWAE(1).loss(g.model, g.guide, g.x)


def test_path_gradients_refuse_what_they_cannot_do():
    def model(x):
        with data_plate(2):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.full((2,), 0.5))
        with data_plate(2):
            pyro.sample("c", dist.Bernoulli(p))

    with pytest.raises(GenlabError, match="needs every guide site reparameterized; site 'c'"):
        DReG_IWAE(3).differentiable_loss(model, guide, torch.zeros(2))

    def shared_model(x):
        w = pyro.param("w", torch.tensor(1.0))
        with data_plate(2):
            z = pyro.sample("z", dist.Normal(w, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def shared_guide(x):
        w = pyro.param("w", torch.tensor(1.0))
        with data_plate(2):
            pyro.sample("z", dist.Normal(w, 1.0))

    with pytest.raises(GenlabError, match="disjoint model and guide parameters"):
        DReG_IWAE(3).differentiable_loss(shared_model, shared_guide, torch.zeros(2))
    assert {"DReG", "STL"} <= set(LOSSES) and isinstance(make_loss("DReG", 2), DReG_IWAE)


# ----------------------------------------------------------------------------- the schedule
def test_burda_schedule_rates_and_passes():
    s = get_schedule("burda")
    assert s.epochs == s.full_passes == 3280 and s.batch_size == 20
    assert s.adam == dict(betas=(0.9, 0.999), eps=1e-4)
    runs = s.runs()
    assert [n for n, _ in runs] == [3**i for i in range(8)]
    for i, (_, lr) in enumerate(runs):
        assert lr == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
    assert s.lr(0) == 1e-3 and s.lr(3279) == pytest.approx(1e-4) and s.lr(5000) == s.lr(3279)
    assert s.lr(1) == s.lr(3) != s.lr(4)  # stage 1 is passes 1..3
    assert s.lr_factor(3279) == pytest.approx(0.1)
    small = burda(passes=10)  # the same shape compressed: mid-epoch positions 164, 492, ...
    assert small.epochs == 10
    assert small.lrs() == [s.lr_at_pass(math.floor((e + 0.5) * 328)) for e in range(10)]
    assert [n for n, _ in small.runs()] == [1, 2, 7]
    assert burda(passes=3280).lrs() == s.lrs()
    assert sorted(burda(passes=97).lrs(), reverse=True) == burda(passes=97).lrs()  # never rises
    with pytest.raises(GenlabError, match="--passes must be a positive integer"):
        burda(passes=0)
    with pytest.raises(GenlabError, match="unknown schedule 'nope'"):
        get_schedule("nope")


# ----------------------------------------------------------------------------- reproduce
def _two_layer_registered(monkeypatch):
    from evaluation import reproduce as R

    assert "vae2" in SYSTEMS  # the two-layer system is a row of the table
    return R


def test_cells_and_commands(monkeypatch):
    R = _two_layer_registered(monkeypatch)
    assert len(R.ALL_CELLS) == 12 and R.Cell.parse("2L-iwae-k50").paper == (-82.90, "26+7")
    assert R.run_key(R.Cell(1, "IWAE", 1)) == "1L-vae-k1"
    with pytest.raises(GenlabError, match="unknown cell '3L-vae-k1'"):
        R.Cell.parse("3L-vae-k1")
    cfg, _ = R.cell_config(R.Cell(2, "IWAE", 5), budget=7, iwae_loss="DReG")
    assert (cfg.system, cfg.loss, cfg.k, cfg.batch_size) == ("vae2", "DReG", 5, 20)
    assert cfg.epochs == 7 and (cfg.schedule, cfg.passes) == ("burda", 7)
    assert "burda: 7 passes (of 3280), batch 20" in R.schedule_of(dataclasses.asdict(cfg))
    cfg, text = R.cell_config(R.Cell(1, "VAE", 1), budget=3, constant_lr=True)
    assert cfg.schedule is None and cfg.epochs == 3 and cfg.lr == 1e-3
    assert text.startswith("constant lr 0.001") and "3 passes" in text
    train, ev = R.commands(R.Cell(1, "VAE", 1), cfg, "runs/x", 5000, None, 0)
    assert "--epochs 3 --lr 0.001" in train and ev == "python -m evaluation runs/x --k 5000 --seed 0"


@pytest.mark.slow
def test_reproduce_smoke_writes_results_from_its_runs(tmp_path, data_dir, monkeypatch):
    """Two cells, one epoch on 40 images, K = 8 on 10 test images: every genlab number in
    RESULTS.md is the one in the runs' eval JSON and metrics."""
    R = _two_layer_registered(monkeypatch)
    monkeypatch.setattr(runner_module.Trainer, "validate", lambda self: float("nan"))
    out = tmp_path / "runs"
    results = tmp_path / "RESULTS.md"
    recs = R.reproduce(out, budget=1, cells="1L-vae-k1,1L-iwae-k1,2L-vae-k1,2L-iwae-k5", k_eval=8,
                       eval_limit=10, limit=40, data_dir=data_dir, results=str(results))
    text = results.read_text()
    assert set(recs) == {"1L-vae-k1", "1L-iwae-k1", "2L-vae-k1", "2L-iwae-k5"}
    for key in ("1L-vae-k1", "2L-iwae-k5"):
        ev = json.loads((out / key / "eval_test.json").read_text())
        metrics = runner_module.read_metrics(out / key)
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}`"))
        cols = [c.strip() for c in row.strip("|").split("|")]
        want = f"{ev['iwae']['8']['mean']:.2f} ± {ev['iwae']['8']['se']:.2f}".replace("-", "−")
        assert cols[5] == want and ev["n"] == 10 and ev["num_samples"] == 8
        assert cols[9] == str(len(metrics)) == "1"
        seconds = sum(r["seconds"] for r in metrics)
        assert cols[11] == f"{seconds:.0f}" and cols[12] == f"{seconds * 3280 / 3600:.1f}"
    row = next(line for line in text.splitlines() if line.startswith("| `1L-iwae-k1`"))
    assert "(run of `1L-vae-k1`)" in row
    assert re.search(r"\| `2L-vae-k50` .*not run", text)
    # the ordering lines: paired differences over the same 10 images, from the runs' npz files
    a, b = (np.load(out / key / "eval_test.npz")["iwae_8"] for key in ("2L-vae-k1", "1L-vae-k1"))
    d = a - b
    line = next(ln for ln in text.splitlines() if ln.startswith("- VAE, k = 1: 2 layers above 1"))
    want = f"({d.mean():+.2f} ± {d.std(ddof=1) / math.sqrt(d.size):.2f} nats, paired"
    assert want.replace("-", "−") in line and ("holds" in line) == (d.mean() > 0)
    assert "1 layer(s), k = 5: IWAE above VAE: not run" in text
    # resumable and cached: a second call trains and evaluates nothing new
    mtime = (out / "2L-iwae-k5" / "eval_test.json").stat().st_mtime
    R.reproduce(out, budget=1, cells="2L-iwae-k5", k_eval=8, eval_limit=10, limit=40,
                data_dir=data_dir, results=str(results))
    assert (out / "2L-iwae-k5" / "eval_test.json").stat().st_mtime == mtime
