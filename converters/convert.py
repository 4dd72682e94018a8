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

from networks.tlora_families import Family, check_layers_per_block, module_path, split_prefix
from networks.tlora_format import atomic_save_safetensors, with_checksum

from . import layouts
from .core import (
    DTYPE_NAMES,
    DTYPE_TOLERANCE,
    ConversionError,
    Converted,
    LoadedLora,
    exact_factors,
    layer_is_denoiser,
    load_lora,
    parse_dtype,
    parse_mask,
    relative_error,
    resolve_family,
    svd_factors,
)

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
    masked: bool = True

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
            f"  source algo={self.algo} family={self.family}; target={self.target} naming={self.naming} mask={self.mask} dtype={self.dtype}"
            + ("" if self.masked or self.mask == "full" else f" (algo={self.algo} has no timestep mask: --mask changes nothing)"),
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
    parent = os.path.dirname(os.path.abspath(out_path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConversionError(f"the output {out_path!r} cannot be written: {parent} is not a folder")


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
    te = [c for c in converted if not layer_is_denoiser(c.name)]
    te_alpha = float(Counter(c.rank for c in te).most_common(1)[0][0]) if te else None
    unet_ranks = {c.rank for c in converted if layer_is_denoiser(c.name)}
    unet_rank = max(unet_ranks) if unet_ranks else None
    out = []
    for c in converted:
        is_unet = layer_is_denoiser(c.name)
        alpha = float(c.rank) if is_unet else te_alpha
        if float(c.alpha) != alpha:
            root = math.sqrt(abs(float(c.alpha) / alpha))
            sign = 1.0 if float(c.alpha) / alpha >= 0 else -1.0
            c = dataclasses.replace(c, down=c.down * root, up=c.up * (root * sign), alpha=alpha)
        out.append(_zero_pad(c, unet_rank) if is_unet else c)
    return out


def convert_layers(loaded: LoadedLora, mask: str, rank: Optional[int], keep_energy: Optional[float]) -> Dict[str, Converted]:
    out = {}
    for name, layer in loaded.layers.items():
        if rank is None and keep_energy is None:
            out[name] = exact_factors(layer, mask)
        else:
            out[name] = svd_factors(layer, mask, rank, keep_energy)
    return out


def check_options(loaded: LoadedLora, mask: str, rank, keep_energy, layers_per_block) -> None:
    """Options that do not fit the file, refused before anything is computed."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConversionError(f"--rank {rank!r} must be a whole number >= 1")
    if keep_energy is not None and not (isinstance(keep_energy, (int, float)) and 0 < float(keep_energy) <= 1):
        raise ConversionError(f"--keep-energy {keep_energy!r} must be in (0, 1], e.g. 0.99")
    try:
        check_layers_per_block(layers_per_block)
    except ValueError as e:
        raise ConversionError(f"--layers-per-block: {e}") from None
    # (a mask on a file without one changes nothing; the report says so)
    if mask.startswith("t=") and not 0 <= int(mask[2:]) < loaded.num_train_timesteps:
        raise ConversionError(f"--mask {mask} is outside t = 0..{loaded.num_train_timesteps - 1} (T = {loaded.num_train_timesteps})")


def output_layout(family: Family, target: str, naming: Optional[str]) -> str:
    if target == "diffusers":
        if naming not in (None, layouts.diffusers_layout(family)):
            raise ConversionError(f"--naming {naming}: diffusers output always uses diffusers' module names")
        return layouts.diffusers_layout(family)
    names = layouts.layout_names(family)
    if naming is None:
        return family.file_layout.name
    if naming not in names:
        raise ConversionError(f"--naming {naming!r} is not a layout of {family.title} models; use {' or '.join(names)}")
    return naming


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
    if target not in ("kohya", "diffusers"):
        raise ConversionError(f"target {target!r} is unknown; use kohya or diffusers")
    _check_paths(in_path, out_path)
    mask_mode = parse_mask(mask)
    out_dtype = parse_dtype(dtype)
    loaded = load_lora(in_path)
    check_options(loaded, mask_mode, rank, keep_energy, layers_per_block)
    family = resolve_family(loaded, base)
    layout_name = output_layout(family, target, naming)
    if target == "diffusers" and any(name.startswith("lora_te3_") for name in loaded.layers):
        raise ConversionError(
            f"{in_path}: diffusers' FluxPipeline loads no T5 (lora_te3) LoRA; use to-kohya (ComfyUI and Forge load it), "
            f"or train without train_t5xxl"
        )

    sources = convert_layers(loaded, mask_mode, rank, keep_energy)
    plan = layouts.plan({name: layer.weight_shape for name, layer in loaded.layers.items()}, family, layout_name, layers_per_block)
    converted = [layouts.apply(module, sources) for module in plan]
    if out_dtype is None:
        src = {layer.down.dtype for layer in loaded.layers.values()}
        out_dtype = src.pop() if len(src) == 1 and next(iter(src)) in DTYPE_TOLERANCE else torch.float32
    tolerance = DTYPE_TOLERANCE[out_dtype]
    native_deltas = {name: layer.delta(layer.mask_vector(mask_mode)) for name, layer in loaded.layers.items()}

    tensors: Dict[str, torch.Tensor] = {}
    errors: Dict[str, float] = {}
    predicted: Dict[str, float] = {}
    ranks: Dict[str, int] = {}
    failures = []
    pad_to = max(c.rank for c in converted) if target == "diffusers" else None
    if target == "kohya":
        converted = loader_safe_alpha(converted)
    modules = {module.name: module for module in plan}
    for conv in converted:
        module = modules[conv.name]
        if target == "kohya":
            down = conv.down.to(out_dtype).contiguous()
            up = conv.up.to(out_dtype).contiguous()
            alpha = torch.tensor(float(conv.alpha), dtype=torch.float32)
            tensors[f"{conv.name}.lora_down.weight"] = down
            tensors[f"{conv.name}.lora_up.weight"] = up
            tensors[f"{conv.name}.alpha"] = alpha
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
            key = diffusers_key(family, conv.name)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            stored_scale = 1.0
        # verification: the change as a loader computes it from the stored tensors, in fp32
        got = (up.float().reshape(up.shape[0], up.shape[1]) @ down.float().reshape(down.shape[0], -1)) * stored_scale
        want = layouts.reference(module, native_deltas)
        err = relative_error(got.reshape(want.shape), want)
        errors[conv.name] = err
        predicted[conv.name] = conv.predicted_error
        ranks[conv.name] = conv.rank
        if not err <= conv.predicted_error + tolerance:
            failures.append((conv.name, err, conv.predicted_error))
    report = Report(in_path, out_path, target, mask_mode, loaded.algo, family.name, layout_name, DTYPE_NAMES[out_dtype],
                    tolerance, errors, predicted, ranks, in_size=loaded.size, masked=loaded.masked)
    if failures:
        worst = sorted(failures, key=lambda f: -f[1])[:5]
        detail = "; ".join(f"{n}: {e:.3e} (allowed {p + tolerance:.3e})" for n, e, p in worst)
        raise ConversionError(
            f"verification failed for {len(failures)} module(s), nothing written: {detail}. "
            f"Non-finite values or a dtype too narrow for these weights (try --dtype fp32)"
        )

    metadata = (_kohya_metadata if target == "kohya" else _diffusers_metadata)(
        loaded, report, converted, rank, keep_energy, out_path, tensors, pad_to, family
    )
    for key, value in (metadata_extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    if dry_run:
        return report
    atomic_save_safetensors(tensors, out_path, with_checksum(tensors, metadata))
    report.written = True
    report.out_size = os.path.getsize(out_path)
    if model_card:
        card_path = model_card if isinstance(model_card, str) else None
        report.model_card = write_model_card(report, out_path, card_path, instance_prompt, base_model or metadata.get("ss_sd_model_name"))
    return report


def diffusers_key(family: Family, name: str) -> str:
    """'<component>.<dotted module path>' as diffusers/PEFT name a kohya-named layer."""
    prefix, rest = split_prefix(name)
    try:
        component = family.diffusers_component(prefix)
    except KeyError:
        if prefix not in ("lora_te", "lora_te1"):
            raise ConversionError(f"{name}: no diffusers component of {family.title} models takes this layer") from None
        component = "text_encoder"
    return f"{component}.{module_path(rest)}"


def _conversion_record(loaded, report, rank, keep_energy) -> str:
    record = {"source_algo": loaded.algo, "source_kind": loaded.kind, "mask": report.mask, "rank": rank, "keep_energy": keep_energy,
              "max_rel_error": report.max_rel_error, "tool": "tlora-convert"}
    if loaded.config is not None:
        record["source_config"] = json.loads(loaded.config.to_json())
    return json.dumps(record, sort_keys=True)


def _kohya_metadata(loaded: LoadedLora, report: Report, converted, rank, keep_energy, out_path, tensors, pad_to, family: Family) -> Dict[str, str]:
    meta: Dict[str, str] = {}
    for key, value in loaded.metadata.items():  # keep training records (ss_*, modelspec.*) as data
        if key.startswith(("ss_", "modelspec.")) and isinstance(value, str):
            meta[key] = value
    ranks = {c.rank for c in converted}
    alphas = {round(float(c.alpha), 6) for c in converted}
    title = os.path.splitext(os.path.basename(out_path))[0]
    v_prediction = loaded.metadata.get("ss_v_parameterization") == "True"
    classification = family.lora_metadata(v_prediction)
    source_arch = loaded.metadata.get("modelspec.architecture", "")
    if source_arch.endswith("/lora") and loaded.families and loaded.families[0] is family and "modelspec.architecture" in loaded.metadata:
        # the source names its variant (FLUX.1 dev / schnell / Chroma, SD 2 512 / 768-v): keep it
        classification["modelspec.architecture"] = source_arch
        classification["modelspec.implementation"] = loaded.metadata.get("modelspec.implementation", classification["modelspec.implementation"])
    meta.update(classification)
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
            "ss_network_args": json.dumps({}),
            "ss_output_name": title,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.title": loaded.metadata.get("modelspec.title", title),
            "modelspec.resolution": loaded.metadata.get("modelspec.resolution", family.resolution),
            "modelspec.prediction_type": loaded.metadata.get("modelspec.prediction_type", "flow" if family.flow_matching else "epsilon"),
            "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
            "modelspec.description": f"{loaded.algo} converted to a standard LoRA with the rank mask '{report.mask}' by tlora-convert",
            "tlora_conversion": _conversion_record(loaded, report, rank, keep_energy),
        }
    )
    return meta


def _diffusers_metadata(loaded: LoadedLora, report: Report, converted, rank, keep_energy, out_path, tensors, pad_to, family: Family) -> Dict[str, str]:
    """`lora_adapter_metadata`: per component the full PEFT LoraConfig of the file. diffusers >= 0.34
    builds the adapter's LoraConfig from exactly these fields when they are present, so they must
    include target_modules: without it peft tries to guess targets from a transformers
    `model_type`, which diffusers models do not have, and loading fails. The modules are listed
    by full path, which PEFT matches exactly."""
    targets: Dict[str, List[str]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            component, _, module = key[: -len(".lora_A.weight")].partition(".")
            # PEFT matches target names as suffixes of module paths: without CLIP's `text_model.` root
            # they fit the text encoders of transformers 4 (with the root) and 5 (without it)
            targets.setdefault(component, []).append(module.removeprefix("text_model.") if component.startswith("text_encoder") else module)
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
    from networks.tlora_families import get_family

    family = get_family(report.family)
    base_model = base_model or family.official_hub_id
    family_tag = {"sdxl": "stable-diffusion-xl", "flux": "flux"}.get(family.name, "stable-diffusion")
    tags = ["lora", "t-lora" if report.algo.startswith("tlora") else report.algo.replace("_", "-"), "text-to-image",
            family_tag, "diffusers", "template:sd-lora"]
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
