"""Bring other T-LoRA implementations' files into networks.tlora's native format.

- Official T-LoRA SD-XL checkpoints (ControlGenAI/T-LoRA, `unet.save_attn_procs`): diffusers
  attention-processor keys `<block path>.attn1.processor.to_q_lora.down.weight` / `.up.weight`
  (vanilla T-LoRA) or `.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`, `.base_q.weight`,
  `.base_p.weight`, `.base_lambda` (Ortho-LoRA / full T-LoRA). No alpha (scale 1). Rank, min_rank,
  the schedule power (`alpha_rank_scale`) and sig_type live in the run's hparams.yml, not in the file.
- Official T-LoRA FLUX.1 checkpoints (`checkpoint-N/lora.pt`, a pickle of
  `{transformer_blocks|single_transformer_blocks}.N.attn.processor.<proj>_lora.{down,up}.weight`):
  vanilla T-LoRA on diffusers' separate projections (to_q/k/v, to_out, add_q/k/v_proj as
  to_q_proj/...; single blocks use only q/k/v, their other adapters never train and stay zero).
  Read with torch.load(weights_only=True), which refuses any pickled object that is not a tensor
  or a plain container (no code runs); rank and min_rank from the options or the run's hparams.yml.
- LyCORIS `algo=tlora` files: `<kohya name>.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`
  [1, R], `.alpha`. LyCORIS does not save the frozen copy; its loader rebuilds it from the SVD of the
  pretrained weight W (sig_type "principal" by default): P0 = U[:, :R], λ0 = S[:R], Q0 = Vh[:R]. So
  importing needs the base model's weights (`--base-model`, a diffusers folder), and min_rank (the
  trainer passes it to LyCORIS at run time; it is not in the file).

Every file written here passes networks.tlora's own validation first (write_native).
"""

import json
import os
import re
from typing import Callable, Dict, Mapping, Optional

import torch

from networks.tlora_families import (
    FLUX,
    FLUX_DIFFUSERS,
    SDXL,
    SDXL_SGM,
    SD_UNET,
    check_layers_per_block,
    is_sgm_name,
    kohya_name,
    layers_per_block_of,
    module_path,
    split_prefix,
    unet_name_from_sgm,
    unet_name_to_sgm,
)
from networks.tlora_format import NetworkConfig, TLoRAFormatError, read_safetensors, write_native
from networks.tlora_layer import singular_slice

from .convert import _check_paths
from .core import ConversionError, parse_dtype

_OFFICIAL_SDXL_RE = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(.+)$")
_OFFICIAL_FLUX_RE = re.compile(r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\.processor\."
                               r"(to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj)_lora\.(down|up)\.weight$")
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
# the official FLUX processor's adapters -> diffusers module of the attention block
_OFFICIAL_FLUX_MODULES = {"to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v", "to_out": "attn.to_out.0",
                          "to_q_proj": "attn.add_q_proj", "to_k_proj": "attn.add_k_proj", "to_v_proj": "attn.add_v_proj"}
_HPARAMS = {"lora_rank", "rank", "min_rank", "alpha_rank_scale", "sig_type", "trainer_type", "pretrained_model_name_or_path"}


def read_hparams(path: str) -> Dict[str, object]:
    """The few fields of an official run's hparams.yml we need, parsed as plain `key: value` data
    (no YAML object tags are evaluated)."""
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(path) else "is not a file"
        raise ConversionError(f"--hparams {path} {what}; give the run's logs/hparams.yml")
    out: Dict[str, object] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise ConversionError(f"--hparams {path} is not a UTF-8 text file; give the run's logs/hparams.yml") from None
    for line in lines:
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$", line)
        if not m or m.group(1) not in _HPARAMS:
            continue
        value = m.group(2).strip("'\"")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[m.group(1)] = value
    for key in ("lora_rank", "rank", "min_rank"):
        if key in out and (not isinstance(out[key], int) or out[key] < 0):
            raise ConversionError(f"--hparams {path}: {key}: {out[key]!r} is not a whole number >= 0")
    if "alpha_rank_scale" in out and not (isinstance(out["alpha_rank_scale"], (int, float)) and out["alpha_rank_scale"] > 0):
        raise ConversionError(f"--hparams {path}: alpha_rank_scale: {out['alpha_rank_scale']!r} is not a number > 0")
    return out


