"""Corrupt and hostile checkpoint files are refused before any merge work (issue #12, principle 2).

Each kind of damage is written by hand (struct + json) into a copy of a tiny
model; the merge must raise one InputError naming the file and the problem,
read no weight and leave no output. The ``safetensors`` library is the floor:
every file it refuses, we refuse too, and the property tests at the end check
that a mutated file we accept reads back exactly as the library reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import mergesmith
from mergesmith.checkpoint.config import read_config
from mergesmith.checkpoint.jsonfile import MAX_JSON_DEPTH
from mergesmith.checkpoint.reader import (MAX_HEADER_BYTES, SAFETENSORS_DTYPES, Checkpoint,
                                          read_safetensors_header)
from mergesmith.errors import InputError
from tiny_models import load_state

# ----------------------------------------------------------------------------- helpers


def split(f: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data area."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(f: Path, header: dict | bytes, data: bytes, n: Optional[int] = None) -> None:
    """Write a safetensors file by hand: 8-byte length, JSON header, data area."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


def by_offset(header: dict) -> list[str]:
    return [k for _, k in sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")]


def library_loads(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``f`` as the safetensors library reads it (raises if it refuses)."""
    with safe_open(str(f), framework="pt") as st_file:
        return {k: st_file.get_tensor(k) for k in st_file.keys()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def linear(*paths: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if any tensor is read: validation must finish first."""
    def refuse(self, name):
        raise AssertionError(f"read {name} before validation finished")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def refused(recipe: dict, tmp_path: Path) -> str:
    """The merge's one InputError, as text; no output is left."""
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    return str(err.value)


# ----------------------------------------------------------------------------- safetensors headers


@dataclass
class Damage:
    """One kind of damage: ``corrupt(file, header, data)`` rewrites the file."""
    corrupt: Callable[[Path, dict, bytes], object]
    expect: list[str]
    library_refuses: bool = True  # False: valid to the library, refused by us on purpose
    names: list[str] = field(default_factory=list)


def _set(name_at: int, key: str, value) -> Callable[[Path, dict, bytes], None]:
    """Set ``key`` of the tensor at position ``name_at`` (by offset) to ``value``."""
    def corrupt(f: Path, header: dict, data: bytes) -> None:
        header[by_offset(header)[name_at]][key] = value
        join(f, header, data)
    return corrupt


def _norm(header: dict) -> str:
    """A [16] float32 tensor (64 bytes) in the middle of the file."""
    return "model.layers.1.input_layernorm.weight"


def _overlap(f: Path, header: dict, data: bytes) -> None:
    # Two [16] float32 norms: the second now claims the first's bytes.
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = \
        header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    join(f, header, data)


def _gap(f: Path, header: dict, data: bytes) -> None:
    del header[by_offset(header)[1]]
    join(f, header, data)


def _duplicate(f: Path, header: dict, data: bytes) -> None:
    first = by_offset(header)[0]
    text = json.dumps(header)
    entry = json.dumps({first: header[first]})[1:-1]
    join(f, ("{" + entry + "," + text[1:]).encode(), data)


def _surrogate(f: Path, header: dict, data: bytes) -> None:
    name = by_offset(header)[0]
    header["\ud800" + name] = header.pop(name)
    join(f, json.dumps(header).encode(), data)  # ensure_ascii spells it \\ud800


def _not_utf8(f: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    at = raw.index(b"model.norm.weight")
    join(f, raw[:at] + b"\xff" + raw[at + 1:], data)


def _deep(f: Path, header: dict, data: bytes) -> None:
    depth = 100_000
    header = json.dumps(header).encode()
    join(f, b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"," + header[1:], data)


def _huge_offset(f: Path, header: dict, data: bytes) -> None:
    header[by_offset(header)[0]]["data_offsets"][1] = "HUGE"
    join(f, json.dumps(header).replace('"HUGE"', "9" * 5000).encode(), data)


def _huge_shape(f: Path, header: dict, data: bytes) -> None:
    end = len(data)
    header["empty"] = {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [end, end]}
    join(f, header, data)


DAMAGES: dict[str, Damage] = {
    "shorter than 8 bytes": Damage(lambda f, h, d: f.write_bytes(b"\x01\x02"), ["only 2 bytes"]),
    "header length over the limit": Damage(lambda f, h, d: join(f, h, d, n=2**40),
                                           [f"says {2**40} bytes", f"{MAX_HEADER_BYTES} allowed"]),
    "header length past the file": Damage(lambda f, h, d: join(f, h, b"", n=10**6), ["truncated"]),
    "header not JSON": Damage(lambda f, h, d: join(f, b"{not json", d), ["not valid JSON", "line 1 column 2"]),
    "header not UTF-8": Damage(_not_utf8, ["not UTF-8", " is 0xff"]),
    "header an array": Damage(lambda f, h, d: join(f, b"[]", d), ["is an array, not a JSON object"]),
    "header nested 100000 deep": Damage(_deep, [f"more than {MAX_JSON_DEPTH} deep"]),
    "duplicate tensor name": Damage(_duplicate, ["names key", "twice"], library_refuses=False),
    "name not Unicode": Damage(_surrogate, ["is not valid Unicode"]),
    # Python's json writes Infinity and reads it back; JSON (and the safetensors library) has no such value.
    "Infinity in the header": Damage(lambda f, h, d: join(f, {**h, "__metadata__": {"x": float("inf")}}, d),
                                     ["holds Infinity, which is not JSON"]),
    "metadata values not strings": Damage(lambda f, h, d: join(f, {**h, "__metadata__": {"format": 1}}, d),
                                          ["__metadata__ must map strings to strings"]),
    "entry not an object": Damage(lambda f, h, d: join(f, {**h, by_offset(h)[0]: [1, 2]}, d),
                                  ["is an array, not an object with dtype"]),
    "entry missing dtype": Damage(lambda f, h, d: (h[by_offset(h)[0]].pop("dtype"), join(f, h, d)),
                                  ["has no dtype"]),
    "unknown dtype": Damage(_set(0, "dtype", "F33"), ["unknown dtype 'F33'", "BF16, BOOL, F16, F32"]),
    "float8 dtype": Damage(lambda f, h, d: (h[_norm(h)].update(dtype="F8_E4M3", shape=[64]), join(f, h, d)),
                           ["F8_E4M3 is a safetensors dtype mergesmith does not merge"], library_refuses=False),
    "shape not a list": Damage(_set(1, "shape", 16), ["shape 16 is not a list of non-negative integers"]),
    "negative dimension": Damage(_set(1, "shape", [-16]), ["shape [-16] is not a list"]),
    "fractional dimension": Damage(_set(1, "shape", [16.0]), ["shape [16.0] is not a list"]),
    "string dimension": Damage(_set(1, "shape", ["16"]), ["shape ['16'] is not a list"]),
    "boolean dimension": Damage(_set(1, "shape", [True]), ["shape [True] is not a list"]),
    "shape products overflow": Damage(_huge_shape, ["larger than any tensor can be"]),
    "shape and bytes disagree": Damage(lambda f, h, d: (h[_norm(h)].update(shape=[15]), join(f, h, d)),
                                       ["hold 64 bytes, but shape [15] of F32 needs 60"]),
    "offsets not a pair": Damage(_set(0, "data_offsets", [0, 64, 64]), ["is not a pair [begin, end]"]),
    "negative offset": Damage(_set(0, "data_offsets", [-4, 60]), ["is not a pair [begin, end]"]),
    "offset beyond any file": Damage(_set(0, "data_offsets", [0, 2**70]), ["point beyond any file"]),
    "5000-digit offset": Damage(_huge_offset, ["cannot be parsed"]),
    "offsets end before they begin": Damage(_set(0, "data_offsets", [64, 0]), ["end before they begin"]),
    "overlapping tensors": Damage(_overlap, ["'model.layers.1.input_layernorm.weight'", "overlaps tensor"]),
    "gap between tensors": Damage(_gap, ["of the data area belong to no tensor"]),
    "data truncated": Damage(lambda f, h, d: join(f, h, d[:-4]), ["past its end", "truncated"]),
    "bytes after the last tensor": Damage(lambda f, h, d: join(f, h, d + b"\0" * 4),
                                          ["the last 4 bytes of the file belong to no tensor"]),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_damaged_header_is_refused_before_any_weight_is_read(kind, tmp_path, model_family, no_weight_reads):
    _, (a, b, _) = model_family()
    broken = copy_model(b, tmp_path / "broken")
    f = broken / "model.safetensors"
    damage = DAMAGES[kind]
    damage.corrupt(f, *split(b / "model.safetensors"))
    text = refused(linear(a, broken), tmp_path)
    lines = [line for line in text.splitlines() if str(f) in line]
    assert lines, text
    for expected in damage.expect:
        assert expected in text, (expected, text)
    assert all("re-download" in line for line in lines)
    assert "Traceback" not in text and str(a) not in text  # only the damaged model is named
    if damage.library_refuses:
        with pytest.raises(Exception):
            library_loads(f)
    else:  # documented: stricter than the library here
        library_loads(f)


def test_nesting_would_crash_the_plain_parser():
    """Why the depth bound exists: Python's json recurses once per level."""
    with pytest.raises(RecursionError):
        json.loads("[" * 100_000 + "]" * 100_000)


def test_not_utf8_names_the_exact_byte_offset(tmp_path):
    f = tmp_path / "x.safetensors"
    header = b'{"a\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    join(f, header, b"\0" * 4)
    with pytest.raises(InputError, match=r"not UTF-8 text: byte 11 is 0xfe"):  # 8 + len('{"a')
        read_safetensors_header(f)


def test_every_problem_of_a_header_is_listed(tmp_path):
    f = tmp_path / "x.safetensors"
    join(f, {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]},
             "b": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 8]},
             "c": {"dtype": "F32", "shape": [2], "data_offsets": [8, 12]}}, b"\0" * 12)
    with pytest.raises(InputError) as err:
        read_safetensors_header(f)
    assert len(err.value.problems) == 3
    assert [p.split(": tensor ")[1][:3] for p in err.value.problems] == ["'a'", "'b'", "'c'"]


