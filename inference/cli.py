"""``python -m inference SYSTEM [options]`` (console script ``genlab-train``): train a system."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from models.common import GenlabError

COMMON = {  # dest -> default; every default is applied after parsing, so --resume can tell
    "epochs": 10,  # which options were given on the command line
    "batch_size": 128,
    "lr": 1e-3,
    "loss": None,  # the system's default loss
    "k": 1,
    "limit": None,
    "seed": 0,
    "device": "cpu",
    "optimizer": "adam",
    "lr_decay": 1.0,
    "clip_norm": 10.0,
    "patience": None,
    "keep_epochs": [],
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, err: GenlabError):
    print(f"{prog}: error: {err}", file=sys.stderr)
    return getattr(err, "exit_code", 2)


def build_parser() -> argparse.ArgumentParser:
    from inference.runner import LOSSES, OPTIMIZERS
    from inference.systems import SYSTEMS, epoch_list

    parser = Parser(prog="genlab-train", description="Train a genlab system with SVI into a run "
                    "directory (config.json, metrics.csv, steps.csv, checkpoint.pt).")
    sub = parser.add_subparsers(dest="system", metavar="SYSTEM", parser_class=Parser,
                                title="systems")
    sub.required = True
    for name, spec in SYSTEMS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        p.add_argument("--out", help="run directory (default runs/SYSTEM-<time>)")
        p.add_argument("--epochs", type=int, help="total passes over the training data (default 10)")
        p.add_argument("--batch-size", type=int, help="mini-batch size (default 128)")
        p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
        p.add_argument("--loss", choices=LOSSES, help=f"objective (default {spec.default_loss})")
        p.add_argument("--k", type=int, help="particles per datapoint (default 1)")
        p.add_argument("--limit", type=int, help="use only the first N training datapoints")
        p.add_argument("--seed", type=int, help="random seed (default 0)")
        p.add_argument("--device", help="torch device (default cpu)")
        p.add_argument("--optimizer", choices=OPTIMIZERS, help="adam (default) or clipped_adam")
        p.add_argument("--lr-decay", type=float, help="learning-rate factor per epoch (default 1)")
        p.add_argument("--clip-norm", type=float, help="clipped_adam's clip: Pyro's ClippedAdam clamps each "
                       "gradient element to [-c, c] (default 10)")
        p.add_argument("--patience", type=int, help="stop after this many epochs without a better "
                       "validation ELBO")
        p.add_argument("--keep-epochs", type=epoch_list, help="also keep checkpoints of these "
                       "epochs, e.g. 0,1,5 (0 = before training)")
        p.add_argument("--data-dir", help="data root (default $GENLAB_DATA, else the user cache)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        spec.add_arguments(p)
    return parser


def config_from_args(ns: argparse.Namespace):
    """A RunConfig from parsed arguments; with --resume, the run's own config plus --epochs."""
    from inference.runner import RunConfig
    from inference.systems import get_system

    spec = get_system(ns.system)
    sys_names, data_names = spec.option_names()
    given = {k: v for k, v in vars(ns).items() if v is not None}
    if ns.resume:
        if not ns.out:
            raise GenlabError("--resume needs --out, the run directory to continue")
        path = Path(ns.out) / "config.json"
        if not path.exists():
            raise GenlabError(f"{ns.out} holds no run to resume (no config.json)")
        saved = json.loads(path.read_text())
        if saved.get("system") != ns.system:
            raise GenlabError(f"{ns.out} holds a {saved.get('system')!r} run, not {ns.system!r}")
        cfg = RunConfig.from_dict(saved)
        changeable = {"epochs", "data_dir", "device", "patience"}
        for key, value in given.items():
            if key in changeable:
                setattr(cfg, key, value)
            elif key in {f.name for f in fields(cfg)} and value != getattr(cfg, key):
                raise GenlabError(f"--{key.replace('_', '-')} {value} differs from the run's "
                                  f"{getattr(cfg, key)}; only --epochs, --patience, --device and "
                                  "--data-dir may change on --resume")
            elif key in sys_names + data_names:
                saved_value = (cfg.system_args if key in sys_names else cfg.data_args).get(key)
                if value != saved_value:
                    raise GenlabError(f"--{key.replace('_', '-')} {value} differs from the run's "
                                      f"{saved_value}; it cannot change on --resume")
        return cfg
    values = {k: given.get(k, v) for k, v in COMMON.items()}
    values["loss"] = values["loss"] or spec.default_loss
    system_args = spec.resolve({k: given.get(k) for k in sys_names})
    data_args = spec.resolve_data({k: given.get(k, d) for k, d in spec.data_defaults().items()})
    return RunConfig(system=ns.system, system_args=system_args, data_args=data_args,
                     data_dir=given.get("data_dir"), **values)


def main(argv=None) -> int:
    from inference.runner import train

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
        if ns.out is None:
            import time

            ns.out = f"runs/{ns.system}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train(cfg, Path(ns.out), resume=ns.resume, progress=not ns.quiet)
    except GenlabError as e:
        return fail(parser.prog, e)
    if not ns.quiet:
        last = result.metrics[-1] if result.metrics else None
        tail = f"; validation ELBO {last['val_elbo']:.3f} nats/pt" if last else ""
        stop = " (stopped early)" if result.stopped_early else ""
        print(f"run saved to {result.out}{tail}{stop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
