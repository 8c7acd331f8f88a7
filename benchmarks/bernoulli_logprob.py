"""The Bernoulli log density genlab's models use against torch's, in speed and accuracy.

    python benchmarks/bernoulli_logprob.py [--runs runs/vae-d20 runs/vae-d4 ...] [--threads 1]

genlab's ``models.common.bernoulli_log_prob(l, x) = x l - softplus(l)`` against torch's
``-binary_cross_entropy_with_logits(l, x)`` (what ``torch.distributions.Bernoulli.log_prob``
computes): the same function.  Speed: one 5000 x 784 float32 evaluation (K = 5000 draws of one
image, as in the IWAE K = 5000 estimate), the two interleaved, median of repetitions, beside a
5000 x 400 x 784 matmul (the 784-400-20 decoder's last layer).  Accuracy: the largest per-image
error (sum over 784 pixels) of each float32 form against float64, on (a) N(0, 8^2) logits and
(b) for each ``--runs`` run: its decoder's logits for 100 draws z ~ q(z | x) of 200 fixed-
binarized MNIST test images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from models.common import bernoulli_log_prob  # noqa: E402

DATA = os.environ.get("GENLAB_DATA", str(ROOT.parent / "shared" / "data"))


def torch_form(logits, x):
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")


def errors(logits: torch.Tensor, x: torch.Tensor) -> tuple:
    """Largest per-image |float32 - float64| of (torch's form, genlab's form)."""
    ref = bernoulli_log_prob(logits.double(), x.double()).sum(-1)
    return tuple((f(logits, x).sum(-1).double() - ref).abs().max().item()
                 for f in (torch_form, bernoulli_log_prob))


def run_logits(run: str, n: int = 200, k: int = 100):
    from evaluation.api import load_run
    from inference.data import load_images

    vae = load_run(run).system
    x = load_images("mnist", "fixed", DATA, download=False).test.x[:n]
    with torch.no_grad():
        loc, scale = vae.encode(x)
        return vae.decode(loc + scale * torch.randn(k, *loc.shape)), x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=[], help="trained VAE run directories")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    logits = torch.randn(5000, 784) * 8
    x = (torch.rand(784) < 0.2).float()
    w, z = torch.randn(784, 400), torch.randn(5000, 400)
    contenders = {"torch -BCE-with-logits": lambda: torch_form(logits, x),
                  "genlab x*l - softplus(l)": lambda: bernoulli_log_prob(logits, x),
                  "[scale] matmul 5000x400x784": lambda: z @ w.T}
    times = {k: [] for k in contenders}
    for r in range(a.reps):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            t = time.perf_counter()
            contenders[name]()
            times[name].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.reps} interleaved "
          "repetitions; 5000 x 784 float32 logits")
    for name, m in med.items():
        print(f"  {name:<30} {m:8.2f} ms")
    print(f"genlab's form is {med['torch -BCE-with-logits'] / med['genlab x*l - softplus(l)']:.2f}x "
          "faster than torch's")
    print("largest per-image error against float64 (nats):   torch's form   genlab's form")
    cases = [("N(0, 8^2) logits, 5000 x 784", logits, x)]
    for run in a.runs:
        lg, xr = run_logits(run)
        cases.append((f"{run} ({lg.shape[0]} x {lg.shape[1]} images)", lg, xr))
    for label, lg, xr in cases:
        e_t, e_g = errors(lg, xr)
        print(f"  {label:<46} {e_t:12.2e} {e_g:15.2e}")


if __name__ == "__main__":
    main()
