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
import fcntl
import json
import math
import os
import signal
import sys
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

from inference import distributed
from inference.importance import flush_denormals
from inference.losses import LOSSES, make_loss
from inference.progress import progress
from inference.schedules import SCHEDULES, get_schedule
from inference.systems import epoch_list, get_system
from models.common import GenlabError, option

OPTIMIZERS = ("adam", "clipped_adam")
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


class Interrupted(GenlabError):
    """Training stopped on request (Ctrl-C); the state is saved."""

    exit_code = 130
    lockstep = True  # under torchrun every rank stops at the same step (rank 0 says so)


class Diverged(GenlabError):
    """A non-finite loss; the last good checkpoint is kept."""

    exit_code = 3
    lockstep = True


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``config.json``."""

    system: str
    system_args: dict = field(default_factory=dict)
    data_args: dict = field(default_factory=dict)
    # the options every system shares: the one source of their defaults and help (the
    # training command line generates its flags from these fields)
    epochs: int = option(10, "total passes over the training data")
    batch_size: int = option(128, "mini-batch size")
    lr: float = option(1e-3, "learning rate")
    loss: str = option("Trace_ELBO", "objective", choices=LOSSES)
    k: int = option(1, "particles per datapoint")
    limit: Optional[int] = option(None, "use only the first N training datapoints")
    seed: int = option(0, "random seed")
    device: str = option("cpu", "torch device")
    optimizer: str = option("adam", "the optimizer", choices=OPTIMIZERS)
    lr_decay: float = option(1.0, "learning-rate factor per epoch")
    clip_norm: float = option(10.0, "clipped_adam's clip: Pyro's ClippedAdam clamps each "
                              "gradient element to [-c, c]")
    patience: Optional[int] = option(None, "stop after this many epochs without a better "
                                     "validation ELBO")
    keep_epochs: list[int] = option([], "also keep checkpoints of these epochs, e.g. 0,1,5 "
                                    "(0 = before training)", parse=epoch_list)
    data_dir: Optional[str] = option(None, "data root (default $GENLAB_DATA, else the user cache)")
    valid_limit: Optional[int] = option(None, "validate on only the first N validation "
                                        "datapoints (default: all of them)")
    checkpoint_every: Optional[str] = option(None, "also checkpoint inside epochs: every N "
                                             "steps (e.g. 500) or every T seconds/minutes "
                                             "(e.g. 90s, 10m); resuming stays exact")
    schedule: Optional[str] = option(None, "a named optimization schedule that sets the "
                                     "optimizer and every epoch's learning rate (and, unless "
                                     "given, --epochs and --batch-size): burda = the IWAE "
                                     "paper's (Adam eps 1e-4, batch 20, 3,280 passes)",
                                     choices=SCHEDULES)
    passes: Optional[int] = option(None, "with --schedule: compress its shape into N epochs "
                                   "(default: its full length)")
    divergence_factor: float = option(1000.0, "stop (exit 3) when the epoch's objective or "
                                      "validation ELBO falls below first - F * max(1, |first|) "
                                      "nats/pt, first = the first step's objective")
    dist_timeout: float = option(distributed.DEFAULT_TIMEOUT, "under torchrun: seconds a rank "
                                 "waits for the others (rendezvous, each all-reduce) before it "
                                 "stops with an error (exit 4)")
    #: How the run was trained (written by the runner, not a flag): world size, backend, each
    #: rank's device and host, and the layouts of earlier segments of a resumed run.
    distributed: dict = field(default_factory=dict)

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
        if self.valid_limit is not None and self.valid_limit < 1:
            raise GenlabError(f"--valid-limit must be a positive integer, got {self.valid_limit}")
        if not self.divergence_factor > 0:
            raise GenlabError(f"--divergence-factor must be positive, got {self.divergence_factor}")
        if not self.dist_timeout > 0:
            raise GenlabError(f"--dist-timeout must be a positive number of seconds, got "
                              f"{self.dist_timeout}")
        checkpoint_interval(self.checkpoint_every)
        if self.schedule is not None:
            s = get_schedule(self.schedule, self.passes)
            if self.optimizer != "adam":
                raise GenlabError(f"--schedule {self.schedule} sets its own optimizer (Adam); "
                                  f"drop --optimizer {self.optimizer}")
            if self.epochs > s.epochs:
                print(f"note: --epochs {self.epochs} runs past the {s.epochs} epochs of "
                      f"--schedule {self.schedule}; the extra epochs keep its last rate",
                      file=sys.stderr)
        elif self.passes is not None:
            raise GenlabError("--passes compresses a --schedule; give one (e.g. --schedule burda)")

    @classmethod
    def read(cls, run_dir) -> "RunConfig":
        """A run directory's ``config.json``, or one clear sentence why it cannot be read."""
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise GenlabError(f"{run_dir} is not a run directory (no config.json)")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict) or "system" not in d:
                raise ValueError("no system")
            return cls.from_dict(d)
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            why = type(e).__name__
        ckpt = Path(run_dir) / CHECKPOINT
        saved = load_checkpoint(ckpt).get("config") if ckpt.exists() else None
        if not saved:
            raise GenlabError(f"{path} is damaged ({why}) and no checkpoint holds the run's "
                              "config; the run cannot be read")
        # every checkpoint holds the config it was trained with: recover it, and say so
        _atomic_text(path, json.dumps(saved, indent=2) + "\n")
        print(f"note: {path} was damaged ({why}); restored it from {ckpt.name}", file=sys.stderr)
        return cls.from_dict(saved)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def checkpoint_interval(text: Optional[str]) -> tuple:
    """``--checkpoint-every``: ("steps", N), ("seconds", T) or (None, None)."""
    if text is None:
        return None, None
    t = str(text).strip().lower()
    try:
        if t.endswith("m"):
            value, kind = float(t[:-1]) * 60, "seconds"
        elif t.endswith("s"):
            value, kind = float(t[:-1]), "seconds"
        else:
            value, kind = int(t), "steps"
    except ValueError:
        value, kind = -1, None
    if not value > 0:
        raise GenlabError(f"--checkpoint-every takes a number of steps (500) or a time (90s, "
                          f"10m), got {text!r}")
    return kind, value


