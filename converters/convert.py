"""convert_file: a native (or plain kohya / diffusers) LoRA file to a standard kohya or
diffusers/PEFT LoRA file, verified numerically before anything is written."""

import dataclasses
import datetime
import json
import math
import os
from collections import Counter
from typing import Dict, List, Mapping, Optional

import torch

from networks.tlora_format import atomic_save_safetensors

from . import naming
from .core import (
    DTYPE_NAMES,
    DTYPE_TOLERANCE,
    ConversionError,
    Converted,
    LoadedLora,
    MaskSpec,
    detect_family,
    exact_factors,
    load_lora,
    parse_dtype,
    relative_error,
    svd_factors,
)

ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
RESOLUTIONS = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
BASE_MODELS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
MODEL_CARD_MARKER = "<!-- written by tlora-convert -->"


@dataclasses.dataclass
class Report:
    in_path: str
    out_path: str
    target: str
    mask: str
    algo: str
    family: str
    naming: str
    dtype: str
    tolerance: float
    per_module: Dict[str, float]
    predicted: Dict[str, float]
    ranks: Dict[str, int]
    out_size: int = 0
    in_size: int = 0
    written: bool = False
    model_card: Optional[str] = None

    @property
    def max_rel_error(self) -> float:
        return max(self.per_module.values()) if self.per_module else 0.0

    @property
    def mean_rel_error(self) -> float:
        return sum(self.per_module.values()) / len(self.per_module) if self.per_module else 0.0

    def worst(self, n: int = 5):
        return sorted(self.per_module.items(), key=lambda kv: -kv[1])[:n]

    def text(self, worst: int = 5) -> str:
        ranks = Counter(self.ranks.values())
        rank_text = ", ".join(f"{r}x{c}" if len(ranks) > 1 else str(r) for r, c in sorted(ranks.items()))
        lines = [
            f"{self.in_path} -> {self.out_path}",
            f"  source algo={self.algo} family={self.family}; target={self.target} naming={self.naming} mask={self.mask} dtype={self.dtype}",
            f"  modules: {len(self.per_module)}; output rank(s): {rank_text}",
            f"  relative error of the weight change vs the native change at mask={self.mask} (fp32):",
            f"    mean {self.mean_rel_error:.3e}   max {self.max_rel_error:.3e}   tolerance {self.tolerance:.3e} (+ SVD truncation where compressed)",
        ]
        if self.predicted and any(v > 0 for v in self.predicted.values()):
            mean_pred = sum(self.predicted.values()) / len(self.predicted)
            lines.append(f"    SVD: mean discarded-energy error sqrt(sum discarded s^2 / sum s^2) = {mean_pred:.3e}")
        lines.append("  worst modules:")
        for name, err in self.worst(worst):
            lines.append(f"    {err:.3e}  {name}  (rank {self.ranks.get(name)})")
        if self.target == "diffusers" and len(ranks) > 1:
            lines.append(f"  (diffusers output: every module zero-padded to rank {max(ranks)}, so one lora_alpha fits all)")
        lines.append(f"  size: {self.in_size / 1e6:.2f} MB -> {self.out_size / 1e6:.2f} MB" + ("" if self.written else " (not written)"))
        if self.model_card:
            lines.append(f"  model card: {self.model_card}")
        return "\n".join(lines)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _check_paths(in_path: str, out_path: str) -> None:
    if not out_path:
        raise ConversionError("no output path given")
    if _same_file(in_path, out_path):
        raise ConversionError(f"the output {out_path!r} is the input file; choose another name (the input is never overwritten)")
    if not out_path.endswith(".safetensors"):
        raise ConversionError(f"the output {out_path!r} must end in .safetensors (only safetensors is written)")
    if os.path.isdir(out_path):
        raise ConversionError(f"the output {out_path!r} is a directory")


def _output_name(name: str, family: str, naming_mode: str, layers_per_block: int) -> str:
    if not name.startswith(naming.UNET_PREFIX) or family != "sdxl":
        return name
    if naming_mode == "sgm":
        return naming.unet_name_to_sgm(naming.unet_name_from_sgm(name, layers_per_block), layers_per_block)
    return naming.unet_name_from_sgm(name, layers_per_block)


def _zero_pad(c: Converted, rank: int) -> Converted:
    """The same change at a higher rank: zero rows in down, zero columns in up; alpha = rank."""
    extra = rank - c.rank
    if extra <= 0:
        return c
    down = torch.cat([c.down, torch.zeros(extra, *c.down.shape[1:], dtype=c.down.dtype)], 0)
    up = torch.cat([c.up, torch.zeros(c.up.shape[0], extra, *c.up.shape[2:], dtype=c.up.dtype)], 1)
    return dataclasses.replace(c, down=down, up=up, alpha=float(rank))


