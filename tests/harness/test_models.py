"""Model presets, mappings and pretrained loading (tiny models, built in memory)."""

import pytest
import torch
import transformers

from sparsebench.errors import ModelError
from sparsebench.models import PRESETS, build_model, resolve_model_config

# Stated sizes: (vocab, seq_len, min params, max params). Counted on the meta device: no memory.
PRESET_SIZES = {
    "gpt-nano": (128, 64, 0.15e6, 0.3e6),
    "gpt-micro": (128, 64, 0.6e6, 1.5e6),
    "gpt-mini": (128, 64, 8e6, 12e6),
    "gpt2-small": (50257, 1024, 124.0e6, 124.9e6),  # OpenAI GPT-2: 124,439,808
    "gpt2-medium": (50257, 1024, 354e6, 356e6),  # 354,823,168
    "llama-nano": (128, 64, 0.08e6, 0.3e6),
    "llama-micro": (128, 64, 0.6e6, 1.5e6),
    "llama-mini": (128, 64, 7e6, 12e6),
}


def meta_model(spec, vocab=128, seq_len=64):
    with torch.device("meta"):
        return build_model(spec, vocab, seq_len)


def n_params(model):
    """Distinct parameters (a tied LM head counts once), as summary.json counts them."""
    return sum(p.numel() for p in model.parameters())


def tied(model):
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count_is_in_its_stated_range(preset):
    vocab, seq_len, lo, hi = PRESET_SIZES[preset]
    count = n_params(meta_model(preset, vocab, seq_len))
    print(f"{preset}: {count:,} params")  # shown with pytest -s / -rP
    assert lo <= count <= hi


def test_gpt2_small_matches_openai_count():
    assert n_params(meta_model("gpt2-small", 50257, 1024)) == 124_439_808


def test_llama_presets_use_grouped_query_attention():
    for name in ("llama-nano", "llama-micro"):
        cfg = meta_model(name).config
        assert cfg.num_key_value_heads < cfg.num_attention_heads


def test_vocab_and_positions_come_from_the_data():
    gpt = build_model("gpt-nano", vocab_size=77, seq_len=32)
    assert gpt.config.vocab_size == 77 and gpt.config.n_positions == 32
    assert gpt.get_input_embeddings().num_embeddings == 77
    llama = build_model("llama-nano", vocab_size=77, seq_len=32)
    assert llama.config.max_position_embeddings == 32


def test_dropout_is_off_by_default_and_settable():
    model = build_model("gpt-nano", 128, 16)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0, 0, 0)
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    model = build_model({"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "resid_pdrop": 0.2}, 64, 16)
    assert model.config.resid_pdrop == 0.2


def test_embeddings_are_tied_as_the_family_default():
    assert tied(build_model("gpt-nano", 128, 16))
    assert not tied(build_model("llama-nano", 128, 16))


def test_mapping_uses_the_family_field_names():
    gpt = build_model({"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_inner": 48}, 64, 16)
    assert isinstance(gpt, transformers.GPT2LMHeadModel)
    assert gpt.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)
    llama = build_model({"family": "llama", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 48,
                         "num_attention_heads": 4, "num_key_value_heads": 1}, 64, 16)
    assert isinstance(llama, transformers.LlamaForCausalLM)
    assert llama.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)


def test_llama_accepts_gpt2_short_names():
    cfg = resolve_model_config({"family": "llama", "n_layer": 3, "n_embd": 64, "n_head": 4})
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (3, 64, 4)


def test_preset_can_be_overridden_in_a_mapping():
    cfg = resolve_model_config({"preset": "gpt-nano", "n_layer": 3})
    assert cfg["n_layer"] == 3 and cfg["n_embd"] == PRESETS["gpt-nano"]["n_embd"]


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(ModelError, match=r"Did you mean 'gpt-nano'.*gpt-micro") as err:
        resolve_model_config("gpt-nan")
    assert "llama-nano" in str(err.value)


def test_unknown_field_is_named():
    with pytest.raises(ModelError, match=r"'n_layers'.*gpt2.*Did you mean 'n_layer'"):
        resolve_model_config({"family": "gpt2", "n_layers": 2})
    with pytest.raises(ModelError, match="'n_positions_typo'"):
        resolve_model_config({"family": "llama", "n_positions_typo": 2})


def test_unknown_family_and_data_fields_are_refused():
    with pytest.raises(ModelError, match="family"):
        resolve_model_config({"family": "bert", "n_layer": 2})
    with pytest.raises(ModelError, match="vocab_size.*from the data"):
        resolve_model_config({"family": "gpt2", "vocab_size": 100})


def test_attn_implementation_is_passed_through():
    assert build_model("gpt-nano", 64, 16, attn_implementation="eager").config._attn_implementation == "eager"


def test_models_train_a_step():
    for spec in ("gpt-nano", "llama-nano"):
        model = build_model(spec, 64, 16)
        x = torch.randint(0, 64, (2, 16))
        loss = model(x, labels=x).loss
        loss.backward()
        assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None


def test_pretrained_loads_from_a_local_folder(tmp_path):
    saved = build_model({"family": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32}, 64, 16)
    saved.save_pretrained(tmp_path)
    loaded = build_model({"pretrained": str(tmp_path)}, vocab_size=64, seq_len=16)
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, saved.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ModelError, match="tokenizer"):
        build_model({"pretrained": str(tmp_path)}, vocab_size=65, seq_len=16)
    with pytest.raises(ModelError, match="positions"):
        build_model({"pretrained": str(tmp_path)}, vocab_size=64, seq_len=17)


def test_pretrained_failure_says_to_pass_a_local_path(tmp_path):
    with pytest.raises(ModelError, match="local path"):
        build_model({"pretrained": str(tmp_path / "missing")}, 64, 16)
