"""Throughput of genlab's importance-weighted estimator against Pyro's own tools.

    python benchmarks/estimator_throughput.py [--quick] [--n N] [--k K]

Task: log p(x) of each of N fixed-binarized MNIST test images by importance sampling with
K = 5000 draws from q(z|x), for a 784-400-20 Bernoulli VAE (models/vae.py) with UNTRAINED
weights (torch.manual_seed(0) initialization; the cost does not depend on the weights).

Contenders, each in its own worker process (so peak memory is not mixed), all under
``torch.no_grad`` and the same memory budget of 1 GiB:

* genlab: ``inference.importance.estimate_log_marginal(model, guide, x, num_samples=K,
  memory=1 GiB)`` (it also returns ELBO, k-hat and ESS per image);
* Pyro RenyiELBO: ``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True).loss`` per
  chunk of images.  RenyiELBO weights a chunk jointly (one weight per particle for the whole
  chunk), so the per-image quantity needs chunks of ONE image; that is what is timed.  Once,
  at the end, it is also called on a whole round of images at once to show what the budget
  allows (a memory check only: that is a different, joint quantity);
* plain PyTorch (the ceiling): the same encoder, K reparameterized draws, decoder, Bernoulli
  (``models.common.bernoulli_log_prob``, the formula genlab's models use)
  and Gaussian log-densities and a float64 log-sum-exp, written directly in torch with no Pyro
  (blocks of 16 images and cells of particles of the estimator's own size);
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
import math
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
TARGET_SHARE = 0.50  # issue 16: >= 50 % of the matmul rate
CEILING_SHARE = 0.90  # issue 16: genlab at >= 90 % of the plain-PyTorch ceiling
TAG = "@@"


# ----------------------------------------------------------------------------- worker side
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _vmsize() -> int:
    return _status("VmSize")


def _maxrss() -> int:
    """Peak resident memory of this process image.  (ru_maxrss survives execve, so a child
    would report its parent's peak; VmHWM starts afresh with the new image.)"""
    return _status("VmHWM")


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _say(obj) -> None:
    sys.__stdout__.write(TAG + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def worker(role: str, xpath: str, K: int, cap: float) -> None:
    sys.stdout = sys.stderr  # library chatter must not mix with the protocol
    import pyro
    import torch

    from inference import importance as est
    from models.vae import VAE

    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    vae = VAE(XDIM, LATENT, (HIDDEN,), "relu")
    vae.eval()
    x = torch.load(xpath)

    # the blocks and cells estimate_log_marginal will use (its own plan, read from its module)
    st = est._structure(vae.model, vae.guide, (x,), {}, "data", x.shape[0])
    plan = est._Plan.make(st, x.shape[0], K, (0, 1))
    nb, kb, memory = plan.nb, plan.kb, BUDGET
    genlab, plain, renyi, importance_one, renyi_elbo = _contenders(vae, K, memory, plan)

    # warm-up (not counted): imports (arviz), allocator, thread pool
    with torch.no_grad():
        if role.startswith("genlab"):
            genlab(x[:2])
        elif role == "plain":
            plain(x[:2])
        elif role == "renyi":
            pyro.infer.RenyiELBO(alpha=0, num_particles=min(K, 200), vectorize_particles=True,
                                 max_plate_nesting=1).loss(vae.model, vae.guide, x[:1])
        else:
            importance_one(x[:1], 20)
    base_rss = _maxrss()
    limit = _vmsize() + BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    _say({"ready": True, "base_rss": base_rss, "threads": torch.get_num_threads(),
          "chunk": [nb, kb], "memory": memory})
    _serve(role, x, K, cap, vae, genlab, plain, renyi, importance_one, renyi_elbo)


def _contenders(vae, K: int, memory: int, plan):
    """The timed functions of a worker: genlab, the plain-PyTorch ceiling, RenyiELBO per image,
    Pyro Importance for one image, and the RenyiELBO object (for the memory check)."""
    import pyro
    import torch

    from inference.importance import estimate_log_marginal
    from models.common import bernoulli_log_prob

    def genlab(xs):
        return estimate_log_marginal(vae.model, vae.guide, xs, num_samples=K, memory=memory).log_marginal.tolist()

    pb, pk = plan.nb, plan.kb  # the ceiling works in the estimator's own blocks and cells

    def plain(xs):
        out = []
        for s in range(0, xs.shape[0], pb):
            xb = xs[s: s + pb]
            loc, scale = vae.encode(xb)
            parts = []
            for k0 in range(0, K, pk):
                z = loc + scale * torch.randn(min(pk, K - k0), *loc.shape)
                logits = vae.decoder(z)
                ll = bernoulli_log_prob(logits, xb).sum(-1)  # the models' own formula
                lp = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
                lq = (-0.5 * ((z - loc) / scale).pow(2) - scale.log()
                      - 0.5 * math.log(2 * math.pi)).sum(-1)
                parts.append((ll + lp - lq).double())
            lw = torch.cat(parts, 0)
            out += (torch.logsumexp(lw, 0) - math.log(K)).tolist()
        return out

    renyi_elbo = pyro.infer.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True,
                                      max_plate_nesting=1)

    def renyi(xs):
        return [-renyi_elbo.loss(vae.model, vae.guide, xs[i: i + 1]) for i in range(xs.shape[0])]

    def importance_one(xi, k):
        with torch.no_grad():
            imp = pyro.infer.Importance(vae.model, vae.guide, num_samples=k).run(xi)
            return float(imp.get_log_normalizer())

    return genlab, plain, renyi, importance_one, renyi_elbo


def _importance_run(importance_one, xs, K: int, cap: float, res: dict) -> None:
    """Pyro Importance: whole images until the time cap, or one image with fewer samples
    (time scaled up to K: the loop is linear in the number of samples)."""
    t0 = time.perf_counter()
    importance_one(xs[:1], 100)
    per_sample = (time.perf_counter() - t0) / 100
    if per_sample * K > cap:  # not even one image at full K fits: fewer samples
        k_run = max(100, int(cap / per_sample) // 100 * 100)
        t0 = time.perf_counter()
        importance_one(xs[:1], k_run)
        res.update(seconds=(time.perf_counter() - t0) * K / k_run, n=1, k_run=k_run)
        return
    t0 = time.perf_counter()
    for i in range(xs.shape[0]):
        res["values"].append(importance_one(xs[i: i + 1], K))
        res["n"] += 1
        if time.perf_counter() - t0 > cap:
            break
    res["seconds"] = time.perf_counter() - t0


def _serve(role, x, K, cap, vae, genlab, plain, renyi, importance_one, renyi_elbo) -> None:
    """Answer the parent's commands (``run A B``, ``joint A B``, ``quit``) one JSON line each."""
    import torch

    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        a, b = int(cmd[1]), int(cmd[2])
        xs = x[a:b]
        res = {"ok": True, "n": 0, "seconds": 0.0, "values": [], "k_run": K}
        f0 = _minflt()
        try:
            if cmd[0] == "run" and role != "importance":
                t0 = time.perf_counter()
                with torch.no_grad():
                    vals = (renyi(xs) if role == "renyi" else plain(xs) if role == "plain"
                            else genlab(xs))
                res.update(seconds=time.perf_counter() - t0, n=len(vals), values=vals)
            elif cmd[0] == "run":
                _importance_run(importance_one, xs, K, cap, res)
            elif cmd[0] == "joint":  # RenyiELBO on all of xs at once (memory check)
                t0 = time.perf_counter()
                renyi_elbo.loss(vae.model, vae.guide, xs)
                res.update(seconds=time.perf_counter() - t0, n=xs.shape[0])
        except (RuntimeError, MemoryError) as e:
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            res.update(ok=False, error=f"{type(e).__name__}: {msg}")
        res["maxrss"] = _maxrss()
        res["minflt"] = _minflt() - f0
        _say(res)
    _say({"bye": True, "maxrss": _maxrss()})


# ----------------------------------------------------------------------------- parent side
class Worker:
    def __init__(self, role: str, xpath: str, K: int, cap: float):
        self.role = role
        env = dict(os.environ)
        if role == "genlab-malloc":  # glibc: keep big blocks in the heap, never trim it
            env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 40), MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker", role, "--xpath", xpath, "--k", str(K),
             "--cap", str(cap)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=env)
        self.ready = None

    def wait_ready(self) -> None:
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
    ap.add_argument("--variants", action="store_true",
                    help="add a diagnostic genlab row with glibc malloc thresholds set by environment")
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
    imp_cap = 2.0 if a.quick else 20.0       # Importance: seconds of sampling
    run_budget = 20.0 if a.quick else 200.0  # skip remaining rounds past this (whole run)

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

    variants = ["genlab-malloc"] if a.variants else []
    roles = ["genlab", "plain", "renyi", *variants]
    workers = {r: Worker(r, xpath, K, imp_cap) for r in [*roles, "importance"]}
    for w in workers.values():
        w.wait_ready()
    bounds = [round(i * N / rounds) for i in range(rounds + 1)]
    res = {r: [] for r in roles}
    mm = [matmul_rate(torch)]
    skipped = 0
    for r in range(rounds):
        if r > 0 and time.perf_counter() - t_start > run_budget:
            skipped = rounds - r
            break
        for role in (roles if r % 2 == 0 else roles[::-1]):
            res[role].append(workers[role].ask(f"run {bounds[r]} {bounds[r + 1]}"))
        mm.append(matmul_rate(torch))
    done_n = bounds[rounds - skipped]
    imp = workers["importance"].ask(f"run 0 {N}")
    joint_n = bounds[1] - bounds[0]
    joint = workers["renyi"].ask(f"joint 0 {joint_n}")
    ends = {r: w.close() for r, w in workers.items()}
    os.remove(xpath)
    os.rmdir(tmp)

    report(res, roles, variants, workers, imp, joint, joint_n, ends, mm, skipped, rounds, done_n,
           N, K, imp_cap, t_start)


