"""Bring other T-LoRA implementations' files into networks.tlora's native format.

- Official T-LoRA SD-XL checkpoints (ControlGenAI/T-LoRA, `unet.save_attn_procs`): diffusers
  attention-processor keys `<block path>.attn1.processor.to_q_lora.down.weight` / `.up.weight`
  (vanilla T-LoRA) or `.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`, `.base_q.weight`,
  `.base_p.weight`, `.base_lambda` (Ortho-LoRA / full T-LoRA). No alpha (scale 1). Rank, min_rank,
  the schedule power (`alpha_rank_scale`) and sig_type live in the run's hparams.yml, not in the file.
- LyCORIS `algo=tlora` files: `<kohya name>.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`
  [1, R], `.alpha`. LyCORIS does not save the frozen copy; its loader rebuilds it from the SVD of the
  pretrained weight W (sig_type "principal" by default): P0 = U[:, :R], λ0 = S[:R], Q0 = Vh[:R]. So
  importing needs the base model's weights (`--base-model`, a diffusers folder), and min_rank (the
  trainer passes it to LyCORIS at run time; it is not in the file).
"""

import json
import os
import re
from typing import Callable, Dict, Mapping, Optional

import torch

from networks.tlora_format import NetworkConfig, TLoRAFormatError, atomic_save_safetensors, build_metadata, read_safetensors
from networks.tlora_layer import singular_slice

from . import naming
from .convert import _check_paths
from .core import ConversionError, parse_dtype

_OFFICIAL_LORA_RE = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(.+)$")
_OFFICIAL_ROLES = {
    "down.weight": "lora_down.weight",
    "up.weight": "lora_up.weight",
    "q_layer.weight": "svd_down.weight",
    "p_layer.weight": "svd_up.weight",
    "lambda_layer": "svd_lambda",
    "base_q.weight": "svd_down_base.weight",
    "base_p.weight": "svd_up_base.weight",
    "base_lambda": "svd_lambda_base",
}


def read_hparams(path: str) -> Dict[str, object]:
    """The few fields of an official run's hparams.yml we need, parsed as plain `key: value` data
    (no YAML object tags are evaluated)."""
    wanted = {"lora_rank", "min_rank", "alpha_rank_scale", "sig_type", "trainer_type", "pretrained_model_name_or_path"}
    out: Dict[str, object] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$", line)
            if not m or m.group(1) not in wanted:
                continue
            value = m.group(2).strip("'\"")
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
            out[m.group(1)] = value
    return out


def _check_out(in_path, out_path):
    try:
        _check_paths(in_path, out_path)
    except ConversionError:
        raise