# ----------------------------------------------------------------------------- objectives
class Objective:
    """A named loss (:func:`inference.losses.make_loss`) called as
    ``objective(model, guide, args, data_size)`` -> differentiable scalar."""

    def __init__(self, name: str, k: int = 1):
        self.name, self.k = ("IWAE" if name == "RenyiELBO" else name), int(k)
        self._loss = make_loss(self.name, self.k)
        self._calls = 0

    def __call__(self, model, guide, args, data_size: int) -> torch.Tensor:
        # Pyro's argument/support/shape validation runs on the first call (the runner's
        # parameter-discovery pass, and any direct use); the later steps of a run repeat the
        # same structure, so they skip it (about 4 % of a VAE step).
        first, self._calls = self._calls == 0, self._calls + 1
        with pyro.validation_enabled(first and pyro.infer.util.is_validation_enabled()):
            return self._loss.differentiable_loss(model, guide, *args, data_size=data_size)


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
def full_data_elbo(system, split, batch_size: int, k: int = 1, inputs: Optional[tuple] = None) -> float:
    """Validation ELBO in nats per datapoint: mini-batch estimates of the full-split ELBO,
    weighted by batch share (exactly the sum over datapoints when all sites are local)."""
    n = len(split)
    elbo = pyro.infer.Trace_ELBO(num_particles=k, vectorize_particles=k > 1)
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size))
            args = split.batch(idx, None, inputs)
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
    bad = _non_finite_parameter()
    if bad is not None:
        return f"parameter {bad!r}"
    return "no site was non-finite on re-evaluation"