def decoder_flops(n: int, K: int) -> float:
    """Multiply-adds x 2 of the decoder for n images x K draws."""
    return 2 * K * n * (LATENT * HIDDEN + HIDDEN * XDIM)


def encoder_flops(n: int) -> float:
    return 2 * n * (XDIM * HIDDEN + HIDDEN * 2 * LATENT)


def flops(n: int, K: int) -> float:
    return decoder_flops(n, K) + encoder_flops(n)


LABELS = {
    "genlab": "genlab estimate_log_marginal",
    "renyi": "Pyro RenyiELBO(alpha=0), 1 image/call",
    "plain": "plain PyTorch IWAE (the ceiling)",
    "genlab-malloc": "[variant] genlab, glibc mmap/trim thresh. 1 TiB",
}


def _totals(res, roles) -> dict:
    """Per contender: (images, seconds, every round ok, page faults per image)."""
    out = {}
    for role in roles:
        ok = [q for q in res[role] if q["ok"]]
        n, sec = sum(q["n"] for q in ok), sum(q["seconds"] for q in ok)
        out[role] = (n, sec, len(ok) == len(res[role]), sum(q["minflt"] for q in ok) / max(n, 1))
    return out


def _print_contenders(res, roles, tot, workers, imp, joint, joint_n, ends, N, K, imp_cap) -> float:
    """The table of contenders (rate, page faults, memory); returns Importance's rate."""
    def mem(role):
        # the peak after the contender's own timed work (RenyiELBO's memory check comes later)
        peak = res[role][-1]["maxrss"] if role in res else ends[role]["maxrss"]
        base = workers[role].ready["base_rss"]
        return f"{fmt_mib(peak)} (+{fmt_mib(peak - base)})"

    print(f"{'contender':<48} {'images':>6} {'seconds':>8} {'img/s':>7} {'page faults/img':>15} "
          f"{'peak RSS (+above set-up)':>25}  note")
    for role in roles:
        n, sec, ok, flt = tot[role]
        note = "" if ok else "SOME ROUNDS FAILED: " + next(q["error"] for q in res[role] if not q["ok"])
        if role == "genlab-malloc":
            note = ("env MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ (genlab already keeps "
                    "freed memory: expect genlab's figure) " + note)
        ips = n / sec if sec else float("nan")
        print(f"{LABELS[role]:<48} {n:>6} {sec:>8.1f} {ips:>7.2f} {flt:>15.0f} {mem(role):>25}  {note}")
    i_ips = imp["n"] / imp["seconds"] if imp["ok"] and imp["n"] else float("nan")
    if imp["ok"] and imp["k_run"] < K:
        inote = (f"capped: 1 image with {imp['k_run']} samples, time scaled x{K / imp['k_run']:.0f} to K={K}; "
                 f"extrapolated to {N} images: {N / i_ips:.0f} s")
    elif imp["ok"]:
        inote = f"capped at {imp_cap:.0f} s: {imp['n']} of {N} images; extrapolated to {N} images: {N / i_ips:.0f} s"
    else:
        inote = f"FAILED: {imp.get('error')}"
    print(f"{'Pyro Importance, 1 image per run':<48} {imp['n']:>6} {imp['seconds']:>8.1f} {i_ips:>7.3f} "
          f"{'':>15} {mem('importance'):>25}  {inote}")
    jnote = (f"fits, {joint['seconds']:.1f} s" if joint["ok"] else
             f"OUT OF MEMORY under the 1 GiB cap ({joint['error'][:110]})")
    print(f"{f'[memory check] RenyiELBO, {joint_n} images in 1 call':<48} {'':>6} {'':>8} {'':>7} {'':>15} "
          f"{'':>25}  {jnote}")
    return i_ips


