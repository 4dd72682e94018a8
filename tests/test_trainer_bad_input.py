"""Bad input and faults in train_tlora.py: every case ends with ONE line on stderr naming the
problem (and the file or option), exit code 2, no traceback, its inputs unchanged (hashed before
and after), and nothing at the destination (or, for faults while writing, only complete files).

Cases run the command's main() in-process (fast); permissions are tested with the process's
effective uid dropped to `nobody` (root ignores permission bits), full and read-only disks on a
small tmpfs mounted for the case, the file-size limit (`ulimit -f`) in a subprocess."""

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, List, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault_helpers import mounted_tmpfs, nobody_ids, privileges_of_nobody, snapshot
from tlora_trainer import cli, errors, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "presets", "demo-random.toml")
EXAMPLE_DIR = os.path.join(ROOT, "examples", "sks_toy")
SDXL_PRESET = os.path.join(ROOT, "presets", "tlora-object-sdxl.toml")
RUN = ["--max_train_steps", "3", "--save_every_n_steps", "1", "--sample_every_n_steps", "1000"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Ctx:
    root: str

    @property
    def out(self) -> str:
        return os.path.join(self.root, "out")

    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def write(self, name: str, content, mode: Optional[int] = None) -> str:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        if mode is not None:
            os.chmod(path, mode)
        return path

    def png(self, name: str, size=32) -> str:
        from PIL import Image

        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (size, size), "red").save(path)
        return path

    def fifo(self, name: str) -> str:
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkfifo(path)
        return path

    def folder(self, name: str) -> str:
        path = self.path(name)
        os.makedirs(path, exist_ok=True)
        return path

    def argv(self, *extra) -> List[str]:
        return ["--config_file", DEMO, "--output_dir", self.out, *RUN, *extra]


@dataclasses.dataclass
class Case:
    build: Callable  # (ctx, state) -> (argv, [needles])
    loads_model: bool = False  # fails only after the model is loaded (a state that does not fit it)
    as_nobody: bool = False  # run with the effective uid of `nobody`
    state: bool = False  # the case starts from a copy of a good run's output folder


CASES = {}


def case(name, **kw):
    def register(build):
        assert name not in CASES
        CASES[name] = Case(build, **kw)
        return build

    return register


