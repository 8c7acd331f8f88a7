r"""Table 1 of Burda, Grosse & Salakhutdinov (2015), rebuilt from scratch: ``RESULTS.md``.

    python -m evaluation.reproduce [--budget PASSES] [--cells 1L-vae-k1,2L-iwae-k50|all]
                                   [--k-eval 5000] [--eval-limit N] [--out runs/reproduce]

Cells: 1 and 2 stochastic layers (``vae --preset iwae-1layer``, ``vae2 --preset iwae-2layer``)
× VAE (``Trace_ELBO`` with k particles) / IWAE (``IWAE`` with k particles, or ``--iwae-loss
DReG``) × k ∈ {1, 5, 50}; keys such as ``1L-vae-k5`` and ``2L-iwae-k50``.  The IWAE bound at
k = 1 is the ELBO, so ``*-iwae-k1`` is the same run as ``*-vae-k1`` (as in the paper, whose two
k = 1 columns agree) unless ``--no-share-k1``.

Every missing cell is trained into ``OUT/<key>`` with :func:`inference.runner.train_if_missing`
(a killed run continues from its last checkpoint; a finished one is reused), evaluated on the
test set with IWAE at K = ``--k-eval`` (default 5000, the paper's; ``--eval-limit`` evaluates N
test images spread through the set), its active units counted per stochastic layer
(:func:`models.iwae.active_units`), and the table written to ``RESULTS.md``: genlab's value ±
standard error beside the paper's, active units, wall-clock, epochs, budget, device and the
commands of each cell.  Cells not run say so.  The numbers are also kept per run in
``OUT/<key>/reproduce.json`` and for the table in ``OUT/results.json``.

Optimization: the paper's schedule, :func:`inference.schedules.burda` (``RunConfig.schedule``
= "burda", ``passes`` = ``--budget``: 3,280 passes, or ``--budget`` passes of the same shape),
batch 20.  ``--constant-lr`` trains ``--budget`` epochs at a constant learning rate 10⁻³ with
torch's default Adam (ε = 10⁻⁸) instead; RESULTS.md states each run's from its config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from evaluation.api import evaluate
from inference.importance import flush_denormals_in_process
from inference.runner import CHECKPOINT, RunConfig, load_checkpoint, read_metrics, train_if_missing
from inference.schedules import get_schedule
from inference.systems import get_system
from models.common import GenlabError
from models.iwae import active_units

#: Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", ICLR 2016
#: (arXiv:1509.00519), Table 1, MNIST (dynamic binarization), test negative log-likelihood in
#: nats (IWAE estimate with k = 5000 on the 10,000 test images after 3,280 passes) and active
#: units, quoted here as log-likelihoods ((layers, objective, k) -> (log p(x), active units)).
PAPER = {
    (1, "VAE", 1): (-86.76, "19"), (1, "IWAE", 1): (-86.76, "19"),
    (1, "VAE", 5): (-86.47, "20"), (1, "IWAE", 5): (-85.54, "22"),
    (1, "VAE", 50): (-86.35, "20"), (1, "IWAE", 50): (-84.78, "25"),
    (2, "VAE", 1): (-85.33, "16+5"), (2, "IWAE", 1): (-85.33, "16+5"),
    (2, "VAE", 5): (-85.01, "17+5"), (2, "IWAE", 5): (-83.89, "21+5"),
    (2, "VAE", 50): (-84.78, "17+5"), (2, "IWAE", 50): (-82.90, "26+7"),
}
PAPER_SOURCE = ("Burda, Grosse & Salakhutdinov (2015), Importance Weighted Autoencoders, "
                "arXiv:1509.00519, Table 1 (MNIST)")
PAPER_PASSES = 3280
KS = (1, 5, 50)
ARCH = {1: ("vae", "iwae-1layer"), 2: ("vae2", "iwae-2layer")}


@dataclass(frozen=True)
class Cell:
    layers: int  # stochastic layers, 1 or 2
    objective: str  # "VAE" or "IWAE"
    k: int

    @property
    def key(self) -> str:
        return f"{self.layers}L-{self.objective.lower()}-k{self.k}"

    @property
    def paper(self) -> tuple:
        return PAPER[(self.layers, self.objective, self.k)]

    @classmethod
    def parse(cls, key: str) -> "Cell":
        try:
            layers, obj, k = key.strip().split("-")
            cell = cls(int(layers.rstrip("L")), obj.upper(), int(k.lstrip("k")))
        except ValueError:
            cell = None
        if cell is None or (cell.layers, cell.objective, cell.k) not in PAPER:
            raise GenlabError(f"unknown cell {key!r}; cells are "
                              f"{', '.join(c.key for c in ALL_CELLS)} (or 'all')")
        return cell


ALL_CELLS = tuple(Cell(n, o, k) for n in (1, 2) for k in KS for o in ("VAE", "IWAE"))


def parse_cells(text: Optional[str]) -> list:
    if text is None or text.strip() == "all":
        return list(ALL_CELLS)
    return [Cell.parse(t) for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- one cell
def device_label(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{os.cpu_count()}-core CPU ({platform.machine()})"


def run_key(cell: Cell, share_k1: bool = True) -> str:
    """The run directory's name: ``*-iwae-k1`` shares ``*-vae-k1``'s run when ``share_k1``."""
    if share_k1 and cell.objective == "IWAE" and cell.k == 1:
        return Cell(cell.layers, "VAE", 1).key
    return cell.key


def cell_config(cell: Cell, budget: Optional[int], iwae_loss: str = "IWAE", seed: int = 0,
                limit: Optional[int] = None, device: str = "cpu",
                data_dir: Optional[str] = None, valid_limit: Optional[int] = None,
                constant_lr: bool = False) -> tuple:
    """``(RunConfig, schedule description)`` of a cell trained for ``budget`` passes
    (None: the paper's 3,280): the burda schedule, or with ``constant_lr`` (or a runner
    without schedules) ``budget`` epochs at lr 1e-3 with torch's default Adam."""
    system, preset = ARCH[cell.layers]
    spec = get_system(system)
    loss = "Trace_ELBO" if cell.objective == "VAE" else iwae_loss
    sched = get_schedule("burda", budget)
    cfg = RunConfig(system=system, system_args=spec.resolve({"preset": preset}),
                    data_args=spec.resolve_data({"dataset": "mnist", "binarization": "dynamic"}),
                    epochs=sched.epochs, batch_size=sched.batch_size, lr=1e-3, loss=loss,
                    k=cell.k, limit=limit, seed=seed, device=device, data_dir=data_dir)
    fields = RunConfig.__dataclass_fields__
    if valid_limit is not None and "valid_limit" in fields:  # smoke runs: validate on fewer
        cfg.valid_limit = valid_limit
    if "schedule" in fields and "passes" in fields and not constant_lr:
        cfg.schedule, cfg.passes = "burda", sched.epochs
    return cfg, schedule_of(asdict(cfg))


