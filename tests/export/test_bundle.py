"""cosmoes.export.bundle/transforms/lower/recipes: per-expert methods that compute what the eager experts compute,
8da4w sizes near the int4 ideal, the group-size rule and padding, quantised embeddings, `inspect` accounting,
refused settings as one-line errors, and atomic export (a failure leaves no half-written bundle)."""

import copy
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cosmoes import int4

from cosmoes.checkpoint import load_model
from cosmoes.cli import main
from cosmoes.config import ModelConfig
from cosmoes.errors import CosmoesError
from cosmoes.export import lower as lower_mod
from cosmoes.export.bundle import ExportConfig, export_bundle, inspect_bundle, resident_bytes
from cosmoes.export.manifest import load_manifest
from cosmoes.export.recipes import load_recipe, targets
from cosmoes.formats import TARGETS
from cosmoes.export.transforms import (EmbedStage, ExpertStage, PaddedLinear, Stage, choose_group_size, pad_linears,
                                       quantize_model)
from cosmoes.model import Transformer, init_weights
from cosmoes.tokenizer import load_tokenizer


def run_method(pte_path, name, *inputs):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte_path)
    return program.load_method(name).execute(list(inputs))[0]


def test_recipes_are_data_with_defaults_for_each_target():
    assert targets() == ["android", "host", "ios"] == list(TARGETS)  # a manifest may name exactly these
    for target in targets():
        r = load_recipe(target)
        assert r.quant in r.allowed_quant and "4w" not in r.allowed_quant
        assert r.group_size % 32 == 0 and r.max_chunk > 0 and r.packaging
    assert "/data/local/tmp/cosmoes/" in load_recipe("android").packaging


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant="4w"), "4w is not supported by the XNNPACK delegate in executorch 1.5.1 (wrong results); use 8da4w"),
    (dict(quant="int2"), "unknown quantisation 'int2'"),
    (dict(target="watch"), "unknown export target 'watch'"),
    (dict(quant_embedding="int3"), "unknown embedding quantisation 'int3'"),
    (dict(group_size=16), "group size 16 is not supported by XNNPACK"),
    (dict(max_chunk=0), "max-chunk must be positive"),
])
def test_refused_settings_fail_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(CosmoesError) as exc:
        export_bundle("no-such-preset-is-never-loaded", tmp_path / "out", ExportConfig(**kwargs))
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def _resolved(**kwargs):
    cfg, recipe = ExportConfig(**kwargs).resolve()
    return cfg, recipe


@pytest.mark.parametrize("target", TARGETS)
def test_every_recipe_ships_an_int8_embedding_and_quant_none_stays_fp32(target):
    assert _resolved(target=target)[0].quant_embedding == "int8"
    assert _resolved(target=target, quant="none")[0].quant_embedding == "none"
    assert _resolved(target=target, quant="none", quant_embedding="int8")[0].quant_embedding == "int8"
    assert _resolved(target=target, quant_embedding="none")[0].quant_embedding == "none"


def test_a_recipe_that_refuses_an_embedding_quantisation_says_so(tmp_path, monkeypatch):
    from cosmoes.export import recipes

    recipe = json.loads((recipes.RECIPE_DIR / "android.json").read_text())
    (tmp_path / "watch.json").write_text(json.dumps(recipe | {"target": "watch", "allowed_quant_embedding": ["int8"]}))
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path)
    with pytest.raises(CosmoesError) as exc:
        export_bundle("no-such-preset-is-never-loaded", tmp_path / "out",
                      ExportConfig(target="watch", quant_embedding="int4"))
    assert str(exc.value) == "embedding quantisation 'int4' is not supported for target watch; choose one of: int8"


def test_context_length_follows_the_recipe_capped_at_training():
    from cosmoes.config import get_preset
    from cosmoes.export.bundle import context_length

    wearable, tiny = get_preset("wearable-moe"), get_preset("tiny-moe")
    android = _resolved(target="android")
    assert context_length(*android, wearable) == 2048 == load_recipe("android").max_seq_len
    assert context_length(*android, tiny) == 512  # the recipe's 2048 capped at what tiny-moe was trained for
    assert context_length(*_resolved(target="android", max_seq_len=256), wearable) == 256
    assert context_length(*_resolved(target="host"), wearable) == wearable.max_seq_len  # host: the model's own


