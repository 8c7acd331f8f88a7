"""``python -m inference SYSTEM [options]`` (console script ``genlab-train``): train a system."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from inference import distributed
from inference.importance import flush_denormals_in_process
from inference.runner import RunConfig, train
from inference.schedules import get_schedule
from inference.systems import SYSTEMS, add_config_arguments, get_system
from models.common import GenlabError, config_defaults


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, err: GenlabError):
    """Print ``err`` in one line; under torchrun rank 0 prints, and the other ranks print only
    errors of their own (not those every rank raises alike), prefixed with their rank."""
    d = distributed.current()
    world = distributed.world_size_from_env() if not d.active else d.size
    rank = d.rank if d.active else int(os.environ.get("RANK", "0") or 0) if world > 1 else 0
    if rank > 0 and getattr(err, "lockstep", False):
        return getattr(err, "exit_code", 2)
    who = f" (rank {rank} of {world})" if rank > 0 else ""
    print(f"{prog}{who}: error: {err}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", 2)


#: What may change on --resume: nothing that changes what the run's numbers mean, except the
#: learning rate, which a user lowers to continue a diverged run from its last good checkpoint.
RESUMABLE = ("epochs", "patience", "device", "data_dir", "lr", "checkpoint_every",
             "dist_timeout", "divergence_factor")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: RunConfig fields that are not flags of their own.
_NOT_FLAGS = ("system", "system_args", "data_args", "distributed")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="genlab-train", description="Train a genlab system with SVI into a run "
                    "directory (config.json, metrics.csv, steps.csv, checkpoint.pt).")
    sub = parser.add_subparsers(dest="system", metavar="SYSTEM", parser_class=Parser,
                                title="systems")
    sub.required = True
    for name, spec in SYSTEMS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        p.add_argument("--out", help="run directory (default runs/SYSTEM-<time>)")
        add_config_arguments(p, RunConfig, skip=_NOT_FLAGS)
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        spec.add_arguments(p)
    return parser


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """A RunConfig from parsed arguments; with --resume, the run's own config plus --epochs."""
    spec = get_system(ns.system)
    sys_names, data_names = spec.option_names()
    given = {k: v for k, v in vars(ns).items() if v is not None}
    if ns.resume:
        if not ns.out:
            raise GenlabError("--resume needs --out, the run directory to continue")
        if not (Path(ns.out) / "config.json").exists():
            raise GenlabError(f"{ns.out} holds no run to resume (no config.json)")
        cfg = RunConfig.read(ns.out)
        if cfg.system != ns.system:
            raise GenlabError(f"{ns.out} holds a {cfg.system!r} run, not {ns.system!r}")
        for key, value in given.items():
            if key in RESUMABLE:
                setattr(cfg, key, value)
            elif key in {f.name for f in fields(cfg)} and value != getattr(cfg, key):
                allowed = ", ".join(_flag(k) for k in RESUMABLE[:-1]) + " and " + _flag(RESUMABLE[-1])
                raise GenlabError(f"{_flag(key)} {value} differs from the run's "
                                  f"{getattr(cfg, key)}; only {allowed} may change on --resume")
            elif key in sys_names + data_names:
                saved_value = (cfg.system_args if key in sys_names else cfg.data_args).get(key)
                if value != saved_value:
                    raise GenlabError(f"--{key.replace('_', '-')} {value} differs from the run's "
                                      f"{saved_value}; it cannot change on --resume")
        return cfg
    values = {k: given.get(k, v) for k, v in config_defaults(RunConfig).items()
              if k not in _NOT_FLAGS + ("data_dir",)}
    values["loss"] = given.get("loss") or spec.default_loss
    if given.get("schedule"):  # the schedule's length and batch, unless given explicitly
        sched = get_schedule(given["schedule"], given.get("passes"))
        values["epochs"] = given.get("epochs", sched.epochs)
        values["batch_size"] = given.get("batch_size", sched.batch_size)
        values["lr"] = sched.lr(0)
    system_args = spec.resolve({k: given.get(k) for k in sys_names})
    data_args = spec.resolve_data({k: given.get(k, d) for k, d in spec.data_defaults().items()})
    return RunConfig(system=ns.system, system_args=system_args, data_args=data_args,
                     data_dir=given.get("data_dir"), **values)


def script() -> int:
    """``python -m inference`` and ``genlab-train``: :func:`main` in a process that flushes
    denormals in every thread (``inference.importance.flush_denormals_in_process``)."""
    flush_denormals_in_process()
    return main()


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
        if ns.out is None:
            ns.out = f"runs/{ns.system}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train(cfg, Path(ns.out), resume=ns.resume, progress=not ns.quiet)
        main_rank = distributed.current().main  # under torchrun only rank 0 reports
    except GenlabError as e:
        return fail(parser.prog, e)
    finally:
        distributed.teardown()
    if not ns.quiet and main_rank:
        last = result.metrics[-1] if result.metrics else None
        tail = f"; validation ELBO {last['val_elbo']:.3f} nats/pt" if last else ""
        stop = " (stopped early)" if result.stopped_early else ""
        print(f"run saved to {result.out}{tail}{stop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
