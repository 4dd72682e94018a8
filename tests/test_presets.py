"""presets/*.toml: each parses the way sd-scripts reads --config_file, uses only argument names
sd-scripts knows, and runs one step of train_tlora.py on the tiny random model of its family."""

import dataclasses
import glob
import json
import os
import subprocess

import pytest
import toml

import train_tlora
from networks.tlora_format import parse_network_args
from tlora_trainer import models, options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "presets", "*.toml")))
EXAMPLE_DIR = os.path.join(ROOT, "examples", "sks_toy")

# Argument names of sd-scripts' train_network.py parser (kohya-ss/sd-scripts 48d368fa);
# sdxl_train_network.py adds cache_text_encoder_outputs(_to_disk) and disable_mmap_load_safetensors.
# sd-scripts turns every TOML key into an attribute WITHOUT any check or warning, so a key outside
# this list would be silently ignored there: presets must not use one.
SD_SCRIPTS_ARGS = frozenset(
    """
    adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier
    bucket_no_upscale bucket_reso_steps cache_info cache_latents cache_latents_to_disk
    caption_dropout_every_n_epochs caption_dropout_rate caption_extension caption_extention
    caption_prefix caption_separator caption_suffix caption_tag_dropout_rate clip_skip color_aug
    conditioning_data_dir config_file console_log_file console_log_level console_log_simple
    cpu_offload_checkpointing dataset_class dataset_config dataset_repeats
    ddp_gradient_as_bucket_view ddp_static_graph ddp_timeout debiased_estimation_loss debug_dataset
    deepspeed dim_from_weights dynamo_backend enable_bucket enable_wildcard face_crop_aug_range
    flip_aug fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16
    fused_backward_pass gradient_accumulation_steps gradient_checkpointing highvram huber_c
    huber_scale huber_schedule huggingface_path_in_repo huggingface_repo_id huggingface_repo_type
    huggingface_repo_visibility huggingface_token in_json initial_epoch initial_step ip_noise_gamma
    ip_noise_gamma_random_strength keep_tokens keep_tokens_separator learning_rate log_config
    log_prefix log_tracker_config log_tracker_name log_with logging_dir loss_type lowram
    lr_decay_steps lr_scheduler lr_scheduler_args lr_scheduler_min_lr_ratio lr_scheduler_num_cycles
    lr_scheduler_power lr_scheduler_timescale lr_scheduler_type lr_warmup_steps masked_loss
    max_bucket_reso max_data_loader_n_workers max_grad_norm max_timestep max_token_length
    max_train_epochs max_train_steps max_validation_steps mem_eff_attn metadata_author
    metadata_description metadata_is_negative_embedding metadata_license metadata_merged_from
    metadata_preprocessor metadata_tags metadata_thumbnail metadata_title metadata_trigger_phrase
    metadata_usage_hint min_bucket_reso min_snr_gamma min_timestep mixed_precision
    multires_noise_discount multires_noise_iterations network_alpha network_args network_dim
    network_dropout network_module network_train_text_encoder_only network_train_unet_only
    network_weights no_half_vae no_metadata noise_offset noise_offset_random_strength
    offload_optimizer_device offload_optimizer_nvme_path offload_param_device
    offload_param_nvme_path optimizer_args optimizer_type output_config output_dir output_name
    persistent_data_loader_workers pretrained_model_name_or_path prior_loss_weight random_crop
    reg_data_dir resize_interpolation resolution resume resume_from_huggingface sample_at_first
    sample_every_n_epochs sample_every_n_steps sample_prompts sample_sampler save_every_n_epochs
    save_every_n_steps save_last_n_epochs save_last_n_epochs_state save_last_n_steps
    save_last_n_steps_state save_model_as save_n_epoch_ratio save_precision save_state
    save_state_on_train_end save_state_to_huggingface scale_v_pred_loss_like_noise_pred
    scale_weight_norms sdpa secondary_separator seed shuffle_caption skip_cache_check
    skip_until_initial_step text_encoder_lr token_warmup_min token_warmup_step tokenizer_cache_dir
    torch_compile train_batch_size train_data_dir training_comment unet_lr use_8bit_adam
    use_lion_optimizer v2 v_parameterization v_pred_like_loss vae vae_batch_size
    validate_every_n_epochs validate_every_n_steps validation_seed validation_split wandb_api_key
    wandb_run_name weighted_captions xformers zero3_init_flag zero3_save_16bit_model zero_stage
    zero_terminal_snr
    """.split()
)
TRAIN_TLORA_ONLY = {"instance_prompt", "save_kohya", "save_diffusers", "sample_compare_base"}
# what flux_train_network.py adds to train_network.py's parser (48d368fa)
FLUX_ARGS = frozenset(
    """
    ae apply_t5_attn_mask blocks_to_swap cache_text_encoder_outputs cache_text_encoder_outputs_to_disk clip_l
    controlnet_model_name_or_path disable_mmap_load_safetensors discrete_flow_shift guidance_scale logit_mean logit_std
    mode_scale model_prediction_type model_type sigmoid_scale split_mode t5xxl t5xxl_max_token_length text_encoder_batch_size
    timestep_sampling weighting_scheme
    """.split()
)
FLUX_PRESETS = [p for p in PRESETS if "flux" in os.path.basename(p)]
SD_PRESETS = [p for p in PRESETS if p not in FLUX_PRESETS]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def flat_keys(path):
    """sd-scripts' read_config_from_file flattening."""
    flat = {}
    for key, value in toml.load(path).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def family_of(path):
    tags = [t.strip() for t in flat_keys(path)["metadata_tags"].split(",")]
    return next(t for t in ("flux", "sdxl", "sd1") if t in tags)


