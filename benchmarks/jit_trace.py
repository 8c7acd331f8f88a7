"""Why ``pyro.infer.JitTrace_ELBO`` is slow on genlab's one-layer IWAE-paper VAE, and what it
costs once it is not: trace counts, the first calls, and the interleaved steady state.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/jit_trace.py [--seconds 60] [--calls 30]

Model: ``build_vae(preset="iwae-1layer")`` (784-200-200-50), batch 20 of the fixed-binarized
MNIST training set, ``data_size`` N = 50,000, Adam with the burda schedule's settings.  Every
step is a full optimizer step (loss, ``.item()``, backward, Adam).

1. First calls, one fresh process per call pattern (so no pattern inherits another's warm JIT):
   per-call wall time, the number of ``torch.jit.trace`` calls so far (counted by wrapping
   ``torch.jit.trace``, which pyro/ops/jit.py calls), the size of ``CompiledFunction.compiled``
   (the trace cache) and which parts of its keys differ between entries.  Patterns:

   * ``inline``: ``JitTrace_ELBO().differentiable_loss(vae.model, vae.guide, x, data_size=N)``,
     validation on, the attribute ``vae.model`` read at every call;
   * ``objective``: genlab's ``inference.runner.Objective`` with its loss swapped for
     ``JitTrace_ELBO`` (validation on for the first call only), called as the runner calls it,
     ``obj(vae.model, vae.guide, args, N)``;
   * ``stored``: the same Objective, but ``m, g = vae.model, vae.guide`` read once and passed
     every time;
   * ``fixed``: the Objective pattern of ``objective`` with :class:`StableJitTrace_ELBO` below;
   * ``svi``: ``pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam, JitTrace_ELBO()).step``;
   * ``eager``: genlab's Objective with Trace_ELBO, for reference;
   * ``stored`` again under other TorchScript executor settings: ``legacy``
     (``torch._C._jit_set_profiling_executor(False)``), ``runs0``
     (``torch._C._jit_set_num_profiled_runs(0)``) and ``noopt``
     (``torch.jit.optimized_execution(False)``).

2. A check that the trace made on the runner's 2-image parameter-discovery batch is reused for
   batch 20 (the cache key holds no shapes) and still gives Trace_ELBO's value at the same seed;
   and a check of what the model id in the key buys: one JitTrace_ELBO called with a toy model
   and then with a different one (new id, so a new trace) against Trace_ELBO doing the same.

3. Steady state, interleaved in this process (blocks of steps, contenders in turn, order
   reversed every other round; figure = median over blocks of block time / steps), after
   warm-up steps: the Objective with Trace_ELBO (the runner's step), the same loss in plain
   PyTorch (``benchmarks/iwae_step.py``'s ``plain_loss_1l``), JitTrace_ELBO in the patterns
   above, and SVI.step with JitTrace_ELBO and with Trace_ELBO.  All contenders share one set of
   weights (Pyro's param store is global, and JitTrace_ELBO feeds the store's tensors into its
   trace); each has its own optimizer.  The ``objective`` pattern re-traces at every step and
   keeps every trace (the process's resident memory growth per new trace is printed), so it
   takes one step per block and stops after ``--retrace-steps`` steps.

On a busy 2-core machine run it with OMP_NUM_THREADS=1 (torch's two threads fighting other
jobs make millisecond steps unmeasurable).
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from iwae_step import ADAM, plain_loss_1l  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from runner_overhead import take_step  # noqa: E402

from inference.data import load_images  # noqa: E402
from inference.runner import Objective  # noqa: E402
from models.vae import build_vae  # noqa: E402

DATA = os.environ.get("GENLAB_DATA", str(ROOT.parent / "shared" / "data"))
PATTERNS = ("inline", "objective", "stored", "fixed", "svi", "eager")
EXECUTORS = ("default", "legacy", "runs0", "noopt")

# --------------------------------------------------------------------------- trace counting
_TRACES = [0]
_torch_jit_trace = torch.jit.trace


def _counting_trace(*args, **kwargs):
    _TRACES[0] += 1
    return _torch_jit_trace(*args, **kwargs)


torch.jit.trace = _counting_trace  # pyro/ops/jit.py calls torch.jit.trace through the module


class StableJitTrace_ELBO(pyro.infer.JitTrace_ELBO):
    """JitTrace_ELBO whose trace cache sees one model and one guide per (object, function).

    Pyro keys the cache on ``id(model)`` and ``id(guide)`` (pyro/infer/trace_elbo.py,
    ``kwargs["_pyro_model_id"] = id(model)``).  ``vae.model`` makes a new bound-method object at
    every attribute read, so a caller that reads it per call gets a new id, a cache miss and a
    new trace at (nearly) every call.  Here the first bound method seen for an (object,
    function) pair is kept and passed on every time (keeping it also keeps the object alive,
    so its id cannot be reused by another object)."""

    def loss_and_surrogate_loss(self, model, guide, *args, **kwargs):
        return super().loss_and_surrogate_loss(self._same(model), self._same(guide), *args, **kwargs)

    def _same(self, fn):
        if inspect.ismethod(fn):
            return self.__dict__.setdefault("_methods", {}).setdefault((id(fn.__self__), fn.__func__), fn)
        return fn


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def register(vae) -> list:
    """Put the VAE's weights into the param store under the names its model/guide use, and
    return the store's parameters (what the runner's optimizer gets after discovery)."""
    pyro.module("encoder", vae.encoder)
    pyro.module("decoder", vae.decoder)
    return [p for _, p in sorted(pyro.get_param_store().named_parameters())]


def jit_objective(loss) -> Objective:
    """genlab's Objective (validation on its first call only) with its loss swapped."""
    obj = Objective("Trace_ELBO", 1)
    obj._loss = loss
    return obj