def import_official(
    in_path: str,
    out_path: str,
    rank: Optional[int] = None,
    min_rank: Optional[int] = None,
    power: Optional[float] = None,
    hparams: Optional[str] = None,
    masked: bool = True,
    naming_mode: str = "sgm",
    layers_per_block: int = 2,
    sig_type: Optional[str] = None,
) -> Dict[str, object]:
    """Official T-LoRA SD-XL checkpoint -> native file. Options override hparams.yml; returns a summary."""
    _check_out(in_path, out_path)
    try:
        tensors, _ = read_safetensors(in_path)
    except (FileNotFoundError, TLoRAFormatError) as e:
        raise ConversionError(str(e)) from None
    params = read_hparams(hparams) if hparams else {}
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _OFFICIAL_LORA_RE.match(key)
        if not m or m.group(3) not in _OFFICIAL_ROLES:
            raise ConversionError(
                f"{in_path}: {key!r} is not an official T-LoRA key (<block>.attnN.processor.to_q_lora.down.weight, ...q_layer.weight, ...)"
            )
        module = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
        name = "lora_unet_" + module.replace(".", "_")
        role = _OFFICIAL_ROLES[m.group(3)]
        if role.startswith("svd_lambda"):
            value = value.reshape(-1)
        layers.setdefault(name, {})[role] = value
    if not layers:
        raise ConversionError(f"{in_path}: no T-LoRA layers found")
    ortho = {"svd_lambda" in t for t in layers.values()}
    if len(ortho) != 1:
        raise ConversionError(f"{in_path}: mixes vanilla (down/up) and Ortho (q_layer/p_layer) layers")
    ortho = ortho.pop()
    file_rank = max(int(t["svd_down.weight" if ortho else "lora_down.weight"].shape[0]) for t in layers.values())
    rank = int(rank if rank is not None else params.get("lora_rank", file_rank))
    if rank != file_rank:
        raise ConversionError(f"--rank {rank} differs from the rank {file_rank} of the file's factors")
    min_rank = int(min_rank if min_rank is not None else params.get("min_rank", 1))  # the official default is 1
    power = float(power if power is not None else params.get("alpha_rank_scale", 1.0))
    sig = sig_type or str(params.get("sig_type", "last"))
    if ortho:
        algo = "tlora" if masked else "ortho"
    else:
        algo = "tlora_vanilla" if masked else "lora"
    out: Dict[str, torch.Tensor] = {}
    for name, t in layers.items():
        down_key = "svd_down.weight" if ortho else "lora_down.weight"
        r = int(t[down_key].shape[0])
        if algo in ("tlora", "tlora_vanilla") and r != rank:
            raise ConversionError(f"{name}: rank {r} differs from {rank}; networks.tlora needs one rank for masked layers")
        if naming_mode == "sgm":
            name = naming.unet_name_to_sgm(name, layers_per_block)
        for role, value in t.items():
            out[f"{name}.{role}"] = value.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r))  # official code: no alpha/rank factor (scale 1)
    config = NetworkConfig(algo=algo, rank=rank, alpha=float(rank), min_rank=min(min_rank, rank) if algo.startswith("tlora") else rank,
                           rank_schedule_power=power, init=sig if sig in ("last", "principal", "middle") else "last",
                           targets="attention")
    try:
        config.validate("import-official")
    except TLoRAFormatError as e:
        raise ConversionError(str(e)) from None
    meta = build_metadata(config, {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                                   "tlora_imported_from": json.dumps({"source": "official T-LoRA", "file": os.path.basename(in_path)})})
    atomic_save_safetensors(out, out_path, meta)
    return {"algo": algo, "rank": rank, "min_rank": config.min_rank, "power": power, "layers": len(layers), "naming": naming_mode}


# ----------------------------------------------------------------------------- LyCORIS


def base_weights_from_diffusers_folder(folder: str, layers_per_block: Optional[int] = None) -> Callable[[str], torch.Tensor]:
    """name -> pretrained weight, read from a diffusers model folder (unet/, text_encoder/, text_encoder_2/)."""
    files = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        sub = os.path.join(folder, component)
        if not os.path.isdir(sub):
            continue
        for fname in sorted(os.listdir(sub)):
            if fname.endswith(".safetensors"):
                files.setdefault(component, []).append(os.path.join(sub, fname))
    if "unet" not in files:
        raise ConversionError(f"--base-model {folder!r}: no unet/*.safetensors found (a diffusers model folder is needed)")
    lpb = layers_per_block
    if lpb is None:
        config_path = os.path.join(folder, "unet", "config.json")
        lpb = 2
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                lpb = naming.layers_per_block_of(json.load(f))
    cache: Dict[str, Dict[str, torch.Tensor]] = {}

    def state(component):
        if component not in cache:
            sd = {}
            for path in files.get(component, []):
                tensors, _ = read_safetensors(path)
                sd.update(tensors)
            cache[component] = sd
        return cache[component]

    def lookup(name: str) -> torch.Tensor:
        two_te = "text_encoder_2" in files
        kname = naming.unet_name_from_sgm(name, lpb) if naming.is_sgm_name(name) else name
        if kname.startswith("lora_te_") and two_te:
            kname = "lora_te1_" + kname[len("lora_te_"):]
        prefix, _ = naming.split_prefix(kname)
        component = naming.DIFFUSERS_COMPONENT[prefix]
        sd = state(component)
        paths = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
        key = naming.kohya_to_diffusers_key(kname, {component: paths})
        path = key[len(component) + 1:] + ".weight"
        if path not in sd:
            raise ConversionError(f"{name}: no weight {component}/{path} in the base model")
        return sd[path]

    return lookup


