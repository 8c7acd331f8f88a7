"""Throughput of genlab's importance-weighted estimator against Pyro's own tools.

    python benchmarks/estimator_throughput.py [--quick] [--n N] [--k K]

Task: log p(x) of each of N fixed-binarized MNIST test images by importance sampling with
K = 5000 draws from q(z|x), for a 784-400-20 Bernoulli VAE (models/vae.py) with UNTRAINED
weights (torch.manual_seed(0) initialization; the cost does not depend on the weights).

Contenders, each in its own worker process (so peak memory is not mixed), all under
``torch.no_grad`` and the same memory budget of 1 GiB:

* genlab: ``evaluation.estimator.estimate_log_marginal(model, guide, x, num_samples=K,
  memory=1 GiB)`` (it also returns ELBO, k-hat and ESS per image);
* Pyro RenyiELBO: ``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True).loss`` per
  chunk of images.  RenyiELBO weights a chunk jointly (one weight per particle for the whole
  chunk), so the per-image quantity needs chunks of ONE image; that is what is timed.  Once,
  at the end, it is also called on a whole round of images at once to show what the budget
  allows (a memory check only: that is a different, joint quantity);
* Pyro Importance: ``Importance(model, guide, num_samples=K).run(x_i)`` then
  ``get_log_normalizer()``, image by image (it loops over the K samples in Python).  It gets
  a subset of the images and a time cap; its rate is extrapolated to N images.

The memory budget is enforced: once a worker is set up and warmed up, its address space is
capped (RLIMIT_AS) at its current size + 1 GiB, so a contender that needs more fails with an
allocation error, which is reported.  Peak resident memory is each worker's ru_maxrss.

Timing: the images are cut into rounds; genlab and RenyiELBO alternate round by round (A B A B,
order flipped every round) and a 2048x2048 float32 torch.matmul (the machine's matmul rate)
is timed between rounds, so every quantity is measured under the same machine load.  Rates are
totals (images / seconds) over the rounds; ratios are also given as the median of per-round
ratios.  A warm-up call per worker (2 images, small K) is not counted.  If the whole run nears
its time budget the remaining rounds are skipped and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = "/work/shared/data"
BUDGET = 1 << 30
LATENT, HIDDEN, XDIM = 20, 400, 784
TARGET_SHARE = 0.35
TAG = "@@"


# ----------------------------------------------------------------------------- worker side
def _vmsize() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _say(obj) -> None:
    sys.__stdout__.write(TAG + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def worker(role: str, xpath: str, K: int, cap: float) -> None:
    sys.stdout = sys.stderr  # library chatter must not mix with the protocol
    import pyro
    import torch

    from evaluation.estimator import estimate_log_marginal
    from models.vae import VAE

    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    vae = VAE(XDIM, LATENT, (HIDDEN,), "relu")
    vae.eval()
    x = torch.load(xpath)

    def genlab(xs):
        return estimate_log_marginal(vae.model, vae.guide, xs, num_samples=K, memory=BUDGET).log_marginal.tolist()

    renyi_elbo = pyro.infer.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True,
                                      max_plate_nesting=1)

    def renyi(xs):
        return [-renyi_elbo.loss(vae.model, vae.guide, xs[i: i + 1]) for i in range(xs.shape[0])]

    def importance_one(xi, k):
        with torch.no_grad():
            imp = pyro.infer.Importance(vae.model, vae.guide, num_samples=k).run(xi)
            return float(imp.get_log_normalizer())

    # warm-up (not counted): imports (arviz), allocator, thread pool
    with torch.no_grad():
        if role == "genlab":
            estimate_log_marginal(vae.model, vae.guide, x[:2], num_samples=min(K, 200), memory=BUDGET)
        elif role == "renyi":
            pyro.infer.RenyiELBO(alpha=0, num_particles=min(K, 200), vectorize_particles=True,
                                 max_plate_nesting=1).loss(vae.model, vae.guide, x[:1])
        else:
            importance_one(x[:1], 20)
    base_rss = _maxrss()
    limit = _vmsize() + BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    _say({"ready": True, "base_rss": base_rss, "threads": torch.get_num_threads()})

    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        a, b = int(cmd[1]), int(cmd[2])
        xs = x[a:b]
        res = {"ok": True, "n": 0, "seconds": 0.0, "values": []}
        try:
            if cmd[0] == "run" and role in ("genlab", "renyi"):
                t0 = time.perf_counter()
                with torch.no_grad():
                    vals = genlab(xs) if role == "genlab" else renyi(xs)
                res.update(seconds=time.perf_counter() - t0, n=len(vals), values=vals)
            elif cmd[0] == "run":  # importance: whole images until the time cap
                t0 = time.perf_counter()
                for i in range(xs.shape[0]):
                    res["values"].append(importance_one(xs[i: i + 1], K))
                    res["n"] += 1
                    if time.perf_counter() - t0 > cap:
                        break
                res["seconds"] = time.perf_counter() - t0
            elif cmd[0] == "joint":  # RenyiELBO on all of xs at once (memory check)
                t0 = time.perf_counter()
                renyi_elbo.loss(vae.model, vae.guide, xs)
                res.update(seconds=time.perf_counter() - t0, n=xs.shape[0])
        except (RuntimeError, MemoryError) as e:
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            res.update(ok=False, error=f"{type(e).__name__}: {msg}")
        res["maxrss"] = _maxrss()
        _say(res)
    _say({"bye": True, "maxrss": _maxrss()})


# ----------------------------------------------------------------------------- parent side
class Worker:
    def __init__(self, role: str, xpath: str, K: int, cap: float):
        self.role = role
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker", role, "--xpath", xpath, "--k", str(K),
             "--cap", str(cap)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"worker {self.role} exited (rc {self.p.wait()})")

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.p.wait()
        return out


def matmul_rate(torch, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a float32 n x n torch.matmul: the median of reps timings."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts)


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 images, short caps (under ~30 s)")
    ap.add_argument("--n", type=int, default=None, help="number of test images (default 1000, quick 50)")
    ap.add_argument("--k", type=int, default=5000, help="importance samples per image")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--xpath", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.xpath, a.k, a.cap)

    t_start = time.perf_counter()
    import torch

    from inference.data import load_images

    N = a.n or (50 if a.quick else 1000)
    K = a.k
    rounds = 2 if a.quick else 10
    imp_cap = 4.0 if a.quick else 30.0       # Importance: seconds of sampling
    run_budget = 22.0 if a.quick else 250.0  # skip remaining rounds past this (whole run)

    print(f"torch {torch.__version__}; torch threads {torch.get_num_threads()} (default), "
          f"machine cores {os.cpu_count()}")
    print(f"task: log p(x) of {N} fixed-binarized MNIST test images, K={K} importance samples, "
          f"784-{HIDDEN}-{LATENT} Bernoulli VAE with UNTRAINED weights (seed 0); memory budget "
          f"{fmt_mib(BUDGET)} per contender")
    data = load_images("mnist", "fixed", DATA, download=False)
    x = data.test.x[:N].contiguous().clone()
    del data
    tmp = tempfile.mkdtemp(prefix="genlab-bench-")
    xpath = os.path.join(tmp, "x.pt")
    torch.save(x, xpath)

    workers = {r: Worker(r, xpath, K, imp_cap) for r in ("genlab", "renyi", "importance")}
    bounds = [round(i * N / rounds) for i in range(rounds + 1)]
    res = {"genlab": [], "renyi": []}
    mm = [matmul_rate(torch)]
    skipped = 0
    for r in range(rounds):
        if r > 0 and time.perf_counter() - t_start > run_budget:
            skipped = rounds - r
            break
        order = ["genlab", "renyi"] if r % 2 == 0 else ["renyi", "genlab"]
        for role in order:
            res[role].append(workers[role].ask(f"run {bounds[r]} {bounds[r + 1]}"))
        mm.append(matmul_rate(torch))
    done_n = bounds[rounds - skipped]
    imp = workers["importance"].ask(f"run 0 {N}")
    joint_n = bounds[1] - bounds[0]
    joint = workers["renyi"].ask(f"joint 0 {joint_n}")
    ends = {r: w.close() for r, w in workers.items()}
    os.remove(xpath)
    os.rmdir(tmp)

    # ---- figures
    def total(role):
        ok = [q for q in res[role] if q["ok"]]
        return sum(q["n"] for q in ok), sum(q["seconds"] for q in ok), len(ok) == len(res[role])

    gn, gs, gok = total("genlab")
    rn, rs, rok = total("renyi")
    g_ips = gn / gs
    r_ips = rn / rs if rs else float("nan")
    per_round = [q["seconds"] / q["n"] for q in res["renyi"] if q["ok"]]
    per_round_g = [q["seconds"] / q["n"] for q in res["genlab"] if q["ok"]]
    ratio_rounds = statistics.median(r_ / g_ for r_, g_ in zip(per_round, per_round_g))
    i_ips = imp["n"] / imp["seconds"] if imp["ok"] and imp["n"] else float("nan")

    dec_flops = 2 * K * gn * (LATENT * HIDDEN + HIDDEN * XDIM)
    enc_flops = 2 * gn * (XDIM * HIDDEN + HIDDEN * 2 * LATENT)
    achieved = (dec_flops + enc_flops) / gs
    machine = statistics.median(mm)
    share = achieved / machine
    share_rounds = statistics.median(
        2 * K * q["n"] * (LATENT * HIDDEN + HIDDEN * XDIM) / q["seconds"] / m
        for q, m in zip(res["genlab"], mm[1:]))

    # agreement of the estimates (different random draws: Monte Carlo noise only)
    g_vals = [v for q in res["genlab"] for v in q["values"]]
    r_vals = [v for q in res["renyi"] for v in q["values"]]
    d_r = statistics.median(abs(u - v) for u, v in zip(g_vals, r_vals)) if r_vals else float("nan")
    d_i = (statistics.median(abs(u - v) for u, v in zip(g_vals, imp["values"]))
           if imp["values"] else float("nan"))

    def mem(role):
        base = workers[role].ready["base_rss"]
        return f"{fmt_mib(ends[role]['maxrss'])} ({fmt_mib(ends[role]['maxrss'] - base)} above set-up)"

    print(f"matmul rate (2048x2048 float32, {len(mm)} timings between rounds): median "
          f"{machine / 1e9:.1f} GFLOP/s (range {min(mm) / 1e9:.1f}-{max(mm) / 1e9:.1f})")
    if skipped:
        print(f"NOTE: time budget reached: {skipped} of {rounds} rounds skipped; genlab and RenyiELBO "
              f"ran on the first {done_n} images")
    print()
    print(f"{'contender':<44} {'images':>7} {'seconds':>8} {'images/s':>9} {'peak RSS (above set-up)':>30}  note")
    print(f"{'genlab estimate_log_marginal':<44} {gn:>7} {gs:>8.1f} {g_ips:>9.2f} {mem('genlab'):>30}  "
          f"{'' if gok else 'SOME ROUNDS FAILED'}")
    print(f"{'Pyro RenyiELBO(alpha=0), 1 image per call':<44} {rn:>7} {rs:>8.1f} {r_ips:>9.2f} "
          f"{mem('renyi'):>30}  {'' if rok else 'SOME ROUNDS FAILED'}")
    inote = (f"capped at {imp_cap:.0f} s: {imp['n']} of {N} images; extrapolated to {N} images: "
             f"{N / i_ips:.0f} s" if imp["ok"] else f"FAILED: {imp.get('error')}")
    print(f"{'Pyro Importance, 1 image per run':<44} {imp['n']:>7} {imp['seconds']:>8.1f} {i_ips:>9.3f} "
          f"{mem('importance'):>30}  {inote}")
    jnote = (f"fits, {joint['seconds']:.1f} s" if joint["ok"] else f"OUT OF MEMORY under the 1 GiB cap "
             f"({joint['error']})")
    print(f"{f'[memory check] RenyiELBO on {joint_n} images at once':<44} {'':>7} {'':>8} {'':>9} {'':>30}  {jnote}")
    print()
    print(f"estimates agree (median |genlab - other| over shared images, nats): RenyiELBO {d_r:.3f}, "
          f"Importance {d_i:.3f}")
    print(f"genlab FLOPs: decoder {dec_flops / 1e12:.3f} TFLOP + encoder {enc_flops / 1e9:.3f} GFLOP in "
          f"{gs:.1f} s = {achieved / 1e9:.1f} GFLOP/s = {100 * share:.1f}% of the matmul rate "
          f"(median of per-round shares {100 * share_rounds:.1f}%)")
    print(f"decoder FLOP share {100 * share:.1f}%; target >= {100 * TARGET_SHARE:.0f}%: "
          f"{'MET' if share >= TARGET_SHARE else 'NOT MET'}")
    print(f"side by side: genlab {g_ips:.2f} img/s vs RenyiELBO {r_ips:.2f} img/s = {g_ips / r_ips:.2f}x "
          f"(median per-round {ratio_rounds:.2f}x); vs Importance {i_ips:.3f} img/s (extrapolated) = "
          f"{g_ips / i_ips:.0f}x")
    print(f"(total wall time {time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
