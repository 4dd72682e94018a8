"""converters: conversions checked against independent oracles (diffusers' own loader, the
T-LoRA formulas written out here, torch.linalg.svd), on tiny random-weight SD1 / SDXL pipelines.

Tolerances: U-Net outputs of the converted file (diffusers' load_lora_weights) vs the native file
(networks.tlora at the same timestep) agree to 1e-4 of the LoRA's own effect (max abs); weight
changes in fp32 to a relative Frobenius error of 1e-5.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import networks.tlora as tlora
from converters import ConversionError, convert_file, describe, import_lycoris, import_official
from networks import tlora_families as naming
from converters.diffusers import apply_tlora, remove_tlora
from test_converters_support import (
    ALGOS,
    MIN_RANK,
    RANK,
    REAL_SDXL_SGM,
    TINY_SDXL_SGM,
    lora_module_count,
    make_native,
    te_out,
    text_encoders,
    tiny_pipeline,
    to_sgm_by_table,
    unet_out,
)

T = 1000
OUTPUT_TOL = 1e-4


# ----------------------------------------------------------------------------- independent formulas


def r_of_t(t, rank, min_rank, power=1.0):
    """T-LoRA's r(t) written out from the paper (not networks' code)."""
    import math

    return math.floor(((T - t) / T) ** power * (rank - min_rank)) + min_rank


def mask_of_t(t, rank, min_rank):
    m = torch.zeros(rank, dtype=torch.float64)
    m[: r_of_t(t, rank, min_rank)] = 1
    return m


def native_layers(path):
    """{name: dict of tensors} and the config of a native file, read directly."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    layers = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        layers.setdefault(name, {})[suffix] = value.double()
    return layers, json.loads(meta["tlora_config"])


def formula_delta(t, mask):
    """alpha/R · ( P diag(λ⊙m) Q − P0 diag(λ0⊙m) Q0 ), 2-D, from the file's tensors."""
    if "svd_down.weight" in t:
        q, p, lam = t["svd_down.weight"], t["svd_up.weight"], t["svd_lambda"]
    else:
        q, p = t["lora_down.weight"], t["lora_up.weight"]
        lam = torch.ones(q.shape[0], dtype=torch.float64)
    rank = q.shape[0]
    c = lam * (mask if mask is not None else 1)
    q2, p2 = q.reshape(rank, -1), p.reshape(p.shape[0], rank)
    delta = p2 @ torch.diag(c) @ q2
    if "svd_down_base.weight" in t:
        c0 = t["svd_lambda_base"] * (mask if mask is not None else 1)
        delta = delta - t["svd_up_base.weight"].reshape(p.shape[0], rank) @ torch.diag(c0) @ t["svd_down_base.weight"].reshape(rank, -1)
    alpha = float(t["alpha"]) if "alpha" in t else rank
    return delta * (alpha / rank)


