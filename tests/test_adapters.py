import pytest
import torch

from onthejob.model import tiny_model
from onthejob.model.adapters import AdapterError, LoraSpec, attach, save, use_adapter, verify


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits[0]


def _trained_adapter(tmp_path, name="v1"):
    lm = tiny_model(seed=0)
    attach(lm, "student", LoraSpec(rank=4, alpha=8))
    with torch.no_grad():
        for pname, p in lm.model.named_parameters():
            if "lora_B" in pname:
                p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path / name
    digest = save(lm.model, "student", path, meta={"note": "test"})
    return lm, path, digest


def test_save_verify_and_serve_reproduces_trained_outputs(tmp_path):
    trained, path, digest = _trained_adapter(tmp_path)
    assert verify(path) == digest
    ids = [1, 2, 3, 4, 5]
    want = _logits(trained, ids)
    served = tiny_model(seed=0)
    base = _logits(served, ids)
    assert not torch.allclose(want, base, atol=1e-4)
    use_adapter(served, path)
    assert torch.allclose(_logits(served, ids), want, atol=1e-5)
    use_adapter(served, None)
    assert torch.allclose(_logits(served, ids), base, atol=1e-5)
    assert not any(p.requires_grad for p in served.model.parameters())


def test_never_overwrites_a_version(tmp_path):
    lm, path, _ = _trained_adapter(tmp_path)
    with pytest.raises(AdapterError, match="never overwritten"):
        save(lm.model, "student", path)


def test_corrupt_adapter_is_refused(tmp_path):
    _, path, _ = _trained_adapter(tmp_path)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="corrupt"):
        verify(path)
    with pytest.raises(AdapterError, match="corrupt"):
        use_adapter(tiny_model(seed=0), path)


def test_stacked_adapters_differ_from_each_alone(tmp_path):
    _, a, _ = _trained_adapter(tmp_path, "a")
    torch.manual_seed(1)
    _, b, _ = _trained_adapter(tmp_path, "b")
    lm = tiny_model(seed=0)
    ids = [7, 8, 9]
    use_adapter(lm, a)
    only_a = _logits(lm, ids)
    use_adapter(lm, [a, b])
    both = _logits(lm, ids)
    use_adapter(lm, a)
    assert torch.allclose(_logits(lm, ids), only_a, atol=1e-5)
    assert not torch.allclose(both, only_a, atol=1e-4)


def test_detaching_the_last_adapter_restores_the_base(tmp_path):
    from onthejob.model import SamplingParams, generate
    from onthejob.model.adapters import detach

    lm = tiny_model(seed=0)
    base = _logits(lm, [1, 2, 3])
    attach(lm, "x", LoraSpec(rank=2))
    detach(lm, "x")
    use_adapter(lm, None)
    assert torch.allclose(_logits(lm, [1, 2, 3]), base, atol=1e-6)
    assert generate(lm, [[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids
