"""A tiny random-weight llama-architecture GGUF, so the real llama.cpp engine runs with no download.

Why: the tests and ``ailayer demo-model`` must prove ailayer against an engine nobody on this
team wrote (llama.cpp's server), on a machine with no network and no GPU. llama.cpp will load
any well-formed llama GGUF; the weights only decide *what* it says, and noise is fine. The
file is written with ``gguf``, llama.cpp's own writer, so the format is exactly what the
engine expects. Different seeds give different files: two "models" to switch between.

The vocabulary is byte-level SentencePiece style (``tokenizer.ggml.model = "llama"``): the
three control tokens plus the 256 byte tokens ``<0x00>``..``<0xFF>``. llama.cpp's SPM
tokenizer falls back to byte tokens for any text, so every prompt tokenizes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

# Small enough to load in milliseconds (about 0.4 MB), big enough to be a real transformer:
# two layers so cross-layer plumbing (KV cache per layer) is exercised.
N_EMBD = 64
N_LAYERS = 2
N_HEADS = 4
N_FF = 128
# llama.cpp sizes the KV cache from this when the server gets no --ctx-size; keep it modest.
CONTEXT_LENGTH = 2048
RMS_EPS = 1e-5
CONTROL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the byte-level SentencePiece-style vocabulary."""
    from gguf import TokenType

    tokens = list(CONTROL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    types += [int(TokenType.BYTE)] * 256
    return tokens, scores, types


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write a random llama GGUF to ``path`` (atomically) and return the path."""
    from gguf import GGUFWriter

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEADS

    def weight(rows: int, cols: int) -> NDArray[np.float32]:
        # numpy shape (rows, cols) is ggml's (ne0=cols, ne1=rows): a rows x cols projection.
        out: NDArray[np.float32] = rng.standard_normal((rows, cols), dtype=np.float32)
        out *= 1.0 / math.sqrt(cols)  # unit-variance activations, so the noise stays finite
        return out

    def norm() -> NDArray[np.float32]:
        return np.ones(N_EMBD, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(f"ailayer-tiny-{seed}")
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYERS)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEADS)
        writer.add_head_count_kv(N_HEADS)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_file_type(0)  # ALL_F32: no quantisation, loads anywhere
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(UNK_ID)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)

        writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
        for i in range(N_LAYERS):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
            writer.add_tensor(f"blk.{i}.attn_q.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.attn_k.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.attn_v.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.attn_output.weight", weight(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(N_FF, N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(N_FF, N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(N_EMBD, N_FF))
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output.weight", weight(n_vocab, N_EMBD))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)
    return path
