"""A tiny random-weight Llama in Hugging Face layout, so the real vLLM runs with no download.

Why: vLLM loads models only in Hugging Face layout (config.json, safetensors, a tokenizer), and
the tests must run the real vLLM on a machine that reaches no model hub. vLLM loads any
well-formed Llama; the weights only decide *what* it says, and noise is fine. The tokenizer is
a byte-level BPE trained here, with the ``tokenizers`` library, on a short built-in text: byte
level means every prompt tokenizes, and training it here means nothing is fetched.

Sizes: vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 256 (not 16), so
hidden 128 over 2 heads gives head_dim 64. Two layers so per-layer plumbing (the KV cache of
each layer) is exercised. About 1.5 MB in all. Different seeds give different weights: two
"models" to switch between.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from reconciler.kit.atomicfile import ensure_dir, write_atomic

if TYPE_CHECKING:
    from tokenizers import Tokenizer

HIDDEN = 128
N_HEADS = 2
HEAD_DIM = HIDDEN // N_HEADS
N_LAYERS = 2
INTERMEDIATE = 256
# Target of the BPE training; the short text below yields about this many (bytes + merges).
VOCAB_TARGET = 512
# What vLLM may be asked for with --max-model-len; its KV cache is sized from the flag, not this.
MAX_POSITIONS = 2048
RMS_EPS = 1e-5
ROPE_THETA = 10000.0
BOS, EOS, PAD, START = "<|begin|>", "<|end|>", "<|pad|>", "<|start|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, START)
# A minimal template of our own: each turn is START role NEWLINE content EOS, then the
# assistant's cue; a turn ends with EOS so an answer that ends its turn stops generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + START + "{{ message['role'] }}\n{{ message['content'] }}" + EOS + "\n"
    + "{% endfor %}{% if add_generation_prompt %}" + START + "assistant\n{% endif %}"
)

# The training text: short, plain English and a little code, so the merges are ordinary words.
TRAINING_TEXT = """\
The reconciler reads the desired state, looks at the machine, and makes the two agree.
One engine runs at a time on the graphics card. When the toggle names another model, the old
engine and every process it started are stopped, the port is proven free, and the new engine
starts. While it loads, the gate answers that it is loading and when to try again.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Tell me a story about a small robot who learns to cook soup in a quiet kitchen.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
def add(a, b):
    return a + b
for i in range(10):
    print(i, add(i, i))
{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
"""


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on TRAINING_TEXT (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Repeated so every pair the text has is frequent enough to merge up to the target.
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines() * 4, trainer=trainer)
    return tokenizer


def _weights(seed: int, vocab: int) -> dict[str, NDArray[np.float32]]:
    """Random Llama weights under the names transformers and vLLM load."""
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> NDArray[np.float32]:
        out: NDArray[np.float32] = rng.standard_normal((rows, cols), dtype=np.float32)
        out *= 1.0 / math.sqrt(cols)  # unit-variance activations, so the noise stays finite
        return out

    def norm() -> NDArray[np.float32]:
        return np.ones(HIDDEN, dtype=np.float32)

    tensors = {"model.embed_tokens.weight": weight(vocab, HIDDEN)}
    for i in range(N_LAYERS):
        layer = f"model.layers.{i}"
        tensors[f"{layer}.input_layernorm.weight"] = norm()
        for proj in ("q_proj", "k_proj", "v_proj"):
            tensors[f"{layer}.self_attn.{proj}.weight"] = weight(N_HEADS * HEAD_DIM, HIDDEN)
        tensors[f"{layer}.self_attn.o_proj.weight"] = weight(HIDDEN, N_HEADS * HEAD_DIM)
        tensors[f"{layer}.post_attention_layernorm.weight"] = norm()
        tensors[f"{layer}.mlp.gate_proj.weight"] = weight(INTERMEDIATE, HIDDEN)
        tensors[f"{layer}.mlp.up_proj.weight"] = weight(INTERMEDIATE, HIDDEN)
        tensors[f"{layer}.mlp.down_proj.weight"] = weight(HIDDEN, INTERMEDIATE)
    tensors["model.norm.weight"] = norm()
    tensors["lm_head.weight"] = weight(vocab, HIDDEN)
    return tensors


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_tiny_hf(path: Path, seed: int = 0) -> Path:
    """Write the model folder ``path`` (each file replaced atomically) and return it."""
    from safetensors.numpy import save

    path = Path(path)
    ensure_dir(path)
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab_size()
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS, "num_key_value_heads": N_HEADS, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA, "vocab_size": vocab, "tie_word_embeddings": False,
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "torch_dtype": "float32", "name_or_path": f"ailayer-tiny-hf-{seed}",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_POSITIONS,
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
    }
    generation_config = {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]}
    write_atomic(path / "model.safetensors", save(_weights(seed, vocab), metadata={"format": "pt"}))
    write_atomic(path / "tokenizer.json", tokenizer.to_str())
    write_atomic(path / "tokenizer_config.json", _json(tokenizer_config))
    write_atomic(path / "generation_config.json", _json(generation_config))
    # Last: a folder with a config.json is a complete model to whoever looks for one.
    write_atomic(path / "config.json", _json(config))
    return path