def loader_safe_alpha(converted: List[Converted]) -> List[Converted]:
    """Choose the ranks and alphas written to a kohya file so that every loader applies the same
    change.

    U-Net modules: one rank for all of them (zero-padded where a module has fewer) with
    alpha = rank (scale 1), the alpha/rank scale folded into the factors. Text-encoder modules:
    one alpha for all of them (the most common output rank), the rest of each module's scale
    folded into its factors.
    Why: diffusers reads kohya files with quirks. 0.32, when U-Net ranks differ, sets every
    U-Net module's scale to 1; 0.42 drops the per-module alphas of attention projections (their
    pattern keys keep the old attention-processor names and match nothing), so those modules get
    the most common alpha over their own rank. With one U-Net rank and alpha = rank neither quirk
    changes anything. For text encoders a single lora_alpha is what every version applies. A file
    that obeys these rules means the same thing to diffusers, A1111, Forge and ComfyUI."""
    te = [c for c in converted if not c.name.startswith(naming.UNET_PREFIX)]
    te_alpha = float(Counter(c.rank for c in te).most_common(1)[0][0]) if te else None
    unet_ranks = {c.rank for c in converted if c.name.startswith(naming.UNET_PREFIX)}
    unet_rank = max(unet_ranks) if unet_ranks else None
    out = []
    for c in converted:
        is_unet = c.name.startswith(naming.UNET_PREFIX)
        alpha = float(c.rank) if is_unet else te_alpha
        if float(c.alpha) != alpha:
            root = math.sqrt(abs(float(c.alpha) / alpha))
            sign = 1.0 if float(c.alpha) / alpha >= 0 else -1.0
            c = dataclasses.replace(c, down=c.down * root, up=c.up * (root * sign), alpha=alpha)
        out.append(_zero_pad(c, unet_rank) if is_unet else c)
    return out


def convert_layers(loaded: LoadedLora, mask: MaskSpec, rank: Optional[int], keep_energy: Optional[float]) -> List[Converted]:
    out = []
    for layer in loaded.layers.values():
        if rank is None and keep_energy is None:
            out.append(exact_factors(layer, mask))
        else:
            out.append(svd_factors(layer, mask, rank, keep_energy))
    return out


