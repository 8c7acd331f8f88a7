"""``python -m evaluation RUN_DIR`` (console script ``genlab-eval``): ELBO and IWAE of a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.api import describe, evaluate, read_config
from evaluation.reports import get_report
from inference.cli import Parser, fail
from models.common import GenlabError

DEFAULT_KS = "1,10,100,1000,5000"


def _ks(text: str) -> list:
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"every k must be at least 1, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="genlab-eval", description="Estimate log p(x) of a trained run by importance "
               "sampling with its guide (IWAE) beside the ELBO; per-datapoint values are saved "
               "to RUN_DIR/eval_<split>.npz.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by genlab-train")
    p.add_argument("--k", type=_ks, default=_ks(DEFAULT_KS),
                   help=f"numbers of importance samples; the largest is K (default {DEFAULT_KS})")
    p.add_argument("--split", default="test",
                   help="train, valid, test, or an extra split of the run's data (holdout)")
    p.add_argument("--limit", type=int, help="only the first N datapoints of the split")
    p.add_argument("--spread", action="store_true", help="with --limit: N datapoints spread "
                   "evenly through the split instead of the first N (binarized-mnist's test "
                   "file is sorted by class)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gb", type=float, default=1.0, help="memory budget of the estimator")
    p.add_argument("--data-dir", help="data root (default: the run's, else $GENLAB_DATA)")
    p.add_argument("--device", default=None)
    p.add_argument("--checkpoint", help="a checkpoint file of the run, e.g. epoch_5.pt "
                   "(default checkpoint.pt; best.pt for runs with --patience)")
    p.add_argument("--report", action="store_true",
                   help="also draw the system's figures into RUN_DIR/figures/")
    p.add_argument("--digit", type=int, help="the digit class a report singles out (default 6)")
    p.add_argument("--classifier-k", type=int, default=100,
                   help="importance samples per label for the CVAE's generative classifier")
    p.add_argument("--baseline", help="a run the report compares with (CVAE: an unconditional "
                   "VAE of the same size)")
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    p = Parser(prog="genlab-eval compare", description="Compare runs of one system on the same "
               "test datapoints: figures in the first run's figures/ folder.")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="two or more run directories")
    p.add_argument("--k", type=_ks, default=_ks(DEFAULT_KS))
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int)
    p.add_argument("--spread", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-gb", type=float, default=1.0)
    p.add_argument("--data-dir")
    p.add_argument("--device", default=None)
    p.add_argument("--out", help="folder for the comparison figures (default RUN_A/figures)")
    return p


def format_table(summary: dict, cfg) -> str:
    joint = not summary["per_datapoint"]

    def row(name, v):
        se = "" if joint or v["se"] != v["se"] else f" ± {v['se']:.3f}"
        return f"  {name:<16}{v['mean']:>12.3f}{se}"

    unit = ("one joint value over all datapoints, nats" if joint
            else "nats per datapoint, mean ± standard error")
    lines = [describe(cfg),
             f"{summary['split']} split, n = {summary['n']}, K = {summary['num_samples']}, "
             f"seed {summary['seed']}; {unit}",
             row("ELBO", summary["elbo"])]
    for k, v in summary["iwae"].items():
        lines.append(row(f"IWAE k={k}", v))
    lines.append(row("gap IWAE-ELBO", summary["gap"]))
    share = "of datapoints" if not joint else "(the joint weight)"
    lines.append(f"  k-hat > 0.7 for {100 * summary['khat_gt_0.7']:.1f} % {share}; "
                 f"mean ESS {summary['ess_mean']:.1f} of {summary['num_samples']}")
    if joint:
        lines.append(f"  note: {summary['summed']}")
    return "\n".join(lines)


def compare_main(argv) -> int:
    parser = build_compare_parser()
    ns = parser.parse_args(argv)
    try:
        if len(ns.run_dirs) < 2:
            raise GenlabError("compare needs at least two run directories")
        systems = set()
        for d in ns.run_dirs:
            systems.add(read_config(d).system)
        if len(systems) != 1:
            raise GenlabError(f"compare needs runs of one system, got {sorted(systems)}")
        paths = get_report(systems.pop()).compare(ns.run_dirs, ns)
    except GenlabError as e:
        return fail(parser.prog, e)
    for p in paths:
        print(p)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        ev = evaluate(ns.run_dir, ns.k, ns.split, ns.limit, ns.seed, ns.memory_gb, ns.data_dir,
                      ns.device, ns.checkpoint, ns.spread)
        summary, cfg = ev.summary, ev.config
        figures = []
        if ns.report:
            figures = get_report(cfg.system).report(Path(ns.run_dir), cfg, ev.system, ev.data,
                                                    ev.estimate, ns)
    except GenlabError as e:
        return fail(parser.prog, e)
    if ns.json:
        out = {"elbo": summary["elbo"]["mean"],
               "iwae": {str(k): v["mean"] for k, v in summary["iwae"].items()},
               "khat_gt_0.7": summary["khat_gt_0.7"], "n": summary["n"], "summary": summary}
        print(json.dumps(out))
    else:
        print(format_table(summary, cfg))
    for p in figures:
        print(f"figure: {p}", file=sys.stderr if ns.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
