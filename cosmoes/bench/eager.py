"""The comparison point of `cosmoes bench --compare`: transformers eager fp32 `generate` (the paper's Table 4 set-up).

Run as ``python -m cosmoes.bench.eager`` with a JSON request on stdin, in its own process so that its peak RSS is
its own; prints one JSON line with time to first token, decode tokens/s and peak RSS.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def load_source(source: dict, max_seq_len: int):
    """`CosmoeForCausalLM` (fp32, eager) holding the weights a bundle was exported from."""
    from cosmoes.checkpoint import load_hf_model, model_from_source
    from cosmoes.hf import CosmoeConfig, CosmoeForCausalLM

    if "checkpoint" in source:
        return load_hf_model(source["checkpoint"])
    model = model_from_source(source["preset"], seed=int(source.get("seed", 0)))
    model.config.max_seq_len = max(model.config.max_seq_len, max_seq_len)
    return CosmoeForCausalLM(CosmoeConfig.from_model_config(model.config), model=model).eval()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


@torch.inference_mode()
def time_generate(model, ids_1T: torch.Tensor, new_tokens: int, sampling: dict) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    out = model.generate(ids_1T, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                         eos_token_id=None, **sampling)
    return time.perf_counter() - t0, out[0, ids_1T.shape[1]:].tolist()


def run(request: dict) -> dict:
    torch.set_num_threads(int(request["threads"]))
    model = load_source(request["source"], int(request["max_seq_len"]))
    ids_1T = torch.tensor([request["prompt"]], dtype=torch.long)
    gen = int(request["gen"])
    temperature = float(request.get("temperature", 0.0))
    # the runner's sampler is its own stream, so sampled tokens differ from it; the timing is what compares
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": float(request.get("top_p", 1.0)),
                 "top_k": None} if temperature > 0 else {"do_sample": False})
    torch.manual_seed(int(request.get("seed", 0)))
    for _ in range(int(request["warmup"])):
        time_generate(model, ids_1T, gen, sampling)
    ttft, decode, tokens = [], [], []
    for _ in range(int(request["repeats"])):
        first, _ = time_generate(model, ids_1T, 1, sampling)
        full, tokens = time_generate(model, ids_1T, gen, sampling)
        ttft.append(first * 1e3)
        decode.append((gen - 1) / max(full - first, 1e-9) if gen > 1 else 0.0)
    return {"runner": "transformers-eager-fp32", "threads": int(request["threads"]),
            "prompt_tokens": ids_1T.shape[1], "generated_tokens": gen, "ttft_ms": statistics.median(ttft),
            "prefill_tok_s": ids_1T.shape[1] / (statistics.median(ttft) / 1e3),
            "decode_tok_s": statistics.median(decode), "decode_tok_s_runs": decode, "peak_rss_mb": peak_rss_mb(),
            "tokens": tokens}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))))
