"""The merge flags of LoRALinear and IA3Linear travel in state_dict: a merged layer's state loads as merged
(the adapter is not applied twice), an unmerged one as unmerged, and state dicts saved before the flags
existed still load."""
import io

import pytest
import torch
from torch import nn

import fastpeft

safetensors_torch = pytest.importorskip("safetensors.torch")


def _lora():
    layer = fastpeft.LoRALinear(nn.Linear(12, 10), r=3, alpha=6, backend="torch")
    nn.init.normal_(layer.lora_B)
    return layer


def _ia3(scale):
    layer = fastpeft.IA3Linear(nn.Linear(12, 10), scale=scale, backend="torch")
    with torch.no_grad():
        layer.ia3_scale.uniform_(0.5, 1.5)
    return layer


LAYERS = {"lora": _lora, "ia3-output": lambda: _ia3("output"), "ia3-input": lambda: _ia3("input")}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("src_merged,dst_merged", [(True, False), (False, True), (True, True)])
def test_load_carries_the_merge_flag(kind, src_merged, dst_merged):
    torch.manual_seed(0)
    src, x = LAYERS[kind](), torch.randn(4, 12)
    want = src(x).detach()
    if src_merged:
        src.merge()
    torch.manual_seed(1)
    dst = LAYERS[kind]()
    if dst_merged:
        dst.merge()
    dst.load_state_dict(src.state_dict())
    assert dst.merged == src_merged
    torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)
    if src_merged:  # and unmerging gives back the unmerged layer's weights
        dst.unmerge()
        torch.testing.assert_close(dst(x), want, rtol=1e-5, atol=1e-5)


def test_ia3_lossy_merge_flag_loads():
    layer = fastpeft.IA3Linear(nn.Linear(4, 3).half(), dtype=torch.float32, backend="torch")
    with torch.no_grad():  # fp16 weights times 1e-8 flush to zero
        layer.ia3_scale.fill_(1e-8)
    layer.merge()
    assert layer.merge_lossy
    other = fastpeft.IA3Linear(nn.Linear(4, 3).half(), dtype=torch.float32, backend="torch")
    other.load_state_dict(layer.state_dict())
    assert other.merged and other.merge_lossy
    with pytest.raises(ValueError, match="original weights are lost"):
        other.unmerge()


def test_state_dict_from_before_the_flag_loads_and_keeps_the_flag():
    src = _lora()
    legacy = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    dst = _lora()
    dst.load_state_dict(legacy)  # strict: no missing key
    assert not dst.merged


def test_bad_flag_is_refused():
    sd = _lora().state_dict()
    sd["_extra_state"] = torch.tensor([0.5, 1.0])
    with pytest.raises(ValueError, match="bool tensor of 1 element"):
        _lora().load_state_dict(sd)


def test_whole_model_round_trips_through_torch_save_and_safetensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10))
    fastpeft.inject_lora(model, ["0", "2"], r=2)
    for m in model.modules():
        if isinstance(m, fastpeft.LoRALinear):
            nn.init.normal_(m.lora_B)
    x = torch.randn(3, 12)
    want = model(x).detach()
    model[0].merge()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    safetensors_torch.save_file(model.state_dict(), tmp_path / "m.safetensors")
    for sd in (torch.load(io.BytesIO(buf.getvalue()), weights_only=True),
               safetensors_torch.load_file(tmp_path / "m.safetensors")):
        fresh = fastpeft.inject_lora(nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10)), ["0", "2"], r=2)
        fresh.load_state_dict(sd)
        assert fresh[0].merged and not fresh[2].merged
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)


def test_adapter_files_hold_no_extra_state(tmp_path):
    model = fastpeft.inject_lora(nn.Sequential(nn.Linear(12, 10)), ["0"], r=2)
    fastpeft.save_adapter(model, tmp_path / "a")
    keys = set(safetensors_torch.load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}