def test_the_expected_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"demo.toml", "demo-random.toml", "tlora-object-sdxl.toml", "tlora-object-sd15.toml", "tlora-character-sdxl.toml",
            "tlora-character-sd15.toml", "trilora-style-sd15.toml", "trilora-style-sdxl.toml", "tlora-flux-object.toml",
            "tlora-flux-character.toml"} <= names


def test_train_tlora_uses_sd_scripts_argument_names():
    ours = {o.name for o in options.OPTIONS}
    assert ours == {a.dest for a in options.build_parser()._actions} - {"help"}
    assert ours - SD_SCRIPTS_ARGS == TRAIN_TLORA_ONLY == {o.name for o in options.OPTIONS if o.ours}


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_preset_is_flat_sd_scripts_config(preset):
    with open(preset, encoding="utf-8") as f:
        text = f.read()
    header = text.split("[", 1)[0]
    assert text.startswith("# ") and len([l for l in header.splitlines() if l.startswith("#")]) >= 3, "a header comment saying when to use it"
    flat = flat_keys(preset)
    known = SD_SCRIPTS_ARGS | (FLUX_ARGS if preset in FLUX_PRESETS else frozenset())
    ours = set(flat) & TRAIN_TLORA_ONLY
    # the first run is train_tlora.py's own (its header says so): it may use train_tlora.py's sampling option
    assert not ours or (os.path.basename(preset) == "demo.toml" and ours == {"sample_compare_base"} and "train_tlora.py only" in header)
    assert set(flat) - ours <= known, f"keys sd-scripts does not know: {set(flat) - ours - known}"
    assert flat["network_module"] == "networks.tlora"
    assert isinstance(flat["network_args"], list) and all(isinstance(a, str) and "=" in a for a in flat["network_args"])
    assert isinstance(flat["resolution"], str)  # sd-scripts calls args.resolution.split(",")
    assert all(isinstance(a, str) and "=" in a for a in flat.get("optimizer_args", []))
    kwargs = dict(a.split("=", 1) for a in flat["network_args"])
    config, _ = parse_network_args(flat["network_dim"], flat["network_alpha"], kwargs)  # what sd-scripts passes
    assert config.algo in ("tlora", "tlora_vanilla", "trilora")
    families = [t.strip() for t in flat["metadata_tags"].split(",")]
    assert len({"sd1", "sdxl", "flux"} & set(families)) == 1
    if preset in FLUX_PRESETS:
        return  # train_tlora.py does not train FLUX (see test_flux_presets)
    args = options.parse_args(["--config_file", preset])
    for key, value in flat.items():
        expected = float(value) if key in ("network_alpha", "learning_rate") else value
        assert getattr(args, key) == expected, key