def _print_agreement(res, imp, K: int) -> None:
    """Median |genlab - other| over shared images (different draws: Monte Carlo noise only)."""
    g_vals = [v for q in res["genlab"] for v in q["values"]]
    r_vals = [v for q in res["renyi"] for v in q["values"]]
    d_r = statistics.median(abs(u - v) for u, v in zip(g_vals, r_vals)) if r_vals else float("nan")
    d_i = (statistics.median(abs(u - v) for u, v in zip(g_vals, imp["values"]))
           if imp["values"] else float("nan"))
    print(f"estimates agree (median |genlab - other| over shared images, nats): RenyiELBO {d_r:.3f}, "
          f"Importance {'n/a (fewer samples)' if imp['k_run'] < K else f'{d_i:.3f}'}")


def _print_shares(res, variants, tot, machine, mm, K) -> None:
    """genlab's FLOP rate against the machine's matmul rate, and the target."""
    gn, gs = tot["genlab"][:2]
    achieved = flops(gn, K) / gs
    share = achieved / machine
    share_rounds = statistics.median(
        flops(q["n"], K) / q["seconds"] / m for q, m in zip(res["genlab"], mm[1:]))
    print(f"genlab FLOPs: decoder {decoder_flops(gn, K) / 1e12:.3f} TFLOP + encoder {encoder_flops(gn) / 1e9:.3f} GFLOP "
          f"in {gs:.1f} s = {achieved / 1e9:.1f} GFLOP/s = {100 * share:.1f}% of the median matmul rate "
          f"(median of per-round shares {100 * share_rounds:.1f}%)")
    for role in variants:
        n, sec = tot[role][:2]
        if not sec:
            continue
        print(f"  {LABELS[role]}: {flops(n, K) / sec / 1e9:.1f} GFLOP/s = "
              f"{100 * flops(n, K) / sec / machine:.1f}% of the matmul rate")
    print(f"decoder FLOP share {100 * share:.1f}%; target >= {100 * TARGET_SHARE:.0f}%: "
          f"{'MET' if share >= TARGET_SHARE else 'NOT MET'}")


