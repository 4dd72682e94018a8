"""Per-layer cost of the adapter math, every algo against algo=lora, with torch.profiler op
tables: which op of FactorisedAdapter's forward + backward costs what.

    python bench/layer_profile.py --dim 320 --tokens 1024 --batch 2 --rank 64

One Linear (dim x dim, as SD 1.5's attention projections at the highest resolution), input
[batch, tokens, dim] with per-sample timesteps (the per-sample mask path), forward + backward.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import measure  # noqa: E402

ALGOS = ("lora", "tlora", "tlora_vanilla", "ortho", "trilora")


def build(algo, dim, rank, batch):
    from networks.tlora_layer import FactorisedAdapter, TimestepState

    torch.manual_seed(0)
    base = torch.nn.Linear(dim, dim).requires_grad_(False)
    layer = FactorisedAdapter("l", base, algo, rank, rank, min_rank=rank // 2)
    with torch.no_grad():
        layer.factor("up").normal_(0, 0.01)
    state = TimestepState()
    state.set(torch.tensor([100, 900][:batch] + [500] * max(0, batch - 2)))
    if layer.spec.masked:
        layer.timestep_state = state
    layer.apply_to()
    return base, layer


def run(base, x):
    out = base(x)
    out.square().mean().backward()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", default="tlora,lora")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.tokens, args.dim)
    layers = {a: build(a, args.dim, args.rank, args.batch) for a in ALGOS}
    bare = torch.nn.Linear(args.dim, args.dim).requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    times = {a: [] for a in ALGOS}
    times["bare Linear"] = []
    for _ in range(args.rounds):  # interleaved rounds, median of per-round means
        for a in ALGOS:
            base, _ = layers[a]
            run(base, x)
            start = measure.now()
            for _ in range(args.iters):
                run(base, x)
            times[a].append((measure.now() - start) / args.iters)
        start = measure.now()
        for _ in range(args.iters):
            bare(xg).square().mean().backward()
        times["bare Linear"].append((measure.now() - start) / args.iters)
    base_t = measure.median(times["lora"])
    print(f"dim {args.dim}, tokens {args.tokens}, batch {args.batch}, rank {args.rank}, threads {args.threads}")
    print("| variant | ms (fwd+bwd) | ratio to lora | adapter cost above the bare Linear, ratio to lora's |")
    print("|---|---|---|---|")
    bare_t = measure.median(times["bare Linear"])
    for a, t in times.items():
        m = measure.median(t)
        extra = (m - bare_t) / max(1e-12, base_t - bare_t)
        print(f"| {a} | {m * 1e3:.2f} | {m / base_t:.2f}x | {extra:.2f}x |")
    from torch.profiler import ProfilerActivity, profile

    for a in [s for s in args.profile.split(",") if s]:
        base, _ = layers[a]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.iters):
                run(base, x)
        print(f"\n### torch.profiler, {a}, {args.iters} iterations (self CPU time)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
