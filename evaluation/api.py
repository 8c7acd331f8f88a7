"""The evaluation library: load a run, estimate log p(x) on a split, describe a run.

The command line (:mod:`evaluation.cli`), the reports and the notebooks all call these; none
of them imports the command line.

* :func:`load_run` -> :class:`LoadedRun` (config, system with trained parameters, data set,
  the checkpoint file used and its epoch);
* :func:`evaluate` -> :class:`Evaluation` (the loaded run, the evaluated subset, the
  importance-sampling estimate and its summary), saved as ``eval_<split>.npz``/``.json``;
* :class:`EvalOptions`: the evaluation's options, the one source of their defaults and help
  (``python -m evaluation`` generates its flags from it; each report's ``Options`` extends it).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyro

from inference import distributed
from inference.data import Dataset, Split
from inference.importance import MAX_SECONDS, Estimate, estimate_log_marginal
from inference.runner import BEST, CHECKPOINT, RunConfig, load_checkpoint, restore_params
from inference.systems import get_system
from models.common import GenlabError, fill_defaults, option
from models.iwae import TwoLayerVAE, active_units
from models.vae import VAE


def k_list(text) -> list:
    """``--k``: comma-separated numbers of importance samples, sorted and deduplicated."""
    try:
        ks = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"every k must be at least 1, got {text!r}")
    return ks


@dataclass
class EvalOptions:
    """What ``python -m evaluation RUN_DIR`` estimates, on which datapoints, with what budget.

    The one source of the evaluation's defaults: the command line's flags and their help are
    generated from these fields (``inference.systems.add_config_arguments``), and each report
    declares its own options as a subclass (``evaluation.reports.<name>.Options``).
    """

    k: list[int] = option([1, 10, 100, 1000, 5000], "numbers of importance samples; the "
                          "largest is K", parse=k_list)
    split: str = option("test", "train, valid, test, or an extra split of the run's data "
                        "(holdout)")
    limit: Optional[int] = option(None, "only the first N datapoints of the split")
    spread: bool = option(False, "with --limit: N datapoints spread evenly through the split "
                          "instead of the first N (binarized-mnist's test file is sorted by class)")
    seed: int = option(0, "random seed of the estimator and the figures")
    memory_gb: float = option(1.0, "memory budget of the estimator, GiB")
    data_dir: Optional[str] = option(None, "data root (default: the run's, else $GENLAB_DATA)")
    device: Optional[str] = option(None, "torch device (default: the run's)")
    checkpoint: Optional[str] = option(None, "a checkpoint file of the run, e.g. epoch_5.pt "
                                       "(default checkpoint.pt; best.pt for runs with --patience)")
    yes: bool = option(False, "run even when the estimator projects more than "
                       f"{MAX_SECONDS / 3600:g} hours (it refuses such requests by default)")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """One clear sentence (GenlabError) for a bad value; subclasses add their own checks."""
        if self.limit is not None and self.limit < 1:
            raise GenlabError(f"--limit must be a positive integer, got {self.limit}")
        if self.memory_gb <= 0:
            raise GenlabError(f"--memory-gb must be positive, got {self.memory_gb}")


@dataclass
class LoadedRun:
    """A run directory's config, its system with trained parameters, and its data set."""

    config: RunConfig
    system: object  # nn.Module with .model and .guide
    data: Dataset
    checkpoint: Path  # the checkpoint file whose parameters were loaded
    epoch: Optional[int]  # the epoch that checkpoint holds

    def __iter__(self):  # ``cfg, system, data = load_run(...)``
        return iter((self.config, self.system, self.data))


def expect_run(run_dir, system: str, flag: str) -> None:
    """An option naming a run directory of ``system`` (``--baseline``, ``--vae-run``): checked
    before any work starts, one sentence otherwise."""
    if not (Path(run_dir) / "config.json").exists():
        raise GenlabError(f"{flag} {run_dir} is not a run directory (no config.json)")
    found = read_config(run_dir).system
    if found != system:
        raise GenlabError(f"{run_dir} holds a {found!r} run, not {system!r}")


def read_config(run_dir) -> RunConfig:
    """The run's ``config.json`` as a :class:`RunConfig` (:meth:`RunConfig.read`: one reader for
    training and evaluation; a damaged file is restored from the checkpoint, with a note)."""
    return RunConfig.read(run_dir)


def checkpoint_path(run_dir, cfg: RunConfig, checkpoint: Optional[str] = None) -> Path:
    """The file :func:`load_run` reads: ``checkpoint`` if given, else ``best.pt`` for runs
    trained with early stopping (``--patience``), else the latest ``checkpoint.pt``."""
    run_dir = Path(run_dir)
    if checkpoint:
        ckpt = run_dir / checkpoint
        if not ckpt.exists():
            have = ", ".join(sorted(p.name for p in run_dir.glob("*.pt")))
            raise GenlabError(f"{run_dir} has no checkpoint {checkpoint!r} (it has {have})")
        return ckpt
    if cfg.patience is not None and (run_dir / BEST).exists():
        return run_dir / BEST
    return run_dir / CHECKPOINT


