"""Throughput of the exact 2x2-patch posterior (16 completions per image, one batched pass).

    python benchmarks/inpaint_throughput.py [--run runs/pixelrnn-gru32] [--images 200] [--repeats 3]
        [--check-k 500,5000,20000 --check-images 50]

For patches whose top-left corner sits at rows 2, 13 and 25 (column 13): the pixels before
the patch are read once per image and shared by its 16 completions, so a patch low in the image
is cheaper.  Prints images per second (median of ``--repeats`` timed calls after one warm-up) of
``evaluation.inpainting.exact_inpaint`` on the run's first ``--images`` test images, with the
torch thread count.  Without ``--run`` (or when it does not exist) a GRU of ``--hidden`` units
with random weights is timed: the cost does not depend on the weights.

``--check-k``: also IS and SMC (the model's conditionals as proposal) against the exact 2x2
posterior at patch (13,13) on ``--check-images`` test images spread evenly through the test set,
for each K: the largest and mean |estimated - exact| p(x_m = 1 | x_o), the mean |error| of
log p(x_o), and the smallest ESS.  The errors should shrink about as 1/sqrt(K).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from evaluation.inpainting import exact_inpaint, importance_inpaint, patch_mask  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "pixelrnn-gru32"))
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-k", help="comma-separated particle counts for the IS/SMC check")
    p.add_argument("--check-images", type=int, default=50)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    if (Path(ns.run) / "config.json").exists():
        from evaluation.api import load_run

        cfg, system, data = load_run(ns.run, ns.data_dir, expect_system="pixelrnn")
        x = data.test.x[: ns.images]
        what = f"run {ns.run} (GRU({cfg.system_args['hidden']})), its first {x.shape[0]} test images"
        x_all = data.test.x
    else:
        from models.pixelrnn import PixelGRU

        torch.manual_seed(0)
        system = PixelGRU(hidden=ns.hidden).eval()
        x = (torch.rand(ns.images, 784) < 0.2).float()
        what = f"random-weight GRU({ns.hidden}), {ns.images} random images"
        x_all = x
    print(f"exact 2x2-patch posterior, {what}; torch threads {ns.threads}")
    print(f"{'patch at':<12}{'images/s':>10}{'s per call':>12}{'completions/s':>15}")
    for row in (2, 13, 25):
        mask = patch_mask(row, 13)
        exact_inpaint(system, x[: min(8, x.shape[0])], mask)  # warm-up
        times = []
        for _ in range(ns.repeats):
            t0 = time.perf_counter()
            exact_inpaint(system, x, mask)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"({row},13){'':<5}{x.shape[0] / t:>10.1f}{t:>12.3f}{16 * x.shape[0] / t:>15.0f}")
    if ns.check_k:
        from evaluation.reports.pixelrnn import spread

        xc, mask = spread(x_all, ns.check_images), patch_mask(13, 13)
        ex = exact_inpaint(system, xc, mask)
        print(f"\nIS / SMC against the exact 2x2 posterior at (13,13), {xc.shape[0]} test images "
              "spread through the test set, seed 0")
        print(f"{'K':>7} {'method':<6}{'max|dp|':>9}{'mean|dp|':>10}{'mean|dlogp|':>12}{'min ESS':>9}")
        for k in (int(v) for v in ns.check_k.split(",")):
            for smc in (False, True):
                r = importance_inpaint(system, xc, mask, k, smc=smc,
                                       generator=torch.Generator().manual_seed(0))
                d = (r.pixel_prob - ex.pixel_prob)[:, mask].abs()
                dl = abs(r.log_marginal - ex.log_marginal).mean()
                print(f"{k:>7} {r.method:<6}{float(d.max()):>9.4f}{float(d.mean()):>10.4f}"
                      f"{dl:>12.4f}{r.ess.min():>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