def test_zero_size_tensors_anywhere_at_a_boundary_are_valid(tmp_path):
    f = tmp_path / "x.safetensors"
    join(f, {"empty0": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
             "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
             "empty4": {"dtype": "I64", "shape": [3, 0], "data_offsets": [4, 4]}}, struct.pack("<f", 1.5))
    infos = read_safetensors_header(f)
    ckpt = Checkpoint(tmp_path, infos, "safetensors")
    assert ckpt.read("a").tolist() == [1.5] and ckpt.read("empty4").shape == (3, 0)
    ckpt.close()
    assert set(library_loads(f)) == {"empty0", "a", "empty4"}


def test_zero_size_tensor_inside_another_is_an_overlap(tmp_path):
    f = tmp_path / "x.safetensors"
    join(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, b"\0" * 8)
    with pytest.raises(InputError, match="'z' at data_offsets \\[4, 4\\] overlaps tensor 'a'"):
        read_safetensors_header(f)
    with pytest.raises(Exception):
        library_loads(f)


def test_a_tensor_read_before_close_stays_valid(tmp_path):
    """close() must not unmap pages under a live view: that access would crash the process."""
    save_file({"x": torch.arange(1024, dtype=torch.float32)}, tmp_path / "model.safetensors")
    script = (f"import gc, torch; from mergesmith.checkpoint.reader import Checkpoint\n"
              f"ckpt = Checkpoint.open({str(tmp_path)!r}); view = ckpt.read('x'); ckpt.close(); del ckpt\n"
              "gc.collect(); assert view.sum().item() == 1023 * 512, view.sum()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(mergesmith.__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


# ----------------------------------------------------------------------------- index files


def sharded_copy(src: Path, dst: Path) -> Path:
    """``src`` saved as two shards and an index, by hand."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_state(src)
    names = sorted(state)
    halves = {"model-1.safetensors": names[: len(names) // 2], "model-2.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, dst / shard)
        weight_map.update({k: shard for k in keys})
    write_index(dst, {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return dst


def write_index(folder: Path, index: dict | bytes) -> None:
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    (folder / "model.safetensors.index.json").write_bytes(raw)


def read_index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_sharded_copy_merges_like_the_original(tmp_path, model_family):
    _, (a, b, _) = model_family()
    sharded = sharded_copy(b, tmp_path / "sharded")
    mergesmith.merge(linear(a, sharded), tmp_path / "o1", progress=False)
    mergesmith.merge(linear(a, b), tmp_path / "o2", progress=False)
    want, got = load_state(tmp_path / "o2"), load_state(tmp_path / "o1")
    assert all(torch.equal(want[k], got[k]) for k in want)


def _outside_file(folder: Path) -> Path:
    """A valid safetensors file next to (not inside) the model folder."""
    outside = folder.parent / "elsewhere.safetensors"
    shutil.copy(folder / "model-1.safetensors", outside)
    return outside


def _point_shard_at(name_of: Callable[[Path], str]) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        index = read_index(folder)
        shard = name_of(folder)
        index["weight_map"] = {k: (shard if v == "model-1.safetensors" else v) for k, v in index["weight_map"].items()}
        write_index(folder, index)
    return corrupt


def _climbing_name(folder: Path) -> str:
    return f"../{_outside_file(folder).name}"


def _absolute_name(folder: Path) -> str:
    return str(_outside_file(folder))


def _escaping_symlink(folder: Path) -> str:
    link = folder / "linked.safetensors"
    link.symlink_to(_outside_file(folder))
    return "linked.safetensors"


def _wrong_shard(folder: Path) -> None:
    index = read_index(folder)
    name = next(k for k, v in index["weight_map"].items() if v == "model-1.safetensors")
    index["weight_map"][name] = "model-2.safetensors"
    write_index(folder, index)


INDEX_DAMAGES: dict[str, tuple[Callable[[Path], object], list[str]]] = {
    "not UTF-8": (lambda d: write_index(d, b'{"weight_map": {"\xc3(": "x"}}'),
                  ["the index is not UTF-8", "byte 17 is 0xc3"]),
    "not JSON": (lambda d: write_index(d, b'{"weight_map": '), ["the index is not valid JSON"]),
    "an array": (lambda d: write_index(d, []), ["the index is an array, not a JSON object"]),
    "no weight_map": (lambda d: write_index(d, {"metadata": {}}), ["the index has no weight_map"]),
    "weight_map an array": (lambda d: write_index(d, {"weight_map": ["model-1.safetensors"]}),
                            ["weight_map is an array, not an object"]),
    "shard name a number": (lambda d: write_index(d, {"weight_map": {"lm_head.weight": 1}}),
                            ["weight_map['lm_head.weight'] = 1 is not a shard file name"]),
    "duplicate tensor name": (lambda d: write_index(d, b'{"weight_map": {"x": "model-1.safetensors", '
                                                       b'"x": "model-2.safetensors"}}'),
                              ["names key 'x' twice"]),
    "metadata an array": (lambda d: write_index(d, {"metadata": [], "weight_map": read_index(d)["weight_map"]}),
                          ["metadata is an array, not an object"]),
    "shard climbs out": (_point_shard_at(_climbing_name),
                         ["shard '../elsewhere.safetensors' climbs out of the model folder"]),
    "shard absolute": (_point_shard_at(_absolute_name), ["is an absolute path"]),
    "shard a symlink out": (_point_shard_at(_escaping_symlink),
                            ["shard 'linked.safetensors' is a symlink that leads out of the model folder"]),
    "shard missing": (_point_shard_at(lambda d: "model-9.safetensors"),
                      ["shard model-9.safetensors is listed but missing"]),
    "tensor in another shard": (_wrong_shard, ["tensors listed in the index are not in their shards"]),
}


@pytest.mark.parametrize("kind", list(INDEX_DAMAGES))
def test_damaged_index_is_refused(kind, tmp_path, model_family, no_weight_reads):
    _, (a, b, _) = model_family()
    folder = sharded_copy(b, tmp_path / "sharded")
    corrupt, expected = INDEX_DAMAGES[kind]
    corrupt(folder)
    text = refused(linear(a, folder), tmp_path)
    assert str(folder / "model.safetensors.index.json") in text
    for e in expected:
        assert e in text, (e, text)


def test_symlinks_inside_the_folder_and_into_the_hub_cache_are_fine(tmp_path, model_family):
    _, (a, b, _) = model_family()
    # A shard linked to a file in a subfolder of the model folder.
    inside = sharded_copy(b, tmp_path / "inside")
    (inside / "real").mkdir()
    (inside / "model-1.safetensors").rename(inside / "real" / "one.safetensors")
    (inside / "model-1.safetensors").symlink_to(Path("real") / "one.safetensors")
    mergesmith.merge(linear(a, inside), tmp_path / "o1", progress=False)
    # huggingface_hub's layout: snapshots/<rev>/file -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    sharded = sharded_copy(b, tmp_path / "plain")
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        shutil.copy(f, repo / "blobs" / f"hash{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"hash{i}")
    mergesmith.merge(linear(a, snapshot), tmp_path / "o2", progress=False)
    assert load_state(tmp_path / "o1").keys() == load_state(tmp_path / "o2").keys()


def test_loose_files_naming_one_tensor_twice(tmp_path, model_family, no_weight_reads):
    _, (a, b, _) = model_family()
    folder = copy_model(b, tmp_path / "loose")
    (folder / "model.safetensors").rename(folder / "part-a.safetensors")
    save_file({"lm_head.weight": torch.zeros(64, 16)}, folder / "part-b.safetensors")
    text = refused(linear(a, folder), tmp_path)
    assert f"{folder / 'part-b.safetensors'}: tensor 'lm_head.weight' is also in part-a.safetensors" in text


# ----------------------------------------------------------------------------- config.json and adapter configs


def test_config_not_utf8_names_the_byte_offset(tmp_path, model_family, no_weight_reads):
    _, (a, b, _) = model_family()
    broken = copy_model(b, tmp_path / "broken")
    (broken / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    text = refused(linear(a, broken), tmp_path)
    assert f"{broken / 'config.json'}: the config is not UTF-8 text: byte 18 is 0xe9" in text


def test_config_of_the_wrong_types_names_every_field(tmp_path, model_family, no_weight_reads):
    _, (a, b, c) = model_family()
    broken = copy_model(b, tmp_path / "broken")
    config = json.loads((b / "config.json").read_text())
    config.update(num_hidden_layers="3", vocab_size=64.0, hidden_size=0, architectures="LlamaForCausalLM",
                  text_config={"num_hidden_layers": True})
    (broken / "config.json").write_text(json.dumps(config))
    listed = copy_model(c, tmp_path / "listed")
    (listed / "config.json").write_text("[]")
    text = refused(linear(a, broken, listed), tmp_path)
    cfg = broken / "config.json"
    for line in (f"{cfg}: num_hidden_layers = '3' (a string) must be a positive integer",
                 f"{cfg}: vocab_size = 64.0 (a number) must be a positive integer",
                 f"{cfg}: hidden_size = 0 (an integer) must be a positive integer",
                 f"{cfg}: architectures = 'LlamaForCausalLM' (a string) must be a list of strings",
                 f"{cfg}: text_config.num_hidden_layers = True (a boolean) must be a positive integer",
                 f"{listed / 'config.json'}: the config is an array, not a JSON object"):
        assert line in text, (line, text)
    assert text.startswith("6 problems")


def test_problems_of_all_models_come_in_one_error(tmp_path, model_family, no_weight_reads):
    _, (a, b, c) = model_family()
    one = copy_model(b, tmp_path / "one")  # a bad config and a bad header in one model
    (one / "config.json").write_text('{"num_hidden_layers": -3}')
    header, data = split(one / "model.safetensors")
    join(one / "model.safetensors", header, data[:-1])
    two = copy_model(c, tmp_path / "two")
    header, data = split(two / "model.safetensors")
    header[by_offset(header)[0]]["dtype"] = "X"
    join(two / "model.safetensors", header, data)
    text = refused(linear(a, one, two), tmp_path)
    assert text.startswith("3 problems")
    assert "num_hidden_layers = -3" in text and "past its end" in text and "unknown dtype 'X'" in text


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["num_hidden_layers", "vocab_size", "architectures", "text_config",
                                         "model_type", "hidden_size", "x"]), inner, max_size=4),
                    max_leaves=12))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_config_is_a_dict_or_an_input_error(value):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(value))
        try:
            config = read_config(path)
        except InputError as err:
            assert all(str(path) in p for p in err.problems)
        else:
            assert isinstance(config, dict)


def _adapter(tmp_path: Path, config: bytes) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(config)
    return adapter


def test_adapter_config_not_utf8(tmp_path, model_family, no_weight_reads):
    _, (a, b, _) = model_family()
    adapter = _adapter(tmp_path, b'{"peft_type": "LORA\x80"}')
    text = refused(linear(a, f"{b}+{adapter}"), tmp_path)
    assert f"{adapter / 'adapter_config.json'}: the adapter config is not UTF-8 text: byte 19 is 0x80" \
        in text


def test_adapter_config_of_the_wrong_types(tmp_path, model_family, no_weight_reads):
    _, (a, b, _) = model_family()
    adapter = _adapter(tmp_path, json.dumps({"peft_type": "LORA", "lora_alpha": "8", "use_rslora": "yes",
                                             "alpha_pattern": {"q_proj(": 2, "v_proj": "x"}}).encode())
    text = refused(linear(a, f"{b}+{adapter}"), tmp_path)
    cfg = adapter / "adapter_config.json"
    for line in (f"{cfg}: lora_alpha = '8' (a string) must be a number",
                 f"{cfg}: use_rslora = 'yes' (a string) must be true or false",
                 f"{cfg}: alpha_pattern key 'q_proj(' is not a regular expression",
                 f"{cfg}: alpha_pattern['v_proj'] = 'x' (a string) must be a number"):
        assert line in text, (line, text)
    adapter_list = tmp_path / "list"
    adapter_list.mkdir()
    (adapter_list / "adapter_config.json").write_text("[1]")
    text = refused(linear(a, f"{b}+{adapter_list}"), tmp_path)
    assert "the adapter config is an array, not a JSON object" in text


# ----------------------------------------------------------------------------- PyTorch .bin


@pytest.fixture
def bin_model(tmp_path, model_family) -> Path:
    _, (_, b, _) = model_family()
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(b / "config.json", folder / "config.json")
    torch.save(load_state(b), folder / "pytorch_model.bin")
    return folder


BIN_DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "garbage": lambda f: f.write_bytes(os.urandom(4096)),
    "empty": lambda f: f.write_bytes(b""),
    "a list, not a dict": lambda f: torch.save([torch.zeros(2)], f),
    "tensor names not strings": lambda f: torch.save({1: torch.zeros(2)}, f),
}


@pytest.mark.parametrize("kind", list(BIN_DAMAGES))
def test_damaged_bin_is_one_clear_error(kind, tmp_path, model_family, bin_model, no_weight_reads):
    _, (a, _, _) = model_family()
    f = bin_model / "pytorch_model.bin"
    BIN_DAMAGES[kind](f)
    with pytest.raises(InputError) as err:
        mergesmith.merge(linear(a, bin_model), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    [problem] = err.value.problems
    assert str(f) in problem and "re-download" in problem


# ----------------------------------------------------------------------------- properties

SAMPLE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
          "h": torch.tensor([1.5, -2.0, 0.25, 8.0], dtype=torch.float16),
          "i": torch.tensor([-7], dtype=torch.int64)}
DTYPE_CODES = sorted(SAFETENSORS_DTYPES) + ["F8_E4M3", "U16", "f32", "", "F"]

json_values = st.one_of(st.integers(-3, 40), st.lists(st.integers(-2, 8), max_size=3), st.text(max_size=3),
                        st.none(), st.floats(allow_nan=False), st.booleans())
mutations = st.one_of(
    st.tuples(st.just("offsets"), st.sampled_from(list(SAMPLE)), st.integers(0, 1), st.integers(-9, 9)),
    st.tuples(st.just("shape"), st.sampled_from(list(SAMPLE)), st.lists(st.integers(-1, 7), max_size=3)),
    st.tuples(st.just("dtype"), st.sampled_from(list(SAMPLE)), st.sampled_from(DTYPE_CODES)),
    st.tuples(st.just("field"), st.sampled_from(list(SAMPLE)),
              st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), json_values),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("length"), st.integers(-16, 16)),
)


def _mutate(raw: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "flip":
        out = bytearray(raw)
        if out:
            out[mutation[1] % len(out)] ^= mutation[2]
        return bytes(out)
    if kind == "truncate":
        return raw[: mutation[1] % (len(raw) + 1)]
    if kind == "append":
        return raw + mutation[1]
    try:  # the mutations below edit a header that still parses, and the tensor they name
        (n,) = struct.unpack("<Q", raw[:8])
        if kind == "length":
            return struct.pack("<Q", max(0, n + mutation[1])) + raw[8:]
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        entry = header[mutation[1]]
        if kind == "offsets":
            entry["data_offsets"][mutation[2]] += mutation[3]
        elif kind in ("shape", "dtype"):
            entry[kind] = mutation[2]
        else:
            entry[mutation[2]] = mutation[3]
    except (struct.error, ValueError, KeyError, IndexError, TypeError):
        return raw
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@given(st.lists(mutations, min_size=1, max_size=3))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_mutated_file_is_refused_or_reads_exactly_as_the_library_reads_it(steps):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.safetensors"
        save_file(SAMPLE, f)
        raw = f.read_bytes()
        for step in steps:
            raw = _mutate(raw, step)
        f.write_bytes(raw)
        try:
            infos = read_safetensors_header(f)
        except InputError as err:
            assert all(str(f) in p for p in err.problems)
            return
        theirs = library_loads(f)  # accepted by us: the library must accept it too
        ckpt = Checkpoint(Path(d), infos, "safetensors")
        try:
            assert set(infos) == set(theirs)
            for name, want in theirs.items():
                got = ckpt.read(name).clone()  # a view dies with the map at close()
                assert got.dtype == want.dtype and got.shape == want.shape
                assert _as_bytes(got) == _as_bytes(want)
        finally:
            ckpt.close()


shapes = st.lists(st.integers(0, 4), max_size=3)
tensors = st.dictionaries(st.text("abcxyz._", min_size=1, max_size=6),
                          st.tuples(st.sampled_from(sorted(SAFETENSORS_DTYPES)), shapes), max_size=5)


@given(tensors, st.integers(0, 2**31 - 1),
       st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_valid_file_is_accepted_and_reads_back_equal(spec, seed, metadata):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (code, shape) in spec.items():
        dtype = SAFETENSORS_DTYPES[code]
        if dtype.is_floating_point:
            state[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            state[name] = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=gen).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.safetensors"
        save_file(state, f, metadata=metadata)
        try:
            library_loads(f)
        except Exception:  # safetensors 0.8 writes `{},"__metadata__":{}}` for no tensors and empty metadata
            with pytest.raises(InputError):
                read_safetensors_header(f)
            return
        infos = read_safetensors_header(f)
        ckpt = Checkpoint(Path(d), infos, "safetensors")
        try:
            assert set(infos) == set(state)
            for name, want in state.items():
                got = ckpt.read(name).clone()  # a view dies with the map at close()
                assert got.dtype == want.dtype and got.shape == want.shape
                assert _as_bytes(got) == _as_bytes(want)
        finally:
            ckpt.close()