def test_object_sdxl_preset_has_the_papers_settings():
    flat = flat_keys(os.path.join(ROOT, "presets", "tlora-object-sdxl.toml"))
    kwargs = dict(a.split("=", 1) for a in flat["network_args"])
    assert (flat["network_dim"], kwargs["min_rank"], kwargs["algo"], kwargs["targets"]) == (64, "32", "tlora", "attention")
    assert flat["optimizer_type"] == "AdamW" and flat["learning_rate"] == 1e-4 and flat["optimizer_args"] == ["weight_decay=1e-4"]
    assert (flat["train_batch_size"], flat["resolution"], flat["max_train_steps"]) == (1, "1024,1024", 800)
    assert flat["network_train_unet_only"] is True
    sd15 = flat_keys(os.path.join(ROOT, "presets", "tlora-object-sd15.toml"))
    assert sd15["resolution"] == "512,512"
    assert {k: v for k, v in sd15.items() if k not in ("resolution", "metadata_tags", "output_name")} == {
        k: v for k, v in flat.items() if k not in ("resolution", "metadata_tags", "output_name")}


@pytest.mark.parametrize("preset", SD_PRESETS, ids=os.path.basename)
def test_preset_runs_one_step(preset, tmp_path):
    """Everything from the preset except the model (its family's tiny random one), the data,
    the size and the step count."""
    family = family_of(preset)
    out = tmp_path / "out"
    result = train_tlora.run([
        "--config_file", preset, "--pretrained_model_name_or_path", f"random:{family}-tiny", "--train_data_dir", EXAMPLE_DIR,
        "--resolution", "64", "--max_train_steps", "1", "--output_dir", str(out),
    ])
    assert result.step == 1
    flat = flat_keys(preset)
    name = flat["output_name"]
    import networks.tlora as tlora

    base = models.build_random_model(f"{family}-tiny", 0)
    network, _ = tlora.create_network_from_weights(1.0, str(out / f"{name}.safetensors"), None, base.text_encoders, base.unet)
    expected, _ = parse_network_args(flat["network_dim"], flat["network_alpha"], dict(a.split("=", 1) for a in flat["network_args"]))
    # every setting the preset determines is in the file (the network module adds what it learns
    # from the model itself, e.g. the model family)
    stored = dataclasses.asdict(network.config)
    assert {k: v for k, v in dataclasses.asdict(expected).items() if v is not None} == {
        k: stored[k] for k, v in dataclasses.asdict(expected).items() if v is not None}
    assert network.unet_loras and not network.text_encoder_loras
    assert (out / f"{name}.toml").is_file()