def schedule_of(config: dict) -> str:
    """How a run's config trains: its named schedule, or a constant learning rate."""
    if config.get("schedule"):
        return get_schedule(config["schedule"], config.get("passes")).describe()
    return (f"constant lr {config['lr']:g}, torch's Adam(betas=(0.9, 0.999), eps=1e-8), batch "
            f"{config['batch_size']}, {config['epochs']} passes")


def commands(cell: Cell, cfg: RunConfig, run_dir: Path, k_eval: int, eval_limit: Optional[int],
             seed: int) -> tuple:
    """The command lines that train and evaluate ``cell`` on their own."""
    preset = cfg.system_args.get("preset")
    train = [f"python -m inference {cfg.system}", f"--preset {preset}", f"--loss {cfg.loss}",
             f"--k {cfg.k}", f"--batch-size {cfg.batch_size}", f"--seed {cfg.seed}"]
    if getattr(cfg, "schedule", None):
        train.append(f"--schedule {cfg.schedule} --passes {cfg.passes}")
    else:
        train.append(f"--epochs {cfg.epochs} --lr {cfg.lr:g}")
    if cfg.limit is not None:
        train.append(f"--limit {cfg.limit}")
    train.append(f"--out {run_dir}")
    ev = [f"python -m evaluation {run_dir}", f"--k {k_eval}", f"--seed {seed}"]
    if eval_limit is not None:
        ev.append(f"--limit {eval_limit} --spread")
    return " ".join(train), " ".join(ev)


def _matches(saved: dict, cfg: RunConfig) -> Optional[str]:
    for f in ("system", "loss", "k", "batch_size", "limit", "seed", "schedule", "passes"):
        if saved.get(f) != getattr(cfg, f, None):
            return f"{f}={saved.get(f)!r}, not {getattr(cfg, f)!r}"
    if saved.get("system_args") != cfg.system_args:
        return f"architecture {saved.get('system_args')}, not {cfg.system_args}"
    return None