def _print_ratios(res, roles, tot, i_ips, machine, K) -> None:
    """genlab against RenyiELBO, Importance and the plain-PyTorch ceiling."""
    g_ips = tot["genlab"][0] / tot["genlab"][1]
    r_ips = tot["renyi"][0] / tot["renyi"][1]
    sec_per_img = {r: [q["seconds"] / q["n"] for q in res[r] if q["ok"] and q["n"]] for r in roles}
    ratio_rounds = statistics.median(r_ / g_ for r_, g_ in zip(sec_per_img["renyi"], sec_per_img["genlab"]))
    print(f"side by side: genlab {g_ips:.2f} img/s vs RenyiELBO {r_ips:.2f} img/s = {g_ips / r_ips:.2f}x "
          f"(median per-round {ratio_rounds:.2f}x); vs Importance {i_ips:.3f} img/s (extrapolated) = "
          f"{g_ips / i_ips:.0f}x")
    p_ips = tot["plain"][0] / tot["plain"][1]
    p_share = flops(tot["plain"][0], K) / tot["plain"][1] / machine
    ceil_rounds = statistics.median(p_ / g_ for p_, g_ in zip(sec_per_img["plain"], sec_per_img["genlab"]))
    print(f"genlab / plain PyTorch ceiling: {g_ips:.2f} vs {p_ips:.2f} img/s = {100 * g_ips / p_ips:.0f}% "
          f"(median per-round {100 * ceil_rounds:.0f}%; target >= {100 * CEILING_SHARE:.0f}%: "
          f"{'MET' if g_ips / p_ips >= CEILING_SHARE else 'NOT MET'}); the ceiling itself runs at "
          f"{100 * p_share:.1f}% of the matmul rate")


def report(res, roles, variants, workers, imp, joint, joint_n, ends, mm, skipped, rounds, done_n,
           N, K, imp_cap, t_start) -> None:
    """The figures of one run: the machine, the contenders' table, agreement, FLOP shares and
    the ratios, in that order."""
    tot = _totals(res, roles)
    machine = statistics.median(mm)
    print(f"matmul rate (2048x2048 float32, {len(mm)} timings, one before and one after each round): "
          f"median {machine / 1e9:.1f} GFLOP/s (range {min(mm) / 1e9:.1f}-{max(mm) / 1e9:.1f})")
    nb, kb = workers["genlab"].ready["chunk"]
    print(f"genlab chunk under the 1 GiB budget: {nb} images x {kb} particles per log_weights call")
    if skipped:
        print(f"NOTE: time budget reached: {skipped} of {rounds} rounds skipped; the interleaved "
              f"contenders ran on the first {done_n} images only")
    print()
    i_ips = _print_contenders(res, roles, tot, workers, imp, joint, joint_n, ends, N, K, imp_cap)
    print()
    _print_agreement(res, imp, K)
    _print_shares(res, variants, tot, machine, mm, K)
    _print_ratios(res, roles, tot, i_ips, machine, K)
    print(f"(total wall time {time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