@pytest.mark.parametrize("kwargs, preset, message", [
    (dict(target="android", max_seq_len=4096), "wearable-moe",
     "max_seq_len 4096 is longer than the 2048 positions the model was trained for (config.json max_seq_len)"),
    (dict(target="ios", max_seq_len=4096), "phone-moe",
     "max_seq_len 4096 needs a 1132 MB KV cache; target ios holds at most 1024 MB (3703 positions of this model)"),
])
def test_context_beyond_training_or_the_device_is_refused(kwargs, preset, message):
    import dataclasses

    from cosmoes.config import get_preset
    from cosmoes.export.bundle import context_length

    trained_long = dataclasses.replace(get_preset(preset), max_seq_len=8192 if preset == "phone-moe" else 2048)
    with pytest.raises(CosmoesError) as exc:
        context_length(*_resolved(**kwargs), trained_long)
    assert str(exc.value) == message


def test_cli_context_beyond_training_names_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cosmoes", "export", "tiny-moe", "--target", "android", "--max-seq-len", "600",
                                      "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and not (tmp_path / "b").exists()
    assert capsys.readouterr().err == ("error: --max-seq-len 600 is longer than the 512 positions the model was "
                                       "trained for (config.json max_seq_len)\n")


def test_cli_export_4w_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cosmoes", "export", "tiny-moe", "--target", "android", "--quant", "4w",
                                      "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "error: 4w is not supported by the XNNPACK delegate in executorch 1.5.1 (wrong results); use 8da4w\n"


def test_expert_methods_compute_the_eager_experts(micro_bundle_fp32, micro_checkpoint, micro_config):
    model = load_model(micro_checkpoint)
    x_ND = torch.randn(5, micro_config.dim, generator=torch.Generator().manual_seed(0))
    for layer, expert in [(0, 0), (1, 3)]:
        got = run_method(micro_bundle_fp32 / "experts.pte", f"layer_{layer}_expert_{expert}", x_ND)
        with torch.no_grad():
            want = model.layers[layer].feed_forward.experts[expert](x_ND)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_8da4w_experts_are_int4_segments_used_in_place(micro_bundle_8da4w, micro_checkpoint, micro_config):
    """Each expert is a page-aligned segment of experts.bin (no program holds it) that computes its eager expert up
    to int4/int8 error, stores int4 nibbles plus one fp32 scale per group of 32, and hashes to its manifest entry."""
    from cosmoes.export.segments import SegmentFile, expert_ffn_from

    m = load_manifest(micro_bundle_8da4w)
    cfg = micro_config
    assert (m.quant, m.group_size, m.expert_layout, list(m.programs)) == ("8da4w", 32, "int4", ["backbone"])
    assert m.fp32_linears == [f"layers.{i}.feed_forward.router" for i in range(cfg.n_layers)]
    weights = 3 * cfg.dim * cfg.ffn_dim
    ideal = weights // 2 + weights // m.group_size * 4
    data = (micro_bundle_8da4w / "experts.bin").read_bytes()
    for layer in m.experts.values():
        for entry in layer.values():
            assert ideal <= entry["bytes"] <= 1.02 * ideal and entry["offset"] % m.expert_file["alignment"] == 0
            assert hashlib.sha256(data[entry["offset"]:entry["offset"] + entry["bytes"]]).hexdigest() == entry["sha256"]
    model = load_model(micro_checkpoint)
    segments = SegmentFile(micro_bundle_8da4w / "experts.bin", m.config, m.group_size)
    x_ND = torch.randn(7, cfg.dim, generator=torch.Generator().manual_seed(1))
    got = expert_ffn_from(segments.expert(m.experts[1][2]["offset"]), wd=False)([x_ND])[0]
    expert = model.layers[1].feed_forward.experts[2]
    with torch.no_grad():
        want = expert(x_ND)
        packed = [int4.pack_linear(lin.weight, m.group_size) for lin in (expert.w1, expert.w3, expert.w2)]
    assert torch.equal(got, int4.expert_ffn(x_ND, *packed))  # the stored bytes are the checkpoint's, packed
    # int4 weights and int8 activations: about a tenth of the signal, as 4 bits give
    assert (got - want).pow(2).mean().sqrt() <= 0.2 * want.pow(2).mean().sqrt()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98


