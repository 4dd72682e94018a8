"""Fuzzing the native-file reader (read_safetensors + validate_native, what every reader of the
project goes through): 1,200 seeded mutations of a valid file's bytes, header, metadata and
tensor data. Each one must be refused with a one-line TLoRAFormatError, or load to exactly the
values of the original file; none may raise anything else, take more than a few seconds, or
allocate beyond the file's size."""

import json
import random
import resource
import signal
import struct

import pytest
import torch
from safetensors import safe_open

import networks.tlora as tlora
import tiny_models as tm
from networks.tlora_format import TLoRAFormatError, read_safetensors, validate_native

MUTATIONS = 1200
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XYZ", "", 7, None]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    (te,), unet = tm.sd1_models()
    torch.manual_seed(0)
    net = tlora.create_network(1.0, 2, 2, None, None, unet, algo="tlora", min_rank="1", targets="attention")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    path = str(tmp_path_factory.mktemp("fuzz") / "good.safetensors")
    net.save_weights(path, None, {"ss_output_name": "good", "ss_note": "x" * 40})
    with open(path, "rb") as f:
        data = f.read()
    tensors, metadata = read_safetensors(path)
    config, _, _ = validate_native(tensors, metadata, path)
    return data, tensors, config


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _random_value(rng: random.Random):
    return rng.choice([0, -1, 1, 2, 3, 10**12, -10**12, 0.5, float("nan"), 1e308, True, False, None, "", "tlora", "abc", [], {}, [1, 2],
                       "1e400", "∞"])


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.25:  # flip a few bytes anywhere
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind < 0.40:  # flip bytes inside the header (JSON)
        (n,) = struct.unpack("<Q", data[:8])
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(8, 8 + n)
            out[i] = rng.randrange(256)
        return bytes(out)
    if kind < 0.48:  # truncate, or cut inside the length field
        return data[: rng.randrange(len(data))]
    if kind < 0.52:  # junk appended, or a header length that lies
        if rng.random() < 0.5:
            return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        (n,) = struct.unpack("<Q", data[:8])
        return struct.pack("<Q", max(0, n + rng.choice([-3, -1, 1, 7, 10**6, 2**40]))) + data[8:]
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    if kind < 0.72:  # a tensor's entry: dtype, shape or offsets changed, removed or duplicated
        name = rng.choice(names)
        entry = header[name]
        choice = rng.randrange(6)
        if choice == 0:
            entry["dtype"] = rng.choice(DTYPES)
        elif choice == 1:
            shape = list(entry["shape"])
            op = rng.randrange(4)
            if op == 0 and shape:
                shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 10**9, -1])
            elif op == 1:
                shape.append(rng.choice([1, 2]))
            elif op == 2 and shape:
                shape.pop()
            else:
                shape = shape[::-1]
            entry["shape"] = shape
        elif choice == 2:
            start, end = entry["data_offsets"]
            delta = rng.choice([-8, -4, -2, 2, 4, 8, 10**9])
            entry["data_offsets"] = rng.choice([[start + delta, end], [start, end + delta], [start + delta, end + delta], [end, start]])
        elif choice == 3:
            del header[name]
        elif choice == 4:
            other = rng.choice(names)
            header[name]["data_offsets"] = list(header[other]["data_offsets"])
        else:
            header[name.replace(".svd_", ".lora_", 1) if rng.random() < 0.5 else name + "x"] = header.pop(name)
        return _join(header, body)
    meta = header.setdefault("__metadata__", {})
    choice = rng.randrange(6)
    if choice < 3 and "tlora_config" in meta:  # the stored config: a field's value, type or presence
        config = json.loads(meta["tlora_config"])
        field = rng.choice(list(config) + ["colour"])
        if rng.random() < 0.2 and field in config:
            del config[field]
        else:
            config[field] = _random_value(rng)
        meta["tlora_config"] = json.dumps(config)
    elif choice == 3:
        meta["tlora_format_version"] = rng.choice(["0", "2", "-1", "one", "", "1.0", "99999999999999999999"])
    elif choice == 4:
        meta[rng.choice(list(meta))] = rng.choice(["", "{", "null", "x" * 1000])
    else:
        key = rng.choice(list(meta))
        del meta[key]
    return _join(header, body)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def test_every_mutation_is_refused_or_loads_the_same_values(original, tmp_path):
    data, reference, config = original
    path = str(tmp_path / "mutant.safetensors")
    rng = random.Random(20261122)
    outcomes = {"refused": 0, "same": 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, _alarm)
    seen = set()
    try:
        for index in range(MUTATIONS):
            mutant = mutate(data, rng)
            seen.add(mutant)
            with open(path, "wb") as f:
                f.write(mutant)
            signal.alarm(10)
            try:
                tensors, metadata = read_safetensors(path)
                loaded_config, _, _ = validate_native(tensors, metadata, path)
            except TLoRAFormatError as e:
                message = str(e)
                assert message and "\n" not in message and path in message, (index, message)
                outcomes["refused"] += 1
                continue
            except _Timeout:
                pytest.fail(f"mutation {index} made the reader hang")
            except Exception as e:  # noqa: BLE001 - anything else is a crash of the reader
                pytest.fail(f"mutation {index}: {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            # it loaded: it must be the original content, nothing bigger than the file
            assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(mutant), index
            assert tensors.keys() == reference.keys(), index
            for key, value in reference.items():
                assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), (index, key)
            assert loaded_config == config, index
            outcomes["same"] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"{MUTATIONS} mutations ({len(seen)} distinct): {outcomes}; peak memory growth {growth_mb:.0f} MB")
    assert len(seen) > 0.75 * MUTATIONS  # a few kinds have few variants (version strings, length lies)
    assert outcomes["refused"] > 0.5 * MUTATIONS and outcomes["same"] > 0  # both kinds occur: the test has teeth
    assert growth_mb < 200


def test_the_original_file_loads(original, tmp_path):
    data, reference, config = original
    path = str(tmp_path / "same.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    tensors, metadata = read_safetensors(path)
    assert validate_native(tensors, metadata, path)[0] == config
    with safe_open(path, "pt") as f:
        assert "tlora_sha256" in f.metadata()
