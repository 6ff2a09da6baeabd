"""The same weights as llama.cpp stores them: a GGUF (Q4_0 linears, q8_0 token embedding) written with the `gguf`
package, for the size and memory comparisons of the footprint and peer benchmarks. No llama.cpp code is used.

Q4_0 and q8_0 take rows in blocks of 32: a hidden size that 32 does not divide (wearable-moe: 432) is zero-padded
to the next multiple, heads included (8 x 54 -> 8 x 56), as cosmoes pads the input width of its 4-bit linears
(transforms.PaddedLinear). The file is then as large as llama.cpp's own GGUF of the model and costs the same to
run, though RMSNorm over the padded width makes its outputs differ: use it for sizes and speed, not for tokens.

    python benchmarks/gguf_peer.py wearable-moe --out /tmp/wearable-moe.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK = 32


def _pad_to(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pad(w: np.ndarray, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """Zero-pad the last two dims of w to (rows, cols)."""
    r, c = w.shape[-2:]
    rows, cols = rows or r, cols or c
    if (rows, cols) == (r, c):
        return w
    out = np.zeros(w.shape[:-2] + (rows, cols), dtype=np.float32)
    out[..., :r, :c] = w
    return out


def _heads(w: np.ndarray, n: int, hd: int, hd_pad: int, axis: int) -> np.ndarray:
    """Pad every head of a (.., n*hd, ..) projection to hd_pad along `axis` (0: output rows, 1: input cols)."""
    if hd == hd_pad:
        return w
    if axis == 0:
        w = w.reshape(n, hd, -1)
        out = np.zeros((n, hd_pad, w.shape[-1]), np.float32)
        out[:, :hd] = w
        return out.reshape(n * hd_pad, -1)
    w = w.reshape(w.shape[0], n, hd)
    out = np.zeros((w.shape[0], n, hd_pad), np.float32)
    out[..., :hd] = w
    return out.reshape(w.shape[0], n * hd_pad)


def write_gguf(source: str, out: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> dict:
    """Write the GGUF of a checkpoint or preset (random init with `seed`, as `cosmoes export` makes it)."""
    from cosmoes.export.bundle import _load_source

    model, _ = _load_source(source, seed)
    return write_model_gguf(model, out, tokenizer_dir)


def write_model_gguf(model, out: Path, tokenizer_dir: Path | None = None) -> dict:
    """Write a cosmoes Transformer as a llama-architecture GGUF; returns its path, bytes and padded widths."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    cfg = model.config
    if cfg.is_wd:
        raise SystemExit(f"{source}: weight-decomposed experts have no GGUF tensor layout in llama.cpp")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_h, n_kv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    hd_pad = hd
    while (n_h * hd_pad) % BLOCK or (n_kv * hd_pad) % BLOCK:
        hd_pad += 2  # RoPE rotates pairs
    dim = n_h * hd_pad if cfg.dim % BLOCK else cfg.dim
    ffn = _pad_to(cfg.ffn_dim)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(cfg.name or "cosmoes")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_h)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd_pad)
    w.add_value_length(hd_pad)
    w.add_rope_dimension_count(hd_pad)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k)
    _add_vocab(w, cfg.vocab_size, tokenizer_dir)

    def put(name: str, x: np.ndarray, qtype) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        else:
            q = quantize(x, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    put("token_embd.weight", _pad(sd["tok_embeddings.weight"], cols=dim), Q.Q8_0)
    put("output_norm.weight", np.pad(sd["norm.weight"], (0, dim - cfg.dim)), Q.F32)
    head = sd["tok_embeddings.weight"] if cfg.tie_embeddings else sd["output.weight"]
    put("output.weight", _pad(head, cols=dim), Q.Q4_0)
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", np.pad(sd[p + "attention_norm.weight"], (0, dim - cfg.dim)), Q.F32)
        put(b + "ffn_norm.weight", np.pad(sd[p + "ffn_norm.weight"], (0, dim - cfg.dim)), Q.F32)
        for name, n in (("wq", n_h), ("wk", n_kv), ("wv", n_kv)):
            x = _heads(sd[p + f"attention.{name}.weight"], n, hd, hd_pad, axis=0)
            put(b + {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v"}[name] + ".weight", _pad(x, cols=dim), Q.Q4_0)
        wo = _heads(sd[p + "attention.wo.weight"], n_h, hd, hd_pad, axis=1)
        put(b + "attn_output.weight", _pad(wo, rows=dim), Q.Q4_0)
        if cfg.is_moe:
            put(b + "ffn_gate_inp.weight", _pad(sd[p + "feed_forward.router.weight"], cols=dim), Q.F32)
            experts = [f"{p}feed_forward.experts.{e}." for e in range(cfg.num_experts)]
            stack = lambda n: np.stack([sd[e + f"{n}.weight"] for e in experts])  # noqa: E731
            put(b + "ffn_gate_exps.weight", _pad(stack("w1"), rows=ffn, cols=dim), Q.Q4_0)
            put(b + "ffn_up_exps.weight", _pad(stack("w3"), rows=ffn, cols=dim), Q.Q4_0)
            put(b + "ffn_down_exps.weight", _pad(stack("w2"), rows=dim, cols=ffn), Q.Q4_0)
        else:
            f = p + "feed_forward."
            put(b + "ffn_gate.weight", _pad(sd[f + "w1.weight"], rows=ffn, cols=dim), Q.Q4_0)
            put(b + "ffn_up.weight", _pad(sd[f + "w3.weight"], rows=ffn, cols=dim), Q.Q4_0)
            put(b + "ffn_down.weight", _pad(sd[f + "w2.weight"], rows=dim, cols=ffn), Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(out), "bytes": out.stat().st_size, "dim": dim, "head_dim": hd_pad}


def _add_vocab(w, vocab_size: int, tokenizer_dir: Path | None) -> None:
    """The tokenizer's BPE vocabulary and merges (gpt2-style, as llama.cpp reads Llama-3's), padded to vocab_size."""
    import gguf

    from cosmoes.tokenizer import default_tokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else default_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for piece, idx in vocab.items():
        if idx < vocab_size:
            tokens[idx], types[idx] = piece, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]], types[added["id"]] = added["content"], gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the shipped tokenizer splits with GPT-2's pattern
    w.add_add_bos_token(True)  # as the HF tokenizer puts <|begin_of_text|> before every text
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="checkpoint directory or preset (random init)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the checkpoint's, or the shipped one)")
    args = ap.parse_args(argv)
    print(json.dumps(write_gguf(args.source, args.out, args.seed, args.tokenizer)))


if __name__ == "__main__":
    main()