def run_cell(cell: Cell, run_dir: Path, cfg: RunConfig, k_eval: int, eval_limit: Optional[int],
             seed: int = 0, data_dir: Optional[str] = None, progress: bool = False,
             memory_gb: float = 1.0) -> dict:
    """Train (if missing), evaluate (if not yet at this epoch and K) and measure one cell."""

    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    if ckpt.exists():
        saved = load_checkpoint(ckpt).get("config", {})
        why = _matches(saved, cfg)
        if why:
            raise GenlabError(f"{run_dir} holds another run ({why}); move it or choose --out")
    t0 = time.perf_counter()
    train_if_missing(cfg, run_dir, progress=progress)
    train_call_s = time.perf_counter() - t0
    metrics = read_metrics(run_dir)
    epochs = int(metrics[-1]["epoch"]) if metrics else 0
    record_path = run_dir / "reproduce.json"
    want = dict(epochs=epochs, k_eval=k_eval, eval_limit=eval_limit, seed=seed)
    if record_path.exists():
        old = json.loads(record_path.read_text())
        if {k: old.get(k) for k in want} == want:
            return old
    ev = evaluate(run_dir, [k_eval], "test", eval_limit, seed, memory_gb=memory_gb,
                  data_dir=data_dir, spread=eval_limit is not None)
    x = get_system(ev.config.system).model_inputs(ev.part)[0]
    au = active_units(ev.system, x, generator=torch.Generator(x.device).manual_seed(seed))
    s = ev.summary
    record = dict(
        want, cell=cell.key, run=str(run_dir), n_test=s["n"],
        log_px=s["iwae"][k_eval]["mean"], se=s["iwae"][k_eval]["se"],
        elbo=s["elbo"]["mean"], elbo_se=s["elbo"]["se"], khat_gt_07=s["khat_gt_0.7"],
        active_units={name: n for name, (n, _) in au.items()},
        train_seconds=sum(r["seconds"] for r in metrics),
        train_call_seconds=round(train_call_s, 1),
        device=device_label(ev.config.device), config=asdict(cfg),
    )
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------- the table
def _fmt(v: Optional[float], nd: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{nd}f}".replace("-", "−")


def _au(record: dict) -> str:
    units = record["active_units"]
    return "+".join(str(units[k]) for k in sorted(units))


def _per_image(record: dict) -> Optional[np.ndarray]:
    """The run's per-image IWAE values at K (from its ``eval_test.npz``), or None."""
    path = Path(record["run"]) / "eval_test.npz"
    if not path.exists():
        return None
    with np.load(path) as z:
        key = f"iwae_{record['k_eval']}"
        return np.asarray(z[key], dtype=float) if key in z.files else None


def _difference(a: dict, b: dict) -> tuple:
    """``(mean of a - b, its standard error, paired)``: paired over the same test images when
    both runs' per-image values are at hand (the spread subset is the same for every run),
    else from the two standard errors."""
    xa, xb = _per_image(a), _per_image(b)
    if xa is not None and xb is not None and xa.shape == xb.shape and xa.size > 1:
        d = xa - xb
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), True
    return a["log_px"] - b["log_px"], math.hypot(a["se"], b["se"]), False


def ordering(rows: dict) -> list:
    """Table 1's orderings checked on the measured values: (claim, verdict) pairs."""
    def v(layers, obj, k):
        return rows.get(Cell(layers, obj, k).key)

    def cmp(a, b) -> str:
        if a is None or b is None:
            return "not run"
        diff, se, paired = _difference(a, b)
        return (f"{'holds' if diff > 0 else 'fails'} ({diff:+.2f} ± {se:.2f} nats"
                f"{', paired over the same images' if paired else ''})").replace("-", "−")

    out = []
    for layers in (1, 2):
        for k in (5, 50):
            out.append((f"{layers} layer(s), k = {k}: IWAE above VAE",
                        cmp(v(layers, "IWAE", k), v(layers, "VAE", k))))
    for obj in ("VAE", "IWAE"):
        for k in KS:
            out.append((f"{obj}, k = {k}: 2 layers above 1", cmp(v(2, obj, k), v(1, obj, k))))
    for layers in (1, 2):
        a, b, c, d = v(layers, "IWAE", 50), v(layers, "IWAE", 1), v(layers, "VAE", 50), v(layers, "VAE", 1)
        if None in (a, b, c, d):
            verdict = "not run"
        else:
            gi, gv = a["log_px"] - b["log_px"], c["log_px"] - d["log_px"]
            verdict = (f"{'holds' if gi > gv else 'fails'} (IWAE gains {gi:+.2f}, "
                       f"VAE {gv:+.2f} nats from k = 1 to 50)").replace("-", "−")
        out.append((f"{layers} layer(s): k helps IWAE more than VAE", verdict))
    return out