def _read_official(in_path: str) -> Dict[str, torch.Tensor]:
    """An official checkpoint: safetensors, or the FLUX trainer's pickle read with
    torch.load(weights_only=True) (tensors and plain containers only; anything else is refused)."""
    if in_path.endswith((".pt", ".pth", ".bin")):
        if not os.path.isfile(in_path):
            raise ConversionError(f"{in_path}: no such file")
        import pickle

        try:
            state = torch.load(in_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ConversionError(f"{in_path}: refused: the pickle holds objects other than tensors and plain containers, which are "
                                  f"never loaded (no code ran); an official lora.pt holds tensors only") from None
        except (RuntimeError, EOFError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConversionError(f"{in_path}: not a readable PyTorch checkpoint ({first_line})") from None
        if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise ConversionError(f"{in_path}: expected a flat dict of tensors (an official T-LoRA lora.pt)")
        return dict(state)
    try:
        tensors, _ = read_safetensors(in_path)
    except TLoRAFormatError as e:
        raise ConversionError(str(e)) from None
    return tensors


def _positive_int(name, value, low=0):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConversionError(f"{name} {value!r} must be a whole number >= {low}")
    return value


def import_official(
    in_path: str,
    out_path: str,
    rank: Optional[int] = None,
    min_rank: Optional[int] = None,
    power: Optional[float] = None,
    hparams: Optional[str] = None,
    masked: bool = True,
    naming_mode: Optional[str] = None,
    layers_per_block: int = 2,
    sig_type: Optional[str] = None,
) -> Dict[str, object]:
    """Official T-LoRA checkpoint (SD-XL or FLUX.1) -> native file. Options override hparams.yml;
    returns a summary. --min-rank above the rank is refused, not clamped."""
    _check_paths(in_path, out_path)
    _positive_int("--rank", rank, 1)
    _positive_int("--min-rank", min_rank)
    if power is not None and not (isinstance(power, (int, float)) and power > 0 and power == power and power != float("inf")):
        raise ConversionError(f"--power {power!r} must be a number > 0")
    try:
        check_layers_per_block(layers_per_block)
    except ValueError as e:
        raise ConversionError(f"--layers-per-block: {e}") from None
    params = read_hparams(hparams) if hparams else {}
    tensors = _read_official(in_path)
    if not tensors:
        raise ConversionError(f"{in_path}: the checkpoint holds no tensors")
    if any(_OFFICIAL_FLUX_RE.match(k) for k in tensors):
        family, layers = FLUX, _official_flux_layers(in_path, tensors)
        layout_name = naming_mode or FLUX_DIFFUSERS.name
        if layout_name != FLUX_DIFFUSERS.name:
            raise ConversionError(f"--naming {layout_name}: official FLUX adapters sit on diffusers' separate projections; the native "
                                  f"file keeps diffusers names (to-kohya writes sd-scripts' fused names)")
    else:
        family, layers = SDXL, _official_sdxl_layers(in_path, tensors)
        layout_name = naming_mode or SDXL_SGM.name
        if layout_name not in (SDXL_SGM.name, SD_UNET.name):
            raise ConversionError(f"--naming {layout_name!r} is not an SDXL layout; use sgm or diffusers")
    kinds = {"svd_lambda" in t for t in layers.values()}
    if len(kinds) != 1:
        raise ConversionError(f"{in_path}: mixes vanilla (down/up) and Ortho (q_layer/p_layer) layers")
    ortho = kinds.pop()
    down_key = "svd_down.weight" if ortho else "lora_down.weight"
    file_ranks = {int(t[down_key].shape[0]) for t in layers.values() if down_key in t}
    if len(file_ranks) != 1:
        raise ConversionError(f"{in_path}: layers of different ranks {sorted(file_ranks)}; official runs use one rank")
    file_rank = file_ranks.pop()
    rank = int(rank if rank is not None else params.get("lora_rank", params.get("rank", file_rank)))
    if rank != file_rank:
        raise ConversionError(f"--rank {rank} (or hparams.yml) differs from the rank {file_rank} of the file's factors")
    min_rank = int(min_rank if min_rank is not None else params.get("min_rank", 1))  # the official default is 1
    if masked and min_rank > rank:
        raise ConversionError(f"--min-rank {min_rank} is larger than the rank {rank}; give 0..{rank}")
    power = float(power if power is not None else params.get("alpha_rank_scale", 1.0))
    sig = sig_type or str(params.get("sig_type", "last"))
    algo = ("tlora" if masked else "ortho") if ortho else ("tlora_vanilla" if masked else "lora")
    out: Dict[str, torch.Tensor] = {}
    for name, t in layers.items():
        if family is SDXL and layout_name == SDXL_SGM.name:
            name = unet_name_to_sgm(name, layers_per_block)
        for role, value in t.items():
            out[f"{name}.{role}"] = value
        out[f"{name}.alpha"] = torch.tensor(float(rank))  # official code: no alpha/rank factor (scale 1)
    config = NetworkConfig(algo=algo, rank=rank, alpha=float(rank), min_rank=min_rank if masked else rank, rank_schedule_power=power,
                           init=sig if sig in ("last", "principal", "middle") else "last", targets="attention", family=family.name,
                           layout=layout_name)
    extra = family.lora_metadata()
    extra["tlora_imported_from"] = json.dumps({"source": f"official T-LoRA ({family.title})", "file": os.path.basename(in_path)})
    _write(out, out_path, config, extra, in_path)
    return {"algo": algo, "family": family.name, "rank": rank, "min_rank": config.min_rank, "power": power, "layers": len(layers),
            "naming": layout_name}


def _write(tensors, out_path, config, extra, source):
    try:
        write_native(tensors, out_path, config, extra)
    except TLoRAFormatError as e:
        raise ConversionError(f"{source}: the imported network is not valid, nothing written: {e}") from None


def _official_sdxl_layers(in_path, tensors) -> Dict[str, Dict[str, torch.Tensor]]:
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _OFFICIAL_SDXL_RE.match(key)
        if not m or m.group(3) not in _OFFICIAL_ROLES:
            raise ConversionError(
                f"{in_path}: {key!r} is not an official T-LoRA key (<block>.attnN.processor.to_q_lora.down.weight, ...q_layer.weight, ...)"
            )
        module = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
        name = "lora_unet_" + module.replace(".", "_")
        role = _OFFICIAL_ROLES[m.group(3)]
        layers.setdefault(name, {})[role] = value.reshape(-1) if role.startswith("svd_lambda") else value
    return layers


def _official_flux_layers(in_path, tensors) -> Dict[str, Dict[str, torch.Tensor]]:
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _OFFICIAL_FLUX_RE.match(key)
        if not m:
            raise ConversionError(f"{in_path}: {key!r} is not an official T-LoRA FLUX key "
                                  f"(transformer_blocks.N.attn.processor.to_q_lora.down.weight, ...)")
        blocks, index, proj, role = m.groups()
        path = f"{blocks}.{index}.{_OFFICIAL_FLUX_MODULES[proj]}"
        layers.setdefault(path, {})["lora_down.weight" if role == "down" else "lora_up.weight"] = value
    out = {}
    for path, t in layers.items():
        if set(t) != {"lora_down.weight", "lora_up.weight"}:
            raise ConversionError(f"{in_path}: adapter {path} lacks its {'up' if 'lora_up.weight' not in t else 'down'} factor")
        single = path.startswith("single_transformer_blocks.")
        if single and not path.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            # single blocks use only q/k/v: their other adapters exist in the processor but never train
            if bool((t["lora_up.weight"] != 0).any()):
                raise ConversionError(f"{in_path}: {path} is not zero, but single blocks have no such projection in the official code")
            continue
        out[kohya_name(FLUX_DIFFUSERS.prefix, path)] = t
    if not out:
        raise ConversionError(f"{in_path}: no T-LoRA layers found")
    return out


# ----------------------------------------------------------------------------- LyCORIS


def base_weights_from_diffusers_folder(folder: str, layers_per_block: Optional[int] = None) -> Callable[[str], torch.Tensor]:
    """name -> pretrained weight, read from a diffusers model folder (unet/, text_encoder/, text_encoder_2/)."""
    if not os.path.isdir(folder):
        raise ConversionError(f"--base-model {folder!r} is not a folder; give a diffusers model folder (unet/, text_encoder/, ...)")
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
            try:
                with open(config_path, encoding="utf-8") as f:
                    lpb = layers_per_block_of(json.load(f))
            except (ValueError, UnicodeDecodeError) as e:
                raise ConversionError(f"--base-model {config_path}: not a readable U-Net config ({e})") from None
    cache: Dict[str, Dict[str, torch.Tensor]] = {}

    def state(component):
        if component not in cache:
            sd = {}
            for path in files.get(component, []):
                try:
                    tensors, _ = read_safetensors(path)
                except TLoRAFormatError as e:
                    raise ConversionError(f"--base-model: {e}") from None
                sd.update(tensors)
            cache[component] = sd
        return cache[component]

    def lookup(name: str) -> torch.Tensor:
        two_te = "text_encoder_2" in files
        kname = unet_name_from_sgm(name, lpb) if is_sgm_name(name) else name
        if kname.startswith("lora_te_") and two_te:
            kname = "lora_te1_" + kname[len("lora_te_"):]
        prefix, rest = split_prefix(kname)
        component = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}.get(prefix)
        if component is None:
            raise ConversionError(f"{name}: LyCORIS import reads SD / SDXL base models only")
        sd = state(component)
        paths = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
        path = module_path(rest, paths) + ".weight"
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
    _check_paths(in_path, out_path)
    _positive_int("--min-rank", min_rank)
    if not (isinstance(power, (int, float)) and power > 0 and power != float("inf")):
        raise ConversionError(f"--power {power!r} must be a number > 0")
    out_dtype = parse_dtype(dtype)
    try:
        tensors, metadata = read_safetensors(in_path)
    except TLoRAFormatError as e:
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
            raise ConversionError(f"{in_path}: layer {name}: missing {sorted(missing)}")
        try:
            split_prefix(name)
        except ValueError as e:
            raise ConversionError(f"{in_path}: {e}") from None
        for key, value in t.items():
            if not value.is_floating_point():
                raise ConversionError(f"{in_path}: {name}.{key} has dtype {value.dtype}; LoRA tensors must be floating point")
            if not bool(torch.isfinite(value).all()):
                raise ConversionError(f"{in_path}: {name}.{key} holds NaN or infinite values")
        q, p, lam = t["q_layer.weight"].float(), t["p_layer.weight"].float(), t["lambda_layer"].float().reshape(-1)
        r = int(q.shape[0])
        if masked and min_rank > r:
            raise ConversionError(f"--min-rank {min_rank} is larger than the rank {r} of {name}; give 0..{r}")
        weight = lookup(name)
        if weight is None:
            raise ConversionError(f"{name}: no base weight")
        weight = weight.detach().float()
        if weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
            raise ConversionError(f"{name}: LyCORIS T-LoRA on a {tuple(weight.shape[2:])} convolution is not imported (1x1 and linear only)")
        if not bool(torch.isfinite(weight).all()):
            raise ConversionError(f"{name}: the base model's weight holds NaN or infinite values")
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
    if out_dtype is not None:
        out = {k: (v if k.endswith(".alpha") else v.to(out_dtype)) for k, v in out.items()}
    if len(ranks) != 1 and masked:
        raise ConversionError(f"ranks {sorted(ranks)} differ between layers; networks.tlora's masked algos need one rank")
    rank = max(ranks)
    family = SDXL if any(n.startswith(("lora_te1_", "lora_te2_")) or is_sgm_name(n) for n in layers) else None
    config = NetworkConfig(algo="tlora" if masked else "ortho", rank=rank, alpha=alphas.pop() if len(alphas) == 1 else float(rank),
                           min_rank=int(min_rank) if masked else rank, rank_schedule_power=float(power),
                           init=sig_type, init_source="weight", family=family.name if family else None)
    try:
        config.validate("import-lycoris")
    except TLoRAFormatError as e:
        raise ConversionError(str(e)) from None
    extra = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")}
    extra["tlora_imported_from"] = json.dumps({"source": "LyCORIS algo=tlora", "file": os.path.basename(in_path), "sig_type": sig_type})
    _write(out, out_path, config, extra, in_path)
    return {"algo": config.algo, "rank": rank, "min_rank": config.min_rank, "layers": len(layers)}