def kohya_delta(t):
    down, up = t["lora_down.weight"].double(), t["lora_up.weight"].double()
    rank = down.shape[0]
    alpha = float(t["alpha"]) if "alpha" in t else rank
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * (alpha / rank)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipes")
    return {family: tiny_pipeline(family, str(folder / family)) for family in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def natives(tmp_path_factory):
    return tmp_path_factory.mktemp("natives")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (less contention); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_native_cache = {}


def native_file(pipes, folder, family, algo, conv=False):
    key = (family, algo, conv)
    if key not in _native_cache:
        path = str(folder / f"{family}_{algo}{'_conv' if conv else ''}.safetensors")
        make_native(pipes[family], algo, path, conv=conv)
        _native_cache[key] = path
    return _native_cache[key]


@torch.no_grad()
def native_outputs(pipe, path, t):
    """U-Net and text encoder outputs with the native file applied by networks.tlora itself."""
    net, _ = tlora.create_network_from_weights(1.0, path, None, text_encoders(pipe), pipe.unet)
    net.apply_to(text_encoders(pipe), pipe.unet)
    try:
        return unet_out(pipe, t), te_out(pipe)
    finally:
        net.remove()


# ----------------------------------------------------------------------------- diffusers is the oracle


CASES = [(f, a, False) for f in ("sd1", "sdxl") for a in ALGOS] + [("sd1", "tlora", True), ("sdxl", "tlora", True)]


@pytest.mark.parametrize("family,algo,conv", CASES, ids=[f"{f}-{a}{'-conv' if c else ''}" for f, a, c in CASES])
def test_converted_file_in_diffusers_matches_native(pipes, natives, tmp_path, family, algo, conv):
    pipe = pipes[family]
    native = native_file(pipes, natives, family, algo, conv)
    t = 500
    base = unet_out(pipe, t)
    ref, ref_te = native_outputs(pipe, native, t)
    effect = float((ref - base).abs().max())
    assert effect > 1e-2, "the LoRA must change the output for the comparison to mean anything"
    n_modules = len({k.split(".")[0] for k in load_file(native)})
    for target in ("kohya", "diffusers"):
        out = str(tmp_path / f"{target}.safetensors")
        report = convert_file(native, out, target=target, mask=f"t={t}", layers_per_block=1)
        assert report.max_rel_error < 1e-5
        pipe.load_lora_weights(out)
        try:
            got = unet_out(pipe, t)
            got_te = te_out(pipe)
            loaded = lora_module_count(pipe.unet) + sum(lora_module_count(te) for te in text_encoders(pipe))
        finally:
            pipe.unload_lora_weights()
        diff = float((got - ref).abs().max())
        print(f"{family} {algo} conv={conv} {target}: max |diffusers - native| = {diff:.2e} (LoRA effect {effect:.2e})")
        assert diff <= OUTPUT_TOL * effect + 1e-6, (target, diff, effect)
        for a, b in zip(got_te, ref_te):
            assert float((a - b).abs().max()) <= 1e-4
        assert loaded == n_modules, f"{target}: diffusers attached {loaded} LoRA layers, the file has {n_modules} modules"
    assert float((unet_out(pipe, t) - base).abs().max()) == 0  # unloaded cleanly


def test_sgm_named_native_file(pipes, natives, tmp_path):
    """A native SDXL file with sd-scripts' SGM names (renamed by a hand-written table): the kohya
    output (SGM and diffusers naming) loads in diffusers and matches; apply_tlora reads it too."""
    pipe = pipes["sdxl"]
    native = native_file(pipes, natives, "sdxl", "tlora")
    tensors = load_file(native)
    from safetensors import safe_open

    with safe_open(native, "pt") as f:
        meta = f.metadata()
    sgm = to_sgm_by_table(tensors, TINY_SDXL_SGM)
    assert sum(k.startswith("lora_unet_input_blocks_3_1_") for k in sgm) > 0
    sgm_path = str(tmp_path / "sgm_native.safetensors")
    save_file(sgm, sgm_path, {k: v for k, v in meta.items() if k != "tlora_sha256"})  # renamed by hand: no checksum
    ref, _ = native_outputs(pipe, native, 700)
    for mode in ("sgm", "diffusers"):
        out = str(tmp_path / f"kohya_{mode}.safetensors")
        convert_file(sgm_path, out, target="kohya", mask="t=700", naming=mode, layers_per_block=1)
        keys = load_file(out)
        assert any("input_blocks" in k for k in keys) == (mode == "sgm")
        if mode == "sgm":  # the SGM names are exactly the hand table's
            assert {k.split(".")[0] for k in keys if k.startswith("lora_unet")} == {k.split(".")[0] for k in sgm if k.startswith("lora_unet")}
        pipe.load_lora_weights(out)
        try:
            got = unet_out(pipe, 700)
        finally:
            pipe.unload_lora_weights()
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    apply_tlora(pipe, sgm_path, mask="t=700")
    try:
        got = unet_out(pipe, 700)
    finally:
        remove_tlora(pipe)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_sgm_naming_roundtrip_and_tables(pipes):
    # every adapted layer of the tiny SDXL U-Net, including resnets and samplers (conv_dim)
    net = tlora.create_network(1.0, 4, 4, None, [], pipes["sdxl"].unet, algo="lora", conv_dim="4")
    names = [layer.lora_name for layer in net.unet_loras]
    assert any("resnets" in n for n in names) and any("samplers" in n for n in names)
    for n in names:
        s = naming.unet_name_to_sgm(n, 1)
        assert naming.is_sgm_name(s), n
        assert naming.unet_name_from_sgm(s, 1) == n
    for table, lpb in ((TINY_SDXL_SGM, 1), (REAL_SDXL_SGM, 2)):
        for diff, sgm in table.items():
            suffix = "_transformer_blocks_0_attn1_to_q" if "attentions" in diff else ""
            a, b = f"lora_unet_{diff}{suffix}", f"lora_unet_{sgm}{suffix}"
            assert naming.unet_name_to_sgm(a, lpb) == b
            assert naming.unet_name_from_sgm(b, lpb) == a
    # kohya -> diffusers module paths, looked up against the real module names
    paths = {name for name, _ in pipes["sdxl"].unet.named_modules()}
    for n in names:
        assert naming.module_path(naming.split_prefix(n)[1]) in paths, n


def _merged_output(pipe, deltas, t):
    """U-Net output with the given weight changes added to a copy of the U-Net's weights."""
    unet = copy.deepcopy(pipe.unet)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for path, delta in deltas.items():
            weight = modules[path].weight
            weight += delta.reshape(weight.shape).to(weight.dtype)
    original = pipe.unet
    try:
        pipe.unet = unet
        return unet_out(pipe, t)
    finally:
        pipe.unet = original


def test_dynamic_rank_files_load_in_diffusers(pipes, natives, tmp_path):
    """Per-module ranks and alphas (--keep-energy) are read by diffusers as the file means them:
    diffusers' output equals the file's own factors merged into the weights (formula here)."""
    pipe = pipes["sdxl"]
    native = native_file(pipes, natives, "sdxl", "tlora")
    paths = {"lora_unet_" + n.replace(".", "_"): n for n, _ in pipe.unet.named_modules()}
    for target in ("kohya", "diffusers"):
        out = str(tmp_path / f"dyn_{target}.safetensors")
        convert_file(native, out, target=target, mask="mean", keep_energy=0.9, naming="diffusers")
        tensors = load_file(out)
        deltas = {}
        if target == "kohya":
            names = {k.split(".")[0] for k in tensors if k.startswith("lora_unet")}
            # U-Net modules are zero-padded to one rank (see loader_safe_alpha): count the rows in use
            ranks = {int((tensors[f"{n}.lora_down.weight"].reshape(tensors[f"{n}.lora_down.weight"].shape[0], -1).abs().sum(1) > 0).sum())
                     for n in names}
            for n in names:
                deltas[paths[n]] = kohya_delta({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == n})
        else:
            mods = {k[len("unet."):-len(".lora_A.weight")] for k in tensors if k.startswith("unet.") and k.endswith("lora_A.weight")}
            ranks = {int((tensors[f"unet.{m}.lora_A.weight"].reshape(tensors[f"unet.{m}.lora_A.weight"].shape[0], -1).abs().sum(1) > 0).sum()) for m in mods}
            for m in mods:
                a, b = tensors[f"unet.{m}.lora_A.weight"].double(), tensors[f"unet.{m}.lora_B.weight"].double()
                deltas[m] = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        assert len(ranks) > 1, "the test needs modules of different ranks"
        want = _merged_output(pipe, deltas, 400)
        pipe.load_lora_weights(out)
        try:
            got = unet_out(pipe, 400)  # the U-Net only: the reference merges the U-Net's changes
        finally:
            pipe.unload_lora_weights()
        if target == "kohya":  # text encoders: diffusers' output vs the file's factors merged (formula)
            for te_prefix, te in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
                # kohya names carry CLIP's text_model root, which transformers 5 dropped from CLIPTextModel
                root = "" if hasattr(te, "text_model") else "text_model_"
                te_paths = {te_prefix + root + n.replace(".", "_"): n for n, _ in te.named_modules()}
                te_deltas = {te_paths[n]: kohya_delta({k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == n})
                             for n in {k.split(".")[0] for k in tensors if k.startswith(te_prefix)}}
                te_ranks = {tensors[f"{n}.lora_down.weight"].shape[0] for n in {k.split(".")[0] for k in tensors if k.startswith(te_prefix)}}
                ref_te = copy.deepcopy(te)
                modules = dict(ref_te.named_modules())
                with torch.no_grad():
                    for path, delta in te_deltas.items():
                        modules[path].weight += delta.reshape(modules[path].weight.shape).float()
                    ids = torch.arange(3, 12)[None]
                    want_te = ref_te(ids)[0]
                pipe.load_lora_weights(out)
                try:
                    with torch.no_grad():
                        got_te = te(ids)[0]
                finally:
                    pipe.unload_lora_weights()
                print(f"  {te_prefix} ranks {sorted(te_ranks)}: max |diffusers - merged| = {float((got_te - want_te).abs().max()):.2e}")
                assert float((got_te - want_te).abs().max()) < 1e-4
        diff = float((got - want).abs().max())
        print(f"keep-energy 0.9 {target}: ranks {sorted(ranks)}, max |diffusers - merged file factors| = {diff:.2e}")
        assert diff <= 1e-4 * float((want - unet_out(pipe, 400)).abs().max()) + 1e-6


# ----------------------------------------------------------------------------- weight-space accuracy


def test_exact_mode_is_exact_and_rank(pipes, natives, tmp_path):
    for algo in ("tlora", "tlora_vanilla", "trilora"):
        native = native_file(pipes, natives, "sd1", algo)
        layers, cfg = native_layers(native)
        out = str(tmp_path / f"{algo}.safetensors")
        convert_file(native, out, target="kohya", mask="t=300")
        got = load_file(out)
        worst = 0.0
        for name, t in layers.items():
            masked = algo.startswith("tlora") and name.startswith("lora_unet")
            mask = mask_of_t(300, RANK, MIN_RANK) if masked else None
            conv = {k.split(".", 1)[1]: v for k, v in got.items() if k.split(".")[0] == name}
            want = formula_delta(t, mask)
            worst = max(worst, rel(kohya_delta(conv).reshape(want.shape), want))
            r = r_of_t(300, RANK, MIN_RANK) if masked else RANK
            assert conv["lora_down.weight"].shape[0] == (2 * r if algo == "tlora" else r)
            assert conv["lora_down.weight"].dim() == t[next(k for k in t if k.endswith("down.weight"))].dim()
        print(f"exact {algo}: max relative error of the weight change {worst:.2e}")
        assert worst < 1e-6


def test_mean_mask_beats_full_mask_over_t(pipes, natives, tmp_path):
    native = native_file(pipes, natives, "sd1", "tlora")
    layers, _ = native_layers(native)
    errors = {}
    for mode in ("full", "mean"):
        out = str(tmp_path / f"{mode}.safetensors")
        convert_file(native, out, target="kohya", mask=mode)
        got = load_file(out)
        sq, rel_sum, count = 0.0, 0.0, 0
        for name, t in layers.items():
            if not name.startswith("lora_unet"):
                continue
            conv = kohya_delta({k.split(".", 1)[1]: v for k, v in got.items() if k.split(".")[0] == name})
            for step in range(0, T, 37):
                want = formula_delta(t, mask_of_t(step, RANK, MIN_RANK))
                d = conv.reshape(want.shape) - want
                sq += float((d**2).sum())
                rel_sum += float(d.norm() / want.norm())
                count += 1
        errors[mode] = (sq / count, rel_sum / count)
    print(f"mean over t of the weight-change error: full {errors['full'][0]:.4e} (relative {errors['full'][1]:.3f}), "
          f"mean {errors['mean'][0]:.4e} (relative {errors['mean'][1]:.3f})")
    assert errors["mean"][0] < errors["full"][0]
    assert errors["mean"][1] < errors["full"][1]


def test_mean_mask_is_the_fraction_of_timesteps_each_rank_is_active(pipes, natives, tmp_path):
    """--mask mean bakes in m_i = #{t in 0..T-1 : i < r(t)} / T, counted here from the paper's r(t);
    the mask of any single t (e.g. t=500) differs from it."""
    native = native_file(pipes, natives, "sd1", "tlora")
    layers, _ = native_layers(native)
    fraction = torch.tensor([sum(1 for t in range(T) if i < r_of_t(t, RANK, MIN_RANK)) / T for i in range(RANK)], dtype=torch.float64)
    assert not torch.allclose(fraction, mask_of_t(500, RANK, MIN_RANK))
    out = str(tmp_path / "mean.safetensors")
    convert_file(native, out, target="kohya", mask="mean")
    got = load_file(out)
    checked = 0
    for name, t in layers.items():
        mask = fraction if name.startswith("lora_unet") else None
        want = formula_delta(t, mask)
        conv = kohya_delta({k.split(".", 1)[1]: v for k, v in got.items() if k.split(".")[0] == name}).reshape(want.shape)
        assert rel(conv, want) < 1e-6, name
        if mask is not None:
            assert rel(conv, formula_delta(t, mask_of_t(500, RANK, MIN_RANK))) > 1e-3  # a one-t mask would not pass
            checked += 1
    assert checked > 10


def test_rank_k_error_is_discarded_energy(pipes, natives, tmp_path):
    native = native_file(pipes, natives, "sd1", "tlora")
    layers, _ = native_layers(native)
    out = str(tmp_path / "k2.safetensors")
    report = convert_file(native, out, target="kohya", mask="full", rank=3)
    got = load_file(out)
    worst = 0.0
    for name, t in layers.items():
        want = formula_delta(t, None)
        s = torch.linalg.svdvals(want.reshape(want.shape[0], -1))
        expected = float((s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        conv = {k.split(".", 1)[1]: v for k, v in got.items() if k.split(".")[0] == name}
        assert conv["lora_down.weight"].shape[0] == 3
        actual = rel(kohya_delta(conv).reshape(want.shape), want)
        worst = max(worst, abs(actual - expected))
        assert abs(report.per_module[name] - expected) < 1e-5
    print(f"--rank 3: max |error - discarded energy| = {worst:.2e}")
    assert worst < 1e-5
    # dynamic: the smallest rank that keeps 99% of the energy
    out = str(tmp_path / "dyn.safetensors")
    convert_file(native, out, target="kohya", mask="mean", keep_energy=0.99)
    got = load_file(out)
    mean_mask = torch.stack([mask_of_t(step, RANK, MIN_RANK) for step in range(T)]).mean(0)
    for name, t in layers.items():
        mask = mean_mask if name.startswith("lora_unet") else None
        want = formula_delta(t, mask)
        energy = torch.linalg.svdvals(want.reshape(want.shape[0], -1)) ** 2
        frac = torch.cumsum(energy, 0) / energy.sum()
        down = got[f"{name}.lora_down.weight"]
        k = int((down.reshape(down.shape[0], -1).abs().sum(1) > 0).sum())  # U-Net modules are zero-padded to one rank
        assert frac[k - 1] >= 0.99 - 1e-9 and (k == 1 or frac[k - 2] < 0.99), (name, k, frac)


def test_dtype_and_metadata(pipes, natives, tmp_path):
    native = native_file(pipes, natives, "sdxl", "tlora")
    out = str(tmp_path / "fp16.safetensors")
    report = convert_file(native, out, target="kohya", mask="mean", dtype="fp16", model_card=True, instance_prompt="a sks dog")
    tensors = load_file(out)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert 0 < report.max_rel_error < 5e-3
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.title"] == "fp16"
    assert float(meta["ss_network_alpha"]) == int(meta["ss_network_dim"])  # alpha = rank: the scale is in the factors
    assert all(float(v) == tensors[k[: -len("alpha")] + "lora_down.weight"].shape[0] for k, v in tensors.items() if k.endswith(".alpha"))
    assert "tlora_config" not in meta
    card = open(tmp_path / "README.md").read()
    assert card.startswith("---\nbase_model:") and "- t-lora" in card and 'instance_prompt: "a sks dog"' in card and "`mean`" in card
    text = describe(out)
    assert "format: kohya" in text and "sdxl" in text
    sd1 = native_file(pipes, natives, "sd1", "tlora")
    out = str(tmp_path / "sd1.safetensors")
    convert_file(sd1, out, target="diffusers", mask="mean")
    assert "format: diffusers" in describe(out)
    with safe_open(out, "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == adapter["unet.r"]
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in load_file(out))
    # 1x1 convolutions (SD1 proj_in / proj_out) keep 4-D factors
    proj = load_file(out)["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]
    assert proj.dim() == 4 and tuple(proj.shape[2:]) == (1, 1)


# ----------------------------------------------------------------------------- timestep-aware sampling


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_apply_tlora_mask_follows_each_step(pipes, natives, tmp_path, family):
    """Sampling with a scheduler: each step's layers see that step's timestep and compute
    W + ΔW(m_t) (formula here). SDXL uses an SGM-named file (sd-scripts' names)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe = pipes[family]
    native = native_file(pipes, natives, family, "tlora")
    layers, _ = native_layers(native)
    if family == "sdxl":
        from safetensors import safe_open

        with safe_open(native, "pt") as f:
            meta = f.metadata()
        sgm_path = str(tmp_path / "sgm.safetensors")
        save_file(to_sgm_by_table(load_file(native), TINY_SDXL_SGM), sgm_path, {k: v for k, v in meta.items() if k != "tlora_sha256"})
        network = apply_tlora(pipe, sgm_path, scale=1.0)
    else:
        network = apply_tlora(pipe, native, scale=1.0)
    layer = next(l for l in network.unet_loras if l.lora_name.endswith("attn1_to_q"))
    module = layer.org_module
    seen = []

    def hook(mod, args, output):
        seen.append((network.timestep_state.timesteps.clone(), args[0].detach().clone(), output.detach().clone()))

    handle = module.register_forward_hook(hook)
    try:
        scheduler_class = EulerDiscreteScheduler if family == "sd1" else DDIMScheduler
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        pipe("a photo of a sks dog", num_inference_steps=3, guidance_scale=2.0, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        remove_tlora(pipe)
    timesteps = pipe.scheduler.timesteps
    assert len(seen) == 3
    counts = []
    t_file = layers[layer.lora_name]
    for (t_seen, x, y), t_sched in zip(seen, timesteps):
        assert float(t_seen.reshape(-1)[0]) == pytest.approx(float(t_sched))
        t_int = float(t_sched)
        counts.append(r_of_t(t_int, RANK, MIN_RANK))
        weight = module.weight.double() + formula_delta(t_file, mask_of_t(t_int, RANK, MIN_RANK))
        want = torch.nn.functional.linear(x.double(), weight, None if module.bias is None else module.bias.double())
        assert float((y.double() - want).abs().max()) < 1e-4 * float(want.abs().max())
    print(f"apply_tlora: timesteps {[round(float(t)) for t in timesteps]} -> active ranks {counts}")
    assert len(set(counts)) > 1
    assert not hasattr(pipe, "_tlora_networks") and module.forward.__self__ is module  # removed cleanly


# ----------------------------------------------------------------------------- importers


def _attention_modules(unet):
    return [(n, m) for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))]


def test_import_official(pipes, tmp_path):
    pipe = pipes["sdxl"]
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, module in _attention_modules(pipe.unet):
        block, proj = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[: -len(".to_out.0")], "to_out")
        prefix = f"{block}.processor.{proj}_lora."
        r = RANK
        for q_key, p_key, lam_key in (("q_layer.weight", "p_layer.weight", "lambda_layer"), ("base_q.weight", "base_p.weight", "base_lambda")):
            # orthonormal-like scale, as trained factors are
            tensors[prefix + q_key] = torch.randn(r, module.in_features, generator=g) / module.in_features**0.5
            tensors[prefix + p_key] = torch.randn(module.out_features, r, generator=g) / module.out_features**0.5
            tensors[prefix + lam_key] = torch.rand(1, r, generator=g)
    src = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(tensors, src)
    hparams = tmp_path / "hparams.yml"
    hparams.write_text(f"lora_rank: {RANK}\nmin_rank: {MIN_RANK}\nalpha_rank_scale: 1.0\nsig_type: last\ntrainer_type: ortho_lora\n")
    out = str(tmp_path / "native.safetensors")
    summary = import_official(src, out, hparams=str(hparams), naming_mode="diffusers")
    assert summary["algo"] == "tlora" and summary["min_rank"] == MIN_RANK
    # reference: the official formula (scale 1) merged into a copy of the U-Net, at t=800
    t = 800
    m = mask_of_t(t, RANK, MIN_RANK)
    ref_pipe_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, module in _attention_modules(ref_pipe_unet):
            block, proj = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[: -len(".to_out.0")], "to_out")
            pre = f"{block}.processor.{proj}_lora."
            d = (tensors[pre + "p_layer.weight"].double() @ torch.diag(tensors[pre + "lambda_layer"][0].double() * m) @ tensors[pre + "q_layer.weight"].double()
                 - tensors[pre + "base_p.weight"].double() @ torch.diag(tensors[pre + "base_lambda"][0].double() * m) @ tensors[pre + "base_q.weight"].double())
            module.weight += d.float()
    original = pipe.unet
    try:
        pipe.unet = ref_pipe_unet
        want = unet_out(pipe, t)
    finally:
        pipe.unet = original
    net, _ = tlora.create_network_from_weights(1.0, out, None, [], pipe.unet)
    net.apply_to([], pipe.unet)
    try:
        got = unet_out(pipe, t)
    finally:
        net.remove()
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    # bad: a file that is not an official checkpoint
    with pytest.raises(ConversionError, match="import-official"):  # converting it directly says what to do
        convert_file(src, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConversionError, match="not an official T-LoRA key"):
        import_official(native_file_path_kohya(tmp_path), str(tmp_path / "x.safetensors"), rank=4)
    assert not os.path.exists(tmp_path / "x.safetensors")


def native_file_path_kohya(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_file({"lora_unet_a_b.lora_down.weight": torch.zeros(2, 3), "lora_unet_a_b.lora_up.weight": torch.zeros(3, 2)}, path)
    return path


def test_import_lycoris(pipes, tmp_path):
    pipe = pipes["sdxl"]
    base_dir = tmp_path / "base"
    pipe.unet.save_pretrained(str(base_dir / "unet"))
    pipe.text_encoder.save_pretrained(str(base_dir / "text_encoder"))
    pipe.text_encoder_2.save_pretrained(str(base_dir / "text_encoder_2"))
    g = torch.Generator().manual_seed(7)
    tensors, weights = {}, {}
    for name, module in _attention_modules(pipe.unet):
        kname = "lora_unet_" + name.replace(".", "_")
        kname = naming.unet_name_to_sgm(kname, 1)  # LyCORIS under sd-scripts uses its SGM names
        u, s, vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
        tensors[f"{kname}.q_layer.weight"] = (vh[:RANK] + 0.05 * torch.randn(RANK, vh.shape[1], generator=g, dtype=torch.float64)).float().contiguous()
        tensors[f"{kname}.p_layer.weight"] = (u[:, :RANK] + 0.05 * torch.randn(u.shape[0], RANK, generator=g, dtype=torch.float64)).float().contiguous()
        tensors[f"{kname}.lambda_layer"] = (s[None, :RANK] * 1.1).float().contiguous()
        tensors[f"{kname}.alpha"] = torch.tensor(2.0)
        weights[kname] = module.weight.detach().double()
    src = str(tmp_path / "lyco.safetensors")
    save_file(tensors, src, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "tlora"})})
    out = str(tmp_path / "native.safetensors")
    summary = import_lycoris(src, out, str(base_dir), min_rank=MIN_RANK)
    assert summary["algo"] == "tlora"
    layers, cfg = native_layers(out)
    assert cfg["min_rank"] == MIN_RANK
    worst = 0.0
    for kname, w in weights.items():
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # LyCORIS' frozen copy: principal triplets of W
        for t in (0, 999):
            m = mask_of_t(t, RANK, MIN_RANK)
            q, p, lam = (tensors[f"{kname}.{k}"].double() for k in ("q_layer.weight", "p_layer.weight", "lambda_layer"))
            want = (p @ torch.diag(lam[0] * m) @ q - u[:, :RANK] @ torch.diag(s[:RANK] * m) @ vh[:RANK]) * (2.0 / RANK)
            worst = max(worst, rel(formula_delta(layers[kname], m), want))
    print(f"import-lycoris: max relative error of the rebuilt change {worst:.2e}")
    assert worst < 1e-5
    with pytest.raises(ConversionError, match="import-lycoris"):
        convert_file(src, str(tmp_path / "y.safetensors"))
    with pytest.raises(ConversionError, match="base model"):
        import_lycoris(src, str(tmp_path / "y.safetensors"), None)
    assert not os.path.exists(tmp_path / "y.safetensors")


# ----------------------------------------------------------------------------- bad input, CLI


def _listing(folder):
    return sorted(os.listdir(folder))


def test_bad_inputs_write_nothing(pipes, natives, tmp_path):
    native = native_file(pipes, natives, "sd1", "tlora")
    not_lora = str(tmp_path / "not_lora.safetensors")
    save_file({"model.diffusion_model.weight": torch.zeros(3)}, not_lora)
    truncated = str(tmp_path / "truncated.safetensors")
    with open(native, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    unknown = str(tmp_path / "unknown_algo.safetensors")
    from safetensors import safe_open

    with safe_open(native, "pt") as f:
        meta = dict(f.metadata())
    meta_native = {k: v for k, v in meta.items() if k != "tlora_sha256"}  # edited below: no checksum to break
    cfg = json.loads(meta["tlora_config"])
    cfg["algo"] = "dora_plus"
    meta["tlora_config"] = json.dumps(cfg)
    save_file(load_file(native), unknown, meta)
    pickle_file = str(tmp_path / "pickle.safetensors")
    torch.save({"a": torch.zeros(1)}, pickle_file)
    cases = [
        (not_lora, "not a LoRA tensor"),
        (truncated, "truncated"),
        (unknown, "algo='dora_plus' is unknown"),
        (pickle_file, "not safetensors"),
        (str(tmp_path / "missing.safetensors"), "no such file"),
    ]
    before = _listing(tmp_path)
    out = str(tmp_path / "out.safetensors")
    for path, message in cases:
        for target in ("kohya", "diffusers"):
            with pytest.raises(ConversionError, match=message):
                convert_file(path, out, target=target)
    with pytest.raises(ConversionError, match="is the input file"):
        convert_file(native, native, target="kohya")
    with pytest.raises(ConversionError, match="mask"):
        convert_file(native, out, mask="t=1000")
    huge = str(tmp_path / "huge.safetensors")  # factors too large for fp16: verification refuses
    save_file({k: (v * 1e4 if not k.endswith(".alpha") else v) for k, v in load_file(native).items()}, huge, meta_native)
    with pytest.raises(ConversionError, match="verification failed"):
        convert_file(huge, out, dtype="fp16")
    before.append("huge.safetensors")
    before.sort()
    assert _listing(tmp_path) == before  # nothing written, no temporary files left
    assert open(native, "rb").read() == data
    # the command line says the same and exits with 2
    result = subprocess.run([sys.executable, "-m", "converters", "to-kohya", unknown, out], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2 and "dora_plus" in result.stderr
    assert _listing(tmp_path) == before


def test_cli_help_and_run(pipes, natives, tmp_path, capsys):
    from converters.__main__ import main

    for command in ("info", "to-kohya", "to-diffusers", "import-official", "import-lycoris"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "example" in capsys.readouterr().out, command
    native = native_file(pipes, natives, "sdxl", "ortho")
    assert main(["info", native]) == 0
    text = capsys.readouterr().out
    assert "algo: ortho" in text and "rank(s): 4" in text
    # the real command line, once, in a fresh interpreter
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "cli.safetensors")
    result = subprocess.run([sys.executable, "-m", "converters", "to-kohya", native, out, "--mask", "mean", "--rank", "4"],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "worst modules" in result.stdout and "MB" in result.stdout and os.path.exists(out)