def rehash(state_dir: str) -> None:
    """After editing a file of a state folder, make its manifest agree (so only the edit is wrong)."""
    manifest_path = os.path.join(state_dir, "state.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for name in manifest["files"]:
        path = os.path.join(state_dir, name)
        with open(path, "rb") as f:
            manifest["files"][name] = {"bytes": os.path.getsize(path), "sha256": hashlib.sha256(f.read()).hexdigest()}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def edit_manifest(state_dir: str, change) -> None:
    path = os.path.join(state_dir, "state.json")
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


STATE = "demo-tlora-step00000002-state"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """The output folder of a 3-step run with a checkpoint every step (the newest: step 2)."""
    out = str(tmp_path_factory.mktemp("good") / "out")
    cli.run(["--config_file", DEMO, "--output_dir", out, *RUN])
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    assert os.path.isdir(os.path.join(out, STATE))
    return out


# ----------------------------------------------------------------------------- arguments

for _name, _extra, _needles in [
    ("learning rate NaN", ["--learning_rate", "nan"], ["--learning_rate=nan", "finite number in (0, 10]"]),
    ("learning rate negative", ["--learning_rate=-1e-4"], ["--learning_rate=-0.0001", "(0, 10]"]),
    ("learning rate 1e38", ["--learning_rate", "1e38"], ["--learning_rate=1e+38", "(0, 10]"]),
    ("learning rate not a number", ["--learning_rate", "fast"], ["--learning_rate", "invalid float value: 'fast'"]),
    ("negative warm-up", ["--lr_warmup_steps", "-5"], ["--lr_warmup_steps=-5", "whole number in [0,"]),
    ("zero steps", ["--max_train_steps", "0"], ["--max_train_steps=0", "[1, 1000000000]"]),
    ("batch size 0", ["--train_batch_size", "0"], ["--train_batch_size=0", "[1, 4096]"]),
    ("negative seed", ["--seed", "-1"], ["--seed=-1"]),
    ("dropout 1.5", ["--network_dropout", "1.5"], ["--network_dropout=1.5", "[0, 1)"]),
    ("negative unet lr", ["--unet_lr", "-1"], ["--unet_lr=-1.0", "[0, 10]"]),
    ("text encoder lr inf", ["--text_encoder_lr", "inf"], ["--text_encoder_lr=inf", "finite"]),
    ("three text encoder lrs", ["--text_encoder_lr", "1e-4", "1e-4", "1e-4"], ["--text_encoder_lr", "one value, or two"]),
    ("noise offset NaN", ["--noise_offset", "nan"], ["--noise_offset=nan", "finite"]),
    ("negative max_grad_norm", ["--max_grad_norm", "-1"], ["--max_grad_norm=-1.0"]),
    ("clip_skip 0", ["--clip_skip", "0"], ["--clip_skip=0", "[1, 24]"]),
    ("timesteps reversed", ["--min_timestep", "500", "--max_timestep", "400"], ["min_timestep", "max_timestep", "min_timestep < max_timestep"]),
    ("max timestep 2000", ["--max_timestep", "2000"], ["--max_timestep=2000", "[1, 1000]"]),
    ("unknown lr scheduler", ["--lr_scheduler", "cosine_warm"], ["--lr_scheduler='cosine_warm' is not one of", "did you mean"]),
    ("unknown sampler", ["--sample_sampler", "k_euler"], ["--sample_sampler='k_euler' is not one of"]),
    ("unknown mixed precision", ["--mixed_precision", "fp8"], ["--mixed_precision='fp8' is not one of no, fp16, bf16"]),
    ("unknown optimizer", ["--optimizer_type", "SGD"], ["--optimizer_type='SGD' is not one of AdamW, AdamW8bit, Prodigy"]),
    ("gradient accumulation", ["--gradient_accumulation_steps", "4"], ["--gradient_accumulation_steps=4 is not supported", "use 1"]),
    ("another network module", ["--network_module", "networks.lora"], ["--network_module='networks.lora' is not supported"]),
    ("unet only and text encoder only", ["--network_train_text_encoder_only"], ["exclude each other"]),
    ("resolution not a multiple of 8", ["--resolution", "500"], ["resolution 500 is not a multiple of 8", "use 496 or 504"]),
    ("resolution text", ["--resolution", "big"], ["resolution='big'", "width,height"]),
    ("resolution three numbers", ["--resolution", "64,64,64"], ["resolution='64,64,64'"]),
    ("output name with a folder", ["--output_name", "a/b"], ["--output_name='a/b'", "plain file name"]),
    ("unknown flag", ["--learnin_rate", "1e-4"], ["unrecognized arguments: --learnin_rate"]),
    ("weight_decay=abc", ["--optimizer_args", "weight_decay=abc"], ["optimizer_args", "weight_decay='abc' is not a valid value for AdamW"]),
    ("unknown optimizer arg", ["--optimizer_args", "momentum=0.9"], ["AdamW has no option 'momentum'", "weight_decay"]),
    ("lr in optimizer_args", ["--optimizer_args", "lr=1"], ["--learning_rate"]),
    ("optimizer arg AdamW refuses", ["--optimizer_args", "betas=(0.9,1.5)"], ["AdamW refuses", "beta"]),
    ("optimizer arg without =", ["--optimizer_args", "weight_decay"], ["'weight_decay' is not key=value"]),
    ("unknown network_args key", ["--network_args", "algo=tlora", "minrank=4"], ["unknown key(s) minrank"]),
    ("min_rank above the rank", ["--network_args", "algo=tlora", "min_rank=99"], ["min_rank=99"]),
    ("sampling without prompts", ["--sample_prompts", "", "--sample_every_n_steps", "5"], ["sample_every_n_steps needs --sample_prompts"]),
]:
    case(_name)(lambda ctx, state, extra=_extra, needles=_needles: (ctx.argv("--network_train_unet_only", *extra), needles))


@case("no output_dir")
def _(ctx, state):
    return ["--config_file", DEMO, "--output_dir", ""], ["give --output_dir"]


@case("missing optimizer package")
def _(ctx, state):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    return ctx.argv("--optimizer_type", "AdamW8bit"), ["needs the bitsandbytes package", "pip install bitsandbytes"]


# ----------------------------------------------------------------------------- config files


def config_case(name, text, needles):
    @case(name)
    def _(ctx, state):
        path = ctx.write("c.toml", text)
        return ["--config_file", path, "--output_dir", ctx.out], [path] + needles


config_case("unknown config key", '[network]\nnetwrk_dim = 8\n', ["unknown config key(s) 'netwrk_dim' (did you mean 'network_dim'?)"])
config_case("text for a number", '[training]\nmax_train_steps = "many"\n', ["max_train_steps = 'many': must be a whole number, not text"])
config_case("true for a number", 'max_train_steps = true\n', ["max_train_steps = True: must be a whole number, not true/false"])
config_case("list for a number", 'learning_rate = [1, 2]\n', ["learning_rate = [1, 2]: must be a single float, not a list"])
config_case("table for a number", '[training]\nmax_train_steps = {a = 1}\n', ["max_train_steps", "not a table"])
config_case("number for a flag", 'network_train_unet_only = 1\n', ["network_train_unet_only = 1: must be true or false"])
config_case("fraction for a whole number", 'max_train_steps = 2.5\n', ["max_train_steps = 2.5: must be a whole number"])
config_case("NaN in a config", '[optimizer]\nlearning_rate = nan\n', ["learning_rate=nan", "finite number in (0, 10]"])
config_case("TOML syntax error", '[training\nmax_train_steps = 3\n', ["not valid TOML"])


@case("config not UTF-8")
def _(ctx, state):
    path = ctx.write("c.toml", b"max_train_steps = 3 # \xff\xfe\n")
    return ["--config_file", path, "--output_dir", ctx.out], [f"config file {path} is not UTF-8 text (byte 0xff at offset 22)"]


@case("config missing")
def _(ctx, state):
    return ["--config_file", ctx.path("none.toml"), "--output_dir", ctx.out], [f"config file {ctx.path('none.toml')} does not exist"]


@case("config is a folder")
def _(ctx, state):
    path = ctx.folder("c.toml")
    return ["--config_file", path, "--output_dir", ctx.out], [path, "is a folder, not a file"]


@case("config is a FIFO")
def _(ctx, state):
    path = ctx.fifo("c.toml")
    return ["--config_file", path, "--output_dir", ctx.out], [path, "is a FIFO (named pipe), not a file"]


@case("config is a character device")
def _(ctx, state):
    path = ctx.path("c.toml")
    os.symlink("/dev/null", path)
    return ["--config_file", path, "--output_dir", ctx.out], [path, "is a character device, not a file"]


# ----------------------------------------------------------------------------- data


@case("missing data folder")
def _(ctx, state):
    return ctx.argv("--train_data_dir", ctx.path("nope")), ["train_data_dir", ctx.path("nope"), "does not exist"]


@case("empty data folder")
def _(ctx, state):
    return ctx.argv("--train_data_dir", ctx.folder("empty")), [ctx.path("empty"), "holds no images"]


@case("broken image")
def _(ctx, state):
    ctx.write("data/photo.txt", "a photo")
    path = ctx.write("data/photo.png", b"\x89PNG\r\n\x1a\nthis is not a png")
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"image {path} cannot be read"]


