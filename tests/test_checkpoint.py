import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from evomerge.checkpoint import CheckpointReader, CheckpointWriter
from evomerge.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from evomerge.checkpoint.writer import _SequentialFile
from evomerge.errors import EvomergeError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


def sample_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g).to(torch.float16),
        "model.layers.1.input_layernorm.weight": torch.ones(4),
        "model.norm.weight": torch.randn(4, generator=g),
        "lm_head.weight": torch.randn(10, 4, generator=g),
        "scalar": torch.tensor(3.5),
        "counts": torch.arange(5),
    }


def write(tmp_path, tensors, streamed=False, **kw):
    out = tmp_path / "ckpt"
    if streamed:
        kw["layout"] = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with CheckpointWriter(out, **kw) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return out


def assert_same(reader, tensors):
    assert sorted(reader.names) == sorted(tensors)
    for name, t in tensors.items():
        info = reader.info(name)
        assert info.shape == tuple(t.shape) and info.dtype == t.dtype
        got = reader.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_single_file_round_trip_is_bit_exact(tmp_path, streamed):
    tensors = sample_tensors()
    out = write(tmp_path, tensors, streamed)
    assert (out / SINGLE_FILE).exists() and not (out / INDEX_FILE).exists()
    reader = CheckpointReader(out)
    assert_same(reader, tensors)
    assert reader.num_layers == 2


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_sharded_round_trip_writes_an_index_and_respects_the_size_limit(tmp_path, streamed):
    tensors = sample_tensors()
    out = write(tmp_path, tensors, streamed, max_shard_bytes=200)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # a shard holds more than the limit only when it is one larger tensor
        in_shard = [n for n, f in index["weight_map"].items() if f == shard]
        data = sum(tensors[n].numel() * tensors[n].element_size() for n in in_shard)
        assert data <= 200 or len(in_shard) == 1
    assert_same(CheckpointReader(out), tensors)