def load_run(run_dir, data_dir=None, device=None, expect_system=None, checkpoint=None) -> LoadedRun:
    """A run directory's config, system with trained parameters, data set and checkpoint.

    ``checkpoint`` names a file in the run directory (e.g. ``epoch_5.pt``); by default the
    latest ``checkpoint.pt``, or ``best.pt`` (the best validation ELBO) for runs trained with
    early stopping (``--patience``).  Unpacks as ``cfg, system, data = load_run(...)``.
    """
    cfg = read_config(run_dir)
    if expect_system is not None and cfg.system != expect_system:
        raise GenlabError(f"{run_dir} holds a {cfg.system!r} run, not {expect_system!r}")
    if data_dir:
        cfg.data_dir = data_dir
    if device:
        cfg.device = device
    spec = get_system(cfg.system)
    ckpt = checkpoint_path(run_dir, cfg, checkpoint)
    state = load_checkpoint(ckpt)
    if state.get("system") != cfg.system:
        raise GenlabError(f"checkpoint {ckpt} is from a {state.get('system')!r} run, not {cfg.system!r}")
    system = spec.build(cfg)
    restore_params(system, state)
    system.to(cfg.device).eval()
    data = spec.load_data(cfg).to(cfg.device)
    epoch = state["loop"]["epoch"] if "loop" in state else state.get("epoch")
    return LoadedRun(cfg, system, data, ckpt, epoch)


@dataclass
class Evaluation:
    """One evaluation of a run: what was loaded, which datapoints, and what was estimated."""

    run: LoadedRun
    split: str
    part: Split  # the evaluated datapoints
    estimate: Estimate
    summary: dict

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def system(self):
        return self.run.system

    @property
    def data(self) -> Dataset:
        return self.run.data


def evaluate(run_dir, ks=None, split=None, limit=None, seed=None, memory_gb=None,
             data_dir=None, device=None, checkpoint=None, spread=None) -> Evaluation:
    """Estimate every datapoint of ``split`` (or ``--limit`` of them) by importance sampling
    with the run's guide; saves ``eval_<split>.npz``/``.json`` in the run directory.

    Call it as ``evaluate(run_dir, options)`` with an :class:`EvalOptions` (or a report's
    ``Options``), or with the options as arguments (``evaluate(run_dir, [1, 100], "test",
    limit=500)``); an argument left out takes :class:`EvalOptions`'s default.
    """
    if isinstance(ks, EvalOptions):
        given = (split, limit, seed, memory_gb, data_dir, device, checkpoint, spread)
        if any(v is not None for v in given):
            raise TypeError("evaluate(run_dir, options) takes no further options")
        o = ks
    else:
        o = EvalOptions(**fill_defaults(EvalOptions, dict(
            k=ks, split=split, limit=limit, seed=seed, memory_gb=memory_gb, data_dir=data_dir,
            device=device, checkpoint=checkpoint, spread=spread)))
    o.check()
    ks = list(o.k)
    # under torchrun: join the ranks first (on CUDA each rank then uses cuda:LOCAL_RANK)
    group = distributed.setup(o.device or read_config(run_dir).device, backend="gloo")
    run = load_run(run_dir, o.data_dir, o.device, checkpoint=o.checkpoint)
    cfg, system, data = run
    part = data.split(o.split)
    if o.limit is not None:
        part = part.subset(o.limit, o.spread)
    inputs = get_system(cfg.system).model_inputs(part)
    if hasattr(system, "check_data"):  # e.g. 0/1 pixels for a Bernoulli likelihood
        system.check_data(*inputs)
    pyro.set_rng_seed(o.seed)
    # each rank estimates its share of the estimator's fixed blocks (the same numbers at any
    # world size) and every rank gets the joined estimate; rank 0 writes it
    est = estimate_log_marginal(system.model, system.guide, *inputs, num_samples=max(ks),
                                ks=ks, memory=int(o.memory_gb * (1 << 30)), progress=True,
                                shard=(group.rank, group.size),
                                max_seconds=None if o.yes else MAX_SECONDS)
    if group.active:
        est = Estimate.concat(group.all_gather_object(est, "gathering the estimates"))
    summary = est.summary() | {"split": o.split, "run": str(run_dir), "system": cfg.system,
                               "seed": o.seed}
    if isinstance(system, (VAE, TwoLayerVAE)) and len(part) > 1:
        # Burda et al.'s Table 2 criterion per stochastic layer, on the evaluated images
        summary["active_units"] = {layer: n for layer, (n, _) in
                                   active_units(system, part.x).items()}
    stem = f"eval_{o.split}" + (f"_{Path(o.checkpoint).stem}" if o.checkpoint else "")
    summary["checkpoint"] = run.checkpoint.name
    summary["checkpoint_epoch"] = run.epoch
    if group.main:
        est.save(Path(run_dir) / f"{stem}.npz")
        (Path(run_dir) / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Evaluation(run, o.split, part, est, summary)


def short(v) -> str:
    """A recorded value for people: floats to 6 significant digits (no float32 noise)."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(short(u) for u in v) + "]"
    return str(v)


def describe(cfg: RunConfig) -> str:
    """One line naming the run: system, its architecture, data and binarization."""
    arch = ", ".join(f"{k}={short(v)}" for k, v in cfg.system_args.items() if v is not None)
    data = ", ".join(f"{k}={short(v)}" for k, v in cfg.data_args.items() if v is not None)
    return f"{cfg.system} ({arch}) on {data}, loss {cfg.loss} k={cfg.k}"
