"""``python -m evaluation RUN_DIR`` (console script ``genlab-eval``): ELBO and IWAE of a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


def load_run(run_dir, data_dir=None, device=None, expect_system=None, checkpoint=None):
    """(config, system module with trained parameters, dataset) of a run directory.

    ``checkpoint`` names a file in the run directory (e.g. ``epoch_5.pt``); by default the
    latest ``checkpoint.pt``, or ``best.pt`` (the best validation ELBO) for runs trained with
    early stopping (``--patience``).
    """
    from inference.runner import BEST, CHECKPOINT, RunConfig, load_checkpoint, restore_params
    from inference.systems import get_system

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise GenlabError(f"{run_dir} is not a run directory (no config.json)")
    cfg = RunConfig.from_dict(json.loads(path.read_text()))
    if expect_system is not None and cfg.system != expect_system:
        raise GenlabError(f"{run_dir} holds a {cfg.system!r} run, not {expect_system!r}")
    if data_dir:
        cfg.data_dir = data_dir
    if device:
        cfg.device = device
    spec = get_system(cfg.system)
    if checkpoint:
        ckpt = run_dir / checkpoint
        if not ckpt.exists():
            have = ", ".join(sorted(p.name for p in run_dir.glob("*.pt")))
            raise GenlabError(f"{run_dir} has no checkpoint {checkpoint!r} (it has {have})")
    elif cfg.patience is not None and (run_dir / BEST).exists():
        ckpt = run_dir / BEST  # early stopping chose the best validation epoch
    else:
        ckpt = run_dir / CHECKPOINT
    state = load_checkpoint(ckpt)
    if state.get("system") != cfg.system:
        raise GenlabError(f"checkpoint {ckpt} is from a {state.get('system')!r} run, not {cfg.system!r}")
    system = spec.build(cfg)
    restore_params(system, state)
    system.to(cfg.device).eval()
    data = spec.load_data(cfg).to(cfg.device)
    return cfg, system, data


def evaluate(run_dir, ks, split="test", limit=None, seed=0, memory_gb=1.0, data_dir=None,
             device=None, checkpoint=None, spread=False):
    """Estimate every datapoint of ``split``; saves ``eval_<split>.npz``/``.json``;
    returns (estimate, summary, config)."""
    return evaluate_run(run_dir, ks, split, limit, seed, memory_gb, data_dir, device,
                        checkpoint, spread)[:3]


def evaluate_run(run_dir, ks, split="test", limit=None, seed=0, memory_gb=1.0, data_dir=None,
                 device=None, checkpoint=None, spread=False):
    """:func:`evaluate`, also returning the loaded system and data set."""
    import pyro

    from evaluation.estimator import estimate_log_marginal

    if limit is not None and limit < 1:
        raise GenlabError(f"--limit must be a positive integer, got {limit}")
    if memory_gb <= 0:
        raise GenlabError(f"--memory-gb must be positive, got {memory_gb}")
    cfg, system, data = load_run(run_dir, data_dir, device, checkpoint=checkpoint)
    part = data.split(split)
    if limit is not None:
        part = part.subset(limit, spread)
    if hasattr(system, "check_data"):  # e.g. 0/1 pixels for a Bernoulli likelihood
        system.check_data(*part.tensors())
    pyro.set_rng_seed(seed)
    est = estimate_log_marginal(system.model, system.guide, *part.tensors(), num_samples=max(ks),
                                ks=ks, memory=int(memory_gb * (1 << 30)), progress=True)
    summary = est.summary() | {"split": split, "run": str(run_dir), "system": cfg.system,
                               "seed": seed}
    stem = f"eval_{split}" + (f"_{Path(checkpoint).stem}" if checkpoint else "")
    summary["checkpoint"] = checkpoint or "best.pt/checkpoint.pt"
    est.save(Path(run_dir) / f"{stem}.npz")
    (Path(run_dir) / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return est, summary, cfg, system, data


def describe(cfg) -> str:
    """One line naming the run: system, its architecture, data and binarization."""
    arch = ", ".join(f"{k}={v}" for k, v in cfg.system_args.items() if v is not None)
    data = "/".join(str(v) for v in cfg.data_args.values() if v is not None)
    return f"{cfg.system} ({arch}) on {data}, loss {cfg.loss} k={cfg.k}"


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
    from evaluation.reports import get_report

    parser = build_compare_parser()
    ns = parser.parse_args(argv)
    try:
        if len(ns.run_dirs) < 2:
            raise GenlabError("compare needs at least two run directories")
        systems = set()
        for d in ns.run_dirs:
            path = Path(d) / "config.json"
            if not path.exists():
                raise GenlabError(f"{d} is not a run directory (no config.json)")
            systems.add(json.loads(path.read_text())["system"])
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
        est, summary, cfg, system, data = evaluate_run(ns.run_dir, ns.k, ns.split, ns.limit,
                                                       ns.seed, ns.memory_gb, ns.data_dir,
                                                       ns.device, ns.checkpoint, ns.spread)
        figures = []
        if ns.report:
            from evaluation.reports import get_report

            figures = get_report(cfg.system).report(Path(ns.run_dir), cfg, system, data, est, ns)
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
