"""The one definition of the networks.tlora file format and of the network's configuration.

Used by the kohya network module, the converters and the standalone trainer alike, so that a
file written by one is read by the others without guessing.

A native file is a safetensors file holding, for every adapted layer `<name>` (kohya names:
`lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...`):

    algo lora, tlora_vanilla     <name>.lora_down.weight  [R, in] or [R, in, kh, kw]
                                 <name>.lora_up.weight    [out, R] or [out, R, 1, 1]
                                 <name>.alpha             0-dim
    algo tlora, ortho, trilora   <name>.svd_down.weight   Q  [R, in] or [R, in, kh, kw]
                                 <name>.svd_up.weight     P  [out, R] or [out, R, 1, 1]
                                 <name>.svd_lambda        λ  [R]
                                 <name>.alpha
    algo tlora, ortho also       <name>.svd_down_base.weight, <name>.svd_up_base.weight,
                                 <name>.svd_lambda_base   frozen copies Q0, P0, λ0

The change of a layer is  multiplier · alpha/R · ( P·diag(λ ⊙ m)·Q − P0·diag(λ0 ⊙ m)·Q0 ).
Files of the λ algorithms deliberately do not use the `lora_up`/`lora_down` names: a loader that
knows only kohya LoRA would otherwise apply P·Q without λ and without the base and produce
garbage silently; with other names it reports unknown keys instead. `converters` turns them
into standard LoRA files.

Metadata (all strings, as safetensors requires): `tlora_format_version`, `tlora_config` (JSON of
`NetworkConfig`), plus whatever the host passes (sd-scripts' ss_* keys, modelspec.*).
"""

import json
import os
import struct
import tempfile
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from .tlora_families import split_prefix
from .tlora_options import (  # noqa: F401  (re-exported: the format's readers use these names)
    ACCEPTED_OPTIONS,
    ALGOS,
    DEFAULT_NUM_TRAIN_TIMESTEPS,
    INIT_SOURCES,
    INITS,
    NETWORK_OPTIONS,
    TARGETS,
    TRAINING_OPTIONS,
    AlgoSpec,
    NetworkConfig,
    TLoRAFormatError,
    TrainingOptions,
    parse_network_args,
)

FORMAT_VERSION = 1
METADATA_VERSION_KEY = "tlora_format_version"
METADATA_CONFIG_KEY = "tlora_config"
# sha256 of the tensors (names, dtypes, shapes, bytes) and of the two keys above: a file changed
# after it was written (a flipped byte, an edited value) is refused instead of loading other numbers
METADATA_CHECKSUM_KEY = "tlora_sha256"
NETWORK_MODULE = "networks.tlora"

# Key suffixes of one layer's tensors, by role. The layer module registers its tensors under
# exactly these names so that `network.state_dict()` keys equal the file's keys (sd-scripts'
# generation scripts call `network.load_state_dict(file_tensors)` directly).
KOHYA_KEYS = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}
SVD_KEYS = {
    "down": "svd_down.weight",
    "up": "svd_up.weight",
    "lambda": "svd_lambda",
    "down_base": "svd_down_base.weight",
    "up_base": "svd_up_base.weight",
    "lambda_base": "svd_lambda_base",
    "alpha": "alpha",
}


def key_names(algo: str) -> Dict[str, str]:
    """Role -> key suffix for one layer of `algo`."""
    spec = ALGOS[algo]
    if not spec.has_lambda:
        return dict(KOHYA_KEYS)
    keys = {k: SVD_KEYS[k] for k in ("down", "up", "lambda", "alpha")}
    if spec.has_base:
        keys.update({k: SVD_KEYS[k] for k in ("down_base", "up_base", "lambda_base")})
    return keys


ALL_SUFFIXES = tuple(sorted(set(KOHYA_KEYS.values()) | set(SVD_KEYS.values()), key=len, reverse=True))


