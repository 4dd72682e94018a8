#!/usr/bin/env python
"""Every FLUX configuration of bench/sd_scripts_run.md's FLUX section through real sd-scripts
(bench/sd_scripts_flux_check.py, one process per run), and a Markdown table of the results.

    /work/sdenv/bin/python bench/sd_scripts_flux_matrix.py --out /work/runs/flux_matrix [--only NAME ...]
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = ["--steps", "3", "--threads", "1", "--network-dim", "8", "--network-alpha", "4"]
MASKED_ARGS = ["min_rank=3"]  # neither default: the config field's 2, nor 0.5 · rank = 4

RUNS = {
    "tlora": (["algo=tlora"] + MASKED_ARGS, []),
    "tlora_vanilla": (["algo=tlora_vanilla"] + MASKED_ARGS, []),
    "ortho": (["algo=ortho"], []),
    "trilora": (["algo=trilora"], []),
    "lora": (["algo=lora"], []),
    "tlora_gc": (["algo=tlora"] + MASKED_ARGS, ["--gradient-checkpointing"]),
    "tlora_bf16_fp8": (["algo=tlora"] + MASKED_ARGS, ["--mixed-precision", "bf16", "--fp8-base"]),
    "tlora_vanilla_bf16_fp8_gc": (["algo=tlora_vanilla"] + MASKED_ARGS, ["--mixed-precision", "bf16", "--fp8-base", "--gradient-checkpointing"]),
    "tlora_swap": (["algo=tlora"] + MASKED_ARGS, ["--flux-size", "128:3:4", "--blocks-to-swap", "2"]),
    "tlora_cache_te_unet_only_sample": (["algo=tlora"] + MASKED_ARGS, ["--cache-te", "--unet-only", "--sample"]),
    "tlora_t5xxl": (["algo=tlora", "train_t5xxl=True"] + MASKED_ARGS, []),
    "tlora_split_qkv": (["algo=tlora", "split_qkv=True"] + MASKED_ARGS, []),
    "tlora_single": (["algo=tlora", "train_blocks=single"] + MASKED_ARGS, []),
    "tlora_double0": (["algo=tlora", "train_double_block_indices=0"] + MASKED_ARGS, []),
    "tlora_cpu_offload_gc": (["algo=tlora"] + MASKED_ARGS, ["--gradient-checkpointing", "--cpu-offload-checkpointing"]),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/work/runs/flux_matrix")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rows = []
    for name, (net_args, flags) in RUNS.items():
        if a.only and name not in a.only:
            continue
        work = os.path.join(a.out, name)
        cmd = [a.python, os.path.join(HERE, "sd_scripts_flux_check.py"), "--network-module", "networks.tlora", *COMMON, *flags,
               "--workdir", work, "--network-args", *net_args]
        t0 = time.time()
        with open(os.path.join(a.out, name + ".log"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        check = {}
        if os.path.exists(os.path.join(work, "check.json")):
            with open(os.path.join(work, "check.json")) as f:
                check = json.load(f)
        result = {}
        if os.path.exists(os.path.join(work, "result.json")):
            with open(os.path.join(work, "result.json")) as f:
                result = json.load(f)
        row = {"name": name, "rc": rc, "seconds": round(time.time() - t0, 1), "command": " ".join(cmd[1:]), "check": check,
               "error_tail": (result.get("error") or "").strip().splitlines()[-1:] if result.get("error") else None}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "rc", "seconds", "error_tail")}), flush=True)
    with open(os.path.join(a.out, "matrix.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    print(markdown(rows))


def markdown(rows):
    out = ["| run | network_args / flags | result | DiT layers (ours / lora_flux) | TE layers (T5) | masks checked: train / in backward / sampling | "
           "sigma dtype | reloaded file: max abs diff | to-kohya keys = lora_flux's | s/step (wall) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row["check"]
        net_args, flags = RUNS[row["name"]]
        if not c or "dit_layers" not in c:
            out.append(f"| {row['name']} | {' '.join(net_args)} {' '.join(flags)} | **fail**: {(row['error_tail'] or c.get('errors') or ['?'])[0][:90]} | | | | | | | |")
            continue
        kinds = c.get("mask_calls_by_kind")
        masks = f"{kinds['train']} / {kinds['backward']} / {kinds['sampling']} ok" if kinds else "(unmasked)"
        dit = f"{c['dit_layers']} / {c['lora_flux_dit_layers']}" + (f" ({c['split_parts']} parts)" if c.get("split_parts") else "")
        out.append(f"| {row['name']} | {' '.join(net_args)} {' '.join(flags)} | {'ok' if c['ok'] else 'FAIL ' + '; '.join(c['errors'])[:120]} | {dit} | "
                   f"{c['te_layers']} ({c['te3_layers']}) | {masks} | {', '.join(s.replace('torch.', '') for s in c.get('sigma_dtypes') or []) or '-'} | "
                   f"{c['roundtrip_max_abs_diff']:.1e} | {'yes' if not any('to-kohya' in e for e in c['errors']) else 'no'} ({c['kohya_tensors']}) | "
                   f"{', '.join(f'{v:.2f}' for v in (c.get('step_seconds') or []))} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