def import_lycoris(
    in_path: str,
    out_path: str,
    base_weights,
    min_rank: int = 1,
    power: float = 1.0,
    sig_type: str = "principal",
    masked: bool = True,
    dtype=None,
) -> Dict[str, object]:
    """LyCORIS algo=tlora file -> native file. `base_weights`: a diffusers model folder, a mapping
    {kohya name: W} or a callable name -> W (the pretrained weights the frozen copy is rebuilt from)."""
    _check_out(in_path, out_path)
    try:
        tensors, metadata = read_safetensors(in_path)
    except (FileNotFoundError, TLoRAFormatError) as e:
        raise ConversionError(str(e)) from None
    if isinstance(base_weights, str):
        lookup = base_weights_from_diffusers_folder(base_weights)
    elif isinstance(base_weights, Mapping):
        lookup = lambda name: base_weights[name]  # noqa: E731
    elif callable(base_weights):
        lookup = base_weights
    else:
        raise ConversionError("import-lycoris needs the base model (--base-model DIR): LyCORIS files do not hold the frozen copy")
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix in ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha"):
            if key.endswith("." + suffix):
                layers.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            raise ConversionError(f"{in_path}: {key!r} is not a LyCORIS T-LoRA key (q_layer.weight, p_layer.weight, lambda_layer, alpha); "
                                  f"only algo=tlora files are imported")
    if not layers:
        raise ConversionError(f"{in_path}: no LyCORIS T-LoRA layers found")
    out: Dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for name, t in layers.items():
        missing = {"q_layer.weight", "p_layer.weight", "lambda_layer"} - set(t)
        if missing:
            raise ConversionError(f"{name}: missing {sorted(missing)}")
        try:
            naming.split_prefix(name)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        q, p, lam = t["q_layer.weight"].float(), t["p_layer.weight"].float(), t["lambda_layer"].float().reshape(-1)
        r = int(q.shape[0])
        weight = lookup(name)
        if weight is None:
            raise ConversionError(f"{name}: no base weight")
        weight = weight.detach().float()
        if weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
            raise ConversionError(f"{name}: LyCORIS T-LoRA on a {tuple(weight.shape[2:])} convolution is not imported (1x1 and linear only)")
        # float64 SVD: the principal base is most of W, and the change is the small difference
        # P·diag(λ)·Q − P0·diag(λ0)·Q0, so the base must be as exact as fp32 storage allows
        matrix = weight.double().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        if r > s.numel():
            raise ConversionError(f"{name}: rank {r} exceeds the {s.numel()} singular values of the weight")
        sel = singular_slice(s.numel(), r, sig_type)
        p0, lam0, q0 = u[:, sel], s[sel], vh[sel]
        alpha = float(t["alpha"].float().item()) if "alpha" in t else float(r)
        alpha = float(r) if alpha == 0 else alpha
        if p.dim() == 4:
            q0 = q0.reshape(q.shape)
            p0 = p0.reshape(p.shape)
        out[f"{name}.svd_down.weight"] = q.contiguous()
        out[f"{name}.svd_up.weight"] = p.contiguous()
        out[f"{name}.svd_lambda"] = lam.contiguous()
        out[f"{name}.svd_down_base.weight"] = q0.float().contiguous()
        out[f"{name}.svd_up_base.weight"] = p0.float().contiguous()
        out[f"{name}.svd_lambda_base"] = lam0.float().contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
        ranks.add(r)
        alphas.add(alpha)
    out_dtype = parse_dtype(dtype)
    if out_dtype is not None:
        out = {k: (v if k.endswith(".alpha") else v.to(out_dtype)) for k, v in out.items()}
    if len(ranks) != 1 and masked:
        raise ConversionError(f"ranks {sorted(ranks)} differ between layers; networks.tlora's masked algos need one rank")
    rank = max(ranks)
    config = NetworkConfig(algo="tlora" if masked else "ortho", rank=rank, alpha=alphas.pop() if len(alphas) == 1 else float(rank),
                           min_rank=min(int(min_rank), rank) if masked else rank, rank_schedule_power=float(power),
                           init=sig_type, init_source="weight")
    try:
        config.validate("import-lycoris")
    except TLoRAFormatError as e:
        raise ConversionError(str(e)) from None
    extra = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")}
    extra["tlora_imported_from"] = json.dumps({"source": "LyCORIS algo=tlora", "file": os.path.basename(in_path), "sig_type": sig_type})
    atomic_save_safetensors(out, out_path, build_metadata(config, extra))
    return {"algo": config.algo, "rank": rank, "min_rank": config.min_rank, "layers": len(layers)}
