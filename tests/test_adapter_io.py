"""fastpeft.save_adapter / load_adapter in PEFT's format: round trips with PEFT, validation, atomic writes.

Small randomly initialised transformers models, no downloads. PEFT references run in float64.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fastpeft import LoRALinear, inject_lora
from fastpeft import adapter_files, adapter_io
from fastpeft.adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from tolerances import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 97


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:  # B non-zero, so the adapter changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ids(seed=3):
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _peft_model(r=4, alpha=8, use_rslora=True, targets=("q_proj", "v_proj"), dropout=0.0):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, use_rslora=use_rslora)
    pm = peft.get_peft_model(_tiny_llama(), cfg)
    _randomize_lora(pm)
    return pm


def _logits64(peft_model, ids):
    with torch.no_grad():
        return peft_model.double()(ids).logits


def _fastpeft_model(r=4, alpha=8, use_rslora=True, targets=("q_proj", "v_proj"), dropout=0.1):
    m = inject_lora(_tiny_llama(), target_modules=list(targets), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    _randomize_lora(m, seed=5)
    return m.eval()


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("pre_injected", [False, True])
def test_peft_saves_fastpeft_loads(tmp_path, pre_injected):
    pm = _peft_model()
    pm.save_pretrained(tmp_path / "a")
    model = _tiny_llama()
    if pre_injected:
        inject_lora(model, target_modules=["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True)
    load_adapter(model, tmp_path / "a")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4
    ids = _ids()
    with torch.no_grad():
        out = model.eval()(ids).logits
    assert_close(out, _logits64(pm, ids), torch.float32, "logits after loading PEFT's adapter")


def test_fastpeft_saves_peft_loads(tmp_path):
    model = _fastpeft_model()
    model.config._name_or_path = "tiny-llama-for-tests"
    save_adapter(model, tmp_path / "a", task_type="CAUSAL_LM")
    assert sorted(os.listdir(tmp_path / "a")) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1 and cfg["use_rslora"] is True
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["fan_in_fan_out"] is False and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "tiny-llama-for-tests"
    keys = set(safetensors_torch.load_file(str(tmp_path / "a" / WEIGHTS_NAME)))
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys and len(keys) == 8

    pm = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "a"))
    ids = _ids()
    with torch.no_grad():
        out = model(ids).logits
    assert_close(out, _logits64(pm, ids), torch.float32, "PEFT's logits after loading fastpeft's adapter")
    # and back again: PEFT saves what it loaded, fastpeft loads it bit for bit
    pm.peft_config["default"].base_model_name_or_path = None  # else PEFT looks the name up online
    pm.float().save_pretrained(tmp_path / "b")
    again = load_adapter(_tiny_llama(), tmp_path / "b")
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_exact_targets_are_written_as_a_regex(tmp_path):
    # LoRA on layer 0's q_proj only: the short name "q_proj" would also match layer 1, so the config names it exactly
    model = inject_lora(_tiny_llama(), target_modules=r"model\.layers\.0\.self_attn\.q_proj", r=3, alpha=6)
    _randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert isinstance(cfg["target_modules"], str)
    pm = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "a"))
    lora_layers = [n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert lora_layers == ["base_model.model.model.layers.0.self_attn.q_proj"]
    ids = _ids()
    with torch.no_grad():
        out = model.eval()(ids).logits
    assert_close(out, _logits64(pm, ids), torch.float32, "logits with one targeted layer")


# ------------------------------------------------------------------------------------------ bad directories


def _saved(tmp_path, **kw):
    model = _fastpeft_model(**kw)
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def _rewrite_config(d, **changes):
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _rewrite_weights(d, fn):
    t = safetensors_torch.load_file(str(d / WEIGHTS_NAME))
    fn(t)
    safetensors_torch.save_file(t, str(d / WEIGHTS_NAME))


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _nan(t):
    t[KEY][0, 0] = float("nan")


def _drop(t):
    del t[KEY]


def _extra(t):
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 48)


def _reshape(t):
    t[KEY] = torch.randn(4, 47)


BAD = {
    "r": (dict(r=8), None, "r: the config has 8 but layer"),
    "alpha": (dict(lora_alpha=3), None, "lora_alpha: the config has 3"),
    "rslora": (dict(use_rslora=False), None, "use_rslora"),
    "targets": (dict(target_modules=["q_proj", "k_proj"]), None, "targeted layers without LoRA: model.layers.0.self_attn.k_proj"),
    "nothing": (dict(target_modules=["nope"]), None, "matches no module"),
    "peft_type": (dict(peft_type="IA3"), None, "peft_type: expected 'LORA', got 'IA3'"),
    # a DoRA config (fastpeft loads DoRA adapters) over LoRA layers, or without the magnitude vectors in the file
    "dora": (dict(use_dora=True), None, r"use_dora: the config has True but layer|missing keys: .*lora_magnitude_vector"),
    "bias": (dict(bias="all"), None, "bias='all' is not supported"),
    "dropout": (dict(lora_dropout=1.5), None, r"lora_dropout: expected a number in \[0, 1\)"),
    "missing_key": ({}, _drop, "missing keys: " + KEY.replace(".", r"\.")),
    "extra_key": ({}, _extra, r"unexpected keys: base_model\.model\.model\.layers\.0\.mlp\.up_proj"),
    "shape": ({}, _reshape, r"lora_A\.weight: expected shape \[4, 48\], got \[4, 47\]"),
    "nan": ({}, _nan, "contains NaN"),
}


# a model with LoRA layers is checked against every case; a plain model takes r, alpha, rslora from the config
BAD_CASES = [(c, True) for c in BAD] + [(c, False) for c in BAD if c not in ("r", "alpha", "rslora", "targets")]


@pytest.mark.parametrize("case,pre_injected", BAD_CASES, ids=[f"{c}-{'lora' if p else 'plain'}" for c, p in BAD_CASES])
def test_mismatched_directory_is_rejected_and_model_unchanged(tmp_path, case, pre_injected):
    changes, weights_fn, message = BAD[case]
    d = _saved(tmp_path)
    if changes:
        _rewrite_config(d, **changes)
    if weights_fn:
        _rewrite_weights(d, weights_fn)
    model = _fastpeft_model(dropout=0.1) if pre_injected else _tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, d)
    _assert_unchanged(model, snap)


def test_corrupt_files_are_rejected(tmp_path):
    d = _saved(tmp_path)
    model = _fastpeft_model(dropout=0.1)
    snap = _snapshot(model)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])  # truncated, as by a crash of a non-atomic writer
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(model, d)
    (d / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(model, d)
    os.remove(d / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(model, d)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_adapter(model, tmp_path / "nope")
    _assert_unchanged(model, snap)


def test_save_rejects_what_peft_cannot_express(tmp_path):
    model = _tiny_llama()
    with pytest.raises(ValueError, match="found none"):
        save_adapter(model, tmp_path / "a")
    inject_lora(model, target_modules=["q_proj"], r=4)
    inject_lora(model, target_modules=["v_proj"], r=2)
    with pytest.raises(ValueError, match=r"one r for all layers.*model\.layers\.0\.self_attn\.v_proj"):
        save_adapter(model, tmp_path / "a")
    (tmp_path / "f").write_text("x")
    model2 = _fastpeft_model()
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_adapter(model2, tmp_path / "f")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------ atomic writes


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_adapter_and_keeps_other_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(adapter_files, "_exchange", lambda a, b: False)
    d = _saved(tmp_path)
    (d / "README.md").write_text("notes")
    (d / "other").mkdir()
    (d / "other" / "x.txt").write_text("kept")
    (d / "adapter_model.bin").write_bytes(b"stale")
    model = _fastpeft_model(dropout=0.1)
    _randomize_lora(model, seed=11)
    save_adapter(model, d)
    assert sorted(os.listdir(d)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md", "other"])
    assert (d / "other" / "x.txt").read_text() == "kept" and (d / "README.md").read_text() == "notes"
    loaded = load_adapter(_tiny_llama(), d)
    assert torch.equal(loaded.get_submodule("model.layers.1.self_attn.q_proj").lora_B,
                       model.get_submodule("model.layers.1.self_attn.q_proj").lora_B)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary or backup directory left


def test_failed_save_leaves_old_adapter_in_place(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    before = _tree(d)
    model = _fastpeft_model(dropout=0.1)
    _randomize_lora(model, seed=12)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io.json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, d)
    assert _tree(d) == before
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_crash_mid_save_leaves_old_adapter_in_place(tmp_path):
    """A process killed between writing the weights and the config: the old adapter is still complete."""
    d = _saved(tmp_path)
    before = _tree(d)
    script = textwrap.dedent(f"""
        import os, torch
        from fastpeft import adapter_io, inject_lora
        model = inject_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), target_modules=["0"], r=2)
        adapter_io.json.dump = lambda *a, **k: os._exit(7)  # dies after the weights file is on disk
        adapter_io.save_adapter(model, {str(d)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert _tree(d) == before
    leftovers = [n for n in os.listdir(tmp_path) if n != "a"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".a.tmp-")  # the killed save's scratch directory
    load_adapter(_fastpeft_model(dropout=0.1), d)
    save_adapter(_fastpeft_model(), d)  # the next save removes it
    assert sorted(os.listdir(tmp_path)) == ["a"]


# ------------------------------------------------------------------------------------------ all or nothing


LAST = "model.layers.1.self_attn.v_proj"
LAST_KEY = f"base_model.model.{LAST}.lora_B.weight"


def _int_last(t):
    t[LAST_KEY] = torch.ones(t[LAST_KEY].shape, dtype=torch.int32)


def _shape_last(t):
    t[LAST_KEY] = torch.randn(t[LAST_KEY].shape[0] + 1, t[LAST_KEY].shape[1])


def _huge_last(t):
    t[LAST_KEY] = t[LAST_KEY].clone()
    t[LAST_KEY][3, 1] = 1e6  # finite in the file's fp32, inf in the model's fp16


LAST_LAYER_BAD = {
    "dtype": (_int_last, r"expected a floating-point tensor, got torch\.int32"),
    "shape": (_shape_last, r"expected shape \[24, 4\], got \[25, 4\]"),
    "overflow": (_huge_last, r"does not fit torch\.float16.*1e\+06"),
}


@pytest.mark.parametrize("case", LAST_LAYER_BAD)
@pytest.mark.parametrize("pre_injected", [False, True], ids=["plain", "lora"])
def test_malformed_last_layer_changes_nothing_and_is_named(tmp_path, case, pre_injected):
    fn, message = LAST_LAYER_BAD[case]
    d = _saved(tmp_path)
    _rewrite_weights(d, fn)
    model = (_fastpeft_model(dropout=0.1) if pre_injected else _tiny_llama()).half()
    snap = _snapshot(model)
    with pytest.raises(ValueError) as info:
        load_adapter(model, d)
    msg = str(info.value)
    assert str(d / WEIGHTS_NAME) in msg and f"layer {LAST}" in msg and LAST_KEY in msg, msg
    assert re.search(message, msg), msg
    _assert_unchanged(model, snap)


def test_load_into_a_model_with_bypassed_targets_changes_nothing(tmp_path):
    d = _saved(tmp_path)
    model = _tiny_llama()
    model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, i, o: o)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj.*hooks"):
        load_adapter(model, d)
    _assert_unchanged(model, snap)
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------ config files


def test_config_with_utf8_bom_loads(tmp_path):
    d = _saved(tmp_path)
    text = (d / CONFIG_NAME).read_text(encoding="utf-8")
    (d / CONFIG_NAME).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Windows editors save it
    model = load_adapter(_tiny_llama(), d)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_invalid_regex_in_config_names_the_file(tmp_path, field):
    d = _saved(tmp_path)
    bad = r"model\.(layers"
    _rewrite_config(d, **{field: bad})
    model = _tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"{d / CONFIG_NAME}: {field}: {bad!r} is not a valid regex")):
        load_adapter(model, d)
    _assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------ directories


