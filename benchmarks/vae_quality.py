"""Held-out log-likelihood of trained VAE runs, beside the figures the literature quotes.

    python benchmarks/vae_quality.py RUN_DIR [RUN_DIR ...] [--k 5000] [--limit 1000]

For each run: its training budget (epochs, the summed wall-clock seconds in metrics.csv, the
objective), the test ELBO and IWAE estimate at K (nats per image, mean ± s.e.), and the
k-hat summary.  Runs of the IWAE paper's one-stochastic-layer architecture are listed beside
Burda et al. (2015), Table 1 / Appendix, for comparison, and their ordering by objective
(IWAE k=50 > k=5 > VAE in the paper) is checked on the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.api import evaluate  # noqa: E402
from inference.runner import read_metrics  # noqa: E402
from models.common import GenlabError  # noqa: E402

# Quoted from Burda, Grosse & Salakhutdinov (2015), one stochastic layer, for reference only.
PAPER = {
    ("mnist", "Trace_ELBO", 1): ("VAE, dynamic MNIST (Table 1)", -86.76),
    ("mnist", "IWAE", 5): ("IWAE k=5, dynamic MNIST (Table 1)", -85.54),
    ("mnist", "IWAE", 50): ("IWAE k=50, dynamic MNIST (Table 1)", -84.78),
    ("binarized-mnist", "Trace_ELBO", 1): ("VAE, Larochelle MNIST (Appendix)", -88.71),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories; RUN:FILE evaluates checkpoint FILE")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="data root (default: the run's, else $GENLAB_DATA)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    rows = []
    for spec in a.runs:
        run, _, ckpt = spec.partition(":")
        try:
            ev = evaluate(run, [1, a.k], "test", a.limit, a.seed, data_dir=a.data_dir,
                          checkpoint=ckpt or None, spread=True)
            s, cfg = ev.summary, ev.config
        except GenlabError as e:
            print(f"vae_quality: error: {e}", file=sys.stderr)
            return 2
        m = read_metrics(run)
        if ckpt.startswith("epoch_"):  # the budget up to that epoch
            m = [r for r in m if r["epoch"] <= int(Path(ckpt).stem.split("_")[1])]
        key = (cfg.data_args.get("dataset"), "IWAE" if cfg.loss == "RenyiELBO" else cfg.loss, cfg.k)
        iwae1l = cfg.system_args.get("hidden") == [200, 200] and cfg.system_args.get("latent_dim") == 50
        rows.append(dict(run=spec, arch=f"d={cfg.system_args['latent_dim']} h={cfg.system_args['hidden']}",
                         data=f"{cfg.data_args.get('dataset')}/{cfg.data_args.get('binarization')}",
                         loss=f"{cfg.loss} k={cfg.k}", epochs=int(m[-1]["epoch"]),
                         train_s=sum(r["seconds"] for r in m), elbo=s["elbo"]["mean"],
                         iwae=s["iwae"][a.k]["mean"], se=s["iwae"][a.k]["se"],
                         khat=s["khat_gt_0.7"], paper=PAPER.get(key) if iwae1l else None, key=key))
    print(f"test images: {a.limit} spread evenly through the test set (every "
          f"len/{a.limit}-th), IWAE K={a.k}, seed {a.seed}; nats per image")
    print(f"{'run':34} {'arch':18} {'data':28} {'loss':16} {'epochs':>6} {'train s':>8} "
          f"{'ELBO':>9} {'IWAE':>9} {'± s.e.':>6} {'k>0.7':>6}  paper")
    for r in rows:
        ref = f"{r['paper'][1]:.2f} ({r['paper'][0]}, 3,280 passes)" if r["paper"] else ""
        print(f"{r['run']:34} {r['arch']:18} {r['data']:28} {r['loss']:16} {r['epochs']:>6} "
              f"{r['train_s']:>8.0f} {r['elbo']:>9.2f} {r['iwae']:>9.2f} {r['se']:>6.2f} "
              f"{r['khat']:>6.1%}  {ref}")
    fam = {r["key"][1:]: r["iwae"] for r in rows if r["paper"] and r["key"][0] == "mnist"}
    order = [("IWAE", 50), ("IWAE", 5), ("Trace_ELBO", 1)]
    have = [o for o in order if o in fam]
    if len(have) > 1:
        ok = all(fam[a_] > fam[b_] for a_, b_ in zip(have, have[1:]))
        print("ordering " + " > ".join(f"{n} k={k} ({fam[(n, k)]:.2f})" for n, k in have) +
              (": holds" if ok else ": does NOT hold") + " on these runs")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