@case("truncated image")
def _(ctx, state):
    source = ctx.png("src/full.png", 64)
    with open(source, "rb") as f:
        data = f.read()
    path = ctx.write("data/photo.png", data[: len(data) // 2])
    ctx.write("data/photo.txt", "a photo")
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"image {path} cannot be read"]


@case("image too small")
def _(ctx, state):
    path = ctx.png("data/tiny.png", 4)
    ctx.write("data/tiny.txt", "a photo")
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"image {path} is only 4x4 pixels"]


@case("caption not UTF-8")
def _(ctx, state):
    ctx.png("data/a.png")
    path = ctx.write("data/a.txt", "caf\xe9".encode("latin-1"))
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"caption file {path} is not UTF-8 text (byte 0xe9 at offset 3)"]


@case("image without caption")
def _(ctx, state):
    path = ctx.png("nocap/a.png")
    return ctx.argv("--train_data_dir", path, "--caption_extension", ".caption"), [f"{path} has no caption", "--instance_prompt"]


@case("image that is a FIFO")
def _(ctx, state):
    ctx.png("data/a.png")
    ctx.write("data/a.txt", "x")
    path = ctx.fifo("data/b.png")
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"image {path} is a FIFO (named pipe), not an image file"]


@case("caption that is a FIFO")
def _(ctx, state):
    ctx.png("data/a.png")
    path = ctx.fifo("data/a.txt")
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"caption file {path} is a FIFO (named pipe), not a file"]