def make_step(pattern: str, vae, n: int):
    """(step(args) -> float, the JitTrace_ELBO or None) for one call pattern."""
    if pattern == "plain":  # its own weights, outside the param store
        opt = torch.optim.Adam(vae.parameters(), **ADAM)
        return (lambda args: take_step(plain_loss_1l(vae, args[0], n), opt)), None
    params = register(vae)
    if pattern in ("svi", "svi-eager"):
        loss = pyro.infer.JitTrace_ELBO() if pattern == "svi" else pyro.infer.Trace_ELBO()
        svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam(dict(ADAM)), loss)
        return (lambda args: svi.step(*args, data_size=n)), loss
    opt = torch.optim.Adam(params, **ADAM)
    if pattern == "inline":
        loss = pyro.infer.JitTrace_ELBO()
        return (lambda args: take_step(loss.differentiable_loss(vae.model, vae.guide, *args, data_size=n),
                                       opt)), loss
    if pattern == "eager":
        obj = Objective("Trace_ELBO", 1)
        return (lambda args: take_step(obj(vae.model, vae.guide, args, n), opt)), None
    loss = StableJitTrace_ELBO() if pattern == "fixed" else pyro.infer.JitTrace_ELBO()
    obj = jit_objective(loss)
    if pattern == "stored":
        m, g = vae.model, vae.guide
        return (lambda args: take_step(obj(m, g, args, n), opt)), loss
    return (lambda args: take_step(obj(vae.model, vae.guide, args, n), opt)), loss  # objective, fixed


def cache(loss) -> dict:
    fn = getattr(loss, "_loss_and_surrogate_loss", None) if loss is not None else None
    return {} if fn is None else fn.compiled


# --------------------------------------------------------------------------- 1. first calls
def probe(pattern: str, executor: str, calls: int) -> dict:
    """Run in a fresh process: ``calls`` steps of one pattern from a cold start."""
    warnings.filterwarnings("ignore")  # the tracer's TracerWarnings, once per trace
    if executor == "legacy":
        torch._C._jit_set_profiling_executor(False)
    elif executor == "runs0":
        torch._C._jit_set_num_profiled_runs(0)
    train = load_images("mnist", "fixed", DATA, download=False).train
    n = len(train)
    x = train.batch(torch.arange(20), None, ("x",))
    torch.manual_seed(0)
    vae = build_vae(preset="iwae-1layer")
    pyro.clear_param_store()
    step, loss = make_step(pattern, vae, n)
    rows = []
    with torch.jit.optimized_execution(executor != "noopt"):
        for _ in range(calls):
            t = time.perf_counter()
            step(x)
            rows.append(((time.perf_counter() - t) * 1e3, _TRACES[0], len(cache(loss))))
    keys = [[k[0], [list(kv) for kv in k[1]]] for k in cache(loss)]  # (len(args), sorted kwargs)
    return dict(rows=rows, keys=keys, profiled_runs=torch._C._jit_get_num_profiled_runs())