def convert_file(
    in_path: str,
    out_path: str,
    target: str = "kohya",
    mask="full",
    rank: Optional[int] = None,
    keep_energy: Optional[float] = None,
    dtype=None,
    naming: Optional[str] = None,
    base: Optional[str] = None,
    metadata_extra: Optional[Mapping[str, str]] = None,
    model_card=False,
    layers_per_block: int = 2,
    instance_prompt: Optional[str] = None,
    base_model: Optional[str] = None,
    dry_run: bool = False,
) -> Report:
    """Convert a LoRA file; verify the result against the native change; write atomically.

    Raises ConversionError (nothing written) for bad input, bad options or a failed verification."""
    naming_mode = naming
    from . import naming as naming_mod

    if target not in ("kohya", "diffusers"):
        raise ConversionError(f"target {target!r} is unknown; use kohya or diffusers")
    _check_paths(in_path, out_path)
    mask_spec = MaskSpec.parse(mask)
    out_dtype = parse_dtype(dtype)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConversionError(f"--rank {rank!r} must be a whole number >= 1")
    if keep_energy is not None and not (0 < float(keep_energy) <= 1):
        raise ConversionError(f"--keep-energy {keep_energy!r} must be in (0, 1], e.g. 0.99")
    loaded = load_lora(in_path)
    family = base or detect_family(loaded)
    if family not in ARCHITECTURES:
        raise ConversionError(f"--base {family!r} is unknown; use sd1, sd2 or sdxl")
    if naming_mode is None:
        naming_mode = "sgm" if family == "sdxl" else "diffusers"
    if naming_mode not in ("sgm", "diffusers"):
        raise ConversionError(f"--naming {naming_mode!r} is unknown; use sgm or diffusers")
    if naming_mode == "sgm" and family != "sdxl":
        raise ConversionError("--naming sgm is the SDXL convention of sd-scripts; SD 1.x/2.x files use diffusers names")
    if target == "diffusers":
        naming_mode = "diffusers"

    converted = convert_layers(loaded, mask_spec, rank, keep_energy)
    if out_dtype is None:
        src = {loaded.layers[c.name].down.dtype for c in converted}
        out_dtype = src.pop() if len(src) == 1 and next(iter(src)) in DTYPE_TOLERANCE else torch.float32
    tolerance = DTYPE_TOLERANCE[out_dtype]

    tensors: Dict[str, torch.Tensor] = {}
    errors: Dict[str, float] = {}
    predicted: Dict[str, float] = {}
    ranks: Dict[str, int] = {}
    failures = []
    pad_to = max(c.rank for c in converted) if target == "diffusers" else None
    if target == "kohya":
        converted = loader_safe_alpha(converted)
    known_two_te = any(n.startswith(("lora_te1_", "lora_te2_")) for n in loaded.layers)
    for conv in converted:
        layer = loaded.layers[conv.name]
        out_name = _output_name(conv.name, family, naming_mode, layers_per_block)
        if target == "kohya":
            down = conv.down.to(out_dtype).contiguous()
            up = conv.up.to(out_dtype).contiguous()
            alpha = torch.tensor(float(conv.alpha), dtype=torch.float32)
            tensors[f"{out_name}.lora_down.weight"] = down
            tensors[f"{out_name}.lora_up.weight"] = up
            tensors[f"{out_name}.alpha"] = alpha
            stored_scale = float(alpha) / conv.rank
        else:
            # diffusers 0.32 ignores lora_adapter_metadata and uses one lora_alpha (= the first
            # module's rank) for every module: fold the scale into up and pad every module to
            # one rank with zeros, so the scale is 1 for every module in every version.
            up64 = conv.up.double() * (conv.alpha / conv.rank)
            down64 = conv.down.double()
            extra = pad_to - conv.rank
            if extra:
                down64 = torch.cat([down64, torch.zeros(extra, *down64.shape[1:], dtype=down64.dtype)], 0)
                up64 = torch.cat([up64, torch.zeros(up64.shape[0], extra, *up64.shape[2:], dtype=up64.dtype)], 1)
            down, up = down64.to(out_dtype).contiguous(), up64.to(out_dtype).contiguous()
            kname = out_name
            if not known_two_te:
                kname = kname.replace("lora_te_", "lora_te1_", 1)
            key = naming_mod.kohya_to_diffusers_key(kname)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            stored_scale = 1.0
        # verification: the change as a loader computes it from the stored tensors, in fp32
        got = (up.float().reshape(up.shape[0], up.shape[1]) @ down.float().reshape(down.shape[0], -1)).reshape(layer.weight_shape) * stored_scale
        want = layer.native_delta(mask_spec)
        err = relative_error(got, want)
        errors[out_name] = err
        predicted[out_name] = conv.predicted_error
        ranks[out_name] = conv.rank
        if not err <= conv.predicted_error + tolerance:
            failures.append((out_name, err, conv.predicted_error))
    report = Report(in_path, out_path, target, str(mask_spec), loaded.algo, family, naming_mode, DTYPE_NAMES[out_dtype],
                    tolerance, errors, predicted, ranks, in_size=loaded.size)
    if failures:
        worst = sorted(failures, key=lambda f: -f[1])[:5]
        detail = "; ".join(f"{n}: {e:.3e} (allowed {p + tolerance:.3e})" for n, e, p in worst)
        raise ConversionError(
            f"verification failed for {len(failures)} module(s), nothing written: {detail}. "
            f"Non-finite values or a dtype too narrow for these weights (try --dtype fp32)"
        )

    metadata = (_kohya_metadata if target == "kohya" else _diffusers_metadata)(
        loaded, report, converted, rank, keep_energy, out_path, tensors, pad_to
    )
    for key, value in (metadata_extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    if dry_run:
        return report
    atomic_save_safetensors(tensors, out_path, metadata)
    report.written = True
    report.out_size = os.path.getsize(out_path)
    if model_card:
        card_path = model_card if isinstance(model_card, str) else None
        report.model_card = write_model_card(report, out_path, card_path, instance_prompt, base_model or metadata.get("ss_sd_model_name"))
    return report


def _conversion_record(loaded, report, rank, keep_energy) -> str:
    record = {"source_algo": loaded.algo, "source_kind": loaded.kind, "mask": report.mask, "rank": rank, "keep_energy": keep_energy,
              "max_rel_error": report.max_rel_error, "tool": "tlora-convert"}
    if loaded.config is not None:
        record["source_config"] = json.loads(loaded.config.to_json())
    return json.dumps(record, sort_keys=True)


def _kohya_metadata(loaded: LoadedLora, report: Report, converted, rank, keep_energy, out_path, tensors, pad_to) -> Dict[str, str]:
    meta: Dict[str, str] = {}
    for key, value in loaded.metadata.items():  # keep training records (ss_*, modelspec.*) as data
        if key.startswith(("ss_", "modelspec.")) and isinstance(value, str):
            meta[key] = value
    ranks = {c.rank for c in converted}
    alphas = {round(float(c.alpha), 6) for c in converted}
    family = report.family
    title = os.path.splitext(os.path.basename(out_path))[0]
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
            "ss_network_args": json.dumps({}),
            "ss_base_model_version": BASE_VERSIONS[family],
            "ss_v2": str(family == "sd2"),
            "ss_output_name": title,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{ARCHITECTURES[family]}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers",
            "modelspec.title": loaded.metadata.get("modelspec.title", title),
            "modelspec.resolution": loaded.metadata.get("modelspec.resolution", RESOLUTIONS[family]),
            "modelspec.prediction_type": loaded.metadata.get("modelspec.prediction_type", "epsilon"),
            "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
            "modelspec.description": f"{loaded.algo} converted to a standard LoRA with the rank mask '{report.mask}' by tlora-convert",
            "tlora_conversion": _conversion_record(loaded, report, rank, keep_energy),
        }
    )
    return meta


