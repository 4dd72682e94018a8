"""The trainer package's structure and its resume state: the state folder is data only
(safetensors + JSON) with a manifest that agrees with its files, its contents are what the run
had (checked against independent computations), an old pickled state is refused without being
unpickled, the option table is the one source of the parser and README's options table, and the
options module imports no torch."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tlora_trainer import checkpoints, cli, errors, options, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "presets", "demo-random.toml")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="module")
def run_with_state(tmp_path_factory):
    """3 steps, a checkpoint every step: the newest state is step 2's (written during step 3)."""
    out = tmp_path_factory.mktemp("run") / "out"
    cli.run(["--config_file", DEMO, "--output_dir", str(out), "--max_train_steps", "3", "--save_every_n_steps", "1",
             "--sample_every_n_steps", "1000", "--lr_scheduler", "linear"])
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return out


def test_state_folder_is_data_only_and_its_manifest_agrees(run_with_state):
    out = run_with_state
    assert sorted(p.name for p in out.iterdir() if p.name.endswith("-state")) == ["demo-tlora-step00000002-state"]
    state = out / "demo-tlora-step00000002-state"
    names = sorted(p.name for p in state.iterdir())
    assert names == ["network.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "state.json"]
    for path in state.iterdir():
        head = path.read_bytes()[:2]
        assert head != b"PK" and head[:1] != b"\x80", f"{path.name} looks like a pickle/torch.save file"
    manifest = json.loads((state / "state.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["step"], manifest["world_size"]) == ("train_tlora-state", 2, 2, 1)
    for name, entry in manifest["files"].items():
        data = (state / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # the weights are step 2's: the same as the step-2 weights file
    with safe_open(str(state / "network.safetensors"), "pt") as a, safe_open(str(out / "demo-tlora-step00000002.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # AdamW's step counters and the schedule both say 2 updates were applied
    with safe_open(str(state / "optimizer.safetensors"), "pt") as f:
        steps = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".step")}
    assert steps == {2.0}
    assert manifest["lr_scheduler"]["last_epoch"] == 2
    assert manifest["optimizer"]["class"] == "AdamW" and manifest["config"]["max_train_steps"] == 3


def test_noise_generator_state_is_the_one_after_two_steps(run_with_state):
    """Independently: the noise generator of rank 0 (seed 42) after two steps' draws (one latent
    noise of 1x4x8x8 and one timestep each) is exactly what the state holds."""
    generator = torch.Generator().manual_seed(42 * 7919 + 1)
    for _ in range(2):
        torch.randn((1, 4, 8, 8), generator=generator)
        torch.randint(0, 1000, (1,), generator=generator)
    rng = checkpoints.RngState.read(str(run_with_state / "demo-tlora-step00000002-state" / "rng-rank0.safetensors"))
    assert torch.equal(rng.noise, generator.get_state())
    assert len(rng.python[1]) == 625 and rng.numpy[1].shape == (624,)


def test_an_old_pickled_state_is_refused_and_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "PICKLE-WAS-LOADED"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = tmp_path / "out" / "demo-tlora-step00000004-state"
    state.mkdir(parents=True)
    for name in ("training_state.pt", "rng_rank0.pt"):
        (state / name).write_bytes(pickle.dumps(Planted()))
    pickle.loads((state / "rng_rank0.pt").read_bytes())  # the payload works ...
    assert marker.exists()
    marker.unlink()
    code = cli.main(["--config_file", DEMO, "--output_dir", str(tmp_path / "out"), "--resume", "latest"])
    assert code == errors.EXIT_BAD_INPUT
    assert "older train_tlora.py (pickled training_state.pt); it is not loaded" in capsys.readouterr().err
    assert not marker.exists()  # ... and the trainer never ran it


def test_options_module_imports_no_torch():
    code = "import sys, tlora_trainer.options; print('torch' in sys.modules, 'numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_help_lists_every_option_with_examples_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{o.name}" in text for o in options.OPTIONS)
    assert "examples:" in text and "presets/demo.toml" in text and "exit codes:" in text


def test_readme_options_table_is_generated_from_the_option_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    begin, end = "<!-- options table: python -m tlora_trainer.options -->\n", "\n<!-- end of options table -->"
    assert begin in readme and end in readme
    assert readme.split(begin, 1)[1].split(end, 1)[0] == options.options_markdown()


def test_ranges_come_from_the_table(capsys):
    """Every numeric option with a range refuses a value just outside it and NaN, naming the option."""
    for option in options.OPTIONS:
        if option.range is None:
            continue
        outside = option.range.low - 1 if option.range.low is not None else option.range.high + 1
        for value in [outside, "nan"] if option.kind is float else [outside]:
            argv = [f"--{option.name}={value}", "--output_dir", "x"]
            with pytest.raises(errors.UsageError, match=f"--{option.name}="):
                options.parse_args(argv)


def test_every_sampler_option_has_a_scheduler():
    import diffusers

    assert set(sampling.SCHEDULER_CLASSES) == set(options.SAMPLERS)
    assert all(hasattr(diffusers, name) for name in sampling.SCHEDULER_CLASSES.values())
