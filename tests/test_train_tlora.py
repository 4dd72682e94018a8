"""train_tlora.py on CPU with the tiny random models: the demo end to end, interrupted + resumed
runs, DDP on two gloo processes, bad input, NaN loss. In-process runs where possible (fast);
subprocesses where the command line itself is what is tested."""

import os
import re
import subprocess
import sys

import pytest
import torch

import train_tlora
from networks.tlora_format import read_safetensors
from tlora_trainer import data, errors, loop, models, options, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DIR = os.path.join(ROOT, "examples", "sks_toy")
DEMO = os.path.join(ROOT, "presets", "demo-random.toml")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from scratch."""
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def small_run_args(output_dir, *extra):
    """The demo preset, shortened: a few steps, no samples unless asked."""
    return [
        "--config_file", DEMO, "--output_dir", str(output_dir), "--max_train_steps", "6",
        "--save_every_n_steps", "1000", "--sample_every_n_steps", "1000", *extra,
    ]


def load_back(path, family="sd1"):
    import networks.tlora as tlora

    base = models.build_random_model(f"{family}-tiny", 0)
    network, weights = tlora.create_network_from_weights(1.0, path, None, base.text_encoders, base.unet)
    return network, weights


def tensors_equal(a, b):
    assert set(a) == set(b)
    return all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- demo


def test_demo_command_end_to_end(tmp_path):
    """The README's first command, run from another working directory (the preset's relative
    paths resolve beside train_tlora.py), with the output folder and, to keep the suite fast, the
    step counts overridden (CI's "First run" runs the command exactly as the README gives it)."""
    out = tmp_path / "out"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    shorter = ["--max_train_steps", "60", "--save_every_n_steps", "20", "--sample_every_n_steps", "30"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_tlora.py"), "--config_file", DEMO, "--output_dir", str(out), *shorter],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    native = out / "demo-tlora.safetensors"
    config = out / "demo-tlora.toml"
    assert f"network (networks.tlora, timestep-aware): {native}" in proc.stdout
    assert str(config) in proc.stdout
    assert "RANDOM weights" in proc.stdout
    assert "60/60" in proc.stderr  # the tqdm bar reached the end
    assert re.search(r"it/s|s/it", proc.stderr) and "loss=" in proc.stderr

    network, weights = load_back(str(native))
    assert network.config.algo == "tlora" and network.config.rank == 8 and network.config.min_rank == 4
    assert len(network.unet_loras) > 0 and not network.text_encoder_loras
    # trained: λ moved away from its frozen copy λ0 in at least one layer
    assert any(not torch.equal(layer.factor("lambda"), layer.factor("lambda_base")) for layer in network.unet_loras)
    # checkpoints every 20 steps, the newest resumable state only, and the sample grids
    assert (out / "demo-tlora-step00000020.safetensors").is_file() and (out / "demo-tlora-step00000040.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith("-state")) == ["demo-tlora-step00000040-state"]
    from PIL import Image

    grids = sorted((out / "sample").iterdir())
    assert [g.name for g in grids] == ["demo-tlora_00000030.png", "demo-tlora_00000060.png"]
    with Image.open(grids[-1]) as grid:
        # four prompts of 64 px in one row, each cell enlarged by a whole factor to at least 128 px
        assert grid.size == (4 * 128, 128)
    # the resolved config is itself a valid config: parsing it gives the same settings
    args = options.parse_args(["--config_file", str(config)])
    assert args.network_args == ["algo=tlora", "min_rank=4", "targets=attention"] and args.max_train_steps == 60
    assert args.learning_rate == 1e-3 and args.optimizer_args == ["weight_decay=1e-4"]  # from the preset
    # no temporary files left behind
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


# ----------------------------------------------------------------------------- resume


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    """Stop a run hard after step 5 (a checkpoint was written at step 4), resume from it, and
    compare with a run that never stopped: bit-identical weights. Dropout and rank dropout are
    on, so the global RNG state matters too; samples are drawn at step 3 (their RNG use must
    not leak into training)."""
    extra = ["--max_train_steps", "8", "--save_every_n_steps", "2", "--sample_every_n_steps", "3",
             "--network_dropout", "0.1",
             "--network_args", "algo=tlora", "min_rank=4", "targets=attention", "rank_dropout=0.2",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--train_batch_size", "2"]
    straight = tmp_path / "straight"
    result = train_tlora.run(small_run_args(straight, *extra))
    assert result.step == 8

    class Interrupt(Exception):
        pass

    def crash(step):
        if step == 5:
            raise Interrupt

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(loop.Trainer, "after_step", lambda self, step: crash(step))
    with pytest.raises(Interrupt):
        train_tlora.run(small_run_args(interrupted, *extra))
    monkeypatch.undo()
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    assert not (interrupted / "demo-tlora.safetensors").exists()
    assert (interrupted / "demo-tlora-step00000004-state").is_dir()
    assert not (interrupted / "demo-tlora-step00000002-state").exists()  # only the newest state is kept

    resumed = train_tlora.run(small_run_args(interrupted, *extra, "--resume", "latest"))
    assert resumed.step == 8
    a, _ = read_safetensors(str(straight / "demo-tlora.safetensors"))
    b, _ = read_safetensors(str(interrupted / "demo-tlora.safetensors"))
    assert tensors_equal(a, b)
    # and training did move the weights between the checkpoint and the end
    c, _ = read_safetensors(str(interrupted / "demo-tlora-step00000004.safetensors"))
    assert not tensors_equal(b, c)


def test_resume_rejects_a_folder_that_is_not_a_state(tmp_path, capsys):
    code = train_tlora.main(small_run_args(tmp_path / "out", "--resume", str(tmp_path)))
    assert code == errors.EXIT_BAD_INPUT
    assert "not a train_tlora state folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- DDP


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_gives_identical_weights_on_both_ranks(tmp_path):
    """accelerate launch with two gloo processes on CPU. The trainer gathers every rank's weight
    digest and refuses to finish if they differ; the ranks drew different noise (their first
    losses differ), so equal weights need the gradient all-reduce."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           os.path.join(ROOT, "train_tlora.py"),
           *small_run_args(out, "--max_train_steps", "4", "--save_every_n_steps", "2", "--network_dropout", "0.1")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"DDP check: 2 ranks hold identical weights \(sha256 ([0-9a-f]{64})\); first losses per rank \[([^\]]*)\]", proc.stdout)
    assert match, proc.stdout[-2000:]
    losses = [float(x) for x in match.group(2).split(",")]
    assert len(losses) == 2 and losses[0] != losses[1]
    assert "2 process(es) x batch 1" in proc.stdout
    network, _ = load_back(str(out / "demo-tlora.safetensors"))
    assert loop.weights_digest(network) == match.group(1)

    # resuming a two-process run from its step-2 state (each rank restores its own RNG states)
    # ends with the same weights
    first, _ = read_safetensors(str(out / "demo-tlora.safetensors"))
    proc = subprocess.run(cmd + ["--resume", "latest"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "demo-tlora-step00000002-state at step 2" in proc.stdout
    assert f"identical weights (sha256 {match.group(1)})" in proc.stdout
    again, _ = read_safetensors(str(out / "demo-tlora.safetensors"))
    assert tensors_equal(first, again)


# ----------------------------------------------------------------------------- NaN


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = loop.compute_loss

    def loss_turning_nan(prediction, target):
        calls["n"] += 1
        loss = real(prediction, target)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(loop, "compute_loss", loss_turning_nan)
    out = tmp_path / "out"
    code = train_tlora.main(small_run_args(out, "--max_train_steps", "10", "--save_every_n_steps", "2"))
    err = capsys.readouterr().err
    assert code == errors.EXIT_NOT_FINITE
    state = out / "demo-tlora-step00000004-state"
    assert "not finite (NaN/inf" in err and "at step 6" in err and str(state) in err
    assert not (out / "demo-tlora.safetensors").exists()  # no final file from a broken run
    assert not (out / "demo-tlora-step00000006.safetensors").exists()
    good, _ = read_safetensors(str(state / "network.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    step4, _ = read_safetensors(str(out / "demo-tlora-step00000004.safetensors"))
    assert tensors_equal(good, step4)
    load_back(str(out / "demo-tlora-step00000004.safetensors"))
    # and the run continues from there once the cause is gone
    monkeypatch.setattr(loop, "compute_loss", real)
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    result = train_tlora.run(small_run_args(out, "--max_train_steps", "10", "--save_every_n_steps", "2", "--resume", "latest"))
    assert result.step == 10 and (out / "demo-tlora.safetensors").is_file()


# ----------------------------------------------------------------------------- bad input


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "red").save(path)
    return str(path)


def test_command_line_overrides_the_config_file_and_wrong_types_are_refused(tmp_path):
    args = options.parse_args(["--config_file", DEMO, "--network_dim", "16", "--learning_rate", "5e-4"])
    assert args.network_dim == 16 and args.learning_rate == 5e-4
    assert args.network_alpha == 8.0 and args.max_train_steps == 300  # from the file
    bad = _write(tmp_path / "bad.toml", '[training]\nmax_train_steps = "many"\n')
    with pytest.raises(errors.UsageError, match="max_train_steps = 'many': must be a whole number, not text"):
        options.parse_args(["--config_file", bad])


def test_data_layouts_single_image_folder_and_repeat_folders(tmp_path):
    single = data.collect_samples(os.path.join(EXAMPLE_DIR, "toy.png"), ".txt", None)
    assert [(os.path.basename(s.path), s.caption, s.repeats) for s in single] == [("toy.png", "a photo of sks toy robot", 1)]
    root = tmp_path / "data"
    _png(root / "plain.png")
    _png(root / "10_sks dog" / "a.png")
    _png(root / "3_ohwx_cat" / "b.png")
    (root / "3_ohwx_cat" / "b.txt").write_text("ohwx cat on a sofa")
    (root / "notes").mkdir()
    samples = data.collect_samples(str(root), ".txt", "a photo")
    got = sorted((os.path.basename(s.path), s.caption, s.repeats) for s in samples)
    assert got == [("a.png", "a photo", 10), ("b.png", "ohwx cat on a sofa", 3), ("plain.png", "a photo", 1)]
    # without --instance_prompt, a repeat folder's class tokens caption its uncaptioned images
    os.remove(root / "plain.png")
    samples = data.collect_samples(str(root), ".txt", None)
    got = sorted((os.path.basename(s.path), s.caption, s.repeats) for s in samples)
    assert got == [("a.png", "sks dog", 10), ("b.png", "ohwx cat on a sofa", 3)]


def test_data_order_is_a_function_of_position_and_covers_each_epoch():
    order = [data.sample_index(p, 5, seed=3) for p in range(10)]
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:]) == list(range(5))
    assert order == [data.sample_index(p, 5, seed=3) for p in range(10)]
    assert order != [data.sample_index(p, 5, seed=4) for p in range(10)]


def test_prompt_file_options_are_read_like_sd_scripts(tmp_path):
    path = _write(tmp_path / "p.txt", "# comment\n\na cat --n blurry, ugly --w 128 --h 64 --s 12 --l 5.5 --d 7\nplain prompt\n")
    first, second = sampling.read_prompts(path)
    assert (first.prompt, first.negative, first.width, first.height, first.steps, first.scale, first.seed) == (
        "a cat", "blurry, ugly", 128, 64, 12, 5.5, 7)
    assert second.prompt == "plain prompt" and second.seed is None


# ----------------------------------------------------------------------------- outputs and options


def test_converted_kohya_and_diffusers_outputs_and_tensorboard(tmp_path):
    pytest.importorskip("converters")
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    result = train_tlora.run(small_run_args(out, "--max_train_steps", "20", "--save_kohya", "--save_diffusers", "--logging_dir", str(logs)))
    native, meta = read_safetensors(str(out / "demo-tlora.safetensors"))
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.tlora"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_steps"] == "20"
    layers = {k.split(".")[0] for k in native}
    kohya, _ = read_safetensors(str(out / "demo-tlora-kohya.safetensors"))
    assert {k.split(".", 1)[1] for k in kohya} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert {k.split(".")[0] for k in kohya} == layers
    diffusers_file, _ = read_safetensors(str(out / "demo-tlora-diffusers.safetensors"))
    assert diffusers_file and all(".lora_A." in k or ".lora_B." in k for k in diffusers_file)
    assert set(result.outputs) >= {str(out / "demo-tlora-kohya.safetensors"), str(out / "demo-tlora-diffusers.safetensors")}
    if importlib_util_find("tensorboard"):
        events = list(logs.rglob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_without_converters_the_run_finishes_with_a_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "converters", None)  # import converters -> ImportError
    out = tmp_path / "out"
    train_tlora.run(small_run_args(out, "--max_train_steps", "2", "--save_kohya"))
    assert (out / "demo-tlora.safetensors").is_file() and not (out / "demo-tlora-kohya.safetensors").exists()
    assert "converters package is not available" in caplog.text


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, monkeypatch):
    """Recomputation in backward must see the mask of the forward being differentiated (a
    batch of 2 has two different timesteps, so two different masks)."""
    plain = train_tlora.run(small_run_args(tmp_path / "a", "--max_train_steps", "3", "--train_batch_size", "2"))
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    import torch.utils.checkpoint as checkpoint_module

    calls = {"n": 0}
    real_checkpoint = checkpoint_module.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "checkpoint", counting)
    checkpointed = train_tlora.run(small_run_args(tmp_path / "b", "--max_train_steps", "3", "--train_batch_size", "2", "--gradient_checkpointing"))
    assert calls["n"] > 0, "gradient checkpointing was not active"
    a, _ = read_safetensors(plain.output)
    b, _ = read_safetensors(checkpointed.output)
    assert tensors_equal(a, b)


def test_text_encoder_training_sdxl(tmp_path):
    """Without network_train_unet_only both text encoders are adapted (lora_te1/lora_te2), with
    their own learning rates, and the file loads back."""
    out = tmp_path / "out"
    config = tmp_path / "te.toml"
    config.write_text(
        'pretrained_model_name_or_path = "random:sdxl-tiny"\nnetwork_dim = 4\nnetwork_alpha = 4\n'
        'network_args = ["algo=tlora", "min_rank=2"]\nlearning_rate = 1e-3\ntext_encoder_lr = [1e-4, 2e-4]\n'
        f'train_data_dir = "{EXAMPLE_DIR}"\ncaption_extension = ".txt"\nresolution = "64"\nmax_train_steps = 2\n'
    )
    result = train_tlora.run(["--config_file", str(config), "--output_dir", str(out)])
    network, weights = load_back(result.output, "sdxl")
    prefixes = {layer.lora_name.split("_")[1] for layer in network.text_encoder_loras}
    assert prefixes == {"te1", "te2"} and network.unet_loras
    trained = [layer for layer in network.text_encoder_loras if not torch.equal(layer.factor("lambda"), layer.factor("lambda_base"))]
    assert trained, "text encoder layers received no update"


def _save_diffusers_folder(path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    b = models.build_random_model(f"{family}-tiny", 0)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoders[0], text_encoder_2=b.text_encoders[1],
                                         tokenizer=b.tokenizers[0], tokenizer_2=b.tokenizers[1], unet=b.unet, scheduler=b.noise_scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], unet=b.unet,
                                       scheduler=b.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return str(path)


def test_local_diffusers_folder_and_family_check(tmp_path, capsys):
    sd1 = _save_diffusers_folder(tmp_path / "sd1-model", "sd1")
    assert models.inspect_model(sd1).family == "sd1"
    # an SDXL preset with this SD 1.x folder is refused before loading
    out = tmp_path / "refused"
    code = train_tlora.main(["--config_file", os.path.join(ROOT, "presets", "trilora-style-sdxl.toml"), "--pretrained_model_name_or_path", sd1,
                             "--train_data_dir", EXAMPLE_DIR, "--resolution", "64", "--output_dir", str(out)])
    assert code == errors.EXIT_BAD_INPUT and "is for SDXL" in capsys.readouterr().err and not out.exists()
    # the SD 1.5 preset trains from it
    out = tmp_path / "out"
    result = train_tlora.run(["--config_file", os.path.join(ROOT, "presets", "trilora-style-sd15.toml"), "--pretrained_model_name_or_path", sd1,
                              "--train_data_dir", EXAMPLE_DIR, "--resolution", "64", "--max_train_steps", "2", "--output_dir", str(out)])
    network, _ = load_back(result.output)
    assert network.config.algo == "trilora"


def test_single_file_checkpoint_that_diffusers_cannot_read_offline_gives_a_message(tmp_path, capsys):
    from safetensors.torch import save_file

    fake = tmp_path / "model.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)}, str(fake))
    assert models.inspect_model(str(fake)).family == "sd1"
    code = train_tlora.main(small_run_args(tmp_path / "out", "--pretrained_model_name_or_path", str(fake)))
    err = capsys.readouterr().err
    assert code == errors.EXIT_BAD_INPUT and "without downloading" in err


def test_process_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    """A real hard kill (SIGKILL, no cleanup) of a command-line run as soon as its first state
    folder appears; `--resume latest` then finishes it. Same weights as a run never killed."""
    import signal
    import time

    extra = ["--max_train_steps", "30", "--save_every_n_steps", "3", "--network_dropout", "0.1"]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_tlora.py"), *small_run_args(killed, *extra)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.endswith("-state") for p in killed.glob("*")) if killed.exists() else False:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "demo-tlora.safetensors").exists()
    resumed = train_tlora.run(small_run_args(killed, *extra, "--resume", "latest"))
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    straight = train_tlora.run(small_run_args(tmp_path / "straight", *extra))
    a, _ = read_safetensors(resumed.output)
    b, _ = read_safetensors(straight.output)
    assert tensors_equal(a, b)


def test_resuming_with_another_network_shape_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    train_tlora.run(small_run_args(out, "--max_train_steps", "2", "--save_every_n_steps", "1"))
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    code = train_tlora.main(small_run_args(out, "--max_train_steps", "4", "--network_dim", "16", "--resume", "latest"))
    assert code == errors.EXIT_BAD_INPUT
    assert "has shape" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_and_sampling(precision, family, tmp_path):
    """The frozen models run in half precision, the network stays float32, the weights stay
    finite, and sampling (timestep-aware) decodes a grid."""
    out = tmp_path / "out"
    result = train_tlora.run(small_run_args(out, "--pretrained_model_name_or_path", f"random:{family}-tiny", "--metadata_tags", family,
                                            "--mixed_precision", precision, "--max_train_steps", "3", "--sample_every_n_steps", "3"))
    assert all(p.dtype == torch.float32 for p in result.network.parameters())
    weights, meta = read_safetensors(result.output)
    assert all(torch.isfinite(v).all() for v in weights.values()) and meta["ss_mixed_precision"] == precision
    assert (out / "sample" / "demo-tlora_00000003.png").is_file()


def test_sample_images_are_drawn_with_the_mask_of_each_denoising_step(tmp_path, monkeypatch):
    """Every denoising step of the sampling pipeline goes through the U-Net hook, which sets
    that step's timestep (and so its rank mask) for the network's layers."""
    from networks.tlora_layer import TimestepState

    seen = []
    real_set = TimestepState.set

    def recording(self, timesteps):
        if timesteps is not None:
            seen.append(timesteps.reshape(-1).tolist())
        return real_set(self, timesteps)

    monkeypatch.setattr(TimestepState, "set", recording)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of sks toy robot --s 4 --d 1\n")
    out = tmp_path / "out"
    train_tlora.run(small_run_args(out, "--max_train_steps", "1", "--sample_at_first", "--sample_prompts", str(prompts),
                                   "--sample_every_n_steps", "1000"))
    # sample at step 0 first (4 DDIM steps of one timestep each, CFG batch), then one training
    # step, then the forward pass that checks the final weights give a finite loss
    ddim = [int(t[0]) for t in seen[:4]]
    assert ddim == sorted(ddim, reverse=True) and len(set(ddim)) == 4 and ddim[0] > 500
    assert all(len(set(t)) == 1 for t in seen[:4])
    assert len(seen) == 6 and (out / "sample" / "demo-tlora_00000000.png").is_file()


def test_sample_grid_compares_with_the_base_model(tmp_path):
    """--sample_compare_base: a second row renders every prompt without the network, with the same
    seeds. That row is the base model's: two runs that trained different networks agree on it and
    differ on the first row."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks toy --s 3 --d 1\na red circle --s 3 --d 2\n")
    grids = []
    for lr in ("1e-3", "3e-2"):
        out = tmp_path / f"out{lr}"
        train_tlora.run(small_run_args(out, "--max_train_steps", "2", "--learning_rate", lr, "--sample_every_n_steps", "2",
                                       "--sample_prompts", str(prompts), "--sample_compare_base", "--pretrained_model_name_or_path",
                                       "random:sd1-tiny"))
        grids.append(np.asarray(Image.open(out / "sample" / "demo-tlora_00000002.png").convert("RGB")).astype(np.int16))
    first, second = grids
    height = first.shape[0] // 2
    assert first.shape == second.shape and first.shape[0] == 2 * height and height >= 128  # two rows, enlarged cells
    assert np.array_equal(first[height:], second[height:])  # the base model's row does not depend on the network
    assert np.abs(first[:height] - second[:height]).max() > 0  # the network's row does
