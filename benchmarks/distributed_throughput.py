"""Evaluation throughput at world sizes 1 and 2 (issue 16): the IWAE estimator sharded by
torchrun, images per second and the ratio P=2 / P=1.

    python benchmarks/distributed_throughput.py [--k 1000] [--images 256] [--sizes 1,2]

Each world size is a real ``torchrun --nproc_per_node P`` launch of this file (``--worker``):
every rank builds the same 784-400-20 VAE (seeded weights; throughput does not need a trained
one) and the same binary images, waits at a barrier, estimates its share of the estimator's
fixed blocks, and rank 0 times until the shards are gathered.  Each worker runs with
OMP_NUM_THREADS = (cores / P), so P = 1 and P = 2 use the same cores; on a 2-core machine expect
about 1x (the work is split, not multiplied) -- more when one process's two intra-op threads
use the cores worse than two single-threaded processes do.  The estimates are compared across
P: bitwise equal at equal threads per process; different thread counts round float32 matmuls
differently (about 1e-5 nats per image).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(k: int, n: int) -> None:
    import numpy as np
    import pyro
    import torch

    from inference import distributed
    from inference.importance import Estimate, estimate_log_marginal
    from models.vae import build_vae

    group = distributed.setup("cpu")
    torch.manual_seed(0)
    vae = build_vae(latent_dim=20, hidden=[400]).eval()
    x = torch.bernoulli(torch.full((n, 784), 0.13), generator=torch.Generator().manual_seed(1))
    if group.active:
        import torch.distributed as dist

        dist.barrier()
    t0 = time.perf_counter()
    pyro.set_rng_seed(0)
    est = estimate_log_marginal(vae.model, vae.guide, x, num_samples=k, max_seconds=None,
                                shard=(group.rank, group.size))
    if group.active:
        est = Estimate.concat(group.all_gather_object(est))
    seconds = time.perf_counter() - t0
    if group.main:
        print(json.dumps({"P": group.size, "seconds": seconds, "images_per_s": n / seconds,
                          "threads": torch.get_num_threads(),
                          "checksum": float(np.sum(est.log_marginal))}), flush=True)
    distributed.teardown()


def launch(p: int, k: int, n: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // p)), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(p),
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--worker",
           "--k", str(k), "--images", str(n)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"P={p} failed:\n{r.stderr[-3000:]}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=1000, help="importance samples per image")
    ap.add_argument("--images", type=int, default=256, help="images")
    ap.add_argument("--sizes", default="1,2", help="world sizes to time")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.k, a.images)
    print(f"{os.cpu_count()} CPU cores; IWAE K={a.k} on {a.images} images, 784-400-20 VAE, gloo")
    rows = [launch(int(p), a.k, a.images) for p in a.sizes.split(",")]
    for r in rows:
        print(f"  P={r['P']}: {r['images_per_s']:.1f} images/s ({r['seconds']:.1f} s, "
              f"{r['threads']} thread(s) per rank)")
    base = rows[0]
    for r in rows[1:]:
        d = abs(r["checksum"] - base["checksum"])
        same = ("bitwise equal estimates" if d == 0 else
                f"summed estimates differ by {d:.1e} nats: {base['threads']} vs {r['threads']} "
                "threads per process round float32 matmuls differently; at equal thread counts "
                "the estimates are bitwise equal")
        print(f"  ratio P={r['P']} / P={base['P']}: {r['images_per_s'] / base['images_per_s']:.2f}x "
              f"({same})")


if __name__ == "__main__":
    main()
