"""Resumable state folders: data only (safetensors + JSON, never a pickle), validated on load,
written atomically.

    <name>-stepNNNNNNNN-state/
        state.json              format, version, step, world size, optimiser structure and scalars,
                                learning-rate schedule, grad scaler, the run's settings, and the
                                size and sha256 of every other file
        network.safetensors     the network weights (a native networks.tlora file)
        optimizer.safetensors   every tensor of the optimiser state, as "<param index>.<name>"
        rng-rank<R>.safetensors per process: torch CPU / CUDA / noise generator states (uint8) and
                                numpy's key (int64); python's and numpy's other state in metadata

A folder is written under a temporary name and renamed when complete, and only after the loss
computed with its weights was finite (see loop.py), so a state folder is always a good one.
"""

import dataclasses
import json
import os
import random
import re
import shutil
from typing import Dict, List, Optional

import numpy as np
import torch

from .errors import NonFiniteLoss, StateError, UsageError, describe_os_error, is_os_failure
from .fileio import describe_path, fsync_folder, read_bytes, sha256_file, writing

FORMAT = "train_tlora-state"
VERSION = 2
MANIFEST = "state.json"
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OLD_FORMAT_FILE = "training_state.pt"  # version 1: pickled, never loaded
MAX_MANIFEST_BYTES = 64 << 20


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def state_dir_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}-state"


def _state_pattern(output_name: str):
    return re.compile(re.escape(output_name) + r"-step(\d{8})-state$")


def list_states(output_dir: str, output_name: str) -> List[str]:
    """State folders of this output name, oldest first."""
    if not output_dir or describe_path(output_dir) != "a folder":
        return []
    pattern = _state_pattern(output_name)
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name)))
    return [os.path.join(output_dir, name) for _, name in found]


def find_latest_state(output_dir: str, output_name: str) -> Optional[str]:
    states = list_states(output_dir, output_name)
    return states[-1] if states else None