def test_save_into_symlinked_directory_follows_the_link(tmp_path):
    real = tmp_path / "store" / "real"
    real.mkdir(parents=True)
    (real / "README.md").write_text("notes")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    model = _fastpeft_model()
    save_adapter(model, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(os.listdir(real)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    assert sorted(os.listdir(tmp_path / "store")) == ["real"] and sorted(os.listdir(tmp_path)) == ["link", "store"]
    loaded = load_adapter(_tiny_llama(), link)  # loading through the link
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "store" / "later", target_is_directory=True)
    save_adapter(model, dangling)  # a link to a directory not made yet: it is made where the link points
    assert dangling.is_symlink() and (tmp_path / "store" / "later" / WEIGHTS_NAME).is_file()


def _mode(path):
    return os.stat(path).st_mode & 0o7777


def test_save_keeps_the_directory_mode(tmp_path):
    model = _fastpeft_model()
    umask = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "new")
        assert _mode(tmp_path / "new") == 0o755  # a new directory: as mkdir makes it
        d = tmp_path / "shared"
        d.mkdir()
        os.chmod(d, 0o2751)
        save_adapter(model, d)
        assert _mode(d) == 0o2751
        os.chmod(d, 0o555)  # read-only for everyone: still replaced whole (the parent is writable), mode kept
        save_adapter(model, d)
        assert _mode(d) == 0o555
    finally:
        os.umask(umask)


def test_next_save_removes_only_stale_scratch_directories(tmp_path):
    d = _saved(tmp_path)
    dead = 2 ** 22 + 1  # above Linux's largest pid: no such process
    stale = [tmp_path / f".a.tmp-{dead}-0123abcd", tmp_path / f".a.old-{dead}-4567cdef"]
    for s in stale:
        (s / "sub").mkdir(parents=True)
        (s / "sub" / WEIGHTS_NAME).write_bytes(b"x" * 1000)
    os.chmod(stale[1], 0o555)  # a read-only leftover is removed as well
    live = tmp_path / f".a.tmp-{os.getpid()}-89abcdef"  # a save in progress in a live process: kept
    other = tmp_path / f".b.tmp-{dead}-0123abcd"  # another adapter's: not this save's business
    locked = tmp_path / f".a.tmp-{dead}-fedcba98"  # a save run by a process we cannot see (another pid namespace)
    for s in (live, other, locked):
        s.mkdir()
    fcntl = pytest.importorskip("fcntl")
    fd = os.open(locked, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # ... which holds its scratch directory locked
        save_adapter(_fastpeft_model(), d)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted(["a", live.name, other.name, locked.name])
