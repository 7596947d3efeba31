"""The tiny Hugging Face layout model: complete, small, shaped as vLLM's CPU build needs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from safetensors.numpy import load_file
from tokenizers import Tokenizer

from reconciler.engines import demomodel_hf
from reconciler.engines.demomodel_hf import write_tiny_hf

# "A few MB at most": the whole folder, so a test or CI writes it in a blink.
MAX_FOLDER_BYTES = 4 * 1024 * 1024
FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json"}


def test_folder_is_complete_and_small(tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "tiny", seed=0)
    assert {p.name for p in folder.iterdir()} == FILES, "a leftover temp file or a missing file"
    assert sum(p.stat().st_size for p in folder.iterdir()) < MAX_FOLDER_BYTES


def test_config_matches_the_weights_and_the_tokenizer(tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # vLLM's CPU attention has no kernel for head size 16; 64 is one it has.
    assert config["head_dim"] == 64 == config["hidden_size"] // config["num_attention_heads"]
    assert config["num_hidden_layers"] == 2
    assert config["vocab_size"] == tokenizer.get_vocab_size()
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    assert tensors["model.embed_tokens.weight"].shape == (vocab, hidden)
    assert tensors["lm_head.weight"].shape == (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        assert tensors[f"model.layers.{i}.self_attn.q_proj.weight"].shape == (hidden, hidden)
        assert tensors[f"model.layers.{i}.mlp.down_proj.weight"].shape == (hidden, config["intermediate_size"])
    assert all(str(t.dtype) == "float32" for t in tensors.values())
    assert tokenizer.id_to_token(config["eos_token_id"]) == demomodel_hf.EOS
    assert tokenizer.id_to_token(config["bos_token_id"]) == demomodel_hf.BOS


def test_tokenizer_round_trips_any_text(tmp_path: Path) -> None:
    """Byte level: text the training never saw (accents, emoji, control bytes) still encodes."""
    tokenizer = Tokenizer.from_file(str(write_tiny_hf(tmp_path / "tiny") / "tokenizer.json"))
    for text in ("Say something.", "déjà vu — 🦙 naïve\ttabs\x01", demomodel_hf.TRAINING_TEXT):
        encoded = tokenizer.encode(text)
        assert encoded.ids and tokenizer.decode(encoded.ids) == text
    # Trained merges: ordinary words take fewer tokens than their bytes.
    assert len(tokenizer.encode("the reconciler").ids) < len("the reconciler")


def test_chat_template_and_special_tokens(tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "tiny")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = tokenizer_config["chat_template"]
    assert "messages" in template and "add_generation_prompt" in template
    assert generation["eos_token_id"] == config["eos_token_id"]
    for token in demomodel_hf.SPECIAL_TOKENS:  # each one token, never split into bytes
        assert len(tokenizer.encode(token).ids) == 1, token


def test_same_seed_same_model_other_seed_other_weights(tmp_path: Path) -> None:
    a, again, b = (write_tiny_hf(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("a2", 0), ("b", 1)))
    for name in FILES:
        assert (a / name).read_bytes() == (again / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_rewriting_a_folder_replaces_it_in_place(tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "tiny", seed=0)
    before = (folder / "model.safetensors").read_bytes()
    write_tiny_hf(folder, seed=1)
    assert (folder / "model.safetensors").read_bytes() != before
    assert {p.name for p in folder.iterdir()} == FILES
