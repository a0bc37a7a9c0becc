"""Checkpoint loading: every layout, pipeline-stage slices, TP merging, and every
broken-checkpoint case failing with a message that names the file and the tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import pad_vocab
from models.loaders import (
    CheckpointError,
    convert,
    load_config,
    load_model,
    merge_tp_shards,
    translate,
)
from models.tokenizer import ByteTokenizer
from tests.models.hf_fixtures import VARIANTS, hf_model, write_hf_dir, write_neox_checkpoint

IDS = torch.tensor([[1, 1, 1, 510, 5347, 273, 6181, 310], [3, 1904, 2220, 247, 673, 13, 627, 369]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])


def assert_matches_hf(model, hf) -> None:
    with torch.no_grad():
        ref = hf(input_ids=IDS, attention_mask=MASK).logits
    got = model.dense_logits(IDS, MASK)
    keep = MASK.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=1e-5 * ref.abs().max())


@pytest.fixture(scope="module")
def hf_untied():
    return hf_model("parallel-rot25", seed=11)


@pytest.fixture(scope="module")
def hf_tied():
    return hf_model("sequential-rot50-tied", seed=12)


# ----------------------------------------------------------------------------- HF layouts


@pytest.mark.parametrize(
    ("layout", "keys", "head"),
    [
        ("safetensors", "5.x", "embed_out.weight"),
        ("safetensors", "4.x", "lm_head.weight"),
        ("sharded", "5.x", "lm_head.weight"),
        ("bin", "4.x", "embed_out.weight"),
        ("bin-sharded", "5.x", "embed_out.weight"),
    ],
)
def test_hf_layouts(tmp_path, tokenizer_path, hf_untied, layout, keys, head) -> None:
    d = write_hf_dir(hf_untied, tmp_path / "hf", tokenizer_path, layout=layout,
                     config_keys=keys, head_name=head)
    lm = load_model(d)
    assert lm.tokenizer.vocab_size == 50277 and lm.source == f"hf:{d}"
    assert lm.config.rotary_pct == 0.25 and lm.config.vocab_size == 50304
    assert load_config(d) == lm.config
    assert not any(p.is_meta for p in lm.model.parameters())
    assert_matches_hf(lm.model, hf_untied)


def test_hf_tied_head_shares_embedding(tmp_path, tokenizer_path, hf_tied) -> None:
    lm = load_model(write_hf_dir(hf_tied, tmp_path / "hf", tokenizer_path))
    assert lm.model.embed_out.weight is lm.model.embed_in.weight
    assert_matches_hf(lm.model, hf_tied)


def test_dtype_and_tokenizer_override(tmp_path, tokenizer_path, hf_untied) -> None:
    d = write_hf_dir(hf_untied, tmp_path / "hf", None)
    lm = load_model(d, dtype="bfloat16", tokenizer=tokenizer_path)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.tokenizer.eos_id == 0


@pytest.mark.parametrize("fixture", ["hf_untied", "hf_tied"])
def test_stage_reads_only_its_layers(tmp_path, tokenizer_path, request, fixture) -> None:
    hf = request.getfixturevalue(fixture)
    d = write_hf_dir(hf, tmp_path / "hf", tokenizer_path, layout="sharded")
    full = load_model(d).model
    n = full.config.num_layers
    first = load_model(d, layer_range=(0, 1)).model
    last = load_model(d, layer_range=(1, n)).model
    names = set(full.state_dict())
    assert set(first.state_dict()) == {k for k in names if k.startswith(("embed_in", "layers.0."))}
    assert set(last.state_dict()) == {k for k in names if not k.startswith(("embed_in",
                                                                            "layers.0."))}
    for part in (first, last):
        for k, t in part.state_dict().items():
            assert torch.equal(t, full.state_dict()[k]), k


# ------------------------------------------------------------------------- presets, convert


def test_preset_is_seeded_and_stage_consistent() -> None:
    a = load_model("preset:tiny", seed=1)
    b = load_model("preset:tiny", seed=1, layer_range=(1, 2))
    c = load_model("preset:tiny", seed=2)
    assert isinstance(a.tokenizer, ByteTokenizer) and a.tokenizer.eos_id == a.config.eos_token_id
    for n, t in b.model.state_dict().items():
        assert torch.equal(t, a.model.state_dict()[n]), n
    assert not torch.equal(a.model.embed_in.weight, c.model.embed_in.weight)
    assert load_model("preset:tiny", dtype=torch.float16).model.embed_in.weight.dtype == (
        torch.float16)
    with pytest.raises(ValueError, match="unknown preset"):
        load_model("preset:nope")


@pytest.mark.parametrize("fixture", ["hf_untied", "hf_tied"])
def test_convert_round_trip_and_stage_files(tmp_path, tokenizer_path, request, fixture) -> None:
    hf = request.getfixturevalue(fixture)
    src = write_hf_dir(hf, tmp_path / "hf", tokenizer_path)
    dst = convert(src, tmp_path / "nq")
    meta = json.loads((dst / "neoxq_config.json").read_text())
    assert meta["dtype"] == "float32" and (dst / "tokenizer.json").exists()
    lm = load_model(dst)
    assert_matches_hf(lm.model, hf)
    # A last stage must read only its own files: the others may be gone.
    n = lm.config.num_layers
    (dst / "embed.safetensors").unlink()
    (dst / "layer_000.safetensors").unlink()
    last = load_model(dst, layer_range=(1, n)).model
    assert torch.equal(last.embed_out.weight, lm.model.embed_out.weight)
    with pytest.raises(CheckpointError, match="embed.safetensors"):
        load_model(dst)


def test_convert_preset_bf16(tmp_path) -> None:
    dst = convert("preset:tiny", tmp_path / "nq", "bfloat16", seed=3)
    lm = load_model(dst, dtype="bfloat16")
    assert isinstance(lm.tokenizer, ByteTokenizer)
    ref = load_model("preset:tiny", seed=3, dtype="bfloat16").model
    for n, t in ref.state_dict().items():
        assert torch.equal(lm.model.state_dict()[n], t), n


def test_staged_read_path(tmp_path, monkeypatch) -> None:
    """The GPU path (two reused staging buffers, chunked parallel reads), run on CPU
    with small chunks: every tensor comes out intact and owns its memory."""
    import models.loaders as L

    monkeypatch.setattr(L, "_CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    files = []
    for k in range(3):  # three files so both buffers are reused
        tensors = {f"t{k}.{i}": torch.randn(7 + i, 33 * (i + 1), generator=g).to(dt)
                   for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16])}
        L.write_safetensors(tmp_path / f"{k}.safetensors", tensors)
        files.append(tensors)
    staging = L._Staging(pin=False)
    got = {}
    for k in range(3):
        st = L._SafetensorsFile(tmp_path / f"{k}.safetensors")
        names = [(n, n) for n in files[k]]
        got.update(dict(L._read_safetensors(st, names, torch.device("cpu"), torch.float32,
                                            staging)))
    for tensors in files:
        for n, t in tensors.items():
            assert torch.equal(got[n], t.float()), n


# --------------------------------------------------------------------- NeoX pipeline + TP


def test_merge_rules() -> None:
    a, b = torch.ones(2, 3), torch.full((2, 3), 3.0)
    assert merge_tp_shards("layers.0.attention.query_key_value.weight", [a, b]).shape == (4, 3)
    assert merge_tp_shards("layers.0.mlp.dense_4h_to_h.weight", [a, b]).shape == (2, 6)
    assert torch.equal(merge_tp_shards("layers.0.attention.dense.bias", [a, b]), a * 4)
    assert torch.equal(merge_tp_shards("layers.3.input_layernorm.weight", [a, b]), a * 2)
    assert torch.equal(merge_tp_shards("final_layer_norm.bias", [a, b]), a * 2)
    assert translate("gpt_neox.layers.7.attention.rotary_emb.inv_freq") is None
    assert translate("lm_head.weight") == "embed_out.weight"
    assert translate("neox.layers.3.mlp.dense_h_to_4h.bias") == "layers.3.mlp.dense_h_to_4h.bias"


@pytest.mark.parametrize(("variant", "tp", "split_yaml"), [
    ("parallel-rot25", 2, True),  # the 20B's layout
    ("sequential-rot50-tied", 4, False),
    ("headdim24-relu", 1, True),
])
def test_neox_pipeline_checkpoint(tmp_path, tokenizer_path, variant, tp, split_yaml) -> None:
    spec = dict(VARIANTS[variant], vocab_size=pad_vocab(50277, 128 * tp))
    hf = hf_model(spec, seed=tp)
    yml = write_neox_checkpoint(hf, tmp_path, tokenizer_path, tp=tp, split_yaml=split_yaml)
    cfg = load_config(yml)
    assert cfg.vocab_size == spec["vocab_size"]
    assert cfg.parallel_residual == spec["use_parallel_residual"]
    assert cfg.tie_embeddings == spec["tie_word_embeddings"]
    lm = load_model(yml)
    assert lm.tokenizer.vocab_size == 50277
    assert_matches_hf(lm.model, hf)


def test_neox_stage_opens_only_its_files(tmp_path, tokenizer_path) -> None:
    hf = hf_model(dict(VARIANTS["parallel-rot25"], vocab_size=50432), seed=5)
    yml = write_neox_checkpoint(hf, tmp_path, tokenizer_path, tp=2)
    full = load_model(yml).model
    step = tmp_path / "ckpt" / "global_step10"
    for f in step.glob("layer_0[02]-*"):  # embedding and block 0 belong to stage 0
        f.write_bytes(b"garbage")
    last = load_model(yml, layer_range=(1, 2)).model
    for n, t in last.state_dict().items():
        assert torch.equal(t, full.state_dict()[n]), n


# ------------------------------------------------------------------ broken checkpoints


@pytest.fixture
def hf_dir(tmp_path, tokenizer_path, hf_untied) -> Path:
    return write_hf_dir(hf_untied, tmp_path / "hf", tokenizer_path)


def _edit_weights(d: Path, fn) -> None:
    f = d / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_tensor(hf_dir) -> None:
    _edit_weights(hf_dir, lambda sd: sd.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.dense_4h_to_h\.bias") as e:
        load_model(hf_dir)
    assert "model.safetensors" in str(e.value) and "missing" in str(e.value)


def test_unknown_tensor(hf_dir) -> None:
    _edit_weights(hf_dir, lambda sd: sd.update({"gpt_neox.layers.0.adapter.weight":
                                                torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*layers\.0\.adapter\.weight"):
        load_model(hf_dir)


def test_extra_layer_config_disagrees(hf_dir) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*gpt_neox\.layers\.1\..*"
                                              r"disagrees"):
        load_model(hf_dir)


def test_wrong_shape(hf_dir) -> None:
    _edit_weights(hf_dir, lambda sd: sd.update({"gpt_neox.layers.0.attention.dense.weight":
                                                torch.zeros(64, 32)}))
    pattern = r"model\.safetensors.*layers\.0\.attention\.dense\.weight.*\[64, 32\]"
    with pytest.raises(CheckpointError, match=pattern):
        load_model(hf_dir)


def test_config_hidden_size_disagrees(hf_dir) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.dense_.*config\.json.*disagrees"):
        load_model(hf_dir)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_truncated_file(tmp_path, tokenizer_path, hf_untied, layout) -> None:
    d = write_hf_dir(hf_untied, tmp_path / "hf", tokenizer_path, layout=layout)
    f = next(d.glob("model.safetensors")) if layout == "safetensors" else d / "pytorch_model.bin"
    os.truncate(f, f.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=f.name) as e:
        load_model(d)
    if layout == "safetensors":  # the header says which tensor was cut off
        assert "truncated" in str(e.value) and "tensor '" in str(e.value)


def test_missing_tokenizer(tmp_path, hf_untied) -> None:
    d = write_hf_dir(hf_untied, tmp_path / "hf", None)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(d)
    with pytest.raises(CheckpointError, match="nope.json"):
        load_model(d, tokenizer=tmp_path / "nope.json")


def test_sharded_index_problems(tmp_path, tokenizer_path, hf_untied) -> None:
    d = write_hf_dir(hf_untied, tmp_path / "hf", tokenizer_path, layout="sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["gpt_neox.embed_in.weight"]
    moved = next(n for n, f in index["weight_map"].items() if f != shard)
    index["weight_map"][moved] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard}: tensor '{moved}' is listed"):
        load_model(d)
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load_model(d)


def test_duplicate_tensor_across_shards(tmp_path, tokenizer_path, hf_untied) -> None:
    d = write_hf_dir(hf_untied, tmp_path / "hf", tokenizer_path, layout="sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    a, b = load_file(d / files[0]), load_file(d / files[1])
    name = next(iter(a))
    b[name] = a[name]
    save_file(b, d / files[1])
    with pytest.raises(CheckpointError, match=f"{name}.*also in"):
        load_model(d)


def test_neox_broken(tmp_path, tokenizer_path) -> None:
    hf = hf_model(dict(VARIANTS["parallel-rot25"], vocab_size=50432), seed=5)
    yml = write_neox_checkpoint(hf, tmp_path, tokenizer_path, tp=2, split_yaml=False)
    step = tmp_path / "ckpt" / "global_step10"
    # a missing TP shard
    shard = step / "layer_03-model_01-model_states.pt"
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(CheckpointError, match="layer_03-model_01-model_states.pt"):
        load_model(yml)
    # a truncated shard
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="layer_03-model_01-model_states.pt"):
        load_model(yml)
    shard.write_bytes(data)
    # a vocabulary that disagrees with the embedding (the YAML pads to a different size)
    text = yml.read_text().replace('"make_vocab_size_divisible_by": 128',
                                   '"make_vocab_size_divisible_by": 64')
    yml.write_text(text)
    with pytest.raises(CheckpointError, match=r"layer_00-model_00.*word_embeddings.*disagrees"):
        load_model(yml)
    # a missing vocab-file
    yml.write_text(text.replace(str(tokenizer_path), str(tmp_path / "gone.json")))
    with pytest.raises(CheckpointError, match="gone.json"):
        load_model(yml)


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="did you mean preset:tiny"):
        load_model("tiny")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path)
