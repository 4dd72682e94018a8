"""Bad arguments and bad files: a clear error naming the problem, and nothing written or changed."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import networks.tlora as tlora
from networks.tlora_format import TLoRAFormatError
from netutil import inputs, make_layout


@pytest.fixture(scope="module")
def sd1():
    return make_layout("sd1")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"algo": "tlorra"}, "algo='tlorra' is unknown; accepted: tlora, tlora_vanilla, ortho, trilora, lora"),
        ({"min_rank": "9"}, "min_rank=9 is larger than the rank 8"),
        ({"min_rank": "3.5"}, "min_rank='3.5' is not a whole number"),
        ({"min_rank": "2", "min_rank_ratio": "0.5"}, "either min_rank or min_rank_ratio"),
        ({"min_rank_ratio": "1.5"}, "min_rank_ratio='1.5' must be <= 1"),
        ({"rank_schedule_power": "0"}, "rank_schedule_power='0' must be > 0"),
        ({"init": "first"}, "init='first' is unknown; accepted: last, principal, middle"),
        ({"init_source": "model"}, "init_source='model' is unknown"),
        ({"targets": "all"}, "targets='all' is unknown; accepted: transformer, attention"),
        ({"rank_dropout": "abc"}, "rank_dropout='abc' is not a number"),
        ({"module_dropout": "1"}, "module_dropout='1' must be < 1"),
        ({"ortho_reg": "0.1"}, "ortho_reg is an option of algo=trilora"),
        ({"conv_alpha": "4"}, "need conv_dim"),
        ({"verbose": "true"}, "unknown key(s) verbose"),
        ({"split_qkv": "True"}, "split_qkv is an option of flux models, and this model is sd1"),
        ({"train_blocks": "single"}, "train_blocks is an option of flux models"),
        ({"train_t5xxl": "True"}, "train_t5xxl is an option of flux models"),
        ({"train_double_block_indices": "1-"}, "'1-' is not an index or a range a-b"),
        ({"train_single_block_indices": "5-2"}, "'5-2' is not an index or a range a-b"),
        ({"split_qkv": "maybe"}, "split_qkv='maybe' is not True or False"),
        ({"train_blocks": "middle"}, "train_blocks='middle' is unknown; accepted: all, double, single"),
        ({"num_train_timesteps": "0"}, "num_train_timesteps='0' must be >= 1"),
        ({"conv_dim": "-2"}, "conv_dim='-2' must be >= 1"),
        ({"loraplus_lr_ratio": "0"}, "loraplus_lr_ratio='0' must be > 0"),
        ({"rank_dropout": "nan"}, "rank_dropout='nan' must be finite"),
    ],
)
def test_bad_network_args_name_key_value_and_accepted(sd1, kwargs, needle):
    with pytest.raises(TLoRAFormatError) as error:
        tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, dropout=None, **kwargs)
    assert needle in str(error.value)


def test_dropout_from_sd_scripts_is_accepted(sd1):
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, neuron_dropout=0.1, dropout=None)
    assert network.training_options.dropout == 0.1
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, dropout="0.2")
    assert network.training_options.dropout == 0.2


def test_rank_larger_than_layer_is_refused_for_ortho(sd1):
    with pytest.raises(ValueError, match="use network_dim <="):
        tlora.create_network(1.0, 64, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="tlora")


def snapshot(layout):
    return {k: v.clone() for k, v in list(layout.unet.state_dict().items()) + list(layout.text_encoders[0].state_dict().items())}


def assert_unchanged(layout, before, folder, files_before):
    after = snapshot(layout)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(folder)) == files_before


def saved(layout_name, tmp_path, name="net.safetensors", rank=8, algo="tlora"):
    layout = make_layout(layout_name)
    network = tlora.create_network(1.0, rank, rank, None, layout.text_encoder_arg(), layout.unet, algo=algo)
    path = tmp_path / name
    network.save_weights(str(path), None, {})
    return path


def test_missing_file(sd1, tmp_path):
    with pytest.raises(TLoRAFormatError, match="no such file"):
        tlora.create_network_from_weights(1.0, str(tmp_path / "nope.safetensors"), None, sd1.text_encoders, sd1.unet)


def test_pickle_file_is_refused_without_unpickling(sd1, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    torch_path = tmp_path / "model.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, torch_path)
    before, files = snapshot(sd1), sorted(os.listdir(tmp_path))
    for bad in (path, torch_path):
        with pytest.raises(TLoRAFormatError, match="not safetensors; networks.tlora loads only .safetensors"):
            tlora.create_network_from_weights(1.0, str(bad), None, sd1.text_encoders, sd1.unet)
    assert not marker.exists()
    assert_unchanged(sd1, before, tmp_path, files)


def test_file_of_another_architecture(sd1, tmp_path):
    path = saved("sgm", tmp_path)  # SDXL names and two text encoders
    before, files = snapshot(sd1), sorted(os.listdir(tmp_path))
    with pytest.raises(TLoRAFormatError, match="match no layer of this model"):
        tlora.create_network_from_weights(1.0, str(path), None, sd1.text_encoders, sd1.unet)
    assert_unchanged(sd1, before, tmp_path, files)


def test_file_of_another_rank_or_algo_into_existing_network(sd1, tmp_path):
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="tlora")
    network.apply_to(sd1.text_encoder_arg(), sd1.unet)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    other_rank = saved("sd1", tmp_path, "r4.safetensors", rank=4)
    with pytest.raises(TLoRAFormatError, match="different network_dim"):
        network.load_weights(str(other_rank))
    other_algo = saved("sd1", tmp_path, "lora.safetensors", algo="lora")
    with pytest.raises(TLoRAFormatError, match="do not belong to this network"):
        network.load_weights(str(other_algo))
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
    network.remove()


def test_truncated_and_garbage_files(sd1, tmp_path):
    good = saved("sd1", tmp_path)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "tiny.safetensors": data[:5],
        "empty.safetensors": b"",
        "header.safetensors": (10**15).to_bytes(8, "little") + b"{}",
        "text.safetensors": b"this is not a LoRA file at all, just text",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    before, files = snapshot(sd1), sorted(os.listdir(tmp_path))
    for name in cases:
        with pytest.raises(TLoRAFormatError) as error:
            tlora.create_network_from_weights(1.0, str(tmp_path / name), None, sd1.text_encoders, sd1.unet)
        assert name in str(error.value)
    assert_unchanged(sd1, before, tmp_path, files)


def test_bad_metadata_and_tensors(sd1, tmp_path):
    layout_net = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="tlora")
    tensors = {k: v.contiguous() for k, v in layout_net.state_dict().items()}
    first = next(k for k in tensors if k.endswith("svd_lambda"))
    cases = {
        "json.safetensors": (tensors, {"tlora_format_version": "1", "tlora_config": "{not json"}, "not valid JSON"),
        "types.safetensors": (tensors, {"tlora_format_version": "1", "tlora_config": '{"algo": "tlora", "rank": "8"}'}, "wrong type"),
        "algo.safetensors": (tensors, {"tlora_format_version": "1", "tlora_config": '{"algo": "dora", "rank": 8}'}, "algo='dora' is unknown"),
        "version.safetensors": (tensors, {"tlora_format_version": "99", "tlora_config": "{}"}, "newer than"),
        "shape.safetensors": ({**tensors, first: torch.zeros(3)}, None, "expected (8,)"),
        "dtype.safetensors": ({**tensors, first: torch.zeros(8, dtype=torch.int32)}, None, "floating point"),
        "names.safetensors": ({**tensors, "lora_unet_nowhere_to_q.svd_lambda": torch.zeros(8)}, None, "tensors do not match algo"),
        "alien.safetensors": ({"model.diffusion_model.x.weight": torch.zeros(2)}, None, "is not a LoRA tensor"),
    }
    for name, (content, metadata, _) in cases.items():
        if metadata is None:
            metadata = {"tlora_format_version": "1", "tlora_config": layout_net.config.to_json()}
        save_file(content, str(tmp_path / name), metadata=metadata)
    before, files = snapshot(sd1), sorted(os.listdir(tmp_path))
    for name, (_, _, needle) in cases.items():
        with pytest.raises(TLoRAFormatError) as error:
            tlora.create_network_from_weights(1.0, str(tmp_path / name), None, sd1.text_encoders, sd1.unet)
        assert needle in str(error.value), (name, str(error.value))
    assert_unchanged(sd1, before, tmp_path, files)


def test_save_refuses_other_formats_before_training(sd1):
    import argparse

    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="lora")
    with pytest.raises(TLoRAFormatError, match="--save_model_as safetensors"):
        network.prepare_network(argparse.Namespace(save_model_as="ckpt"))


def test_save_is_atomic_and_keeps_old_file_on_failure(sd1, tmp_path, monkeypatch):
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="lora")
    path = tmp_path / "n.safetensors"
    network.save_weights(str(path), None, {})
    original = path.read_bytes()
    import safetensors.torch

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        network.save_weights(str(path), None, {})
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["n.safetensors"]  # no temporary file left behind


def test_saved_file_gets_the_usual_permissions(sd1, tmp_path):
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="lora")
    old = os.umask(0o022)
    try:
        network.save_weights(str(tmp_path / "p.safetensors"), None, {})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "p.safetensors").st_mode & 0o777) == 0o644


def test_stale_temporaries_of_killed_saves_are_cleaned_up(sd1, tmp_path):
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="lora")
    stale = tmp_path / ".n.safetensors.abc123.tmp"
    fresh = tmp_path / ".n.safetensors.def456.tmp"  # may belong to a save still running elsewhere
    other = tmp_path / ".other.safetensors.x.tmp"
    for f in (stale, fresh, other):
        f.write_bytes(b"partial")
    old = os.path.getmtime(stale) - 7200
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    network.save_weights(str(tmp_path / "n.safetensors"), None, {})
    assert not stale.exists() and fresh.exists() and other.exists()


def test_a_model_of_no_known_family_is_refused(sd1):
    unknown = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TLoRAFormatError, match="does not know the model Sequential.*supported: SD 1.x"):
        tlora.create_network(1.0, 4, 4, None, None, unknown)


def test_sd_option_on_a_flux_model_is_refused():
    import tiny_models as tm

    tes, flux = tm.flux_models()
    with pytest.raises(TLoRAFormatError, match="conv_dim is an option of sd1/sd2/sdxl models, and this model is flux"):
        tlora.create_network(1.0, 4, 4, None, tes, flux, conv_dim="4")


@pytest.mark.parametrize("mask,algo,needle", [
    ("t=5000", "tlora", "mask=t=5000 is outside 0..999"),
    ("t=500", "lora", "mask=t=500 needs a timestep-masked file"),
    ("half", "tlora", "mask='half' is unknown"),
])
def test_bad_fixed_masks_of_the_generation_scripts(sd1, tmp_path, mask, algo, needle):
    path = saved("sd1", tmp_path, algo=algo)
    with pytest.raises(TLoRAFormatError) as error:
        tlora.create_network_from_weights(1.0, str(path), None, sd1.text_encoders, sd1.unet, for_inference=True, mask=mask)
    assert needle in str(error.value)


def test_a_file_changed_after_writing_is_refused(sd1, tmp_path):
    path = saved("sd1", tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(TLoRAFormatError, match="does not match its checksum"):
        tlora.create_network_from_weights(1.0, str(path), None, sd1.text_encoders, sd1.unet)
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="tlora")
    with pytest.raises(TLoRAFormatError, match="does not match its checksum"):
        network.load_weights(str(path))


def test_a_diverged_network_is_not_saved(sd1, tmp_path):
    network = tlora.create_network(1.0, 8, 8, None, sd1.text_encoder_arg(), sd1.unet, algo="trilora")
    with torch.no_grad():
        network.unet_loras[0].factor("lambda").fill_(float("nan"))
    with pytest.raises(TLoRAFormatError, match="NaN or infinite"):
        network.save_weights(str(tmp_path / "nan.safetensors"), None, {})
    assert os.listdir(tmp_path) == []