# ----------------------------------------------------------------------------- the loop
#: Seeds derived from ``cfg.seed``, named once: the shuffling generator, the binarization
#: generator, and validation after epoch E, which runs on a forked RNG seeded
#: ``seed + VALIDATION_SEED_STRIDE * E`` (so it never disturbs the training stream).
SHUFFLE_SEED_OFFSET = 1
BINARIZE_SEED_OFFSET = 2
VALIDATION_SEED_STRIDE = 7919


def rank_seed(seed: int, rank: int, global_step: int) -> int:
    """The sampling stream of rank ``rank`` > 0 of a torchrun run, started at ``global_step``
    (rank 0 uses ``seed`` itself, as a plain run does)."""
    return distributed.derive_seed(int(seed), "rank", int(rank), int(global_step)) % (1 << 32)


@dataclass
class StepRow:
    """One optimizer step: the objective in nats per datapoint and the system's diagnostics."""

    step: int  # global step, from 0
    epoch: int  # from 1
    train_elbo: float
    extra: Optional[dict] = None  # ``system.step_metrics(*batch)``, when the system has it

    def saved(self) -> tuple:  # the checkpoint's format (format 1): a tuple
        head = (self.step, self.epoch, self.train_elbo)
        return head if self.extra is None else head + (self.extra,)

    @classmethod
    def load(cls, row) -> "StepRow":
        return row if isinstance(row, cls) else cls(*row)


@dataclass
class LoopState:
    """Where the training loop is; saved in every checkpoint (as a dict, ``loop``)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of the current epoch
    global_step: int = 0
    perm: Optional[torch.Tensor] = None  # the current epoch's shuffle, None between epochs
    loss_sum: float = 0.0  # sum over the epoch's steps of objective x batch size
    metrics: list = field(default_factory=list)  # one dict per completed epoch
    steps: list = field(default_factory=list)  # StepRow per step
    best_val: float = -math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    first_elbo: Optional[float] = None  # the first step's objective (divergence reference)

    def saved(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["steps"] = [r.saved() for r in self.steps]
        d["metrics"] = [dict(m) for m in self.metrics]
        return d

    @classmethod
    def load(cls, d: dict) -> "LoopState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        st = cls(**known)
        st.steps = [StepRow.load(r) for r in st.steps]
        if st.first_elbo is None and st.steps:  # checkpoints written before it was recorded
            st.first_elbo = st.steps[0].train_elbo
        return st


@dataclass
class RunResult:
    out: Path
    metrics: list
    steps: list  # StepRow
    stopped_early: bool = False
    notes: list = field(default_factory=list)  # what happened that was not asked for


def _write_tables(out: Path, metrics: list, steps: list, written: Optional[dict] = None) -> None:
    """metrics.csv (rewritten atomically) and steps.csv: rewritten on the first call of a
    process, then only appended to (``written`` remembers how many rows are on disk), so long
    runs of many short epochs do not rewrite a growing file every epoch."""
    cols = ["epoch", "train_elbo", "val_elbo", "seconds", "lr"]
    lines = [",".join(cols)] + [",".join(repr(r[c]) for c in cols) for r in metrics]
    _atomic_text(out / "metrics.csv", "\n".join(lines) + "\n")
    extra = sorted(steps[0].extra) if steps and steps[0].extra is not None else []

    def fmt(row: StepRow):
        values = [repr(float(row.extra[k])) for k in extra] if extra else []
        return ",".join([str(row.step), str(row.epoch), repr(row.train_elbo), *values])

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


@contextmanager
def sigint_requests_stop():
    """While inside, Ctrl-C sets ``flag["stop"]`` instead of raising; the handler is restored
    on exit.  (Outside the main thread signals cannot be caught: the flag stays False.)"""
    flag = {"stop": False}
    try:
        old = signal.signal(signal.SIGINT, lambda *_: flag.__setitem__("stop", True))
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


class RunLock:
    """An OS lock (``flock``) on ``RUN_DIR/.lock``, held while a process trains into the run:
    a second writer is refused in one sentence; the OS releases the lock when the process
    exits or dies, so a crash never leaves the run locked."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise GenlabError(f"{out} is being written by another process (pid {holder}); wait "
                              "for it to finish or stop it before training into this run") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _non_finite_parameter() -> Optional[str]:
    for name, p in pyro.get_param_store().named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