def test_shards_without_an_index_are_read_as_one_checkpoint(tmp_path):
    tensors = sample_tensors()
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:3]}, str(tmp_path / "part-a.safetensors"))
    save_file({n: tensors[n] for n in names[3:]}, str(tmp_path / "part-b.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names) == sorted(names)
    for n in names:
        assert torch.equal(reader.get(n), tensors[n])


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    limit=st.integers(1, 400),
    streamed=st.booleans(),
)
def test_any_tensors_round_trip_through_any_shard_limit(tmp_path_factory, shapes, dtype, limit, streamed):
    g = torch.Generator().manual_seed(len(shapes))
    tensors = {
        f"t{i}": (torch.randn(*s, generator=g) * 10).to(dtype) if s else torch.tensor(1).to(dtype)
        for i, s in enumerate(shapes)
    }
    out = write(tmp_path_factory.mktemp("rt"), tensors, streamed, max_shard_bytes=limit)
    assert_same(CheckpointReader(out), tensors)


def test_metadata_files_are_copied_and_config_updated(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "pytorch_model.bin").write_text("not copied")
    out = write(tmp_path, sample_tensors(), metadata_from=src, config_updates={"dtype": "bfloat16"})
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not (out / "pytorch_model.bin").exists()
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama", "dtype": "bfloat16"}


def test_an_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "ckpt"

    class Boom(Exception):
        pass

    with pytest.raises(Boom), CheckpointWriter(out, max_shard_bytes=64) as w:
        for i, (name, t) in enumerate(sample_tensors().items()):
            if i == 5:
                raise Boom()
            w.add(name, t)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the partial directory is gone too


def test_an_aborted_streamed_write_is_removed_even_when_the_disk_is_full(tmp_path, monkeypatch):
    # abort discards what is staged for the shard instead of writing it: a write failing with
    # ENOSPC at that point must not keep the partial directory (or hide the original error)
    out = tmp_path / "ckpt"
    tensors = sample_tensors()
    layout = [(n, t.shape, t.dtype) for n, t in tensors.items()]

    class Boom(Exception):
        pass

    def full(*args):
        raise OSError(28, "No space left on device")

    with pytest.raises(Boom), CheckpointWriter(out, layout=layout) as w:
        for name, t in list(tensors.items())[:3]:
            w.add(name, t)
        monkeypatch.setattr(os, "pwrite", full)
        raise Boom()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_unless_overwrite(tmp_path):
    out = write(tmp_path, sample_tensors(0))
    with pytest.raises(EvomergeError, match="already exists"):
        CheckpointWriter(out)
    new = sample_tensors(1)
    write(tmp_path, new, overwrite=True)
    assert_same(CheckpointReader(out), new)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_streamed_write_must_follow_its_declared_layout(tmp_path):
    layout = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    with (
        pytest.raises(RuntimeError, match="does not match the declared layout"),
        CheckpointWriter(tmp_path / "c", layout=layout) as w,
    ):
        w.add("b", torch.zeros(3))
    with (
        pytest.raises(RuntimeError, match="1 declared tensors were never written"),
        CheckpointWriter(tmp_path / "c", layout=layout) as w,
    ):
        w.add("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_the_same_name_cannot_be_written_twice(tmp_path):
    with pytest.raises(EvomergeError, match="'x' written twice"), CheckpointWriter(tmp_path / "c") as w:
        w.add("x", torch.zeros(1))
        w.add("x", torch.zeros(1))


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickled_weights_are_refused_with_a_clear_message(tmp_path, pickle_name):
    (tmp_path / pickle_name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(EvomergeError, match=f"only pickled weights found \\({pickle_name}\\).*safetensors"):
        CheckpointReader(tmp_path)


def test_safetensors_are_preferred_when_pickles_lie_beside_them(tmp_path):
    out = write(tmp_path, sample_tensors())
    (out / "pytorch_model.bin").write_bytes(b"ignored")
    assert len(CheckpointReader(out)) == 8


def test_bad_checkpoints_name_the_file_or_tensor(tmp_path):
    with pytest.raises(EvomergeError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvomergeError, match="no \\*.safetensors weights"):
        CheckpointReader(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SINGLE_FILE).write_bytes(b"garbage")
    with pytest.raises(EvomergeError, match="model.safetensors: cannot read"):
        CheckpointReader(broken)
    out = write(tmp_path, sample_tensors(), max_shard_bytes=200)
    index = json.loads((out / INDEX_FILE).read_text())
    index["weight_map"]["ghost.weight"] = index["weight_map"]["lm_head.weight"]
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(EvomergeError, match="'ghost.weight' is listed in the index but missing"):
        CheckpointReader(out)
    index["weight_map"]["ghost.weight"] = "model-00099-of-00099.safetensors"
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(EvomergeError, match="shard 'model-00099-of-00099.safetensors' does not exist"):
        CheckpointReader(out)
    with pytest.raises(EvomergeError, match="no tensor named 'missing'"):
        CheckpointReader(write(tmp_path / "x", sample_tensors())).info("missing")


def _raw_safetensors(path, tensors):
    """A safetensors file laid out exactly as given: no padding between tensors."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        code = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(blobs))


def test_tensors_are_private_maps_even_when_misaligned(tmp_path):
    odd = torch.tensor([1, 2, 3], dtype=torch.uint8)  # puts the float32 tensor at byte 3
    f32 = torch.arange(5, dtype=torch.float32) / 3
    bf16 = torch.linspace(-1, 1, 7).to(torch.bfloat16)
    _raw_safetensors(tmp_path / SINGLE_FILE, {"odd": odd, "f32": f32, "bf16": bf16})
    before = (tmp_path / SINGLE_FILE).read_bytes()
    r = CheckpointReader(tmp_path)
    assert torch.equal(r.get("odd"), odd) and torch.equal(r.get("f32"), f32)
    assert torch.equal(r.get("bf16"), bf16)
    x = r.get("bf16")
    x.mul_(0)  # copy-on-write: the file and later reads are untouched
    assert torch.equal(r.get("bf16"), bf16) and (tmp_path / SINGLE_FILE).read_bytes() == before


def test_a_shard_truncated_after_opening_is_a_clear_error(tmp_path):
    save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(tmp_path / SINGLE_FILE))
    r = CheckpointReader(tmp_path)
    size = (tmp_path / SINGLE_FILE).stat().st_size
    with open(tmp_path / SINGLE_FILE, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(EvomergeError, match=r"model.safetensors: tensor '\w' is truncated"):
        r.get("a"), r.get("b")


@pytest.mark.parametrize("direct_io", [True, False])
def test_sequential_file_writes_every_byte_in_order(tmp_path, monkeypatch, direct_io):
    # a 12 KiB stage: writes cross it, fill it exactly, and leave a partial last block
    monkeypatch.setattr(_SequentialFile, "STAGE", 3 * 4096)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5, 4091, 12288, 1, 30000, 7, 0, 8192)]
    f = _SequentialFile(tmp_path / "x", direct_io)
    if direct_io and f.direct is None:
        pytest.skip("this filesystem has no O_DIRECT")
    assert (f.direct is not None) == direct_io
    for c in chunks:
        f.write(c)
    f.close()
    assert (tmp_path / "x").read_bytes() == b"".join(c.tobytes() for c in chunks)


@pytest.mark.parametrize("size", [30000, 1500])  # the refusal while writing, or first in close()
def test_sequential_file_falls_back_when_direct_writes_fail(tmp_path, monkeypatch, size):
    monkeypatch.setattr(_SequentialFile, "STAGE", 2 * 4096)
    f = _SequentialFile(tmp_path / "x", True)
    if f.direct is None:
        pytest.skip("this filesystem has no O_DIRECT")
    real = os.pwrite
    refused = f.direct

    def pwrite(fd, data, offset):
        if fd == refused and (offset > 0 or size < 4096):  # EINVAL after the first stage, or at once
            raise OSError(22, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = np.arange(size, dtype=np.uint32).view(np.uint8)
    f.write(data[:5000])
    f.write(data[5000:])
    f.close()
    assert f.direct is None
    assert (tmp_path / "x").read_bytes() == data.tobytes()
