"""Measurement helpers for bench/run.py: timers, peak-memory probes, machine description."""

import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List


def now() -> float:
    return time.perf_counter()


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- memory
#
# CPU tensors live in the process heap, so the operating system's resident-set high-water mark
# (VmHWM) is what a user's machine must hold. tracemalloc does not see torch's allocations and
# torch has no allocator statistics on CPU, so: one fresh subprocess per variant, the HWM reset
# (Linux clear_refs = 5) once the frozen model is built, then the peak read after the steps.
# The reset drops the model-building transients, so the figure is the peak of the steady
# training state: model + network + optimiser state + activations of one step.


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(match.group(1)) if match else -1


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return kib / 2**20
    except (OSError, AttributeError):
        return float("nan")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> Dict[str, str]:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_mem_total_gib():.1f} GiB",
        "torch threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    for name in ("torch", "diffusers", "transformers", "safetensors", "peft", "accelerate"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: say so
            info[name] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        info["project commit"] = commit or "?"
    except (OSError, subprocess.SubprocessError):
        info["project commit"] = "?"
    return info
