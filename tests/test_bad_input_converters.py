"""Bad input and faults in `tlora-convert` (info, to-kohya, to-diffusers, import-official,
import-lycoris): every case ends with ONE line on stderr naming the problem (and the file or
option), exit code 2, no traceback, its inputs unchanged (hashed before and after), and nothing
at the destination. The commands run in-process (main(argv)); the file-size limit runs in a
subprocess (ulimit -f), full and read-only disks on small tmpfs mounts."""

import json
import os
import resource
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import networks.tlora as tlora
import tiny_models as tm
from converters.__main__ import main
from fault_helpers import mounted_tmpfs, privileges_of_nobody, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- input files


def _randomised(network, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in network.state_dict(keep_vars=True).items():
            if not name.endswith(".alpha"):
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)
    return network


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good files of every kind the commands read, made once; cases copy or edit them."""
    folder = tmp_path_factory.mktemp("good")
    files = {}
    (te,), unet = tm.sd1_models()
    net = _randomised(tlora.create_network(1.0, 4, 4, None, [te], unet, algo="tlora", min_rank="1"))
    files["sd1"] = str(folder / "sd1_tlora.safetensors")
    net.save_weights(files["sd1"], None, {"ss_base_model_version": "sd_v1"})
    tes, sgm = tm.sgm_models()
    net = _randomised(tlora.create_network(1.0, 4, 4, None, tes, sgm, algo="tlora", min_rank="1"))
    files["sdxl"] = str(folder / "sdxl_tlora.safetensors")
    net.save_weights(files["sdxl"], None, {})
    tes, flux = tm.flux_models()
    net = _randomised(tlora.create_network(1.0, 4, 4, None, tes, flux, algo="tlora_vanilla", min_rank="1", train_t5xxl="True"))
    files["flux_t5"] = str(folder / "flux_t5.safetensors")
    net.save_weights(files["flux_t5"], None, {})
    net = _randomised(tlora.create_network(1.0, 4, 4, None, [te], unet, algo="lora"))
    files["kohya"] = str(folder / "kohya.safetensors")
    net.save_weights(files["kohya"], None, {})
    # an official SD-XL T-LoRA checkpoint (attention processor keys), one layer
    official = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.randn(4, 64),
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": torch.randn(64, 4)}
    files["official"] = str(folder / "official.safetensors")
    save_file(official, files["official"])
    # an official FLUX checkpoint: a pickle of plain tensors
    flux_ckpt = {f"transformer_blocks.0.attn.processor.{p}_lora.{r}.weight": torch.randn(4, 32) if r == "down" else torch.randn(32, 4)
                 for p in ("to_q", "to_k", "to_v") for r in ("down", "up")}
    files["official_flux"] = str(folder / "lora.pt")
    torch.save(flux_ckpt, files["official_flux"])
    # a LyCORIS algo=tlora file and a diffusers base model folder to rebuild its frozen copy from
    unet.save_pretrained(str(folder / "base" / "unet"))
    lyco = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.q_layer.weight": torch.randn(4, 32),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.p_layer.weight": torch.randn(32, 4),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lambda_layer": torch.rand(1, 4),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}
    files["lycoris"] = str(folder / "lyco.safetensors")
    save_file(lyco, files["lycoris"])
    files["base"] = str(folder / "base")
    files["hparams"] = str(folder / "hparams.yml")
    with open(files["hparams"], "w") as f:
        f.write("lora_rank: 4\nmin_rank: 2\n")
    return files


def _tensors_meta(path):
    with safe_open(path, "pt") as f:
        return load_file(path), dict(f.metadata() or {})


def edited(ctx, source, name, change_tensors=None, change_meta=None):
    """A copy of a good file with its tensors or metadata changed."""
    tensors, meta = _tensors_meta(source)
    if change_tensors:
        tensors = change_tensors(tensors)
    if change_meta:
        meta = change_meta(meta)
    path = ctx.path(name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return path


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def with_config(**changes):
    def change(meta):
        config = json.loads(meta["tlora_config"])
        config.update(changes)
        meta["tlora_config"] = json.dumps(config)
        return meta
    return change


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix) and k.startswith("lora_unet"))


def replace(suffix, make):
    def change(tensors):
        key = first_key(tensors, suffix)
        tensors[key] = make(tensors[key])
        return tensors
    return change


def drop(suffix):
    def change(tensors):
        del tensors[first_key(tensors, suffix)]
        return tensors
    return change


class Ctx:
    def __init__(self, root, files):
        self.root, self.files = root, files

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    @property
    def out(self):
        return self.path("out", "result.safetensors")

    def write(self, name, content):
        with open(self.path(name), "wb") as f:
            f.write(content)
        return self.path(name)


# ----------------------------------------------------------------------------- the cases


CASES = {}


def case(name, as_nobody=False):
    def register(build):
        assert name not in CASES, name
        CASES[name] = (build, as_nobody)
        return build
    return register


def input_case(name, make, needles, commands=("info", "to-kohya", "to-diffusers")):
    """One broken input, given to each reading command."""
    for command in commands:
        def build(ctx, make=make, command=command, needles=needles):
            path = make(ctx)
            argv = [command, path] + ([] if command == "info" else [ctx.out])
            return argv, needles(path) if callable(needles) else needles
        case(f"{command}: {name}")(build)


input_case("missing file", lambda c: c.path("nope.safetensors"), ["nope.safetensors", "no such file"])
input_case("a folder", lambda c: os.makedirs(c.path("dir.safetensors")) or c.path("dir.safetensors"), ["dir.safetensors", "a directory"])
input_case("a FIFO", lambda c: os.mkfifo(c.path("pipe.safetensors")) or c.path("pipe.safetensors"), ["pipe.safetensors", "named pipe (FIFO)"])
input_case("empty file", lambda c: c.write("empty.safetensors", b""), ["empty.safetensors", "too short"])
input_case("truncated file", lambda c: c.write("cut.safetensors", open(c.files["sd1"], "rb").read()[:3000]), ["cut.safetensors", "truncated"])
input_case("garbage bytes", lambda c: c.write("junk.safetensors", os.urandom(4096)), ["junk.safetensors", "not a valid safetensors"])
input_case("header length beyond the file", lambda c: c.write("long.safetensors", struct.pack("<Q", 10**6) + b"{}"), ["long.safetensors", "does not fit"])
input_case("header not JSON", lambda c: c.write("nojson.safetensors", struct.pack("<Q", 8) + b"[1,2,3] "), ["nojson.safetensors", "not JSON"])
input_case("a pickle", lambda c: torch.save({"a": torch.zeros(1)}, c.path("p.safetensors")) or c.path("p.safetensors"),
           ["p.safetensors", "PyTorch zip checkpoint", "pickles can run code"])
input_case("NaN factor", lambda c: edited(c, c.files["sd1"], "nan.safetensors", replace("svd_up.weight", lambda t: t * float("nan"))),
           ["nan.safetensors", "NaN or infinite"])
input_case("Inf factor", lambda c: edited(c, c.files["sd1"], "inf.safetensors", replace("svd_lambda", lambda t: t + float("inf"))),
           ["inf.safetensors", "NaN or infinite"])
input_case("int tensor", lambda c: edited(c, c.files["sd1"], "int.safetensors", replace("svd_down.weight", lambda t: t.to(torch.int32))),
           ["int.safetensors", "int32", "floating point"])
input_case("lambda of the wrong length", lambda c: edited(c, c.files["sd1"], "lam.safetensors", replace("svd_lambda", lambda t: t[:3])),
           ["lam.safetensors", "svd_lambda has shape (3,)"])
input_case("missing frozen copy", lambda c: edited(c, c.files["sd1"], "nobase.safetensors", drop("svd_up_base.weight")),
           ["nobase.safetensors", "missing ['svd_up_base.weight']"])
input_case("up and down of different ranks", lambda c: edited(c, c.files["kohya"], "ranks.safetensors", replace("lora_up.weight", lambda t: t[:, :3])),
           ["ranks.safetensors", "does not match down"])
input_case("metadata rank differs from the tensors", lambda c: edited(c, c.files["sd1"], "meta8.safetensors", change_meta=with_config(rank=8)),
           ["meta8.safetensors", "has rank 4 but the file's config says 8"])
input_case("unknown algo", lambda c: edited(c, c.files["sd1"], "algo.safetensors", change_meta=with_config(algo="dora")),
           ["algo.safetensors", "algo='dora' is unknown"])
input_case("config not JSON", lambda c: edited(c, c.files["sd1"], "cfg.safetensors", change_meta=lambda m: {**m, "tlora_config": "{oops"}),
           ["cfg.safetensors", "not valid JSON"])
input_case("newer format", lambda c: edited(c, c.files["sd1"], "new.safetensors", change_meta=lambda m: {**m, "tlora_format_version": "9"}),
           ["new.safetensors", "newer than"])
input_case("unknown config field", lambda c: edited(c, c.files["sd1"], "field.safetensors", change_meta=with_config(colour="red")),
           ["field.safetensors", "unknown fields ['colour']"])
input_case("min_rank above the rank in the config", lambda c: edited(c, c.files["sd1"], "minr.safetensors", change_meta=with_config(min_rank=9)),
           ["minr.safetensors", "min_rank=9"])
input_case("negative power in the config", lambda c: edited(c, c.files["sd1"], "pow.safetensors", change_meta=with_config(rank_schedule_power=-1)),
           ["pow.safetensors", "rank_schedule_power=-1"])
input_case("svd factors without config", lambda c: edited(c, c.files["sd1"], "nocfg.safetensors", change_meta=lambda m: {}),
           ["nocfg.safetensors", "without 'tlora_config'"])
input_case("not LoRA tensors", lambda c: save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, c.path("model.safetensors"))
           or c.path("model.safetensors"), ["model.diffusion_model.x.weight", "not a LoRA tensor"])
input_case("an official checkpoint", lambda c: c.files["official"], ["official T-LoRA checkpoint", "import-official"])
input_case("a LyCORIS file", lambda c: c.files["lycoris"], ["LyCORIS", "import-lycoris"])
input_case("a layer name that is no kohya name", lambda c: edited(
    c, c.files["kohya"], "name.safetensors", lambda t: {k.replace("lora_unet_", "lora_xyz_", 1): v for k, v in t.items()}),
    ["name.safetensors", "not a kohya LoRA layer name"])
input_case("alpha with two values", lambda c: edited(c, c.files["kohya"], "alpha.safetensors", replace(".alpha", lambda t: torch.ones(2))),
           ["alpha.safetensors", "alpha must hold one number"])
input_case("a value edited after writing", lambda c: edited(c, c.files["sd1"], "edited.safetensors", replace("svd_up.weight", lambda t: t * 1.001)),
           ["edited.safetensors", "does not match its checksum"])
input_case("a flipped byte in the tensor data", lambda c: c.write("flip.safetensors", _flip_last_byte(open(c.files["sd1"], "rb").read())),
           ["flip.safetensors", "does not match its checksum"])
input_case("no tensors", lambda c: save_file({}, c.path("none.safetensors")) or c.path("none.safetensors"), ["none.safetensors", "no tensors"])
input_case("an unreadable file", lambda c: c.files["sd1"], ["sd1_tlora.safetensors", "permission denied"])  # run as nobody below


def option_case(name, command, extra, needles, source="sd1"):
    def build(ctx):
        return [command, ctx.files[source], ctx.out, *extra], needles
    case(name)(build)


option_case("--mask t beyond T", "to-kohya", ["--mask", "t=5000"], ["--mask t=5000", "outside t = 0..999"])
option_case("--mask unknown", "to-kohya", ["--mask", "half"], ["--mask", "'half' is unknown"])
option_case("--mask timestep", "to-diffusers", ["--mask", "timestep"], ["--mask timestep", "cannot follow the timestep"])
option_case("--mask t beyond T on an unmasked file", "to-kohya", ["--mask", "t=1000"], ["--mask t=1000", "outside"], source="kohya")
option_case("--rank 0", "to-kohya", ["--rank", "0"], ["--rank 0", ">= 1"])
option_case("--rank negative", "to-diffusers", ["--rank", "-3"], ["--rank -3", ">= 1"])
option_case("--keep-energy 0", "to-kohya", ["--keep-energy", "0"], ["--keep-energy 0", "(0, 1]"])
option_case("--keep-energy above 1", "to-kohya", ["--keep-energy", "1.5"], ["--keep-energy 1.5", "(0, 1]"])
option_case("--base sd1 on an SDXL file", "to-kohya", ["--base", "sd1"], ["--base sd1", "SDXL LoRA", "not SD 1.x"], source="sdxl")
option_case("--base flux on an SD file", "to-kohya", ["--base", "flux"], ["--base flux", "not FLUX.1"])
option_case("--base sdxl on a FLUX file", "to-diffusers", ["--base", "sdxl"], ["--base sdxl", "FLUX.1 LoRA"], source="flux_t5")
option_case("--layers-per-block 0", "to-kohya", ["--layers-per-block", "0"], ["--layers-per-block", ">= 1", "got 0"], source="sdxl")
option_case("--layers-per-block -1", "to-kohya", ["--layers-per-block", "-1"], ["--layers-per-block", "got -1"], source="sdxl")
option_case("--naming sgm on SD 1", "to-kohya", ["--naming", "sgm"], ["--naming 'sgm'", "not a layout of SD 1.x"])
option_case("--naming bfl on SDXL", "to-kohya", ["--naming", "bfl"], ["--naming 'bfl'", "not a layout of SDXL"], source="sdxl")
option_case("--naming on a diffusers output", "to-diffusers", ["--naming", "sgm"], ["unrecognized arguments: --naming sgm"], source="sdxl")
option_case("--dtype unknown", "to-kohya", ["--dtype", "fp8"], ["--dtype", "invalid choice: 'fp8'"])
option_case("--rank not a number", "to-kohya", ["--rank", "lots"], ["--rank", "invalid int value: 'lots'"])
option_case("T5 layers to diffusers", "to-diffusers", [], ["flux_t5.safetensors", "no T5 (lora_te3)"], source="flux_t5")
option_case("fp16 too narrow", "to-kohya", ["--dtype", "fp16"], ["verification failed", "try --dtype fp32"], source="huge")


@case("output is the input")
def _(ctx):
    return ["to-kohya", ctx.files["sd1"], ctx.files["sd1"]], ["is the input file", "never overwritten"]


@case("output is not .safetensors")
def _(ctx):
    return ["to-kohya", ctx.files["sd1"], ctx.path("out", "x.ckpt")], ["x.ckpt", "must end in .safetensors"]


@case("output is a folder")
def _(ctx):
    os.makedirs(ctx.path("out", "d.safetensors"))
    return ["to-diffusers", ctx.files["sd1"], ctx.path("out", "d.safetensors")], ["d.safetensors", "is a directory"]


@case("output folder not writable", as_nobody=True)
def _(ctx):
    source = ctx.write("readable.safetensors", open(ctx.files["sd1"], "rb").read())
    os.chmod(source, 0o644)
    os.chmod(ctx.path("out"), 0o555)
    return ["to-kohya", source, ctx.out], ["out", "permission denied"]


@case("output under a file")
def _(ctx):
    with open(ctx.path("out", "plain"), "w") as f:
        f.write("x")
    return ["to-kohya", ctx.files["sd1"], ctx.path("out", "plain", "x.safetensors")], ["plain is not a folder"]


# importers
@case("import-official: --hparams is a folder")
def _(ctx):
    os.makedirs(ctx.path("hp"))
    return ["import-official", ctx.files["official"], ctx.out, "--hparams", ctx.path("hp")], ["--hparams", "hp", "is not a file"]


@case("import-official: --hparams missing")
def _(ctx):
    return ["import-official", ctx.files["official"], ctx.out, "--hparams", ctx.path("nope.yml")], ["nope.yml", "does not exist"]


@case("import-official: --hparams bad value")
def _(ctx):
    path = ctx.write("bad.yml", b"lora_rank: 4\nmin_rank: abc\n")
    return ["import-official", ctx.files["official"], ctx.out, "--hparams", path], ["bad.yml", "min_rank: 'abc'"]


@case("import-official: --hparams not UTF-8")
def _(ctx):
    path = ctx.write("latin.yml", "min_rank: 2 # é\n".encode("latin-1"))
    return ["import-official", ctx.files["official"], ctx.out, "--hparams", path], ["latin.yml", "not a UTF-8"]


@case("import-official: --min-rank above the rank")
def _(ctx):
    return ["import-official", ctx.files["official"], ctx.out, "--min-rank", "9"], ["--min-rank 9", "larger than the rank 4"]


@case("import-official: --min-rank negative")
def _(ctx):
    return ["import-official", ctx.files["official"], ctx.out, "--min-rank", "-1"], ["--min-rank -1", ">= 0"]


@case("import-official: --rank differs from the file")
def _(ctx):
    return ["import-official", ctx.files["official"], ctx.out, "--rank", "8"], ["--rank 8", "differs from the rank 4"]


@case("import-official: --power 0")
def _(ctx):
    return ["import-official", ctx.files["official"], ctx.out, "--power", "0"], ["--power 0", "> 0"]


@case("import-official: NaN factors")
def _(ctx):
    tensors = load_file(ctx.files["official"])
    key = next(k for k in tensors if k.endswith("up.weight"))
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, ctx.path("nan_off.safetensors"))
    return ["import-official", ctx.path("nan_off.safetensors"), ctx.out], ["nan_off.safetensors", "NaN or infinite", "nothing written"]


@case("import-official: lambda of the wrong length")
def _(ctx):
    base = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora."
    tensors = {base + "q_layer.weight": torch.randn(4, 64), base + "p_layer.weight": torch.randn(64, 4), base + "lambda_layer": torch.rand(3),
               base + "base_q.weight": torch.randn(4, 64), base + "base_p.weight": torch.randn(64, 4), base + "base_lambda": torch.rand(4)}
    save_file(tensors, ctx.path("lam_off.safetensors"))
    return ["import-official", ctx.path("lam_off.safetensors"), ctx.out], ["lam_off.safetensors", "svd_lambda has shape (3,)"]


@case("import-official: missing frozen copy")
def _(ctx):
    base = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora."
    tensors = {base + "q_layer.weight": torch.randn(4, 64), base + "p_layer.weight": torch.randn(64, 4), base + "lambda_layer": torch.rand(4)}
    save_file(tensors, ctx.path("nobase_off.safetensors"))
    return ["import-official", ctx.path("nobase_off.safetensors"), ctx.out], ["nobase_off.safetensors", "missing", "svd_down_base.weight"]


@case("import-official: up and down of different ranks")
def _(ctx):
    tensors = load_file(ctx.files["official"])
    key = next(k for k in tensors if k.endswith("up.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, ctx.path("rank_off.safetensors"))
    return ["import-official", ctx.path("rank_off.safetensors"), ctx.out], ["rank_off.safetensors", "does not match down"]


@case("import-official: int tensors")
def _(ctx):
    tensors = {k: (v * 10).to(torch.int64) for k, v in load_file(ctx.files["official"]).items()}
    save_file(tensors, ctx.path("int_off.safetensors"))
    return ["import-official", ctx.path("int_off.safetensors"), ctx.out], ["int_off.safetensors", "int64", "floating point"]


@case("import-official: foreign keys")
def _(ctx):
    save_file({"encoder.weight": torch.zeros(2)}, ctx.path("foreign.safetensors"))
    return ["import-official", ctx.path("foreign.safetensors"), ctx.out], ["encoder.weight", "not an official T-LoRA key"]


@case("import-official: a pickle with code")
def _(ctx):
    class Planted:
        def __reduce__(self):
            return (open, (ctx.path("CODE-RAN"), "w"))

    path = ctx.path("evil.pt")
    torch.save({"transformer_blocks.0.attn.processor.to_q_lora.down.weight": Planted()}, path)
    return ["import-official", path, ctx.out], ["evil.pt", "refused", "never loaded"]


@case("import-official: a truncated pickle")
def _(ctx):
    path = ctx.path("cut.pt")
    with open(path, "wb") as f:
        f.write(open(ctx.files["official_flux"], "rb").read()[:500])
    return ["import-official", path, ctx.out], ["cut.pt", "not a readable PyTorch checkpoint"]


@case("import-official: a pickle that is not a dict of tensors")
def _(ctx):
    path = ctx.path("list.pt")
    torch.save([torch.zeros(2)], path)
    return ["import-official", path, ctx.out], ["list.pt", "flat dict of tensors"]


@case("import-lycoris: --base-model missing")
def _(ctx):
    return ["import-lycoris", ctx.files["lycoris"], ctx.out, "--base-model", ctx.path("nobase")], ["--base-model", "nobase", "not a folder"]


@case("import-lycoris: --base-model without unet")
def _(ctx):
    os.makedirs(ctx.path("emptybase"))
    return ["import-lycoris", ctx.files["lycoris"], ctx.out, "--base-model", ctx.path("emptybase")], ["emptybase", "no unet/*.safetensors"]


@case("import-lycoris: --min-rank above the rank")
def _(ctx):
    return ["import-lycoris", ctx.files["lycoris"], ctx.out, "--base-model", ctx.files["base"], "--min-rank", "7"], ["--min-rank 7", "larger than the rank 4"]


@case("import-lycoris: NaN factors")
def _(ctx):
    tensors = load_file(ctx.files["lycoris"])
    key = next(k for k in tensors if k.endswith("p_layer.weight"))
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, ctx.path("nan_lyco.safetensors"))
    return ["import-lycoris", ctx.path("nan_lyco.safetensors"), ctx.out, "--base-model", ctx.files["base"]], ["nan_lyco.safetensors", "NaN or infinite"]


@case("import-lycoris: int tensors")
def _(ctx):
    tensors = load_file(ctx.files["lycoris"])
    key = next(k for k in tensors if k.endswith("q_layer.weight"))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, ctx.path("int_lyco.safetensors"))
    return ["import-lycoris", ctx.path("int_lyco.safetensors"), ctx.out, "--base-model", ctx.files["base"]], ["int_lyco.safetensors", "int32"]


@case("import-lycoris: foreign keys")
def _(ctx):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, ctx.path("plain.safetensors"))
    return ["import-lycoris", ctx.path("plain.safetensors"), ctx.out, "--base-model", ctx.files["base"]], ["not a LyCORIS T-LoRA key"]


@case("import-lycoris: a layer the base model lacks")
def _(ctx):
    tensors = {k.replace("attn1_to_q", "attn1_to_z"): v for k, v in load_file(ctx.files["lycoris"]).items()}
    save_file(tensors, ctx.path("nolayer.safetensors"))
    return ["import-lycoris", ctx.path("nolayer.safetensors"), ctx.out, "--base-model", ctx.files["base"]], ["attn1_to_z", "no weight"]


# ----------------------------------------------------------------------------- running a case


def test_enough_distinct_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(name, inputs, tmp_path, capsys):
    build, as_nobody = CASES[name]
    as_nobody = as_nobody or name.endswith("an unreadable file")
    files = dict(inputs)
    if name.startswith("fp16 too narrow") or "fp16 too narrow" in name:
        tensors, meta = _tensors_meta(inputs["sd1"])
        meta.pop("tlora_sha256")  # values too large for fp16, in a file that is otherwise intact (no checksum to break)
        files["huge"] = str(tmp_path / "huge.safetensors")
        save_file({k: (v * 1e4 if not k.endswith(".alpha") else v).contiguous() for k, v in tensors.items()}, files["huge"], meta)
    if as_nobody:  # a case folder nobody can reach: pytest's own temporary folders are private to root
        import tempfile

        root = tempfile.mkdtemp(prefix="tlora-nobody-")
        os.chmod(root, 0o755)
    else:
        root = str(tmp_path / "case")
    os.makedirs(os.path.join(root, "out"))
    os.chmod(os.path.join(root, "out"), 0o777 if as_nobody else 0o755)
    ctx = Ctx(root, files)
    argv, needles = build(ctx)
    if name.endswith("an unreadable file"):  # a private copy nobody may read
        private = ctx.path("private.safetensors")
        with open(private, "wb") as f:
            f.write(open(files["sd1"], "rb").read())
        os.chmod(private, 0o600)
        argv = [argv[0], private] + argv[2:]
        needles = ["private.safetensors", "permission denied"]
    before = snapshot(root)
    inputs_before = snapshot(os.path.dirname(inputs["sd1"]))
    try:
        if as_nobody:
            with privileges_of_nobody():
                code = main(argv)
        else:
            code = main(argv)
    finally:
        if as_nobody:
            import shutil

            after = snapshot(root)
            shutil.rmtree(root, ignore_errors=True)
    err = capsys.readouterr().err
    if as_nobody:
        assert after == before
        before = after = None
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    if before is not None:
        assert snapshot(root) == before  # inputs unchanged, nothing written, no temporaries
    assert snapshot(os.path.dirname(inputs["sd1"])) == inputs_before
    assert not os.path.exists(ctx.path("CODE-RAN"))


# ----------------------------------------------------------------------------- faults while writing


def _good_conversion_args(inputs, out):
    return ["to-kohya", inputs["sd1"], out, "--mask", "mean"]


def test_disk_full(inputs, tmp_path, capsys):
    with mounted_tmpfs(str(tmp_path / "disk"), "size=16k") as disk:
        out = os.path.join(disk, "x.safetensors")
        code = main(_good_conversion_args(inputs, out))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "no space left on the device" in err and "x.safetensors" in err
        assert os.listdir(disk) == []  # no partial file, no temporary


def test_read_only_disk(inputs, tmp_path, capsys):
    with mounted_tmpfs(str(tmp_path / "ro"), "ro,size=64k") as disk:
        out = os.path.join(disk, "x.safetensors")
        code = main(_good_conversion_args(inputs, out))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "read-only" in err and disk in err
        assert os.listdir(disk) == []


def test_file_size_limit(inputs, tmp_path):
    limit = 8 * 1024

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = str(tmp_path / "big" / "x.safetensors")
    os.makedirs(os.path.dirname(out))
    proc = subprocess.run([sys.executable, "-m", "converters", *_good_conversion_args(inputs, out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "file-size limit" in proc.stderr and "x.safetensors" in proc.stderr
    assert os.listdir(os.path.dirname(out)) == []


def test_a_good_conversion_still_works(inputs, tmp_path, capsys):
    """The cases above fail for their own reason: the same command on the good file succeeds."""
    out = str(tmp_path / "ok.safetensors")
    assert main(_good_conversion_args(inputs, out)) == 0
    assert os.path.getsize(out) > 0
    assert main(["import-official", inputs["official"], str(tmp_path / "off.safetensors"), "--hparams", inputs["hparams"]]) == 0
    assert main(["import-official", inputs["official_flux"], str(tmp_path / "offflux.safetensors")]) == 0
    assert main(["import-lycoris", inputs["lycoris"], str(tmp_path / "lyco.safetensors"), "--base-model", inputs["base"]]) == 0