@case("data folder that is a FIFO")
def _(ctx, state):
    path = ctx.fifo("data")
    return ctx.argv("--train_data_dir", path), [f"train_data_dir {path} is a FIFO (named pipe)"]


@case("image that is a broken link")
def _(ctx, state):
    ctx.folder("data")
    os.symlink(ctx.path("gone.png"), ctx.path("data", "a.png"))
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"image {ctx.path('data', 'a.png')} is a broken symbolic link"]


@case("repeat folder with 0 repeats")
def _(ctx, state):
    ctx.png("data/0_sks dog/a.png")
    return ctx.argv("--train_data_dir", ctx.path("data")), [ctx.path("data", "0_sks dog"), "repeat count", "at least 1"]


@case("unreadable image", as_nobody=True)
def _(ctx, state):
    ctx.png("data/a.png")
    os.chmod(ctx.path("data/a.png"), 0)
    ctx.write("data/a.txt", "a photo", mode=0o644)
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"image {ctx.path('data/a.png')}: cannot read it: permission denied"]


@case("unreadable caption", as_nobody=True)
def _(ctx, state):
    ctx.png("data/a.png")
    os.chmod(ctx.path("data/a.png"), 0o644)
    path = ctx.write("data/a.txt", "a photo", mode=0)
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"caption file {path}: cannot read it: permission denied"]


@case("unreadable data folder", as_nobody=True)
def _(ctx, state):
    ctx.png("data/a.png")
    os.chmod(ctx.path("data"), 0)
    return ctx.argv("--train_data_dir", ctx.path("data")), [f"data folder {ctx.path('data')}: cannot read it: permission denied"]


@case("unreadable config", as_nobody=True)
def _(ctx, state):
    path = ctx.write("c.toml", "max_train_steps = 3\n", mode=0)
    return ["--config_file", path, "--output_dir", ctx.out], [f"config file {path}: cannot read it: permission denied"]


# ----------------------------------------------------------------------------- base model and network file


@case("missing base model")
def _(ctx, state):
    return ctx.argv("--pretrained_model_name_or_path", ctx.path("no-model")), [ctx.path("no-model"), "never downloads"]


@case("unknown random model")
def _(ctx, state):
    return ctx.argv("--pretrained_model_name_or_path", "random:sd3-tiny"), ["random:sd3-tiny: unknown random model"]


@case("SDXL preset with an SD 1.5 model")
def _(ctx, state):
    return (["--config_file", SDXL_PRESET, "--pretrained_model_name_or_path", "random:sd1-tiny", "--train_data_dir", EXAMPLE_DIR,
             "--resolution", "64", "--output_dir", ctx.out], ["is for SDXL", "random:sd1-tiny is an SD 1.x model"])


@case("base model is a FIFO")
def _(ctx, state):
    path = ctx.fifo("model.safetensors")
    return ctx.argv("--pretrained_model_name_or_path", path), [f"base model {path} is a FIFO (named pipe)"]


@case("base model of an unknown kind")
def _(ctx, state):
    path = ctx.write("model.txt", "hello")
    return ctx.argv("--pretrained_model_name_or_path", path), [path, "must be .safetensors or .ckpt"]


@case("base model not safetensors")
def _(ctx, state):
    path = ctx.write("model.safetensors", b"\x00" * 64)
    return ctx.argv("--pretrained_model_name_or_path", path), [f"base model {path} is not a readable safetensors file"]


