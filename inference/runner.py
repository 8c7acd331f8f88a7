"""The one SVI runner: every model/guide pair trains through :func:`train`.

A run directory holds ``config.json``, ``metrics.csv`` (one row per epoch), ``steps.csv``
(the training objective at every step, plus the columns of ``system.step_metrics(*batch)``
when the system defines that method: a dict of floats, computed after the step), ``checkpoint.pt`` (the latest state, resumable),
``best.pt`` (parameters at the best validation ELBO) and ``epoch_<E>.pt`` for kept epochs.

Objective and units: the loss of a mini-batch of B datapoints out of N is an unbiased estimate
of the full-data negative objective (the data plate subsamples and Pyro scales by N / B);
everything printed or written is in nats per datapoint (the full-data value divided by N).

Losses, by name: ``Trace_ELBO`` and ``TraceMeanField_ELBO`` (Pyro's, analytic KL where it
exists) with K vectorized particles, and ``IWAE`` (alias ``RenyiELBO``): the importance-weighted
bound of Burda et al. with K particles per datapoint, computed from the estimator's unscaled
log weights.  Pyro's own ``RenyiELBO(alpha=0)`` puts the N / B subsampling factor inside its
log-sum-exp, which biases the bound on mini-batches; on an unsubsampled batch the two agree
(tests/test_estimator.py).

Reproducibility: the global RNGs (torch, numpy, random), the shuffling generator and the
binarization generator are all in the checkpoint, and validation runs on a forked RNG, so a run
resumed from any step boundary produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from evaluation.estimator import log_weights, probe
from models.common import GenlabError

LOSSES = ("Trace_ELBO", "TraceMeanField_ELBO", "IWAE", "RenyiELBO")
OPTIMIZERS = ("adam", "clipped_adam")
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


class Interrupted(GenlabError):
    """Training stopped on request (Ctrl-C); the state is saved."""

    exit_code = 130


class Diverged(GenlabError):
    """A non-finite loss; the last good checkpoint is kept."""

    exit_code = 3


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``config.json``."""

    system: str
    system_args: dict = field(default_factory=dict)
    data_args: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    loss: str = "Trace_ELBO"
    k: int = 1
    limit: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    optimizer: str = "adam"
    lr_decay: float = 1.0
    clip_norm: float = 10.0
    patience: Optional[int] = None
    keep_epochs: list = field(default_factory=list)
    data_dir: Optional[str] = None

    def check(self) -> None:
        for name in ("epochs", "batch_size", "k"):
            v = getattr(self, name)
            least = 0 if name == "epochs" else 1
            if not isinstance(v, int) or v < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise GenlabError(f"--{name.replace('_', '-')} must be {kind} integer, got {v}")
        if self.limit is not None and self.limit < 1:
            raise GenlabError(f"--limit must be a positive integer, got {self.limit}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise GenlabError(f"--lr must be a positive number, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise GenlabError(f"--lr-decay must lie in (0, 1], got {self.lr_decay}")
        if self.loss not in LOSSES:
            raise GenlabError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise GenlabError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.patience is not None and self.patience < 1:
            raise GenlabError(f"--patience must be a positive integer, got {self.patience}")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- objectives
class Objective:
    """A named loss: ``objective(model, guide, args, data_size)`` -> differentiable scalar."""

    def __init__(self, name: str, k: int = 1):
        self.name, self.k = ("IWAE" if name == "RenyiELBO" else name), int(k)
        vec = self.k > 1
        if self.name == "Trace_ELBO":
            self._elbo = pyro.infer.Trace_ELBO(num_particles=self.k, vectorize_particles=vec)
        elif self.name == "TraceMeanField_ELBO":
            self._elbo = pyro.infer.TraceMeanField_ELBO(num_particles=self.k, vectorize_particles=vec)
        self._structure = None
        self._calls = 0

    def __call__(self, model, guide, args, data_size: int) -> torch.Tensor:
        # Pyro's argument/support/shape validation runs on the first call (the runner's
        # parameter-discovery pass, and any direct use); the later steps of a run repeat the
        # same structure, so they skip it (about 4 % of a VAE step).
        first, self._calls = self._calls == 0, self._calls + 1
        with pyro.validation_enabled(first and pyro.infer.util.is_validation_enabled()):
            return self._loss(model, guide, args, data_size)

    def _loss(self, model, guide, args, data_size: int) -> torch.Tensor:
        if self.name != "IWAE":
            return self._elbo.differentiable_loss(model, guide, *args, data_size=data_size)
        if self._structure is None:
            self._structure = probe(model, guide, args, {"data_size": data_size})
            if not self._structure.per_datapoint:
                raise GenlabError(
                    "the IWAE loss needs every sample site inside plate 'data' (per-datapoint "
                    f"weights); sites {self._structure.outside} are outside it: use Trace_ELBO"
                )
        lw = log_weights(model, guide, args, {"data_size": data_size}, self.k, self._structure)
        bound = torch.logsumexp(lw, 0) - math.log(self.k)  # (B,) per-datapoint IWAE bound
        return -bound.sum() * (data_size / bound.shape[0])


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise GenlabError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise GenlabError(f"checkpoint {path} is unreadable ({type(e).__name__})") from None


def param_state(module: torch.nn.Module) -> dict:
    """The module's weights and the param store's other (non-module) parameters."""
    store = pyro.get_param_store().get_state()
    other = {k: v.detach().clone() for k, v in store["params"].items() if "$$$" not in k}
    cons = {k: store["constraints"][k] for k in other}
    return {"module": module.state_dict(), "params": {"params": other, "constraints": cons}}


def restore_params(module: torch.nn.Module, state: dict) -> None:
    """Load :func:`param_state` into ``module`` and a freshly cleared param store."""
    pyro.clear_param_store()
    try:
        module.load_state_dict(state["module"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise GenlabError(f"the checkpoint does not fit this model ({first})") from None
    pyro.get_param_store().set_state(state["params"])


@contextmanager
def forked_rng(seed: int):
    """Run a block on its own seeded RNG and leave the global RNG as it was."""
    saved = pyro.util.get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        yield
    finally:
        pyro.util.set_rng_state(saved)


# ----------------------------------------------------------------------------- validation
def full_data_elbo(system, split, batch_size: int, k: int = 1) -> float:
    """Validation ELBO in nats per datapoint: mini-batch estimates of the full-split ELBO,
    weighted by batch share (exactly the sum over datapoints when all sites are local)."""
    n = len(split)
    elbo = pyro.infer.Trace_ELBO(num_particles=k, vectorize_particles=k > 1)
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size))
            args = split.batch(idx)
            total += elbo.loss(system.model, system.guide, *args, data_size=n) * len(idx) / n
    return -total / n


def _find_bad_site(system, args, data_size) -> str:
    """Name the first site whose log-probability (or the first parameter) is non-finite."""
    with torch.no_grad():
        guide_tr = poutine.trace(system.guide).get_trace(*args, data_size=data_size)
        model_tr = poutine.trace(poutine.replay(system.model, trace=guide_tr)).get_trace(
            *args, data_size=data_size)
    for where, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                lp = site["fn"].log_prob(site["value"])
                if not torch.isfinite(lp).all() or not torch.isfinite(site["value"]).all():
                    return f"{where} site {name!r}"
    for name, p in pyro.get_param_store().named_parameters():
        if not torch.isfinite(p).all():
            return f"parameter {name!r}"
    return "no site was non-finite on re-evaluation"


# ----------------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    out: Path
    metrics: list
    steps: list
    stopped_early: bool = False


def _write_tables(out: Path, metrics: list, steps: list, written: Optional[dict] = None) -> None:
    """metrics.csv (rewritten atomically) and steps.csv: rewritten on the first call of a
    process, then only appended to (``written`` remembers how many rows are on disk), so long
    runs of many short epochs do not rewrite a growing file every epoch."""
    cols = ["epoch", "train_elbo", "val_elbo", "seconds", "lr"]
    lines = [",".join(cols)] + [",".join(repr(r[c]) for c in cols) for r in metrics]
    _atomic_text(out / "metrics.csv", "\n".join(lines) + "\n")
    extra = sorted(steps[0][3]) if steps and len(steps[0]) > 3 else []

    def fmt(row):
        values = [repr(float(row[3][k])) for k in extra] if extra else []
        return ",".join([str(row[0]), str(row[1]), repr(row[2]), *values])

    done = written.get("steps") if written is not None else None
    if done is None or done > len(steps) or written.get("columns") != extra:
        lines = [",".join(["step", "epoch", "train_elbo", *extra])] + [fmt(r) for r in steps]
        _atomic_text(out / "steps.csv", "\n".join(lines) + "\n")
    elif done < len(steps):
        with open(out / "steps.csv", "a") as f:
            f.write("\n".join(fmt(r) for r in steps[done:]) + "\n")
    if written is not None:
        written["steps"], written["columns"] = len(steps), extra


def read_metrics(out: Path) -> list:
    with open(Path(out) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train(
    cfg: RunConfig,
    out: Path,
    resume: bool = False,
    progress: Optional[bool] = None,
    stop_after_steps: Optional[int] = None,
) -> RunResult:
    """Train ``cfg.system`` into the run directory ``out`` (see the module docstring)."""
    from inference.systems import get_system  # the table imports the data module and models

    cfg.check()
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    state = None
    if resume:
        state = load_checkpoint(ckpt_path)
        if state.get("system") != cfg.system:
            raise GenlabError(
                f"{out} holds a {state.get('system')!r} run, not {cfg.system!r}; choose another --out"
            )
    elif ckpt_path.exists():
        raise GenlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    spec = get_system(cfg.system)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    pyro.set_rng_seed(cfg.seed)
    device = torch.device(cfg.device)
    data = spec.load_data(cfg)
    train_set, valid_set = data.train, data.valid
    if cfg.limit is not None:
        train_set = train_set.head(cfg.limit)
    train_set, valid_set = train_set.to(device), valid_set.to(device)
    system = spec.build(cfg).to(device)
    objective = Objective(cfg.loss, cfg.k)
    n = len(train_set)
    if n == 0:
        raise GenlabError("the training set is empty")

    pyro.clear_param_store()
    if state is not None:
        restore_params(system, state)
    # Discover every parameter (module weights and pyro.param sites) without using the RNG.
    with forked_rng(cfg.seed):
        probe_args = train_set.batch(torch.arange(min(2, n)), torch.Generator().manual_seed(0))
        objective(system.model, system.guide, probe_args, n)
    named = sorted(pyro.get_param_store().named_parameters())
    params = [p for _, p in named]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)
    else:
        opt = pyro.optim.clipped_adam.ClippedAdam(params, lr=cfg.lr, clip_norm=cfg.clip_norm)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)

    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    bin_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    if state is None:
        st = dict(epoch=0, step=0, global_step=0, perm=None, loss_sum=0.0, metrics=[], steps=[],
                  best_val=-math.inf, bad_epochs=0)
    else:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        pyro.util.set_rng_state(state["rng"])
        shuffle_gen.set_state(state["shuffle_rng"])
        bin_gen.set_state(state["binarize_rng"])
        st = state["loop"]

    def snapshot():
        return {"format": 1, "system": cfg.system, "config": asdict(cfg), "loop": dict(st),
                **param_state(system), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": pyro.util.get_rng_state(),
                "shuffle_rng": shuffle_gen.get_state(), "binarize_rng": bin_gen.get_state()}

    written: dict = {}

    def save(extra_name: Optional[str] = None):
        snap = snapshot()
        atomic_save(snap, ckpt_path)
        _write_tables(out, st["metrics"], st["steps"], written)
        if extra_name:
            atomic_save(snap, out / extra_name)

    if state is None:
        save("epoch_0.pt" if 0 in cfg.keep_epochs else None)

    step_metrics = getattr(system, "step_metrics", None)
    stop = {"flag": False}
    handler_installed = False
    try:
        old = signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("flag", True))
        handler_installed = True
    except ValueError:  # not the main thread
        old = None

    from tqdm import tqdm

    batches = (n + cfg.batch_size - 1) // cfg.batch_size
    stopped_early = False
    steps_this_call = 0
    try:
        while st["epoch"] < cfg.epochs:
            t0 = time.perf_counter()
            if st["perm"] is None:
                st["perm"] = torch.randperm(n, generator=shuffle_gen)
                st["loss_sum"] = 0.0
            bar = tqdm(total=batches, initial=st["step"], disable=progress is False or None,
                       desc=f"{cfg.system} epoch {st['epoch'] + 1}/{cfg.epochs}", leave=False)
            system.train()
            while st["step"] < batches:
                if stop["flag"] or (stop_after_steps is not None and steps_this_call >= stop_after_steps):
                    save()
                    raise Interrupted(
                        f"interrupted at epoch {st['epoch'] + 1}, step {st['step']}; state saved to "
                        f"{ckpt_path}; continue with --resume --out {out}"
                    )
                idx = st["perm"][st["step"] * cfg.batch_size : (st["step"] + 1) * cfg.batch_size]
                rng_before = pyro.util.get_rng_state()
                args = train_set.batch(idx.to(device), bin_gen)
                with warnings.catch_warnings():  # a non-finite loss is reported below, once
                    warnings.filterwarnings("ignore", message="Encountered NaN")
                    loss = objective(system.model, system.guide, args, n)
                value = loss.item()
                if not math.isfinite(value):
                    pyro.util.set_rng_state(rng_before)
                    where = _find_bad_site(system, args, n)
                    raise Diverged(
                        f"non-finite loss ({value}) at epoch {st['epoch'] + 1}, step {st['step']} "
                        f"(global step {st['global_step']}), {where}; the last good checkpoint is {ckpt_path}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                per_point = -value / n
                st["loss_sum"] += per_point * len(idx)
                row = (st["global_step"], st["epoch"] + 1, per_point)
                if step_metrics is not None:  # the system's own per-step diagnostics
                    with torch.no_grad():
                        row = row + (step_metrics(*args),)
                st["steps"].append(row)
                st["step"] += 1
                st["global_step"] += 1
                steps_this_call += 1
                bar.update(1)
                bar.set_postfix_str(f"elbo {per_point:.2f} nats/pt")
            bar.close()
            system.eval()
            with forked_rng(cfg.seed + 7919 * (st["epoch"] + 1)):
                val = full_data_elbo(system, valid_set, max(cfg.batch_size, 500)) if len(valid_set) else float("nan")
            lr = opt.param_groups[0]["lr"]
            sched.step()
            st["metrics"].append(dict(epoch=st["epoch"] + 1, train_elbo=st["loss_sum"] / n, val_elbo=val,
                                      seconds=round(time.perf_counter() - t0, 3), lr=lr))
            st["epoch"] += 1
            st["step"], st["perm"] = 0, None
            if progress is not False:
                m = st["metrics"][-1]
                print(f"epoch {m['epoch']}: train ELBO {m['train_elbo']:.3f}, "
                      f"validation ELBO {m['val_elbo']:.3f} nats/pt, {m['seconds']:.1f} s", flush=True)
            improved = val > st["best_val"]
            if improved:
                st["best_val"], st["bad_epochs"] = val, 0
            else:
                st["bad_epochs"] += 1
            save(f"epoch_{st['epoch']}.pt" if st["epoch"] in cfg.keep_epochs else None)
            if improved or not math.isfinite(val):
                atomic_save(param_state(system) | {"system": cfg.system, "config": asdict(cfg),
                                                    "epoch": st["epoch"]}, out / BEST)
            if cfg.patience is not None and st["bad_epochs"] >= cfg.patience:
                stopped_early = st["stopped_early"] = True
                save()
                break
    finally:
        if handler_installed:
            signal.signal(signal.SIGINT, old)
    return RunResult(out, st["metrics"], st["steps"], stopped_early)


def train_if_missing(cfg: RunConfig, out, progress: Optional[bool] = False) -> Path:
    """Train ``cfg`` into ``out`` unless it already holds ``cfg.epochs`` epochs; return ``out``.

    For notebooks and studies: a committed notebook re-executed on a machine that has the
    runs reuses them; a run that was interrupted is resumed.
    """
    out = Path(out)
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        if state["loop"]["epoch"] >= cfg.epochs or state["loop"].get("stopped_early"):
            return out
        saved = RunConfig.from_dict(state["config"]) if state.get("config") else cfg
        saved.epochs = cfg.epochs  # continue the run's own config up to the epochs asked for
        train(saved, out, resume=True, progress=progress)
        return out
    train(cfg, out, progress=progress)
    return out