def test_flux_presets(capsys):
    """The official FLUX recipe as the paper and the official code state it, the network each
    preset makes on sd-scripts' FLUX layout, and a clear refusal from train_tlora.py."""
    import networks.tlora as tlora
    import tiny_models as tm
    from tlora_trainer import cli

    flat = flat_keys(os.path.join(ROOT, "presets", "tlora-flux-object.toml"))
    kwargs = dict(a.split("=", 1) for a in flat["network_args"])
    assert (kwargs["algo"], flat["network_dim"], kwargs["min_rank"]) == ("tlora_vanilla", 32, "1")  # vanilla, rank 32, min_rank 1
    assert (flat["optimizer_type"], flat["learning_rate"], flat["lr_scheduler"]) == ("Prodigy", 1.0, "constant")
    assert (flat["max_train_steps"], flat["resolution"], flat["mixed_precision"], flat["guidance_scale"]) == (1000, "1024,1024", "bf16", 1.0)
    assert flat["network_alpha"] == flat["network_dim"]  # the official adapters have no alpha: scale 1
    tes, flux = tm.flux_models()
    net = tlora.create_network(1.0, 4, 4, None, tes, flux, **{**kwargs, "min_rank": "1"})
    names = {layer.lora_name for layer in net.unet_loras}
    # separate q/k/v adapters in fused layers (as the official code's), no MLP part, both output projections
    assert "lora_transformer_transformer_blocks_0_attn_to_q" in names and "lora_transformer_single_transformer_blocks_1_attn_to_v" in names
    assert "lora_unet_double_blocks_0_img_attn_proj" in names and "lora_unet_double_blocks_0_txt_attn_proj" in names
    assert not any("proj_mlp" in n or "mlp" in n or "mod" in n for n in names)
    character = flat_keys(os.path.join(ROOT, "presets", "tlora-flux-character.toml"))
    net = tlora.create_network(1.0, 4, 4, None, tes, flux, **dict(a.split("=", 1) for a in character["network_args"]))
    assert len(net.unet_loras) == 10 * len(flux.double_blocks) + 3 * len(flux.single_blocks)  # lora_flux's default layers
    capsys.readouterr()  # the tiny models' creation logs
    for preset in FLUX_PRESETS:
        assert cli.main(["--config_file", preset, "--output_dir", "/nonexistent/out"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "flux_train_network.py" in err[0] and "trains SD 1.x/2.x and SDXL" in err[0]


SD_SCRIPTS_DIR = os.environ.get("SD_SCRIPTS_DIR", "/work/sd-scripts")
SD_SCRIPTS_PYTHON = os.environ.get("SD_SCRIPTS_PYTHON", "/work/sdenv/bin/python")
SD_CHECK = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import train_network, sdxl_train_network, flux_train_network
from library import train_util
out = {}
for preset in sys.argv[1:]:
    name = os.path.basename(preset)
    module = flux_train_network if "flux" in name else sdxl_train_network if "sdxl" in name else train_network
    parser = module.setup_parser()
    sys.argv = ["x", "--config_file", preset]
    args = train_util.read_config_from_file(parser.parse_args(), parser)
    train_util.prepare_dataset_args(args, True)
    dests = {a.dest for a in parser._actions}
    out[preset] = {"unknown": sorted(k for k in vars(args) if k not in dests), "resolution": list(args.resolution),
                   "network_args": args.network_args, "optimizer_args": args.optimizer_args,
                   "network_module": args.network_module, "network_dim": args.network_dim}
print("JSON" + json.dumps(out))
"""


@pytest.mark.skipif(not (os.path.isfile(SD_SCRIPTS_PYTHON) and os.path.isfile(os.path.join(SD_SCRIPTS_DIR, "train_network.py"))),
                    reason="no sd-scripts checkout + venv (set SD_SCRIPTS_DIR / SD_SCRIPTS_PYTHON)")
def test_presets_with_sd_scripts_own_config_reader():
    """sd-scripts' read_config_from_file and prepare_dataset_args on every preset, in its own venv."""
    proc = subprocess.run([SD_SCRIPTS_PYTHON, "-c", SD_CHECK, *PRESETS], cwd=SD_SCRIPTS_DIR, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("JSON", 1)[1])
    for preset in PRESETS:
        got = result[preset]
        flat = flat_keys(preset)
        # sd-scripts would silently ignore a key it does not know; only the train_tlora.py-only demo has one
        assert got["unknown"] == (["sample_compare_base"] if os.path.basename(preset) == "demo.toml" else []), preset
        width, height = (int(v) for v in (flat["resolution"].split(",") * 2)[:2])
        assert got["resolution"] == [width, height]
        assert got["network_args"] == flat["network_args"] and got["network_module"] == "networks.tlora"
        assert got["network_dim"] == flat["network_dim"] and got["optimizer_args"] == flat.get("optimizer_args")