@case("diffusers folder with a damaged config")
def _(ctx, state):
    ctx.write("model/model_index.json", '{"_class_name": "StableDiffusionPipeline"}')
    path = ctx.write("model/unet/config.json", '{"cross_attention_dim": 768,')
    return ctx.argv("--pretrained_model_name_or_path", ctx.path("model")), [f"U-Net config {path} is not valid JSON"]


@case("diffusers folder without weights", loads_model=True)
def _(ctx, state):
    from diffusers import StableDiffusionPipeline

    b = models.build_random_model("sd1-tiny", 0)
    StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], unet=b.unet,
                            scheduler=b.noise_scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(ctx.path("model"))
    for name in os.listdir(ctx.path("model", "unet")):
        if name.startswith("diffusion_pytorch_model"):
            os.remove(ctx.path("model", "unet", name))
    return ctx.argv("--pretrained_model_name_or_path", ctx.path("model")), [f"the diffusers model folder {ctx.path('model')} could not be loaded"]


@case("network_weights is a FIFO")
def _(ctx, state):
    path = ctx.fifo("w.safetensors")
    return ctx.argv("--network_weights", path), [f"network_weights {path} is a FIFO (named pipe), not a file"]


@case("network_weights is a pickle", loads_model=True)
def _(ctx, state):
    path = ctx.write("w.safetensors", pickle.dumps({"a": 1}, protocol=2))
    return ctx.argv("--network_weights", path), [path, "pickle"]


# ----------------------------------------------------------------------------- sample prompts


def prompts_case(name, content, needles):
    @case(name)
    def _(ctx, state):
        path = ctx.write("p.txt", content)
        return ctx.argv("--sample_prompts", path), [path] + needles


prompts_case("prompts not UTF-8", b"a photo \xff\n", ["is not UTF-8 text"])
prompts_case("prompts empty", "# nothing\n\n", ["holds no prompts"])
prompts_case("prompt size not a number", "a cat --w wide\n", ["line 1: --w 'wide' is not a whole number"])
prompts_case("prompt size not a multiple of 8", "a cat --w 100\n", ["line 1: image size 100 is not a multiple of 8"])
prompts_case("prompt guidance NaN", "a cat --l nan\n", ["line 1: --l 'nan' must be a guidance scale"])


@case("prompts missing")
def _(ctx, state):
    return ctx.argv("--sample_prompts", ctx.path("p.txt")), [f"sample_prompts file {ctx.path('p.txt')} does not exist"]


# ----------------------------------------------------------------------------- resume state


@case("resume latest without a state")
def _(ctx, state):
    return ctx.argv("--resume", "latest"), ["--resume latest: no demo-tlora-stepNNNNNNNN-state folder in", ctx.out]


@case("resume a folder that is no state")
def _(ctx, state):
    return ctx.argv("--resume", ctx.folder("somewhere")), [ctx.path("somewhere"), "is not a train_tlora state folder (no state.json)"]


@case("resume a FIFO")
def _(ctx, state):
    path = ctx.fifo("state")
    return ctx.argv("--resume", path), [f"--resume {path} is a FIFO (named pipe), not a state folder"]


class Planted:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@case("resume an old pickled state")
def _(ctx, state):
    folder = ctx.folder(os.path.join("out", STATE))
    marker = ctx.path("PICKLE-WAS-LOADED")
    for name in ("training_state.pt", "rng_rank0.pt"):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(Planted(marker), f)
    return ctx.argv("--resume", "latest"), [folder, "older train_tlora.py", "training_state.pt", "not loaded"]


def state_case(name, corrupt, needles, loads_model=False):
    @case(name, state=True, loads_model=loads_model)
    def _(ctx, state):
        folder = os.path.join(ctx.out, STATE)
        corrupt(folder)
        return ctx.argv("--resume", "latest"), [n.format(folder=folder) for n in needles]


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _flip_byte(path, offset=-100):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def _rewrite_tensors(path, change):
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)


state_case("state manifest not JSON", lambda d: _truncate(os.path.join(d, "state.json"), 0.5),
           ["{folder}/state.json is not valid JSON"])