def _diffusers_metadata(loaded: LoadedLora, report: Report, converted, rank, keep_energy, out_path, tensors, pad_to) -> Dict[str, str]:
    """`lora_adapter_metadata`: per component the full PEFT LoraConfig of the file. diffusers >= 0.34
    builds the adapter's LoraConfig from exactly these fields when they are present, so they must
    include target_modules: without it peft tries to guess targets from a transformers
    `model_type`, which diffusers models do not have, and loading fails. The modules are listed
    by full path, which PEFT matches exactly."""
    targets: Dict[str, List[str]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            component, _, module = key[: -len(".lora_A.weight")].partition(".")
            targets.setdefault(component, []).append(module)
    adapter = {}
    for component, modules in sorted(targets.items()):
        adapter[f"{component}.r"] = pad_to
        adapter[f"{component}.lora_alpha"] = pad_to  # scale 1: alpha/rank already in the factors
        adapter[f"{component}.target_modules"] = sorted(modules)
    return {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter, sort_keys=True),
        "tlora_conversion": _conversion_record(loaded, report, rank, keep_energy),
    }


def write_model_card(report: Report, out_path: str, card_path: Optional[str] = None, instance_prompt=None, base_model=None) -> str:
    """README.md beside the output with the YAML header model hubs read."""
    folder = os.path.dirname(os.path.abspath(out_path))
    path = card_path or os.path.join(folder, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if MODEL_CARD_MARKER not in f.read():
                stem = os.path.splitext(os.path.basename(out_path))[0]
                path = os.path.join(folder, f"{stem}.README.md")
    family = report.family
    base_model = base_model or BASE_MODELS[family]
    tags = ["lora", "t-lora" if report.algo.startswith("tlora") else report.algo.replace("_", "-"), "text-to-image",
            "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion", "diffusers", "template:sd-lora"]
    file_name = os.path.basename(out_path)

    def q(text):
        return json.dumps(str(text))

    lines = ["---", f"base_model: {q(base_model)}", "tags:"] + [f"- {t}" for t in dict.fromkeys(tags)]
    if instance_prompt:
        lines.append(f"instance_prompt: {q(instance_prompt)}")
    lines += [f"library_name: {'diffusers' if report.target == 'diffusers' else 'sd-scripts'}", "---", MODEL_CARD_MARKER, ""]
    title = os.path.splitext(file_name)[0]
    lines += [
        f"# {title}",
        "",
        f"A {report.algo} adapter ({'T-LoRA' if report.algo.startswith('tlora') else report.algo}) for {base_model}, "
        f"converted to a standard {'kohya' if report.target == 'kohya' else 'diffusers/PEFT'} LoRA that any loader reads.",
        "",
        f"- Rank mask baked in: `{report.mask}` (T-LoRA's timestep-dependent rank is fixed to one mask in this file;"
        " `mean` is the average mask over timesteps, `full` uses every rank).",
        f"- Output rank(s): {sorted(set(report.ranks.values()))}; dtype {report.dtype}; naming {report.naming}.",
        f"- Conversion error of the weight change: mean {report.mean_rel_error:.2e}, max {report.max_rel_error:.2e}.",
    ]
    if instance_prompt:
        lines.append(f"- Instance prompt: `{instance_prompt}`")
    lines += ["", "## Use", ""]
    if report.target == "diffusers":
        lines += ["```python", f"pipe.load_lora_weights(\".\", weight_name={q(file_name)})", "```"]
    else:
        lines += [f"AUTOMATIC1111 / Forge: put `{file_name}` in `models/Lora` and write `<lora:{title}:1>` in the prompt. "
                  "ComfyUI: LoraLoader. diffusers: `pipe.load_lora_weights(path)`."]
    lines += ["", "Timestep-aware sampling with the native file: `converters.diffusers.apply_tlora(pipe, native_file)`.", ""]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path