def render(records: dict, cells: Sequence[Cell], meta: dict, skipped: dict) -> str:
    """RESULTS.md from the cells' records (``{cell key: record}``) and run metadata."""
    lines = [
        "# Table 1 of the IWAE paper, reproduced",
        "",
        f"Written by `{meta['command']}` on {meta['date']}. Every genlab figure below is read "
        f"from the runs in `{meta['out']}` (each run's `reproduce.json` and eval JSON); the "
        f"paper's figures are quoted from {PAPER_SOURCE}.",
        "",
        f"Test log-likelihood in nats per image (higher is better). genlab: IWAE estimate with "
        f"K = {meta['k_eval']} on {meta['eval_images']} MNIST test images (fixed binarization "
        f"of the test split), ± standard error across images. Paper: K = 5000 on the 10,000 test "
        f"images after {PAPER_PASSES:,} passes. Training: dynamic binarization; "
        f"{meta['schedule']}. Budget: {meta['budget_text']}.",
        "",
        *([meta["note"], ""] if meta.get("note") else []),
        "| cell | layers | objective | k | training loss | genlab log p(x) | paper | gap | active "
        "units genlab (paper) | epochs | budget (passes) | train s | 3,280 passes at this speed "
        "(h) | device |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in ALL_CELLS:
        p_val, p_au = cell.paper
        r = records.get(cell.key)
        head = f"| `{cell.key}` | {cell.layers} | {cell.objective} | {cell.k} |"
        if r is None:
            why = skipped.get(cell.key, "not selected (--cells)" if cell not in cells else "not run")
            lines.append(f"{head} — | not run: {why} | {_fmt(p_val)} | — | — ({p_au}) | — | — | — "
                         "| — | — |")
            continue
        head += f" {r['config']['loss']} k={r['config']['k']} |"
        shared = "" if r["cell"] == cell.key else f" (run of `{r['cell']}`)"
        lines.append(
            f"{head} {_fmt(r['log_px'])} ± {_fmt(r['se'])}{shared} | {_fmt(p_val)} | "
            f"{_fmt(r['log_px'] - p_val)} | {_au(r)} ({p_au}) | {r['epochs']} | "
            f"{r['budget']} | {r['train_seconds']:.0f} | "
            f"{r['train_seconds'] / max(r['epochs'], 1) * PAPER_PASSES / 3600:.1f} | {r['device']} |")
    lines += ["", "'train s' is each run's own training time on its machine, under whatever load it "
              "ran; the column after it scales it to 3,280 passes. Step times measured side by "
              "side, and the full table's wall-clock from them: `python "
              "benchmarks/table1_wallclock.py`.",
              "", "Table 1's orderings, on the measured values (difference ± its standard error):",
              ""]
    lines += [f"- {claim}: {verdict}" for claim, verdict in ordering(records)]
    lines += ["", "Active units: Cov_x(E_q[u]) > 10⁻² per stochastic layer (z, or z1+z2), on the "
              "evaluated test images; the z2 inner expectation averages 100 draws of z1.", "",
              "## Commands", "",
              "Each cell on its own (train, then evaluate; `reproduce` does both, resumably):", ""]
    for cell in ALL_CELLS:
        r = records.get(cell.key)
        if r is not None:
            lines += [f"- `{cell.key}`: `{r['train_command']}`; `{r['eval_command']}`"]
    lines.append("")
    return "\n".join(lines)


def reproduce(out_dir="runs/reproduce", budget: Optional[int] = None, cells=None,
              k_eval: int = 5000, eval_limit: Optional[int] = None, limit: Optional[int] = None,
              seed: int = 0, device: str = "cpu", data_dir: Optional[str] = None,
              iwae_loss: str = "IWAE", share_k1: bool = True, train: bool = True,
              results: Optional[str] = None, progress: bool = False, memory_gb: float = 1.0,
              command: Optional[str] = None, valid_limit: Optional[int] = None,
              note: Optional[str] = None, constant_lr: bool = False) -> dict:
    """Train what is missing, evaluate, and write RESULTS.md (``results``; default
    ``OUT/RESULTS.md``).  ``cells``: Cell objects or keys (default all).  ``train=False``
    only tabulates cells whose runs already hold the budget's epochs.  Returns the records."""
    out = Path(out_dir)
    cells = parse_cells(cells) if cells is None or isinstance(cells, str) else [
        c if isinstance(c, Cell) else Cell.parse(c) for c in cells]
    if iwae_loss not in ("IWAE", "DReG"):
        raise GenlabError(f"--iwae-loss must be IWAE or DReG, got {iwae_loss!r}")
    if k_eval < 1:
        raise GenlabError(f"--k-eval must be a positive integer, got {k_eval}")
    records: dict = {}
    skipped: dict = {}
    schedule = None
    by_run: dict = {}
    for cell in cells:
        rkey = run_key(cell, share_k1)  # the cell whose run this cell reads
        cfg, schedule = cell_config(Cell.parse(rkey), budget, iwae_loss, seed, limit, device,
                                    data_dir, valid_limit, constant_lr)
        run_dir = out / rkey
        train_cmd, eval_cmd = commands(cell, cfg, run_dir, k_eval, eval_limit, seed)
        if rkey in by_run:
            records[cell.key] = by_run[rkey]
            continue
        if not train:
            ckpt = run_dir / CHECKPOINT
            done = ckpt.exists() and load_checkpoint(ckpt)["loop"]["epoch"] >= cfg.epochs
            if not done:
                skipped[cell.key] = f"no finished run in `{run_dir}` (--no-train)"
                continue
        print(f"reproduce: {cell.key} -> {run_dir}", flush=True)
        rec = run_cell(cell, run_dir, cfg, k_eval, eval_limit, seed, data_dir, progress, memory_gb)
        rec.update(budget=cfg.epochs, train_command=train_cmd, eval_command=eval_cmd,
                   cell=rkey)
        (run_dir / "reproduce.json").write_text(json.dumps(rec, indent=2) + "\n")
        by_run[rkey] = records[cell.key] = rec
    n_images = sorted({r["n_test"] for r in records.values()})
    budget_text = (f"{budget} passes per cell" if budget is not None
                   else f"the full {PAPER_PASSES:,} passes")
    if limit is not None:
        budget_text += f", on the first {limit} training images only (--limit)"
    meta = dict(
        command=command or "reproduce(...)", out=str(out), k_eval=k_eval,
        eval_images=", ".join(f"{n:,}" for n in n_images) or "—",
        date=datetime.date.today().isoformat(), budget_text=budget_text, iwae_loss=iwae_loss,
        schedule="; ".join(sorted({schedule_of(r["config"]) for r in records.values()}))
        or schedule or "—", note=note,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, records=records,
                                                      skipped=skipped), indent=2) + "\n")
    path = Path(results) if results else out / "RESULTS.md"
    path.write_text(render(records, cells, meta, skipped))
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.reproduce",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reproduce", help="folder of the cells' runs")
    p.add_argument("--results", default=None, help="where RESULTS.md goes (default OUT/RESULTS.md)")
    p.add_argument("--budget", type=int, help=f"passes per cell (default the paper's {PAPER_PASSES})")
    p.add_argument("--cells", default="all", help="comma-separated keys, e.g. 1L-vae-k1,2L-iwae-k5")
    p.add_argument("--k-eval", type=int, default=5000, help="importance samples per test image")
    p.add_argument("--eval-limit", type=int, help="evaluate N test images spread through the set")
    p.add_argument("--limit", type=int, help="train on the first N training images (smoke runs)")
    p.add_argument("--valid-limit", type=int, help="validate each epoch on N images only "
                   "(smoke runs; needs a runner with RunConfig.valid_limit)")
    p.add_argument("--iwae-loss", default="IWAE", choices=("IWAE", "DReG"),
                   help="gradient estimator of the IWAE cells (default IWAE)")
    p.add_argument("--constant-lr", action="store_true", help="train --budget epochs at a "
                   "constant lr 1e-3 with torch's default Adam instead of the burda schedule "
                   "(its compressed shape spends small budgets at lr <= 1.9e-4)")
    p.add_argument("--no-share-k1", action="store_true", help="train *-iwae-k1 separately")
    p.add_argument("--no-train", action="store_true", help="only tabulate finished runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", help="data root (default $GENLAB_DATA, else the user cache)")
    p.add_argument("--memory-gb", type=float, default=1.0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--note", help="a paragraph for RESULTS.md (e.g. the machine's load)")
    a = p.parse_args(argv)
    args = list(sys.argv[1:] if argv is None else argv)
    if "--note" in args:  # the note is printed as itself, not inside the command
        i = args.index("--note")
        del args[i : i + 2]
    command = "python -m evaluation.reproduce " + " ".join(args)
    try:
        reproduce(a.out, a.budget, a.cells, a.k_eval, a.eval_limit, a.limit, a.seed, a.device,
                  a.data_dir, a.iwae_loss, not a.no_share_k1, not a.no_train, a.results,
                  a.progress, a.memory_gb, command.strip(), a.valid_limit, a.note,
                  a.constant_lr)
    except GenlabError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    flush_denormals_in_process()  # before torch starts its threads (see there)
    sys.exit(main())