state_case("state manifest missing", lambda d: os.remove(os.path.join(d, "state.json")), ["{folder} is not a train_tlora state folder (no state.json)"])
state_case("state of another format version", lambda d: edit_manifest(d, lambda m: m.update(version=99)), ["format version 99"])
state_case("state with a negative step", lambda d: edit_manifest(d, lambda m: m.update(step=-3)), ["step is -3"])
state_case("state network file truncated", lambda d: _truncate(os.path.join(d, "network.safetensors")),
           ["{folder}/network.safetensors has", "truncated or replaced"])
state_case("state optimizer file corrupted", lambda d: _flip_byte(os.path.join(d, "optimizer.safetensors")),
           ["{folder}/optimizer.safetensors does not match its checksum"])
state_case("state RNG file missing", lambda d: os.remove(os.path.join(d, "rng-rank0.safetensors")),
           ["{folder} is incomplete: rng-rank0.safetensors is missing"])
state_case("state network file is garbage", lambda d: (open(os.path.join(d, "network.safetensors"), "wb").write(b"\x00" * 64), rehash(d)),
           ["{folder}/network.safetensors is not a readable safetensors file"])
state_case("state weights NaN", lambda d: (_rewrite_tensors(os.path.join(d, "network.safetensors"),
                                                             lambda t: next(iter(t.values())).view(-1).__setitem__(0, float("nan"))), rehash(d)),
           ["{folder}: the network weights hold NaN or inf"])
state_case("state RNG file damaged", lambda d: (_rewrite_tensors(os.path.join(d, "rng-rank0.safetensors"), lambda t: t.pop("numpy_key")), rehash(d)),
           ["RNG file {folder}/rng-rank0.safetensors is damaged"], loads_model=True)
state_case("state optimizer tensor of the wrong shape",
           lambda d: (_rewrite_tensors(os.path.join(d, "optimizer.safetensors"), lambda t: t.__setitem__("0.exp_avg", torch.zeros(3))), rehash(d)),
           ["optimiser tensor 0.exp_avg has shape (3,)"], loads_model=True)
state_case("state of another optimizer", lambda d: edit_manifest(d, lambda m: m["optimizer"].update({"class": "Prodigy"})),
           ["holds the state of a Prodigy optimiser", "--optimizer_type"], loads_model=True)
state_case("state schedule tampered", lambda d: edit_manifest(d, lambda m: m["lr_scheduler"].update(base_lrs="fast")),
           ["learning-rate schedule state's base_lrs does not match"], loads_model=True)
state_case("state schedule with functions", lambda d: edit_manifest(d, lambda m: m["lr_scheduler"].update(lr_lambdas=[{"x": 1}])),
           ["holds unexpected schedule functions"], loads_model=True)


def _two_processes(folder):
    shutil.copy(os.path.join(folder, "rng-rank0.safetensors"), os.path.join(folder, "rng-rank1.safetensors"))
    edit_manifest(folder, lambda m: (m.update(world_size=2), m["files"].update({"rng-rank1.safetensors": {}})))
    rehash(folder)


state_case("state of two processes", _two_processes, ["was saved by 2 process(es), this run has 1"], loads_model=True)


@case("state of another network", state=True, loads_model=True)
def _(ctx, state):
    return ctx.argv("--resume", "latest", "--network_dim", "16"), ["has shape", "network_dim"]


# ----------------------------------------------------------------------------- outputs


@case("output_dir is a file")
def _(ctx, state):
    path = ctx.write("out", "x")
    return ctx.argv(), [f"output_dir {path} exists and is a file, not a folder"]


@case("output_dir is a FIFO")
def _(ctx, state):
    path = ctx.fifo("out")
    return ctx.argv(), [f"output_dir {path} exists and is a FIFO (named pipe), not a folder"]


@case("output_dir below a file")
def _(ctx, state):
    blocker = ctx.write("blocker", "x")
    return ["--config_file", DEMO, "--output_dir", os.path.join(blocker, "out")], [f"{blocker} is a file, not a folder"]


@case("logging_dir is a file")
def _(ctx, state):
    path = ctx.write("logs", "x")
    return ctx.argv("--logging_dir", path), [f"logging_dir {path} exists and is a file"]


