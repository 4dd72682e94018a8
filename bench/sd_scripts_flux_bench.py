#!/usr/bin/env python
"""Step time and memory inside sd-scripts' own FLUX training loop (flux_train_network.py through
bench/sd_scripts_flux_harness.py): networks.tlora (tlora, tlora_vanilla) vs sd-scripts'
networks.lora_flux at the same rank, runs interleaved in one session, one process per run.

Per run: CPU seconds and wall seconds of every training step (the harness's on_step_start
timestamps; the first step, which includes warm-up, is left out of the means), the resident set
size (RSS) at the start of the first step (models, network and optimizer built) and the peak RSS of
the process. "loop extra" = peak RSS − RSS at the first step = what training adds (activations,
gradients, optimizer state).

    /work/sdenv/bin/python bench/sd_scripts_flux_bench.py --flux-size medium --rank 16 --steps 8 --rounds 3 \
        --out /work/runs/flux_bench
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {  # name: (module, network_args, extra child options)
    "lora_flux": ("networks.lora_flux", [], []),
    # lora_flux without its per-step update_grad_norms (two dense out x in products per layer and step,
    # which train_network.py calls whenever the network has the method): the adapter math alone
    "lora_flux_no_grad_norms": ("networks.lora_flux", [], ["--no-grad-norms"]),
    "tlora_vanilla": ("networks.tlora", ["algo=tlora_vanilla"], []),
    "tlora": ("networks.tlora", ["algo=tlora"], []),
}


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def one(argv):
    """Inside the child: the harness with an RSS probe at every step start."""
    sys.path.insert(0, HERE)
    import sd_scripts_flux_harness as H

    while HERE in sys.path:
        sys.path.remove(HERE)
    if "--no-grad-norms" in argv:
        argv = [a for a in argv if a != "--no-grad-norms"]
        h = H.parse_harness_args(argv)
        H.base.setup_paths(h.sd_scripts, h.project_root)
        import importlib

        lora_flux = importlib.import_module("networks.lora_flux")
        del lora_flux.LoRANetwork.update_grad_norms  # hasattr(network, "update_grad_norms") is then False
    rss = []
    orig_make_trainer = H.make_trainer

    def make_trainer(*a, **k):
        trainer = orig_make_trainer(*a, **k)
        orig_step = trainer.on_step_start

        def on_step_start(*sa, **sk):
            rss.append(round(rss_gb(), 4))
            return orig_step(*sa, **sk)

        trainer.on_step_start = on_step_start
        return trainer

    H.make_trainer = make_trainer
    rc = H.main(argv)
    print("BENCH_RSS " + json.dumps({"rss_at_step_start_gb": rss,
                                     "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}), flush=True)
    return rc


def parse_line(text, tag):
    for line in text.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        sys.exit(one(sys.argv[2:]))
    p = argparse.ArgumentParser()
    p.add_argument("--flux-size", default="medium")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names of VARIANTS, optionally <name>@<project root>")
    p.add_argument("--extra", nargs="*", default=[], help="more harness options, e.g. --gradient-checkpointing")
    p.add_argument("--out", default="/work/runs/flux_bench")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs = []
    for r in range(a.rounds):
        order = a.variants if r % 2 == 0 else list(reversed(a.variants))
        for name in order:
            # "<variant>@<dir>": the same variant with the networks/ of another project copy (e.g. before a change)
            base_name, _, root = name.partition("@")
            module, net_args, child = VARIANTS[base_name]
            child = child + (["--project-root", root] if root else [])
            cmd = [sys.executable, os.path.abspath(__file__), "--one", "--network-module", module, "--flux-size", a.flux_size,
                   "--steps", str(a.steps), "--threads", "1", "--unet-only", "--cache-te", "--network-dim", str(a.rank),
                   "--network-alpha", str(a.rank), "--workdir", os.path.join(a.out, f"{name.replace('/', '_')}_{r}"), *child, *a.extra]
            if net_args:
                cmd += ["--network-args", *net_args]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            summary = parse_line(proc.stdout, "HARNESS_SUMMARY") or {}
            memory = parse_line(proc.stdout, "BENCH_RSS") or {}
            with open(os.path.join(a.out, f"{name.replace('/', '_')}_{r}.log"), "w") as f:
                f.write(proc.stdout + proc.stderr)
            cpu = summary.get("step_cpu_seconds") or []
            wall = summary.get("step_seconds") or []
            rss = memory.get("rss_at_step_start_gb") or [None]
            run = {"variant": name, "round": r, "rc": proc.returncode, "status": summary.get("status"), "cpu_steps": cpu, "wall_steps": wall,
                   "cpu_mean": statistics.mean(cpu[1:]) if len(cpu) > 1 else None,
                   "wall_mean": statistics.mean(wall[1:]) if len(wall) > 1 else None,
                   "rss_first_step_gb": rss[0], "peak_rss_gb": memory.get("peak_rss_gb"),
                   "trainable_params": summary.get("trainable_params"), "seconds": round(time.time() - t0, 1),
                   "command": " ".join(cmd[1:])}
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("variant", "round", "rc", "cpu_mean", "wall_mean", "rss_first_step_gb", "peak_rss_gb",
                                                  "trainable_params")}), flush=True)
    table = {}
    for name in a.variants:
        mine = [r for r in runs if r["variant"] == name and r["cpu_mean"] is not None]
        if not mine:
            continue
        cpu = [s for r in mine for s in r["cpu_steps"][1:]]
        wall = [s for r in mine for s in r["wall_steps"][1:]]
        table[name] = {"cpu_median": statistics.median(cpu), "cpu_mean": statistics.mean(cpu), "wall_median": statistics.median(wall),
                       "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in mine),
                       "loop_extra_gb": statistics.median(r["peak_rss_gb"] - r["rss_first_step_gb"] for r in mine),
                       "trainable_params": mine[0]["trainable_params"], "steps_measured": len(cpu)}
    for base_name in ("lora_flux", "lora_flux_no_grad_norms"):
        base = table.get(base_name)
        if not base:
            continue
        tag = "" if base_name == "lora_flux" else "_vs_no_grad_norms"
        for name, row in table.items():
            row["cpu_ratio" + tag] = row["cpu_median"] / base["cpu_median"]
            row["wall_ratio" + tag] = row["wall_median"] / base["wall_median"]
            row["peak_rss_ratio" + tag] = row["peak_rss_gb"] / base["peak_rss_gb"]
            row["loop_extra_ratio" + tag] = row["loop_extra_gb"] / base["loop_extra_gb"] if base["loop_extra_gb"] > 0 else None
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump({"args": vars(a), "runs": runs, "table": table}, f, indent=1)
    print("BENCH_TABLE " + json.dumps(table), flush=True)


if __name__ == "__main__":
    main()