def test_bundle_copies_the_checkpoints_tokenizer(micro_bundle_8da4w, micro_checkpoint):
    ours, theirs = load_tokenizer(micro_bundle_8da4w / "tokenizer"), load_tokenizer(micro_checkpoint)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours("a bundle")["input_ids"] == theirs("a bundle")["input_ids"]


def test_inspect_accounts_segments_and_resident_bytes(micro_bundle_fp32, micro_bundle_8da4w, micro_config):
    cfg = micro_config
    fp32, q = inspect_bundle(micro_bundle_fp32), inspect_bundle(micro_bundle_8da4w, verify=True)
    for info in (fp32, q):
        seg, res = info["segments"], info["resident"]
        per_expert = info["experts"]["bytes_max"]
        assert info["experts"]["count"] == cfg.n_layers * cfg.num_experts
        assert seg["backbone"] == seg["embedding"] + seg["attention"] + seg["head"]
        assert res["all"] == seg["backbone"] + seg["experts"]
        assert res["swap"] == seg["backbone"] + cfg.n_layers * cfg.top_k * per_expert
        assert "lru:1" not in res  # both runtimes refuse lru:N below top_k
        assert list(res) == ["swap", "lru:2", "lru:3", "lru:4", "all"]
        assert res["lru:2"] == res["swap"] < res["lru:3"] < res["lru:4"] == res["all"]
        assert info["total_bytes"] >= sum(p["bytes"] for p in info["programs"].values())
    # fp32 experts are methods of experts.pte; 8da4w ones int4 segments of experts.bin, counted in the total
    assert "experts" in fp32["programs"] and list(q["programs"]) == ["backbone"]
    assert q["expert_layout"] == "int4" and q["files"]["experts.bin"] >= q["segments"]["experts"]
    assert q["segments"]["experts"] < fp32["segments"]["experts"] / 5
    # linears shrink ~7x; the embedding is int8 (the host recipe's default, as the phones'), with an fp32 per-row scale
    assert q["segments"]["head"] < fp32["segments"]["head"] / 5
    assert q["quant_embedding"] == "int8" and fp32["quant_embedding"] == "none"
    assert q["segments"]["embedding"] == cfg.vocab_size * (cfg.dim + 4) == fp32["segments"]["embedding"] // 4 + \
        cfg.vocab_size * 4
    # beside the weights: the KV caches (fp32, all layers, every position of the context) and the activations
    kv_per_position = cfg.n_layers * 2 * cfg.kv_heads * cfg.head_dim * 4
    for info in (fp32, q):
        fp = info["footprint"]
        assert fp["embedding"] == {"stored": info["segments"]["embedding"], "backing": "file"}
        # XNNPACK copies a loaded method's weights into anonymous memory; int4 segments are used in place
        backing = "file" if info["expert_layout"] == "int4" else "anon"
        assert fp["experts"] == {"stored": info["segments"]["experts"], "backing": backing}
        assert fp["kv_cache"]["per_position"] == kv_per_position
        assert fp["kv_cache"]["reserved"] == kv_per_position * cfg.max_seq_len
        assert fp["kv_cache"]["per_1k_positions"] == kv_per_position * 1024
        assert 0 < fp["activations"]["reserved"] < 10e6
    with pytest.raises(CosmoesError, match="expert cache policy"):
        resident_bytes(load_manifest(micro_bundle_fp32), "lru:0")
    with pytest.raises(CosmoesError, match="unknown expert cache policy"):
        resident_bytes(load_manifest(micro_bundle_fp32), "fifo")