# ----------------------------------------------------------------------------- file reading

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _describe_non_safetensors(head: bytes) -> Optional[str]:
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (torch.save)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return None


def describe_path_kind(path: str) -> str:
    """'a directory', 'a named pipe (FIFO)', ... for a path that exists but is not a regular file."""
    import stat

    mode = os.stat(path).st_mode
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def check_safetensors_file(path: str) -> None:
    """Validate a file's existence and safetensors framing without reading tensor data."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise TLoRAFormatError(f"{path}: no such file; check the path") from None
    except PermissionError:
        raise TLoRAFormatError(f"{path}: permission denied (a folder on the way cannot be entered); check the permissions") from None
    if not os.path.isfile(path):
        raise TLoRAFormatError(f"{path} is {describe_path_kind(path)}, not a LoRA file; give a .safetensors file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except PermissionError:
        raise TLoRAFormatError(f"{path}: permission denied; make the file readable or copy it somewhere readable") from None
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    looks_like_safetensors = header_len is not None and head[8:9] == b"{" and header_len + 8 <= size
    kind = None if looks_like_safetensors else _describe_non_safetensors(head)
    if kind is not None:
        raise TLoRAFormatError(
            f"{path} is {kind}, not safetensors; networks.tlora loads only .safetensors (pickles can run code). "
            f"Convert it in a trusted environment, e.g. with sd-scripts' --save_model_as safetensors"
        )
    if size < 8:
        raise TLoRAFormatError(f"{path} is {size} bytes, too short to be a safetensors file (truncated?)")
    if header_len > _MAX_HEADER_BYTES or header_len + 8 > size:
        raise TLoRAFormatError(
            f"{path} is not a valid safetensors file: header length {header_len} does not fit in {size} bytes (truncated or corrupt)"
        )
    if head[8:9] != b"{":
        raise TLoRAFormatError(f"{path} is not a valid safetensors file: the header is not JSON")


def _open_safetensors(path: str, read_tensors: bool):
    check_safetensors_file(path)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TLoRAFormatError(f"{path}: the metadata is not a map of strings (corrupt file)")
            tensors = {key: f.get_tensor(key) for key in f.keys()} if read_tensors else {}
    except TLoRAFormatError:
        raise
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own error types; name the file and the cause
        raise TLoRAFormatError(f"{path} could not be read as safetensors (corrupt or truncated): {e}") from None
    return tensors, dict(metadata)


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for anything else."""
    return _open_safetensors(path, True)


def read_metadata(path: str) -> Dict[str, str]:
    return _open_safetensors(path, False)[1]


def config_from_metadata(metadata: Mapping[str, str], source: str = "file") -> Optional[NetworkConfig]:
    """The NetworkConfig stored in a native file, or None for a file without one (plain kohya)."""
    if METADATA_CONFIG_KEY not in metadata:
        return None
    version = metadata.get(METADATA_VERSION_KEY, "")
    try:
        version_number = int(version)
    except (TypeError, ValueError):
        raise TLoRAFormatError(f"{source}: metadata '{METADATA_VERSION_KEY}' is {version!r}, expected a whole number") from None
    if version_number > FORMAT_VERSION:
        raise TLoRAFormatError(
            f"{source}: format version {version_number} is newer than this networks.tlora understands ({FORMAT_VERSION}); update the project"
        )
    if version_number < 1:
        raise TLoRAFormatError(f"{source}: metadata '{METADATA_VERSION_KEY}' is {version!r}; format versions start at 1")
    return NetworkConfig.from_json(metadata[METADATA_CONFIG_KEY], source, METADATA_CONFIG_KEY)


def split_key(key: str) -> Tuple[str, str]:
    """'lora_unet_x.svd_up.weight' -> ('lora_unet_x', 'svd_up.weight')."""
    for suffix in ALL_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise TLoRAFormatError(f"tensor {key!r} is not a LoRA tensor (expected <layer>.<{'|'.join(ALL_SUFFIXES)}>)")