class Trainer:
    """One run's training, in named steps: :meth:`__init__` (set up or restore),
    :meth:`run_epoch`, :meth:`validate`, :meth:`checkpoint`; :func:`train` drives them."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool = False,
                 progress: Optional[bool] = None):
        cfg.check()
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.ckpt_path = self.out / CHECKPOINT
        self.notes: list = []  # what the run did that the user did not ask for, said once
        world = distributed.world_size_from_env()
        if cfg.batch_size % world:
            raise distributed.Lockstep(
                f"--batch-size {cfg.batch_size} does not split among {world} processes: the "
                f"global batch must be a multiple of the world size (e.g. "
                f"{max(world, cfg.batch_size - cfg.batch_size % world)} or "
                f"{cfg.batch_size + world - cfg.batch_size % world})")
        # under torchrun: the process group (docs/distributed.md); plain runs: distributed.SINGLE
        self.dist = distributed.setup(cfg.device, cfg.dist_timeout)
        if not self.dist.main:
            self.progress = False
        # one writer per run directory: rank 0 creates it and holds its lock
        self.lock = self.dist.from_main(lambda: self._open_run(resume))
        try:
            self._setup(resume)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _open_run(self, resume: bool) -> "RunLock":
        if not resume:
            self.out.mkdir(parents=True, exist_ok=True)
        elif not self.out.is_dir():
            raise GenlabError(f"{self.out} holds no run to resume")
        return RunLock(self.out)

    def _setup(self, resume: bool) -> None:
        cfg = self.cfg
        # every rank restores from the same checkpoint: rank 0's, sent to the others
        state = self.dist.from_main(lambda: self._previous_state(resume), send=True)
        self.spec = get_system(cfg.system)
        pyro.set_rng_seed(cfg.seed)  # every rank: the same initial weights
        self.device = self.dist.device(cfg.device)
        data = self.spec.load_data(cfg)
        train_set, valid_set = data.train, data.valid
        if cfg.limit is not None and cfg.limit > len(train_set):
            self.notes.append(f"--limit {cfg.limit} exceeds the {len(train_set)} training "
                              f"datapoints; using all {len(train_set)} (recorded as such)")
            cfg.limit = len(train_set)
        if cfg.limit is not None:
            train_set = train_set.head(cfg.limit)
        if cfg.valid_limit is not None:
            valid_set = valid_set.head(cfg.valid_limit)
        cfg.distributed = self._layout(state)
        if self.dist.main:
            _atomic_text(self.out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        self.train_set, self.valid_set = train_set.to(self.device), valid_set.to(self.device)
        self.system = self.spec.build(cfg).to(self.device)
        self.objective = Objective(cfg.loss, cfg.k)
        self.n = len(self.train_set)
        if self.n == 0:
            raise GenlabError("the training set is empty")
        self._setup_params(state)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + SHUFFLE_SEED_OFFSET)
        self.bin_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + BINARIZE_SEED_OFFSET)
        if state is None:
            self.st = LoopState()
            if self.dist.rank > 0:  # its own sampling stream (rank 0 keeps the plain run's)
                pyro.set_rng_seed(rank_seed(cfg.seed, self.dist.rank, 0))
        else:
            self._restore_loop(state)
        self._written: dict = {}
        self.step_metrics = getattr(self.system, "step_metrics", None)
        self.batches = (self.n + cfg.batch_size - 1) // cfg.batch_size
        self.every_kind, self.every = checkpoint_interval(cfg.checkpoint_every)
        self._last_save = time.monotonic()
        if state is None:
            self.checkpoint("epoch_0.pt" if 0 in cfg.keep_epochs else None)

    def _restore_loop(self, state: dict) -> None:
        """Optimizer, schedule, every RNG and the loop position from a checkpoint; a learning
        rate changed on ``--resume`` takes effect from here (the schedule continues from it)."""
        cfg = self.cfg
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.shuffle_gen.set_state(state["shuffle_rng"])
        self.bin_gen.set_state(state["binarize_rng"])
        self.st = LoopState.load(state["loop"])
        self._restore_rng(state)
        old_lr = (state.get("config") or {}).get("lr", cfg.lr)
        if old_lr != cfg.lr:
            now = cfg.lr * cfg.lr_decay ** self.st.epoch
            for g in self.opt.param_groups:
                g["lr"] = now
            self.sched.base_lrs = [cfg.lr] * len(self.opt.param_groups)
            self.notes.append(f"learning rate changed from {old_lr:g} to {cfg.lr:g} at epoch "
                              f"{self.st.epoch + 1}, step {self.st.step}")
        if self.st.epoch < cfg.epochs and self.dist.main:
            self._retire_results()

    def _restore_rng(self, state: dict) -> None:
        """Each rank's sampling stream from the checkpoint.  At another world size the batch is
        split differently, so only rank 0's stream continues; ranks > 0 start streams of their
        own (:func:`rank_seed` at this global step), and the note says so."""
        saved = int(state.get("world_size", 1))
        rank, size = self.dist.rank, self.dist.size
        if saved == size and size == 1:
            pyro.util.set_rng_state(state["rng"])  # a plain run, exactly as before
        elif saved == size and len(state.get("rng_ranks") or ()) == size:
            pyro.util.set_rng_state(state["rng_ranks"][rank])
        else:
            if rank == 0:
                pyro.util.set_rng_state(state["rng"])
            else:
                pyro.set_rng_seed(rank_seed(self.cfg.seed, rank, self.st.global_step))
            self.notes.append(
                f"resumed at world size {size} from a checkpoint written at world size {saved} "
                f"(epoch {self.st.epoch + 1}, step {self.st.step}): parameters, optimizer, "
                "schedule, shuffling and binarization continue exactly, but each global batch "
                "is now split into different shares, so the latent draws (each rank's random "
                "stream) differ from an uninterrupted run's: the losses from here on are "
                "equally valid, not the same numbers")

    def _layout(self, state: Optional[dict]) -> dict:
        """config.json's ``distributed``: this run's ranks, and the earlier segments' layouts
        when a resumed run changed its world size."""
        layout = self.dist.describe(self.device)
        if state is None:
            return layout
        before = dict((state.get("config") or {}).get("distributed") or {})
        earlier = list(before.pop("earlier", []))
        saved = int(state.get("world_size", 1))
        if saved != self.dist.size:
            before.setdefault("world_size", saved)
            earlier.append(before | {"until_global_step": state["loop"]["global_step"]})
        if earlier:
            layout["earlier"] = earlier
        return layout

    def _retire_results(self) -> None:
        """Evaluation results and figures describe the parameters they were made from: once
        training continues they are stale, so they move to ``stale-epoch<E>/``."""
        old = [p for pat in ("eval_*", "ais_*", "bdmc*", "classifier_*", "figures")
               for p in self.out.glob(pat)]
        if not old:
            return
        dest = self.out / f"stale-epoch{self.st.epoch}"
        dest.mkdir(exist_ok=True)
        for p in old:
            os.replace(p, dest / p.name)
        self.notes.append(f"moved {len(old)} earlier result(s) made at epoch {self.st.epoch} "
                          f"to {dest} (training continues, so they no longer describe the run)")

    def _previous_state(self, resume: bool) -> Optional[dict]:
        if resume:
            state = load_checkpoint(self.ckpt_path)
            if state.get("system") != self.cfg.system:
                raise GenlabError(f"{self.out} holds a {state.get('system')!r} run, not "
                                  f"{self.cfg.system!r}; choose another --out")
            return state
        if self.ckpt_path.exists():
            raise GenlabError(f"{self.out} already holds a run; pass --resume to continue it "
                              "or choose another --out")
        return None

    def _setup_params(self, state: Optional[dict]) -> None:
        """Restore or discover every parameter (module weights and pyro.param sites) without
        using the RNG, then build the optimizer and the learning-rate schedule."""
        cfg, system = self.cfg, self.system
        pyro.clear_param_store()
        if state is not None:
            restore_params(system, state)
        with forked_rng(cfg.seed):
            probe_args = self.spec.model_inputs(self.train_set, torch.arange(min(2, self.n)),
                                                torch.Generator().manual_seed(0))
            self.objective(system.model, system.guide, probe_args, self.n)
        params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
        self.dist.broadcast_(params)  # torchrun: every rank starts from rank 0's values
        if cfg.schedule is not None:  # a named schedule fixes the optimizer and every epoch's lr
            s = get_schedule(cfg.schedule, cfg.passes)
            self.opt = torch.optim.Adam(params, lr=s.lr(0), **s.adam)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, s.lr_factor)
            return
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr)
        else:
            self.opt = pyro.optim.clipped_adam.ClippedAdam(params, lr=cfg.lr, clip_norm=cfg.clip_norm)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=cfg.lr_decay)

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict:
        snap = {"format": 1, "system": self.cfg.system, "config": asdict(self.cfg),
                "loop": self.st.saved(), **param_state(self.system),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": pyro.util.get_rng_state(), "shuffle_rng": self.shuffle_gen.get_state(),
                "binarize_rng": self.bin_gen.get_state(), "world_size": self.dist.size}
        if self.dist.active:  # every rank's sampling stream (rank 0's is also "rng")
            snap["rng_ranks"] = self.dist.all_gather_object(pyro.util.get_rng_state(),
                                                            "gathering the ranks' RNG states")
        return snap

    def checkpoint(self, extra_name: Optional[str] = None) -> None:
        """``checkpoint.pt`` (and ``extra_name``), atomically, with the tables; under torchrun
        every rank calls it at the same step and only rank 0 writes."""
        self._last_save = time.monotonic()
        snap = self.snapshot()
        if not self.dist.main:
            return
        atomic_save(snap, self.ckpt_path)
        _write_tables(self.out, self.st.metrics, self.st.steps, self._written)
        if extra_name:
            atomic_save(snap, self.out / extra_name)

    # ------------------------------------------------------------------ one step, one epoch
    def step(self, idx: torch.Tensor) -> float:
        """One optimizer step on the datapoints ``idx``; the objective in nats per datapoint."""
        st, n = self.st, self.n
        rng_before = pyro.util.get_rng_state()
        # the whole global batch (binarized from the shared generator on every rank, so its
        # draws do not depend on the world size); under torchrun each rank trains on its share
        args = self.spec.model_inputs(self.train_set, idx.to(self.device), self.bin_gen)
        mine, weight = self._share(args, len(idx))
        with warnings.catch_warnings():  # a non-finite loss is reported below, once
            warnings.filterwarnings("ignore", message="Encountered NaN")
            loss = (self.objective(self.system.model, self.system.guide, mine, n)
                    if mine is not None else None)
        value = loss.item() if not self.dist.active else self._global_loss(loss, weight)
        if not math.isfinite(value):
            pyro.util.set_rng_state(rng_before)
            where = _find_bad_site(self.system, args, n)
            raise Diverged(
                f"non-finite loss ({value}) at epoch {st.epoch + 1}, step {st.step} "
                f"(global step {st.global_step}), {where}; the last good checkpoint is {self.ckpt_path}"
            )
        per_point = -value / n
        if st.first_elbo is None:
            st.first_elbo = per_point
        self._check_absurd(per_point, "the step's objective")
        self.opt.zero_grad(set_to_none=True)
        if not self.dist.active:
            loss.backward()
        else:  # the P=1 gradient: sum over ranks of (share / batch) x the rank's gradient
            if loss is not None:
                (loss * weight).backward()
            self.dist.all_reduce_grads(self.opt.param_groups[0]["params"])
        self.opt.step()
        extra = None
        if self.step_metrics is not None and self.dist.main:  # the system's own diagnostics
            with torch.no_grad():
                try:
                    extra = self.step_metrics(*args)
                except (ValueError, RuntimeError):  # e.g. a distribution given NaN parameters
                    bad = _non_finite_parameter()
                    if bad is None:
                        raise
                    raise Diverged(
                        f"the step at epoch {st.epoch + 1}, step {st.step} made parameter "
                        f"{bad!r} non-finite; the last good checkpoint is {self.ckpt_path}; "
                        "continue with --resume and a smaller --lr") from None
        st.steps.append(StepRow(st.global_step, st.epoch + 1, per_point, extra))
        st.loss_sum += per_point * len(idx)
        st.step += 1
        st.global_step += 1
        return per_point

    def _share(self, args: tuple, b: int) -> tuple:
        """(this rank's rows of the global batch ``args``, share / b); a plain run: all of it.

        Each rank's objective carries Pyro's subsampling scale N / b_r for its b_r rows; times
        b_r / b that is N / b, so the ranks' weighted losses (and gradients) sum to the plain
        run's on the global batch of b.  A rank whose share of a short last batch is empty
        contributes nothing (None)."""
        if not self.dist.active:
            return args, 1.0
        lo, hi = distributed.share(b, self.dist.rank, self.dist.size)
        if hi == lo:
            return None, 0.0
        return tuple(a[lo:hi] for a in args), (hi - lo) / b

    def _global_loss(self, loss: Optional[torch.Tensor], weight: float) -> float:
        """The global batch's loss: the sum over ranks of share-weighted local losses."""
        t = torch.zeros(1, dtype=torch.float64, device=self.dist._comm_device())
        if loss is not None:
            t += loss.detach().double() * weight
        return float(self.dist.all_reduce(t, "the loss all-reduce").item())

    def _check_absurd(self, value: float, what: str) -> None:
        """Finite but absurd divergence: an objective (nats/pt) below
        ``first - F * max(1, |first|)``, where ``first`` is the first step's objective and F is
        ``--divergence-factor`` (1000): training never legitimately gets a thousand times
        worse than its random initialization."""
        first, f = self.st.first_elbo, self.cfg.divergence_factor
        if first is None or not math.isfinite(value):
            return
        bound = first - f * max(1.0, abs(first))
        if value < bound:
            raise Diverged(
                f"{what} fell to {value:.4g} nats/pt at epoch {self.st.epoch + 1}, step "
                f"{self.st.step}, below {bound:.4g} (the first step's {first:.4g} minus "
                f"{f:g} x max(1, |first|)): training diverged; the last good checkpoint is "
                f"{self.ckpt_path}; continue with --resume and a smaller --lr")

    def _maybe_checkpoint(self) -> None:
        """``--checkpoint-every``: a mid-epoch checkpoint every N steps or T seconds."""
        if self.every_kind == "steps" and self.st.global_step % self.every == 0:
            self.checkpoint()
        elif self.every_kind == "seconds" and self.dist.any(
                time.monotonic() - self._last_save >= self.every, "agreeing to checkpoint"):
            self.checkpoint()  # torchrun: when any rank's clock says so, all ranks together

    def run_epoch(self, stop: dict, stop_after_steps: Optional[int] = None) -> None:
        """The rest of the current epoch (from ``st.step``); saves and raises
        :class:`Interrupted` when ``stop["stop"]`` is set or after ``stop_after_steps``."""
        st, cfg = self.st, self.cfg
        if st.perm is None:
            st.perm = torch.randperm(self.n, generator=self.shuffle_gen)
            st.loss_sum = 0.0
        bar = progress(self.batches, f"{cfg.system} epoch {st.epoch + 1}/{cfg.epochs}",
                       self.progress is not False, unit="steps", initial=st.step)
        self.system.train()
        done = 0
        while st.step < self.batches:
            asked = self.dist.any(stop["stop"], "agreeing to stop") if self.dist.active else stop["stop"]
            if asked or (stop_after_steps is not None and done >= stop_after_steps):
                self.checkpoint()
                raise Interrupted(
                    f"interrupted at epoch {st.epoch + 1}, step {st.step}; state saved to "
                    f"{self.ckpt_path}; continue with --resume --out {self.out}"
                )
            idx = st.perm[st.step * cfg.batch_size : (st.step + 1) * cfg.batch_size]
            per_point = self.step(idx)
            done += 1
            if st.step < self.batches:  # the epoch's end checkpoints anyway
                self._maybe_checkpoint()
            bar.update(1)
            bar.set_postfix_str(f"elbo {per_point:.2f} nats/pt")
        bar.close()
        self.steps_done = done

    def validate(self) -> float:
        """The validation ELBO (nats per datapoint) on a forked RNG; nan without a valid split."""
        self.system.eval()
        if not len(self.valid_set):
            return float("nan")
        with forked_rng(self.cfg.seed + VALIDATION_SEED_STRIDE * (self.st.epoch + 1)):
            return full_data_elbo(self.system, self.valid_set, max(self.cfg.batch_size, 500),
                                  inputs=self.spec.inputs)

    def end_epoch(self, val: float, seconds: float) -> bool:
        """Record the epoch, checkpoint it, keep the best; True when early stopping fires."""
        st, cfg = self.st, self.cfg
        self._check_absurd(st.loss_sum / self.n, "the epoch's training objective")
        self._check_absurd(val, "the validation ELBO")
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        st.metrics.append(dict(epoch=st.epoch + 1, train_elbo=st.loss_sum / self.n, val_elbo=val,
                               seconds=round(seconds, 3), lr=lr))
        st.epoch += 1
        st.step, st.perm = 0, None
        if self.progress is not False and self.dist.main:
            m = st.metrics[-1]
            print(f"epoch {m['epoch']}: train ELBO {m['train_elbo']:.3f}, "
                  f"validation ELBO {m['val_elbo']:.3f} nats/pt, {m['seconds']:.1f} s", flush=True)
        improved = val > st.best_val
        if improved:
            st.best_val, st.bad_epochs = val, 0
        else:
            st.bad_epochs += 1
        self.checkpoint(f"epoch_{st.epoch}.pt" if st.epoch in cfg.keep_epochs else None)
        if (improved or not math.isfinite(val)) and self.dist.main:
            atomic_save(param_state(self.system) | {"system": cfg.system, "config": asdict(cfg),
                                                     "epoch": st.epoch}, self.out / BEST)
        if cfg.patience is not None and st.bad_epochs >= cfg.patience:
            st.stopped_early = True
            self.checkpoint()
            return True
        return False

    def run(self, stop_after_steps: Optional[int] = None) -> RunResult:
        try:
            return self._run(stop_after_steps)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self, stop_after_steps: Optional[int] = None) -> RunResult:
        stopped_early = False
        left = stop_after_steps
        if self.st.epoch >= self.cfg.epochs:
            self.notes.append(f"the run already has {self.st.epoch} epochs (asked for "
                              f"{self.cfg.epochs}): nothing was trained")
        for note in self.notes if self.dist.main else ():  # said even with --quiet
            print(f"note: {note}", file=sys.stderr, flush=True)
        with sigint_requests_stop() as stop, flush_denormals():
            while self.st.epoch < self.cfg.epochs:
                t0 = time.perf_counter()
                self.run_epoch(stop, left)
                if left is not None:
                    left -= self.steps_done
                val = self.validate()
                if self.end_epoch(val, time.perf_counter() - t0):
                    stopped_early = True
                    break
        return RunResult(self.out, self.st.metrics, self.st.steps, stopped_early, self.notes)


def train(
    cfg: RunConfig,
    out: Path,
    resume: bool = False,
    progress: Optional[bool] = None,
    stop_after_steps: Optional[int] = None,
) -> RunResult:
    """Train ``cfg.system`` into the run directory ``out`` (see the module docstring)."""
    return Trainer(cfg, out, resume, progress).run(stop_after_steps)


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
