"""Fault and bad-input tests (issue 5): saving survives SIGKILL at any moment, and every kind of
broken file gets a clear TLoRAFormatError (or FileNotFoundError) — no crash, no hang, nothing
written, nothing changed."""

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

import networks.tlora as tlora
from networks.tlora_format import TLoRAFormatError, atomic_save_safetensors, read_metadata, read_safetensors

import tiny_models as tm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the body takes more than 60 s."""

    def on_alarm(signum, frame):
        raise TimeoutError("the call hung for 60 s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 60)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def dir_state(folder):
    """Names, sizes and mtimes of everything in a folder: to show that nothing was written."""
    return {name: (os.path.getsize(os.path.join(folder, name)), os.stat(os.path.join(folder, name)).st_mtime_ns) for name in sorted(os.listdir(folder))}


def state_of(network):
    return {k: v.clone() for k, v in network.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- SIGKILL while saving

SERVER = textwrap.dedent(
    r"""
    import os, sys, torch
    sys.path[:0] = [{root!r}, {tests!r}]
    from networks.tlora_format import atomic_save_safetensors
    import networks.tlora as tlora
    import tiny_models as tm
    torch.set_num_threads(1)
    tes, unet = tm.sd1_models()
    net = tlora.create_network(1.0, 4, 4, None, tes, unet, algo="tlora", min_rank="2")
    path_raw, path_net = sys.argv[1], sys.argv[2]
    big = torch.zeros(256, 1024)  # 1 MiB, so that a save takes long enough to be interrupted

    def save_raw(v):
        big.fill_(v)
        atomic_save_safetensors({{"a": big, "b": torch.full((7,), float(v))}}, path_raw, {{"version": str(v)}})

    def save_net(v):
        with torch.no_grad():
            for layer in net.loras:
                layer.factor("lambda").fill_(float(v))
        net.save_weights(path_net, None, {{"version": str(v)}})

    import time
    durations = {{}}
    for kind, save, target in (("raw", save_raw, path_raw), ("net", save_net, path_net)):
        start = time.perf_counter()
        for _ in range(3):
            save(0)
        durations[kind] = (time.perf_counter() - start) / 3
        os.unlink(target)
    print("ready", durations["raw"], durations["net"], flush=True)
    for line in sys.stdin:
        kind, start = line.split()
        start = int(start)
        pid = os.fork()
        if pid == 0:  # the worker: save new versions forever, until killed
            save = save_raw if kind == "raw" else save_net
            v = start
            while True:
                save(v)
                v += 1
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else f"status {{status}}", flush=True)
    """
)


def check_raw(path):
    tensors, metadata = read_safetensors(path)
    v = int(metadata["version"])
    assert torch.all(tensors["a"] == v) and torch.all(tensors["b"] == v), "tensors of different versions in one file"
    return v


def check_net(path, text_encoders, unet):
    net, sd = tlora.create_network_from_weights(1.0, path, None, text_encoders, unet)
    v = int(read_metadata(path)["version"])
    for layer in net.loras:
        assert torch.all(layer.factor("lambda") == v), "tensors of different versions in one file"
    return v


def test_sigkill_while_saving_never_leaves_a_broken_file(tmp_path):
    path_raw = str(tmp_path / "raw.safetensors")
    path_net = str(tmp_path / "net.safetensors")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(root=ROOT, tests=TESTS), path_raw, path_net],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    tes, unet = tm.sd1_models()
    rng = random.Random(1234)
    try:
        ready, raw_seconds, net_seconds = server.stdout.readline().split()
        assert ready == "ready"
        save_seconds = {"raw": float(raw_seconds), "net": float(net_seconds)}
        versions = {"raw": -1, "net": -1}
        interrupted = 0
        kills = 0
        # at least 40 kills, and more (up to 120) until 5 of them landed inside a save: a loaded
        # machine makes the measured save time a poor guess of when a save is running
        for round_index in range(120):
            if kills >= 40 and interrupted >= 5:
                break
            kind = "raw" if round_index % 2 == 0 else "net"
            path = path_raw if kind == "raw" else path_net
            tmp_before = {n for n in os.listdir(tmp_path) if n.startswith(".")}
            server.stdin.write(f"{kind} {versions[kind] + 1}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            # a random moment within the first few saves (the first rounds: within the first save,
            # when no previous file exists); the save time was measured by the server
            span = save_seconds[kind] * (1.0 if round_index < 4 else 4.0)
            time.sleep(rng.uniform(0.0, span))
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline().strip() == "killed"
            kills += 1

            names = set(os.listdir(tmp_path))
            # nothing but the final files and the hidden temp files of interrupted saves (ours,
            # .<name>.XXXX.tmp, and safetensors' own .tmpXXXXXX, which it renames to ours)
            for name in names - {"raw.safetensors", "net.safetensors"}:
                assert name.startswith(".") and not name.endswith(".safetensors"), f"unexpected file {name!r}"
            if {n for n in names if n.startswith(".")} - tmp_before:
                interrupted += 1
            if os.path.exists(path):
                v = check_raw(path) if kind == "raw" else check_net(path, tes, unet)
                assert v >= versions[kind], f"the file went back from version {versions[kind]} to {v}"
                versions[kind] = v
            else:
                assert versions[kind] == -1, "a complete file disappeared"
        # the test only proves something if kills landed inside saves and saves completed
        assert kills >= 40
        assert interrupted >= 5, f"only {interrupted} of {kills} kills interrupted a save"
        assert versions["raw"] >= 1 and versions["net"] >= 1
        # a later save works despite the left-over temp files, and is complete
        atomic_save_safetensors({"a": torch.zeros(2), "b": torch.zeros(1)}, path_raw, {"version": "0"})
        assert read_safetensors(path_raw)[1]["version"] == "0"
    finally:
        server.stdin.close()
        server.kill()
        server.wait()


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path):
    """An exception during the write (here: a non-tensor value) keeps the old file, removes the temp."""
    path = str(tmp_path / "x.safetensors")
    atomic_save_safetensors({"a": torch.ones(3)}, path, {"version": "1"})
    with pytest.raises(Exception):
        atomic_save_safetensors({"a": torch.ones(3), "b": torch.ones(2).to_sparse()}, path, {"version": "2"})
    assert os.listdir(tmp_path) == ["x.safetensors"]
    tensors, metadata = read_safetensors(path)
    assert metadata["version"] == "1" and torch.equal(tensors["a"], torch.ones(3))


# ----------------------------------------------------------------------------- broken files


@pytest.fixture(scope="module")
def models():
    return tm.sd1_models()


@pytest.fixture(scope="module")
def good_file(tmp_path_factory, models):
    tes, unet = models
    net = tlora.create_network(1.0, 4, 4, None, tes, unet, algo="tlora", min_rank="2")
    path = str(tmp_path_factory.mktemp("good") / "good.safetensors")
    net.save_weights(path, None, {"ss_network_dim": "4"})
    with open(path, "rb") as f:
        data = f.read()
    tensors, metadata = read_safetensors(path)
    return data, tensors, metadata


def header_of(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def corruptions(data):
    header, body = header_of(data)
    (n,) = struct.unpack("<Q", data[:8])
    out = {
        "empty file": b"",
        "4 bytes": data[:4],
        "truncated in the header": data[: 8 + n // 2],
        "truncated in the data": data[: 8 + n + len(body) // 2],
        "last byte missing": data[:-1],
        "absurd header length 2^63": struct.pack("<Q", 2**63) + data[8:],
        "absurd header length 2^40": struct.pack("<Q", 2**40) + data[8:],
        "header length 0": struct.pack("<Q", 0) + data[8:],
        "header length too short": struct.pack("<Q", n - 10) + data[8:],
        "header not JSON": struct.pack("<Q", n) + b"[" + data[9 : 8 + n] + body,
        "garbage": bytes(random.Random(0).getrandbits(8) for _ in range(4096)),
        "pickle": b"\x80\x04\x95" + data[3:200],
        "zip (torch.save)": b"PK\x03\x04" + data[4:200],
    }
    # offsets pointing past the end of the data
    bad = json.loads(json.dumps(header))
    key = next(k for k in bad if k != "__metadata__")
    bad[key]["data_offsets"] = [0, len(body) + 4096]
    out["data offsets past the end"] = with_header(bad, body)
    # dtype of a tensor that does not match its byte length
    bad = json.loads(json.dumps(header))
    bad[key]["dtype"] = "F64"
    out["dtype does not match the byte length"] = with_header(bad, body)
    # an unknown dtype
    bad = json.loads(json.dumps(header))
    bad[key]["dtype"] = "Q7"
    out["unknown dtype"] = with_header(bad, body)
    # bytes flipped inside the header (a JSON string broken)
    flipped = bytearray(data)
    for i in range(8 + n // 3, 8 + n // 3 + 6):
        flipped[i] = 0x22  # '"'
    out["header bytes flipped"] = bytes(flipped)
    return out


CORRUPTION_NAMES = [
    "empty file", "4 bytes", "truncated in the header", "truncated in the data", "last byte missing",
    "absurd header length 2^63", "absurd header length 2^40", "header length 0", "header length too short",
    "header not JSON", "garbage", "pickle", "zip (torch.save)", "data offsets past the end",
    "dtype does not match the byte length", "unknown dtype", "header bytes flipped",
]


def test_every_corruption_case_is_run(good_file):
    assert sorted(corruptions(good_file[0])) == sorted(CORRUPTION_NAMES)


@pytest.mark.parametrize("case", CORRUPTION_NAMES)
def test_corrupt_or_truncated_file_gives_clear_error(case, good_file, models, tmp_path, no_hang):
    data, _, _ = good_file
    tes, unet = models
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(corruptions(data)[case])
    before = dir_state(tmp_path)
    with pytest.raises(TLoRAFormatError) as err:
        read_safetensors(path)
    assert "bad.safetensors" in str(err.value)
    with pytest.raises(TLoRAFormatError):
        tlora.create_network_from_weights(1.0, path, None, tes, unet)
    net = tlora.create_network(1.0, 4, 4, None, tes, unet, algo="tlora", min_rank="2")
    snapshot = state_of(net)
    with pytest.raises(TLoRAFormatError):
        net.load_weights(path)
    assert same_state(snapshot, state_of(net)), "a failed load changed the network"
    assert dir_state(tmp_path) == before, "a failed load wrote or changed a file"


def test_missing_file_and_directory(models, tmp_path, no_hang):
    tes, unet = models
    with pytest.raises(TLoRAFormatError, match="no such file"):
        tlora.create_network_from_weights(1.0, str(tmp_path / "nope.safetensors"), None, tes, unet)
    with pytest.raises(TLoRAFormatError, match="directory"):
        read_safetensors(str(tmp_path))
    assert os.listdir(tmp_path) == []


def rewrite(tmp_path, tensors, metadata, name="bad.safetensors"):
    """A file edited by hand: the other checks are the subject here, so no checksum to break."""
    metadata = None if metadata is None else {k: v for k, v in metadata.items() if k != "tlora_sha256"}
    path = str(tmp_path / name)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def metadata_cases(metadata):
    config = json.loads(metadata["tlora_config"])

    def with_config(**changes):
        c = dict(config)
        c.update(changes)
        return {**metadata, "tlora_config": json.dumps(c)}

    return {
        "config not JSON": ({**metadata, "tlora_config": "{not json"}, "not valid JSON"),
        "config is a list": ({**metadata, "tlora_config": "[1, 2]"}, "JSON object"),
        "rank is a string": (with_config(rank="4"), "wrong type"),
        "rank is a float": (with_config(rank=4.5), "wrong type"),
        "rank is a bool": (with_config(rank=True), "wrong type"),
        "algo is a number": (with_config(algo=5), "wrong type"),
        "alpha is null": (with_config(alpha=None), "wrong type"),
        "unknown algo": (with_config(algo="dora"), "unknown"),
        "unknown field": (with_config(colour="red"), "unknown fields"),
        "min_rank above rank": (with_config(min_rank=9), "min_rank"),
        "negative power": (with_config(rank_schedule_power=-1.0), "rank_schedule_power"),
        "version not a number": ({**metadata, "tlora_format_version": "one"}, "whole number"),
        "version from the future": ({**metadata, "tlora_format_version": "99"}, "newer"),
        "rank disagrees with tensors": (with_config(rank=8, min_rank=4), "rank"),
        "algo disagrees with tensors": (with_config(algo="lora"), "algo=lora"),
    }


METADATA_CASES = list(metadata_cases({"tlora_config": "{}"}).keys())


@pytest.mark.parametrize("case", METADATA_CASES)
def test_bad_metadata_gives_clear_error(case, good_file, models, tmp_path, no_hang):
    _, tensors, metadata = good_file
    tes, unet = models
    bad_metadata, expected = metadata_cases(metadata)[case]
    path = rewrite(tmp_path, tensors, bad_metadata)
    before = dir_state(tmp_path)
    with pytest.raises(TLoRAFormatError, match=expected):
        tlora.create_network_from_weights(1.0, path, None, tes, unet)
    assert dir_state(tmp_path) == before


def tensor_cases(tensors):
    names = sorted(tensors)
    up = next(k for k in names if k.endswith(".svd_up.weight"))
    lam = next(k for k in names if k.endswith(".svd_lambda"))
    base = next(k for k in names if k.endswith(".svd_down_base.weight"))
    alpha = next(k for k in names if k.endswith(".alpha"))
    layer = up[: -len(".svd_up.weight")]

    def changed(**kw):
        out = dict(tensors)
        for key, value in kw.items():
            if value is None:
                out.pop(key)
            else:
                out[key] = value
        return out

    other_layer = {k.replace(layer, "lora_unet_no_such_block_attn1_to_q"): v for k, v in tensors.items() if k.startswith(layer + ".")}
    return {
        "up with wrong out dim": (changed(**{up: torch.zeros(tensors[up].shape[0] + 1, tensors[up].shape[1])}), "shape"),
        "up of another rank": (changed(**{up: torch.zeros(tensors[up].shape[0], 3)}), "does not match"),
        "lambda of wrong length": (changed(**{lam: torch.zeros(7)}), "expected"),
        "base shape differs": (changed(**{base: torch.zeros(2, 3)}), "differs"),
        "lambda is int": (changed(**{lam: torch.zeros(tensors[lam].shape, dtype=torch.int32)}), "dtype"),
        "up is bool": (changed(**{up: torch.zeros(tensors[up].shape, dtype=torch.bool)}), "dtype"),
        "alpha holds a vector": (changed(**{alpha: torch.ones(3)}), "alpha"),
        "missing tensor": (changed(**{lam: None}), "missing"),
        "up is 3-D": (changed(**{up: tensors[up][:, :, None]}), "shapes"),
        "name matches no layer": ({**tensors, **other_layer}, "match no layer"),
        "not a LoRA key": ({**tensors, "model.diffusion_model.weight": torch.zeros(2)}, "not a LoRA tensor"),
        "no layers at all": ({}, "no LoRA layers"),
    }


TENSOR_CASES = list(tensor_cases({
    "l.svd_up.weight": torch.zeros(2, 2), "l.svd_lambda": torch.zeros(2), "l.svd_down_base.weight": torch.zeros(2, 2), "l.alpha": torch.ones(()),
}).keys())


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensors_give_clear_error(case, good_file, models, tmp_path, no_hang):
    _, tensors, metadata = good_file
    tes, unet = models
    bad_tensors, expected = tensor_cases(tensors)[case]
    path = rewrite(tmp_path, bad_tensors, metadata)
    before = dir_state(tmp_path)
    with pytest.raises(TLoRAFormatError, match=expected):
        tlora.create_network_from_weights(1.0, path, None, tes, unet)
    net = tlora.create_network(1.0, 4, 4, None, tes, unet, algo="tlora", min_rank="2")
    snapshot = state_of(net)
    if bad_tensors:
        try:
            net.load_weights(path)
        except TLoRAFormatError:
            pass
        else:
            pytest.fail("load_weights accepted a broken file")
        assert same_state(snapshot, state_of(net)), "a failed load changed the network"
    assert dir_state(tmp_path) == before


def test_file_of_another_architecture(models, tmp_path, no_hang):
    """A file trained on SDXL (two text encoders, other names) on an SD1 model."""
    tes_xl, unet_xl = tm.sdxl_models()
    net = tlora.create_network(1.0, 4, 4, None, tes_xl, unet_xl, algo="tlora", min_rank="2")
    path = str(tmp_path / "xl.safetensors")
    net.save_weights(path, None, None)
    before = dir_state(tmp_path)
    tes, unet = models
    with pytest.raises(TLoRAFormatError, match="match no layer"):
        tlora.create_network_from_weights(1.0, path, None, tes, unet)
    sd1 = tlora.create_network(1.0, 4, 4, None, tes, unet, algo="tlora", min_rank="2")
    snapshot = state_of(sd1)
    with pytest.raises(TLoRAFormatError, match="do not belong"):
        sd1.load_weights(path)
    assert same_state(snapshot, state_of(sd1))
    assert dir_state(tmp_path) == before


def test_good_file_still_loads(good_file, models, tmp_path):
    """Control: the untouched bytes load, so the failures above come from the damage."""
    data, tensors, _ = good_file
    tes, unet = models
    path = str(tmp_path / "good.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    net, sd = tlora.create_network_from_weights(1.0, path, None, tes, unet)
    assert sd.keys() == tensors.keys()
    assert all(torch.equal(net.state_dict()[k], tensors[k]) for k in tensors)