@case("output_dir not writable", as_nobody=True)
def _(ctx, state):
    folder = ctx.folder("out")
    os.chmod(folder, 0o555)
    return ctx.argv(), [f"output_dir {folder}: cannot write there: permission denied"]


# ----------------------------------------------------------------------------- the test


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(name, tmp_path, monkeypatch, capsys, request):
    spec = CASES[name]
    root = str(tmp_path)
    if spec.as_nobody:
        if os.geteuid() == 0 and nobody_ids() is None:
            pytest.skip("root ignores permissions and there is no 'nobody' user to drop to")
        root = tempfile.mkdtemp(prefix="tlora-nobody-")  # pytest's own tmp folders are closed to other users
        os.chmod(root, 0o777)
        request.addfinalizer(lambda: (subprocess.run(["chmod", "-R", "u+rwx", root]), shutil.rmtree(root, ignore_errors=True)))
    ctx = Ctx(root)
    if spec.state:
        shutil.copytree(request.getfixturevalue("good_run"), ctx.out)
    argv, needles = spec.build(ctx, None)
    if not spec.loads_model:
        def no_model(*a, **k):
            raise AssertionError("a model was loaded before the input was checked")

        monkeypatch.setattr(models, "load_base_model", no_model)
        monkeypatch.setattr(models, "build_random_model", no_model)
    before = snapshot(root)
    capsys.readouterr()  # what setting up printed (the module's good run) is not the case's output
    with privileges_of_nobody() if spec.as_nobody else contextlib.nullcontext():
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == errors.EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 or spec.loads_model, err  # a model load may log; the message is still one line
    message = lines[-1]
    assert message.startswith("train_tlora.py: error: "), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(root) == before  # inputs unchanged, nothing written
    assert not os.path.exists(ctx.path("PICKLE-WAS-LOADED"))


# ----------------------------------------------------------------------------- faults while writing


def _only_complete_outputs(out: str) -> None:
    """Nothing half-written: no temporaries, every file loads, every state folder validates."""
    from tlora_trainer.checkpoints import read_state_folder

    for folder, dirs, files in os.walk(out):
        for name in dirs + files:
            assert not name.startswith("."), f"temporary left behind: {os.path.join(folder, name)}"
        for name in files:
            if name.endswith(".safetensors"):
                load_file(os.path.join(folder, name))
        for name in dirs:
            if name.endswith("-state"):
                read_state_folder(os.path.join(folder, name))


def test_disk_full_while_saving_a_checkpoint(tmp_path, capsys):
    """A 512 KiB disk: the first state folder (about 600 KB) does not fit."""
    with mounted_tmpfs(str(tmp_path / "disk"), "size=512k") as disk:
        out = os.path.join(disk, "out")
        code = cli.main(["--config_file", DEMO, "--output_dir", out, *RUN])
        err = capsys.readouterr().err
        assert code == errors.EXIT_BAD_INPUT and "Traceback" not in err
        message = err.strip().splitlines()[-1]
        assert message.startswith("train_tlora.py: error: ") and "no space left on the device" in message
        assert ".safetensors: cannot write it" in message  # names the file
        _only_complete_outputs(out)
        assert os.listdir(out) == []  # the incomplete state folder was removed


def test_read_only_file_system(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    with mounted_tmpfs(str(tmp_path / "ro"), "ro,size=64k") as disk:
        out = os.path.join(disk, "out")
        code = cli.main(["--config_file", DEMO, "--output_dir", out, *RUN])
        err = capsys.readouterr().err
        assert code == errors.EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1
        assert f"output_dir {out} (in {disk}): cannot write there: the file system is read-only" in err
        assert os.listdir(disk) == []


def test_file_size_limit(tmp_path):
    """`ulimit -f` below the size of a checkpoint file: EFBIG, reported as one line with exit 2
    by the real command, and no half-written file."""
    out = tmp_path / "out"
    limit = 200 * 1024

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tlora.py"), "--config_file", DEMO, "--output_dir", str(out), *RUN],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("train_tlora.py: error: ") and "larger than this process may write (ulimit -f)" in message
    _only_complete_outputs(str(out))
    assert all(os.path.getsize(os.path.join(d, f)) <= limit for d, _, fs in os.walk(out) for f in fs)
