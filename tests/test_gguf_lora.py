"""`onthejob adapters export --format gguf`: PEFT adapters as GGUF LoRA files for llama.cpp,
read back with gguf's own reader."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from gguf import GGUFReader
from lora_fixtures import LAYERS, SHAPES, fake_adapter, peft_tensors

from onthejob.cli import main
from onthejob.model.adapters import AdapterError
from onthejob.model.gguf_lora import base_model, export_gguf, permute_rows, shipped_gguf
from onthejob.store import Store

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def base():
    return base_model(shipped_gguf())


def _read(path):
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    # GGUF lists dimensions innermost first; reversed they are numpy's (rows, columns).
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return meta, tensors


def test_base_model_facts_come_from_the_shipped_gguf(base):
    assert (base.arch, base.n_head, base.n_head_kv, base.n_layer) == ("llama", 9, 3, 30)
    assert base.shapes["blk.0.attn_k.weight"] == (192, 576)


def test_permute_rows_interleaves_the_rotary_halves_of_each_head():
    # HF row h*d + half*(d/2) + i goes to GGUF row h*d + 2*i + half (d = 8 rows a head).
    n_head, d = 3, 8
    b = np.arange(n_head * d, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    got = permute_rows(b, n_head)
    for h in range(n_head):
        for half in range(2):
            for i in range(d // 2):
                assert got[h * d + 2 * i + half, 0] == h * d + half * (d // 2) + i


def test_export_round_trip_names_shapes_alpha_and_values(tmp_path, base):
    adapter = fake_adapter(tmp_path / "a", rank=4, alpha=8)
    info = export_gguf(adapter, tmp_path / "a.gguf", base)
    assert (info.rank, info.alpha, info.tensors, info.folded) == (4, 8.0, 2 * 7 * LAYERS, [])
    meta, tensors = _read(tmp_path / "a.gguf")
    assert meta["general.type"] == "adapter" and meta["general.architecture"] == "llama"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 8.0
    assert len(tensors) == 2 * 7 * LAYERS
    peft = peft_tensors(adapter)
    for layer in (0, 17, LAYERS - 1):
        for module, (out, inp) in SHAPES.items():
            stem = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            a, b = tensors[stem + ".lora_a"], tensors[stem + ".lora_b"]
            assert a.dtype == np.float32 and a.shape == (4, inp) and b.shape == (out, 4)
            key = f"base_model.model.model.layers.{layer}.{module}"
            np.testing.assert_array_equal(a, peft[key + ".lora_A.weight"])
            want = peft[key + ".lora_B.weight"]
            if module == "self_attn.q_proj":
                want = permute_rows(want, 9)
            elif module == "self_attn.k_proj":
                want = permute_rows(want, 3)
            np.testing.assert_array_equal(b, want)
    # q and k really are permuted (not a no-op), v is not.
    q = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert not np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], q)


def test_rslora_scale_is_folded_into_b(tmp_path, base):
    adapter = fake_adapter(tmp_path / "rs", rank=4, alpha=8, layers=1,
                           extra_config={"use_rslora": True})
    info = export_gguf(adapter, tmp_path / "rs.gguf", base)
    assert len(info.folded) == 7
    _, tensors = _read(tmp_path / "rs.gguf")
    b = peft_tensors(adapter)["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    # PEFT's scale alpha/sqrt(r) = 4; llama.cpp's alpha/r = 2; so B is doubled.
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], b * (8 / math.sqrt(4)) / 2,
                               rtol=1e-6)


def test_corrupt_missing_and_foreign_adapters_are_refused(tmp_path, base):
    with pytest.raises(AdapterError, match="does not exist"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf", base)
    adapter = fake_adapter(tmp_path / "c", layers=1)
    with open(adapter / "adapter_model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(AdapterError, match="corrupt"):
        export_gguf(adapter, tmp_path / "c.gguf", base)
    assert not (tmp_path / "c.gguf").exists()
    other = fake_adapter(tmp_path / "dora", layers=1)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        export_gguf(other, tmp_path / "d.gguf", base, check=False)
    # An adapter of another model (half the base's columns here) does not fit its shapes.
    small = dataclasses.replace(base, shapes={k: (v[0], v[1] // 2) if len(v) == 2 else v
                                              for k, v in base.shapes.items()})
    with pytest.raises(AdapterError, match="another model"):
        export_gguf(fake_adapter(tmp_path / "w", layers=1), tmp_path / "w.gguf", small)


def test_cli_exports_the_active_or_named_version(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(db)
    store.create_tenant("acme")
    from onthejob.model.adapters import checksum

    paths = [fake_adapter(tmp_path / f"v{i}", layers=2, seed=i) for i in (1, 2)]
    ids = [store.add_adapter("tenant", "acme", method="opsd", path=str(p), checksum=checksum(p)).id
           for p in paths]
    args = ["adapters", "export", "--db", db, "--tenant", "acme", "--format", "gguf"]
    assert main([*args, "--out", str(tmp_path / "none.gguf")]) == 1
    assert "no active adapter" in capsys.readouterr().err
    store.activate_adapter(ids[1])
    out = tmp_path / "acme.gguf"
    assert main([*args, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "v2" in said and "--lora" in said
    _, tensors = _read(out)
    np.testing.assert_array_equal(
        tensors["blk.1.ffn_up.weight.lora_a"],
        peft_tensors(paths[1])["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"])
    assert main([*args, "--version", "1", "--out", str(tmp_path / "v1.gguf")]) == 0
    assert "v1" in capsys.readouterr().out
    assert main([*args, "--version", "7"]) == 1
    assert "no version 7" in capsys.readouterr().err
    (paths[0] / "adapter_model.safetensors").unlink()
    assert main([*args, "--version", "1", "--out", str(tmp_path / "gone.gguf")]) == 1
    err = capsys.readouterr().err
    assert "cannot export v1" in err and "missing" in err
