"""Does a JIT-traced ELBO train to the same numbers as the eager one?  (docs/jit.md)

    python benchmarks/jit_values.py [--steps 60]

For the IWAE paper's one- and two-layer models: Adam steps (batch 20, lr 1e-3, eps 1e-4) from
the same weights and seed with Pyro's ``Trace_ELBO`` and with ``JitTrace_ELBO`` traced once
(``StableJitTrace_ELBO`` of benchmarks/jit_trace.py; the tracing call runs on the parameter-
discovery batch with the RNG state restored afterwards, so both see the same draws).  Prints
whether every loss value is identical, the first step that differs, and the largest parameter
difference at the end.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from jit_trace import StableJitTrace_ELBO  # noqa: E402  (benchmarks/ is the script's folder)

from inference.data import load_images  # noqa: E402
from models.iwae import TwoLayerVAE  # noqa: E402
from models.vae import build_vae  # noqa: E402

DATA = str(ROOT.parent / "shared" / "data")


def train(base, loss, x, n: int, steps: int) -> tuple:
    """(loss values, final parameters) of ``steps`` Adam steps with ``loss``."""
    v = copy.deepcopy(base)
    pyro.clear_param_store()
    state = torch.get_rng_state()
    loss.differentiable_loss(v.model, v.guide, x[:2], data_size=n)  # discovery (and the trace)
    torch.set_rng_state(state)
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-4)
    torch.manual_seed(11)
    values = []
    for i in range(steps):
        value = loss.differentiable_loss(v.model, v.guide, x[i * 20:(i + 1) * 20], data_size=n)
        values.append(value.item())
        opt.zero_grad()
        value.backward()
        opt.step()
    return values, [p.detach().clone() for p in params]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the tracer's warnings about Python values
    x = load_images("mnist", "fixed", DATA, download=False).train.x
    n = len(x)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, 1 thread; {a.steps} steps, batch 20")
    for name, build in (("1 layer", lambda: build_vae(preset="iwae-1layer")), ("2 layers", TwoLayerVAE)):
        torch.manual_seed(0)
        base = build()
        le, pe = train(base, pyro.infer.Trace_ELBO(), x, n, a.steps)
        lj, pj = train(base, StableJitTrace_ELBO(ignore_jit_warnings=True), x, n, a.steps)
        first = next((i for i, (u, w) in enumerate(zip(le, lj)) if u != w), None)
        diff = max((u - w).abs().max().item() for u, w in zip(pe, pj))
        print(f"{name}: every loss identical: {le == lj}; first differing step: {first}; "
              f"largest |parameter difference| after {a.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