def run_probes(calls: int) -> dict:
    jobs = [(p, "default") for p in PATTERNS] + [("stored", e) for e in EXECUTORS[1:]]
    out = {}
    for pattern, executor in jobs:
        cmd = [sys.executable, __file__, "--probe", pattern, "--executor", executor, "--calls", str(calls)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[(pattern, executor)] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def report_probes(out: dict, calls: int) -> None:
    print(f"\n1. First {calls} steps from a cold process, batch 20 (per step: ms / torch.jit.trace "
          "calls so far)")
    names = [f"{p}" if e == "default" else f"stored,{e}" for p, e in out]
    print("step " + "".join(f"{nm:>15}" for nm in names))
    for i in range(calls):
        print(f"{i + 1:>4} " + "".join(f"{r['rows'][i][0]:>10.1f}/{r['rows'][i][1]:<4d}" for r in out.values()))
    eager = statistics.median(t for t, *_ in out[("eager", "default")]["rows"][3:])
    print(f"\n{'pattern':<16} {'traces':>7} {'cache':>6} {'first 3 steps ms':>17} "
          f"{'median 4..end ms':>17} {'x eager':>8}  cache keys differ in")
    for nm, r in zip(names, out.values()):
        rows = r["rows"]
        med = statistics.median(t for t, *_ in rows[3:])
        varies = sorted({name for k in r["keys"] for name, v in k[1] if any(
            dict(k2[1]).get(name) != v for k2 in r["keys"])} | ({"len(args)"} if len({k[0] for k in r["keys"]}) > 1 else set()))
        print(f"{nm:<16} {rows[-1][1]:>7d} {rows[-1][2]:>6d} {sum(t for t, *_ in rows[:3]):>17.1f} "
              f"{med:>17.2f} {med / eager:>8.2f}  "
              f"{', '.join(varies) if varies else '-'}")
    k = out[("inline", "default")]["keys"]
    print("trace-cache keys (pyro.ops.jit._hashable_args_kwargs: len(args), sorted kwargs) of the inline "
          f"pattern, first two: {k[0]}; {k[1] if len(k) > 1 else '-'}")
    print(f"torch._C._jit_get_num_profiled_runs() by default: {out[('stored', 'default')]['profiled_runs']}")


# --------------------------------------------------------------------------- 2. agreement
def agreement(train, n: int) -> None:
    """The runner's discovery call (2 images) traces; batch 20 then reuses that trace."""
    warnings.filterwarnings("ignore")
    probe_args = train.batch(torch.arange(2), None, ("x",))
    x = train.batch(torch.arange(20), None, ("x",))
    torch.manual_seed(0)
    vae = build_vae(preset="iwae-1layer")
    pyro.clear_param_store()
    m, g = vae.model, vae.guide
    jit, eager = pyro.infer.JitTrace_ELBO(), pyro.infer.Trace_ELBO()
    before = _TRACES[0]
    with torch.no_grad():
        jit.differentiable_loss(m, g, *probe_args, data_size=n)
        torch.manual_seed(5)
        a = jit.differentiable_loss(m, g, *x, data_size=n).item()
        torch.manual_seed(5)
        b = eager.differentiable_loss(m, g, *x, data_size=n).item()
    print(f"\n2. Trace made on the 2-image discovery batch, then batch 20 at the same seed: "
          f"JitTrace_ELBO {a:.7g}, Trace_ELBO {b:.7g} (relative difference {abs(a - b) / abs(b):.1e}); "
          f"traces made: {_TRACES[0] - before}")
    import pyro.distributions as dist

    def guide(y):
        pyro.sample("z", dist.Normal(pyro.param("toy_loc", torch.tensor(0.0)), 1.0))

    def model_a(y):
        pyro.sample("y", dist.Normal(pyro.sample("z", dist.Normal(0.0, 1.0)), 1.0), obs=y)

    def model_b(y):  # a 100x wider likelihood: a different loss at every draw
        pyro.sample("y", dist.Normal(pyro.sample("z", dist.Normal(0.0, 1.0)), 100.0), obs=y)

    y = torch.tensor(3.0)
    for loss in (pyro.infer.Trace_ELBO(), pyro.infer.JitTrace_ELBO()):
        vals = []
        for mdl in (model_a, model_b):  # each a first call for the JIT (new id): 3 draws each
            torch.manual_seed(3)
            vals.append(loss.differentiable_loss(mdl, guide, y).item())
        print(f"   one {type(loss).__name__:<14} model_a {vals[0]:.6g}, then model_b {vals[1]:.6g}; "
              f"traces kept: {len(cache(loss)) if isinstance(loss, pyro.infer.JitTrace_ELBO) else '-'}")
    torch.manual_seed(3)
    fresh = pyro.infer.JitTrace_ELBO().differentiable_loss(model_b, guide, y).item()
    print(f"   a fresh JitTrace_ELBO on model_b: {fresh:.6g}")


# --------------------------------------------------------------------------- 3. steady state
def steady(train, n: int, seconds: float, per_block: int, retrace_steps: int) -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    vae = build_vae(preset="iwae-1layer")
    pyro.clear_param_store()
    plain_vae = copy.deepcopy(vae)
    labels = {"eager": "Objective + Trace_ELBO (runner)",
              "plain": "plain PyTorch",
              "objective": "Objective + JitTrace (runner's call)",
              "stored": "Objective + JitTrace, stored m/g",
              "fixed": "Objective + StableJitTrace",
              "svi": "SVI.step + JitTrace_ELBO",
              "svi-eager": "SVI.step + Trace_ELBO"}
    steps, losses = {}, {}
    for p in labels:
        steps[p], losses[p] = make_step(p, plain_vae if p == "plain" else vae, n)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=g)

    def batch(i):
        s = i * 20 % (n - 20)
        return train.batch(perm[s:s + 20], None, ("x",))

    for p in labels:  # warm-up: the JIT patterns need 3 steps to reach their optimized graphs
        for i in range(5):
            steps[p](batch(i))
    traces0 = {p: len(cache(losses[p])) for p in labels}
    gc.collect()
    rss0 = rss_mb()
    times = {p: [] for p in labels}
    done = {p: 0 for p in labels}
    t0, b = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or b < 2:
        order = list(labels) if b % 2 == 0 else list(labels)[::-1]
        for p in order:
            k = 1 if p == "objective" else per_block
            if p == "objective" and done[p] >= retrace_steps:
                continue
            batches = [batch(b * per_block + i) for i in range(k)]
            t = time.perf_counter()
            for args in batches:
                steps[p](args)
            times[p].append((time.perf_counter() - t) / k * 1e3)
            done[p] += k
        b += 1
    med = {p: statistics.median(v) for p, v in times.items()}
    gc.collect()
    grew, new = rss_mb() - rss0, sum(len(cache(losses[p])) - traces0[p] for p in labels)
    print(f"\n3. Steady state, batch 20: {b} interleaved rounds, {per_block} steps per block "
          f"(runner's JitTrace call: 1 step per block, {done['objective']} steps in all); Adam({ADAM})\n"
          f"   process RSS grew {grew:.0f} MB while timing, {new} new traces kept "
          f"({grew / max(new, 1):.2f} MB per new trace)")
    print(f"{'contender':<38} {'ms/step':>8} {'q1..q3 of blocks':>18} {'x runner':>9} {'x plain':>8} "
          f"{'new traces':>11} {'steps':>6}")
    for p, lab in labels.items():
        q = statistics.quantiles(times[p], n=4) if len(times[p]) > 1 else [med[p]] * 3
        print(f"{lab:<38} {med[p]:>8.2f} {q[0]:>8.2f}..{q[2]:<8.2f} {med[p] / med['eager']:>9.2f} "
              f"{med[p] / med['plain']:>8.2f} {len(cache(losses[p])) - traces0[p]:>11d} {done[p]:>6d}")
    print(f"JitTrace (traced once, stored m/g) saves {med['eager'] - med['stored']:.2f} ms/step against the "
          f"runner's Trace_ELBO step; the runner's call as is costs {med['objective'] / med['eager']:.1f}x it.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="timed seconds of the steady-state part")
    ap.add_argument("--calls", type=int, default=30, help="cold-start steps per pattern in part 1")
    ap.add_argument("--per-block", type=int, default=10)
    ap.add_argument("--retrace-steps", type=int, default=60,
                    help="steps of the re-tracing pattern in part 3 (each keeps ~2 MB)")
    ap.add_argument("--probe", choices=PATTERNS, help=argparse.SUPPRESS)
    ap.add_argument("--executor", choices=EXECUTORS, default="default", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe:
        print(json.dumps(probe(a.probe, a.executor, a.calls)))
        return
    print(f"torch {torch.__version__}, pyro {pyro.__version__}; torch threads {torch.get_num_threads()}, "
          f"machine cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    report_probes(run_probes(a.calls), a.calls)
    train = load_images("mnist", "fixed", DATA, download=False).train
    agreement(train, len(train))
    steady(train, len(train), a.seconds, a.per_block, a.retrace_steps)


if __name__ == "__main__":
    main()