def group_by_layer(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{layer name: {key suffix: tensor}}."""
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = split_key(key)
        layers.setdefault(name, {})[suffix] = value
    return layers


def detect_algo(layer_keys: Iterable[str]) -> str:
    """The algo family a layer's keys belong to (lora / trilora / ortho)."""
    keys = set(layer_keys)
    if SVD_KEYS["lambda_base"] in keys:
        return "ortho"
    if SVD_KEYS["lambda"] in keys:
        return "trilora"
    return "lora"


def is_kxk(down: torch.Tensor) -> bool:
    return down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


def validate_layer_tensors(name: str, tensors: Mapping[str, torch.Tensor], algo: str, check_values: bool = True) -> int:
    """Check one layer's tensors against `algo`'s key set, shapes, dtypes and (check_values)
    finiteness; returns its rank."""
    expected = key_names(algo)
    required = {v for k, v in expected.items() if k != "alpha"}
    present = set(tensors)
    missing = sorted(required - present)
    extra = sorted(present - set(expected.values()))
    if missing or extra:
        raise TLoRAFormatError(
            f"layer {name!r}: tensors do not match algo={algo} (missing {missing or 'none'}, unexpected {extra or 'none'})"
        )
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise TLoRAFormatError(f"layer {name!r}: {key} has dtype {value.dtype}; LoRA tensors must be floating point")
    down, up = tensors[expected["down"]], tensors[expected["up"]]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or min(down.shape) < 1 or min(up.shape) < 1:
        raise TLoRAFormatError(f"layer {name!r}: down {tuple(down.shape)} / up {tuple(up.shape)} are not LoRA factor shapes")
    rank = down.shape[0]
    if up.shape[1] != rank or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise TLoRAFormatError(f"layer {name!r}: up {tuple(up.shape)} does not match down {tuple(down.shape)} (rank {rank})")
    for role in ("lambda", "lambda_base"):
        if role in expected and tuple(tensors[expected[role]].shape) != (rank,):
            raise TLoRAFormatError(f"layer {name!r}: {expected[role]} has shape {tuple(tensors[expected[role]].shape)}, expected ({rank},)")
    for role, ref in (("down_base", down), ("up_base", up)):
        if role in expected and tensors[expected[role]].shape != ref.shape:
            raise TLoRAFormatError(f"layer {name!r}: {expected[role]} shape {tuple(tensors[expected[role]].shape)} differs from {tuple(ref.shape)}")
    if "alpha" in tensors and tensors["alpha"].numel() != 1:
        raise TLoRAFormatError(f"layer {name!r}: alpha must hold one number, got shape {tuple(tensors['alpha'].shape)}")
    if check_values:
        for key, value in tensors.items():
            if not bool(torch.isfinite(value).all()):
                raise TLoRAFormatError(f"layer {name!r}: {key} holds NaN or infinite values; the file is broken (a diverged run?)")
    return int(rank)


def content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the format version, the stored config and every tensor (name, dtype, shape, bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for key in (METADATA_VERSION_KEY, METADATA_CONFIG_KEY):
        digest.update(f"{key}={metadata.get(key, '')}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def with_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Dict[str, str]:
    out = dict(metadata)
    out[METADATA_CHECKSUM_KEY] = content_digest(tensors, out)
    return out


def validate_native(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str, check_values: bool = True):
    """The one check of a LoRA file's content, used by every reader and every writer of files
    (network, converters, importers, trainer): metadata config, layer names, per-layer tensors
    and, for masked algos, that every denoiser layer has the rank the config states (the rank
    schedule needs it). Plain kohya files (no config) are algo=lora.

    Returns (config or None, algo, {layer name: {suffix: tensor}})."""
    config = config_from_metadata(metadata, source)
    try:
        layers = group_by_layer(tensors) if tensors else {}
    except TLoRAFormatError as e:
        raise TLoRAFormatError(f"{source}: {e}") from None
    if not layers:
        raise TLoRAFormatError(f"{source}: the file holds no LoRA layers")
    if config is None:
        kinds = {detect_algo(keys) for keys in layers.values()}
        if kinds != {"lora"}:
            raise TLoRAFormatError(
                f"{source}: svd_* factors without '{METADATA_CONFIG_KEY}' metadata: the algo and min_rank are unknown; "
                f"pass algo=... (and min_rank=...) or bring it in with `tlora-convert import-official` / `import-lycoris` first"
            )
        algo = "lora"
    else:
        algo = config.algo
    for name, layer_tensors in layers.items():
        try:
            prefix, _ = split_prefix(name)
        except ValueError as e:
            raise TLoRAFormatError(f"{source}: {e}") from None
        try:
            rank = validate_layer_tensors(name, layer_tensors, algo, check_values)
        except TLoRAFormatError as e:
            raise TLoRAFormatError(f"{source}: {e}") from None
        if config is not None and config.spec.masked and prefix in ("lora_unet", "lora_transformer"):
            expected, _, _ = config.layer_settings(is_kxk(layer_tensors[key_names(algo)["down"]]))
            if expected is None or rank != expected:
                raise TLoRAFormatError(
                    f"{source}: layer {name!r} has rank {rank} but the file's config says {expected} "
                    f"(algo={algo} needs one rank for its timestep schedule); the file was edited or is corrupt"
                )
    stored = metadata.get(METADATA_CHECKSUM_KEY)
    if stored is not None and check_values and stored != content_digest(tensors, metadata):
        raise TLoRAFormatError(
            f"{source}: the content does not match its checksum ({METADATA_CHECKSUM_KEY}): the file was damaged or edited "
            f"after it was written; use an intact copy"
        )
    return config, algo, layers


# ----------------------------------------------------------------------------- file writing


def build_metadata(config: Optional[NetworkConfig], extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Metadata for a native file: the host's keys (ss_*, modelspec.*) plus the network config."""
    metadata: Dict[str, str] = {}
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    if config is not None:
        metadata[METADATA_VERSION_KEY] = str(FORMAT_VERSION)
        metadata[METADATA_CONFIG_KEY] = config.to_json()
        metadata.setdefault("ss_network_module", NETWORK_MODULE)
        metadata.setdefault("ss_network_dim", str(config.rank))
        metadata.setdefault("ss_network_alpha", str(config.alpha))
    return metadata


def write_native(tensors: Mapping[str, torch.Tensor], path: str, config: Optional[NetworkConfig],
                 extra_metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a native (or, with config None, plain kohya) file: first the same validation every
    reader applies (validate_native), then an atomic write. A file we write is a file we read."""
    metadata = build_metadata(config, extra_metadata)
    metadata.pop(METADATA_CHECKSUM_KEY, None)  # a copied source's checksum; this file gets its own
    validate_native(tensors, metadata, path)
    atomic_save_safetensors(tensors, path, with_checksum(tensors, metadata))


def _remove_stale_temporaries(path: str, age_seconds: float = 3600.0) -> None:
    """Temporary files of earlier saves to the same name that were killed mid-write (an hour old:
    never one that another process may still be writing)."""
    import time

    folder, base = os.path.split(path)
    prefix = "." + base + "."
    now = time.time()
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            stale = os.path.join(folder, entry)
            try:
                if now - os.path.getmtime(stale) > age_seconds:
                    os.unlink(stale)
            except OSError:
                pass


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage; copy a view that does not own all of its storage."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file through a temporary file in the same folder and an atomic rename,
    so the destination is always either the old complete file or the new complete file."""
    from safetensors.torch import save_file

    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    contiguous = {k: _owned(v.detach().to("cpu").contiguous()) for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask), or
        # keep the mode of the file it replaces, so a web UI running as another user can read it
        if os.path.exists(path):
            mode = os.stat(path).st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _remove_stale_temporaries(path)
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