def test_cli_inspect_json(micro_bundle_8da4w, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cosmoes", "inspect", str(micro_bundle_8da4w), "--json"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out) == inspect_bundle(micro_bundle_8da4w)


# -- the group-size rule, padding and embedding quantisation (single methods: seconds, not minutes) -----------

def tiny(dim: int, **kw) -> Transformer:
    cfg = ModelConfig(vocab_size=512, dim=dim, n_layers=1, n_heads=2, ffn_dim=2 * dim, num_experts=2, top_k=1,
                      max_seq_len=32, **kw)
    return init_weights(Transformer(cfg), seed=0).eval()


def test_group_size_rule_takes_the_largest_dividing_candidate():
    assert choose_group_size(tiny(256), 128) == 128  # widths 256 and 512
    assert choose_group_size(tiny(192), 128) == 64  # 192 = 3 x 64
    assert choose_group_size(tiny(96), 256) == 32
    assert choose_group_size(tiny(48), 128) == 32  # nothing divides 48: pad to 64
    with pytest.raises(CosmoesError, match="multiple of 32"):
        choose_group_size(tiny(64), 16)


def test_padding_keeps_the_fp32_function_and_is_recorded():
    model = tiny(48, wd_rank=40)
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
    padded = pad_linears(model, 32)
    assert padded["layers.0.attention.wq"] == [48, 64]
    assert padded["layers.0.feed_forward.experts.0.w1.up"] == [40, 64]  # the rank-40 factor of Eq. 1
    assert "layers.0.feed_forward.experts.0.w2.down" not in padded  # in_features = ffn 96 = 3 x 32
    assert isinstance(model.get_submodule("layers.0.attention.wq"), PaddedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-6)


def test_padded_8da4w_expert_lowers_to_xnnpack_and_matches_eager(tmp_path):
    model = tiny(48)
    report = quantize_model(model, "8da4w", 32)
    assert report.group_size == 32 and report.padded_linears["layers.0.feed_forward.experts.1.w1"] == [48, 64]
    expert = model.layers[0].feed_forward.experts[1]
    from torch.export import Dim

    stage = Stage("layer_0_expert_1", ExpertStage(expert), (torch.zeros(2, 48),), ({0: Dim("N", min=1, max=8)},),
                  "experts", "expert", 0, 1)
    lowered = lower_mod.lower_program([stage], share_state=False)
    (tmp_path / "e.pte").write_bytes(lowered.buffer)
    x_ND = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    got = run_method(tmp_path / "e.pte", "layer_0_expert_1", x_ND)
    with torch.no_grad():
        want = expert(x_ND)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.parametrize("mode, bytes_per_weight, weights_per_scale", [("int8", 1.0, 64), ("int4", 0.5, 32)])
def test_quantised_embedding_lowers_to_executorch_kernels(tmp_path, mode, bytes_per_weight, weights_per_scale):
    import executorch.kernels.quantized  # noqa: F401  (the runtime's quantized embedding kernels)

    model = tiny(64)
    fp32 = model.tok_embeddings.weight.detach().clone()
    quantize_model(model, "none", 32, quant_embedding=mode)
    from torch.export import Dim

    stage = Stage("embed", EmbedStage(model), (torch.zeros(1, 2, dtype=torch.long),),
                  ({1: Dim("T", min=1, max=8)},), "backbone", "embedding")
    lowered = lower_mod.lower_program([stage], share_state=False)
    (tmp_path / "embed.pte").write_bytes(lowered.buffer)
    ids = torch.tensor([[0, 5, 511, 7]])
    got = run_method(tmp_path / "embed.pte", "embed", ids)
    with torch.no_grad():
        torch.testing.assert_close(got, model.tok_embeddings(ids))  # exactly the eager quantised lookup
    assert (got[0] - fp32[ids[0]]).abs().max() <= 0.1 * fp32.abs().max()
    # int8: one fp32 scale per row (dim 64); int4: one fp32 scale per group of 32
    ideal = fp32.numel() * bytes_per_weight + fp32.numel() // weights_per_scale * 4
    assert ideal <= lowered.method_bytes["embed"] <= 1.05 * ideal


# -- atomic writes ---------------------------------------------------------------------------------------------

def test_failed_export_leaves_old_bundle_and_no_temp_dirs(micro_checkpoint, micro_bundle_fp32, tmp_path, monkeypatch):
    out = shutil.copytree(micro_bundle_fp32, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = []

    def fail_on_experts(stages, share_state, delegate=None, progress=None):
        calls.append(stages[0].program)
        if stages[0].program == "experts":
            raise RuntimeError("simulated failure while lowering the experts")
        # the backbone "succeeds", so a backbone.pte is already in the temp dir when the failure comes
        return lower_mod.LoweredProgram(b"partial", [s.name for s in stages], {s.name: 0 for s in stages})

    monkeypatch.setattr(lower_mod, "lower_program", fail_on_experts)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(RuntimeError, match="simulated failure"):
            export_bundle(micro_checkpoint, target, ExportConfig(quant="none", max_chunk=8), progress=None)
    assert calls == ["backbone", "experts"] * 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .tmp-/.old- leftovers


def test_sigterm_during_export_removes_the_temp_dir(micro_checkpoint, tmp_path):
    out = tmp_path / "b"
    code = ("from cosmoes.export.bundle import ExportConfig, export_bundle; "
            f"export_bundle({str(micro_checkpoint)!r}, {str(out)!r}, ExportConfig(quant='none', max_chunk=8))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(tmp_path.glob(".b.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob(".b.tmp-*")), "the export never reached its temp dir"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_replace_a_directory_that_is_not_a_bundle(micro_checkpoint, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CosmoesError, match="refusing to overwrite"):
        export_bundle(micro_checkpoint, tmp_path / "notes", ExportConfig(quant="none"), progress=None)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_worker_processes_lower_the_same_program_as_one_process(micro_checkpoint):
    # the per-layer stages (and context, head) are lowered in forked workers and come back through exir serde
    from cosmoes.export.transforms import quantize_model, split_model

    model = load_model(micro_checkpoint)
    model.eval()
    quantize_model(model, "8da4w", 32, "int8", skip_experts=True)
    stages = split_model(model, 16, experts=False)
    one = lower_mod.lower_program(stages, share_state=True, jobs=1)
    two = lower_mod.lower_program(stages, share_state=True, jobs=2)
    assert one.buffer == two.buffer and one.planned_bytes == two.planned_bytes
    assert one.methods == two.methods == [s.name for s in stages]


def test_export_jobs_follow_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("COSMOES_EXPORT_JOBS", "3")
    assert lower_mod.export_jobs(5) == 5 and lower_mod.export_jobs() == 3
    monkeypatch.delenv("COSMOES_EXPORT_JOBS")
    assert lower_mod.export_jobs() >= 1  # one per core
    for bad in ("zero", "0", "-2"):
        monkeypatch.setenv("COSMOES_EXPORT_JOBS", bad)
        with pytest.raises(CosmoesError, match=f"^COSMOES_EXPORT_JOBS={bad} is not a number of processes"):
            lower_mod.export_jobs()


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise ValueError("no graph here")


def test_a_stage_that_fails_in_a_worker_process_is_one_error_not_a_hang():
    stages = [Stage(f"layer_{i}", _Broken(), (torch.zeros(2, 4),), ({},), "backbone", "attention", layer=i)
              for i in range(3)]
    with pytest.raises(CosmoesError, match="^lowering failed in a worker process: ValueError: no graph here"):
        lower_mod.lower_program(stages, share_state=True, jobs=2)


def _plans(pte):
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes())
    return getattr(program, "program", program).execution_plan


def _operators(pte) -> dict[str, set[str]]:
    return {plan.name: {op.name for op in plan.operators if op.name.startswith("cosmoes::")} for plan in _plans(pte)}


def test_8da4w_layers_and_head_run_the_projects_operators(micro_bundle_8da4w, micro_bundle_fp32):
    ops = _operators(micro_bundle_8da4w / "backbone.pte")
    layers = [name for name in ops if name.startswith("layer_")]
    layer_ops = {"cosmoes::rms_norm", "cosmoes::heads", "cosmoes::cached_attention", "cosmoes::fp32_linear"}
    assert layers and all(ops[n] == layer_ops | {"cosmoes::int4_linear"} for n in layers)
    assert ops["head"] == {"cosmoes::rms_norm", "cosmoes::int4_linear"}
    # with int4 experts every linear of the backbone is the project's: it is lowered without a delegate
    assert all(not plan.delegates for plan in _plans(micro_bundle_8da4w / "backbone.pte"))
    # without quantisation the projections stay XNNPACK's fp32 ones; norms, heads, attention and routers are the
    # project's
    fp32 = _operators(micro_bundle_fp32 / "backbone.pte")
    assert all(fp32[n] == layer_ops for n in layers) and fp32["head"] == {"cosmoes::rms_norm"}
    assert any(plan.delegates for plan in _plans(micro_bundle_fp32 / "backbone.pte"))


def test_a_kv_cache_type_outside_the_list_is_one_line(micro_checkpoint, tmp_path):
    with pytest.raises(CosmoesError, match="kv-cache.*fp32, fp16.*'bf16'"):
        export_bundle(micro_checkpoint, tmp_path / "b", ExportConfig(target="host", kv_cache="bf16"))
    assert not (tmp_path / "b").exists()