def remove_stale_temporaries(output_dir: str, output_name: str) -> None:
    """Temporary state folders of a run that was killed while saving."""
    pattern = re.compile(r"\." + re.escape(output_name) + r"-step\d{8}-state\.tmp$")
    for name in os.listdir(output_dir):
        if pattern.match(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------- JSON and tensors


def _json_bytes(value) -> bytes:
    try:
        return json.dumps(value, indent=1, allow_nan=False).encode("utf-8")
    except ValueError:
        raise NonFiniteLoss("the training state holds NaN or infinite numbers; it was not saved") from None


def _jsonable(value):
    """Tuples become lists; anything that is not plain data is refused (it would need a pickle)."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"a {type(value).__name__} cannot be stored as data")


def _like(template, value):
    """`value` (from JSON) with the container types of `template` (tuples where it has tuples)."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_like(t, v) for t, v in zip(template, value)) if len(template) == len(value) else tuple(value)
    return value


def all_finite(tensors) -> bool:
    """True when no floating-point tensor holds NaN or inf (max |x| does not overflow, unlike a norm)."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=float("inf"))))


def _write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    with writing(path):
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, path, metadata=metadata)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _read_safetensors(path: str, what: str):
    """(tensors, metadata) of a file inside a state folder, with a one-line error for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        if is_os_failure(e):
            raise StateError(f"resume state {what} {describe_os_error(e, path, 'read it')}") from None
        raise StateError(f"resume state {what} {path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                         f"the state folder is corrupt: resume from another one") from None


# ----------------------------------------------------------------------------- RNG states


@dataclasses.dataclass
class RngState:
    """Every random generator a training step draws from, for one process."""

    python: tuple
    numpy: tuple
    torch_cpu: torch.Tensor
    cuda: List[torch.Tensor]
    noise: torch.Tensor

    @classmethod
    def capture(cls, noise_generator: torch.Generator) -> "RngState":
        return cls(
            python=random.getstate(), numpy=np.random.get_state(), torch_cpu=torch.random.get_rng_state(),
            cuda=[s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            noise=noise_generator.get_state(),
        )

    def restore(self, noise_generator: torch.Generator) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.random.set_rng_state(self.torch_cpu)
        noise_generator.set_state(self.noise)
        if self.cuda and torch.cuda.is_available() and len(self.cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(self.cuda)

    def write(self, path: str) -> None:
        version, mt_state, gauss_next = self.python
        name, key, pos, has_gauss, cached_gaussian = self.numpy
        tensors = {"torch_cpu": self.torch_cpu, "noise": self.noise, "numpy_key": torch.from_numpy(key.astype(np.int64))}
        tensors.update({f"cuda.{i}": s for i, s in enumerate(self.cuda)})
        metadata = {
            "format": "train_tlora-rng",
            "python": json.dumps([version, list(mt_state), gauss_next]),
            "numpy": json.dumps({"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}),
        }
        _write_safetensors(path, tensors, metadata)

    @classmethod
    def read(cls, path: str) -> "RngState":
        tensors, metadata = _read_safetensors(path, "RNG file")
        try:
            if metadata.get("format") != "train_tlora-rng":
                raise ValueError("it is not a train_tlora RNG file")
            version, mt_state, gauss_next = json.loads(metadata["python"])
            numpy_meta = json.loads(metadata["numpy"])
            key = tensors["numpy_key"]
            if (not isinstance(version, int) or not isinstance(mt_state, list) or len(mt_state) != 625
                    or not all(isinstance(v, int) and 0 <= v < 2**32 for v in mt_state[:-1])
                    or not isinstance(mt_state[-1], int) or not (gauss_next is None or isinstance(gauss_next, float))):
                raise ValueError("python's random state is malformed")
            if key.shape != (624,) or key.dtype != torch.int64 or int(key.min()) < 0 or int(key.max()) >= 2**32:
                raise ValueError("numpy's key is malformed")
            for name in ("torch_cpu", "noise"):
                if tensors[name].dtype != torch.uint8 or tensors[name].dim() != 1:
                    raise ValueError(f"the {name} generator state is malformed")
            numpy_state = (str(numpy_meta["name"]), key.numpy().astype(np.uint32), int(numpy_meta["pos"]),
                           int(numpy_meta["has_gauss"]), float(numpy_meta["cached_gaussian"]))
            cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
            state = cls((version, tuple(mt_state), gauss_next), numpy_state, tensors["torch_cpu"], cuda, tensors["noise"])
            # trial restores on scratch generators: a state torch or numpy would refuse is refused here
            torch.Generator().set_state(state.noise)
            torch.Generator().set_state(state.torch_cpu)
            np.random.RandomState().set_state(numpy_state)
            random.Random().setstate(state.python)
        except (KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as e:
            raise StateError(f"resume state RNG file {path} is damaged ({e}); resume from another state folder") from None
        return state


# ----------------------------------------------------------------------------- optimiser, schedule, scaler


def optimizer_to_data(optimizer):
    """(tensors, structure): the optimiser's state_dict split into safetensors and JSON."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = _jsonable(value)
    structure = {"class": type(optimizer).__name__, "param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}
    return tensors, structure


def optimizer_from_data(optimizer, tensors: Dict[str, torch.Tensor], structure: dict, source: str) -> dict:
    """The optimiser state_dict from its files, checked against the optimiser it is for."""
    current = optimizer.state_dict()
    if structure.get("class") != type(optimizer).__name__:
        raise StateError(f"{source} holds the state of a {structure.get('class')} optimiser, this run uses "
                         f"{type(optimizer).__name__}; resume with the same --optimizer_type")
    groups = structure.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]):
        raise StateError(f"{source}: the optimiser has {len(current['param_groups'])} parameter group(s), the state "
                         f"{len(groups) if isinstance(groups, list) else 'none'}; resume with the same network and learning-rate options")
    restored_groups = []
    for saved, now in zip(groups, current["param_groups"]):
        if not isinstance(saved, dict) or set(saved) != set(now) or saved.get("params") != now["params"]:
            raise StateError(f"{source}: the optimiser's parameter groups do not match this network; resume with the same settings")
        restored_groups.append({k: _like(now[k], v) for k, v in saved.items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict numbers them in this order
    shapes = {index: tuple(p.shape) for index, p in enumerate(params)}
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) not in shapes or not name:
            raise StateError(f"{source}: optimiser tensor {key!r} belongs to no parameter of this network")
        if name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and tuple(value.shape) != shapes[int(index)]:
            raise StateError(f"{source}: optimiser tensor {key} has shape {tuple(value.shape)}, the parameter {shapes[int(index)]}")
        state.setdefault(int(index), {})[name] = value
    for index, values in (structure.get("scalars") or {}).items():
        if not index.isdigit() or int(index) not in shapes or not isinstance(values, dict):
            raise StateError(f"{source}: optimiser entry {index!r} belongs to no parameter of this network")
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": restored_groups}


def _check_json_like(saved, current, source: str, what: str) -> dict:
    """A JSON state_dict (lr scheduler, grad scaler) checked against the current one: no unknown
    keys, the same value types and list lengths. Keys it lacks keep their current values (a newer
    torch may add some)."""
    if not isinstance(saved, dict) or not saved or set(saved) - set(current):
        raise StateError(f"{source}: the {what} state does not match this run's {what}; resume with the same settings")
    restored = dict(current)
    for key, value in saved.items():
        now = current[key]
        if key == "lr_lambdas":  # LambdaLR stores only callable objects' attributes; diffusers' schedules store None
            if not isinstance(value, list) or any(v is not None for v in value) or len(value) != len(now):
                raise StateError(f"{source}: the {what} state holds unexpected schedule functions")
        elif isinstance(now, (list, tuple)) and (not isinstance(value, list) or len(value) != len(now)):
            raise StateError(f"{source}: the {what} state's {key} does not match this run (another network or settings?)")
        elif isinstance(now, bool) != isinstance(value, bool) or (isinstance(now, (int, float)) and not isinstance(value, (int, float))):
            raise StateError(f"{source}: the {what} state's {key} is {value!r}, not a {type(now).__name__}")
        restored[key] = _like(now, value)
    return restored


# ----------------------------------------------------------------------------- reading a folder


@dataclasses.dataclass
class SavedState:
    """A state folder, read and checked as far as possible without the model (see apply_state)."""

    folder: str
    step: int
    world_size: int
    manifest: dict
    network: Dict[str, torch.Tensor]


def read_state_folder(folder: str) -> SavedState:
    """Check a state folder completely enough that a corrupt, truncated, incomplete, old or
    foreign one is refused before any model loads. Nothing in it is ever unpickled."""
    kind = describe_path(folder)
    if kind == "missing":
        raise StateError(f"--resume {folder}: no such state folder")
    if kind != "a folder":
        raise StateError(f"--resume {folder} is {kind}, not a state folder; give a <name>-stepNNNNNNNN-state folder or 'latest'")
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.lexists(manifest_path):
        if os.path.lexists(os.path.join(folder, OLD_FORMAT_FILE)):
            raise StateError(
                f"--resume {folder} is a state folder of an older train_tlora.py (pickled {OLD_FORMAT_FILE}); it is not loaded, "
                f"because unpickling can run code planted in it. Resume with the version that wrote it, or start again"
            )
        raise StateError(f"--resume {folder} is not a train_tlora state folder (no {MANIFEST}); give a <name>-stepNNNNNNNN-state folder")
    data = read_bytes(manifest_path, "resume state manifest")
    if len(data) > MAX_MANIFEST_BYTES:
        raise StateError(f"resume state {manifest_path} is {len(data)} bytes, too large to be a train_tlora manifest")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"resume state {manifest_path} is not valid JSON ({e}); the state folder is corrupt: resume from another one") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateError(f"resume state {manifest_path} is not a train_tlora state manifest")
    if manifest.get("version") != VERSION:
        raise StateError(f"resume state {folder} has format version {manifest.get('version')!r}; this train_tlora.py reads version {VERSION}")
    step, world, files = manifest.get("step"), manifest.get("world_size"), manifest.get("files")
    for name, value, ok in (("step", step, isinstance(step, int) and step >= 0), ("world_size", world, isinstance(world, int) and world >= 1),
                            ("files", files, isinstance(files, dict))):
        if not ok or isinstance(value, bool):
            raise StateError(f"resume state {manifest_path}: {name} is {value!r}; the manifest is damaged")
    needed = {NETWORK_FILE, OPTIMIZER_FILE, *(rng_file(r) for r in range(world))}
    if set(files) != needed:
        raise StateError(f"resume state {manifest_path} lists {sorted(files)}, expected {sorted(needed)}; the manifest is damaged")
    for name in sorted(needed):
        path = os.path.join(folder, name)
        entry = files[name]
        if describe_path(path) != "a file":
            raise StateError(f"resume state {folder} is incomplete: {name} is {describe_path(path)}; resume from another state folder")
        size = os.path.getsize(path)
        if not isinstance(entry, dict) or size != entry.get("bytes"):
            raise StateError(f"resume state {path} has {size} bytes, the manifest says {entry.get('bytes') if isinstance(entry, dict) else '?'} "
                             f"(truncated or replaced); resume from another state folder")
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise StateError(f"resume state {describe_os_error(e, path, 'read it')}") from None
        if digest != entry.get("sha256"):
            raise StateError(f"resume state {path} does not match its checksum in {MANIFEST} (corrupt or edited); resume from another state folder")
    for name in ("optimizer", "lr_scheduler"):
        if not isinstance(manifest.get(name), dict):
            raise StateError(f"resume state {manifest_path}: no {name} state; the manifest is damaged")
    network, _ = _read_safetensors(os.path.join(folder, NETWORK_FILE), "network file")
    if not all_finite(network.values()):
        raise StateError(f"resume state {folder}: the network weights hold NaN or inf (a diverged run); resume from an earlier state")
    return SavedState(folder, step, world, manifest, network)


def resolve_resume(resume: str, output_dir: str, output_name: str) -> str:
    if resume != "latest":
        return resume
    latest = find_latest_state(output_dir, output_name)
    if latest is None:
        raise UsageError(f"--resume latest: no {output_name}-stepNNNNNNNN-state folder in {output_dir}; "
                         f"start without --resume, or give the state folder")
    return latest


# ----------------------------------------------------------------------------- applying and writing


def apply_state(saved: SavedState, *, rank: int, world: int, network, optimizer, lr_scheduler, scaler,
                noise_generator: torch.Generator) -> int:
    """Load a checked state into this run's objects; returns its step. Everything is checked
    before the first object changes."""
    source = saved.folder
    if saved.world_size != world:
        raise StateError(f"--resume: {source} was saved by {saved.world_size} process(es), this run has {world}; "
                         f"launch the same number of processes")
    network.check_state_dict(saved.network, source)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    tensors, _ = _read_safetensors(os.path.join(source, OPTIMIZER_FILE), "optimizer file")
    if not all_finite(tensors.values()):
        raise StateError(f"resume state {source}: the optimiser state holds NaN or inf (a diverged run); resume from an earlier state")
    optimizer_state = optimizer_from_data(inner, tensors, saved.manifest["optimizer"], source)
    schedule = _check_json_like(saved.manifest["lr_scheduler"], lr_scheduler.state_dict(), source, "learning-rate schedule")
    scaler_state = saved.manifest.get("grad_scaler")
    if (scaler_state is None) != (scaler is None):
        raise StateError(f"--resume: {source} was saved {'with' if scaler_state is not None else 'without'} fp16 loss scaling; "
                         f"resume with the same --mixed_precision")
    if scaler is not None:
        scaler_state = _check_json_like(scaler_state, scaler.state_dict(), source, "grad scaler")
    rng = RngState.read(os.path.join(source, rng_file(rank)))
    network.load_state_dict(saved.network, strict=False)
    try:
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(schedule)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise StateError(f"resume state {source} does not fit this run ({e}); resume with the same settings") from None
    rng.restore(noise_generator)
    return saved.step


def write_state_files(folder: str, *, step: int, world: int, network, network_metadata: Dict[str, str], optimizer, lr_scheduler,
                      scaler, config: dict) -> None:
    """The main process's part of a state folder (the RNG files of every process are already in it)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors, structure = optimizer_to_data(inner)
    if not all_finite(tensors.values()) or not all_finite(network.state_dict().values()):
        raise NonFiniteLoss(f"the weights or optimiser state at step {step} hold NaN or inf; no checkpoint was written")
    with writing(os.path.join(folder, NETWORK_FILE)):
        network.save_weights(os.path.join(folder, NETWORK_FILE), None, network_metadata)
    _write_safetensors(os.path.join(folder, OPTIMIZER_FILE), tensors)
    names = [NETWORK_FILE, OPTIMIZER_FILE, *(rng_file(r) for r in range(world))]
    manifest = {
        "format": FORMAT, "version": VERSION, "step": step, "world_size": world,
        "optimizer": structure, "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
        "grad_scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
        "files": {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": sha256_file(os.path.join(folder, name))}
                  for name in names},
        "config": _jsonable(config),
    }
    path = os.path.join(folder, MANIFEST)
    data = _json_bytes(manifest)
    with writing(path):
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    fsync_folder(folder)


def publish_state_folder(tmp: str, final: str, output_dir: str, output_name: str, step: int) -> None:
    """Rename the complete temporary folder to its name, then drop older state folders."""
    with writing(final):
        if os.path.lexists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    fsync_folder(output_dir)
    for older in list_states(output_dir, output_name):
        if older != final and int(_state_pattern(output_name).match(os.path.basename(older)).group(1)) < step:
            shutil.rmtree(older, ignore_errors=True)
