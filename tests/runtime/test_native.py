"""cosmoes.runtime.native and the C++ runner in export/: the same tokens as the Python runtime for every policy, expert
traffic per policy, the memory budget, sampling, the statistics line and the bad-input paths."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch

from cosmoes.errors import CosmoesError
from cosmoes.artifacts import MANIFEST_NAME
from cosmoes.formats import FORMAT_VERSION
from cosmoes.runtime.native import build_runner, generate_native, run_local
from cosmoes.runtime.python import BundleRuntime
from cosmoes.tokenizer import default_tokenizer

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")


@pytest.fixture(scope="module")
def runner():
    return build_runner()


@pytest.fixture(scope="module")
def prompt_ids():
    ids = default_tokenizer()(PROMPT)["input_ids"]
    assert len(ids) > 16  # longer than the fixtures' max_chunk: prefill runs in several calls
    return ids


def _run(runner, bundle, *args):
    return subprocess.run([str(runner), str(bundle), *args], capture_output=True, text=True)


@pytest.mark.parametrize("policy", ["all", "swap", "lru:2", "lru:3"])
@pytest.mark.parametrize("bundle", ["micro_bundle_fp32", "micro_bundle_8da4w"])
def test_same_tokens_loads_and_exrep_as_python_runtime(runner, bundle, policy, prompt_ids, request):
    path = request.getfixturevalue(bundle)
    py = BundleRuntime(path, policy=policy, threads=1)
    expected = py.generate(prompt_ids, 24)
    native = generate_native(path, prompt_ids, 24, policy=policy, threads=1)
    assert native.tokens == expected
    assert native.stats["expert_loads"] == py.stats.loads
    assert native.stats["expert_evictions"] == py.stats.evictions
    assert native.stats["exrep_per_layer"] == pytest.approx(py.stats.exrep(), abs=1e-6)


@pytest.mark.parametrize("policy", ["all", "swap", "lru:2", "lru:4"])
def test_two_threads_run_a_steps_experts_side_by_side_with_the_same_tokens_and_loads(runner, micro_bundle_8da4w,
                                                                                      policy, prompt_ids):
    # each int4 expert of a step on its own thread (decode under every policy; prefill under all and lru:4, which
    # hold all 4 experts at once): the same sums in the same order, the same cache
    py = BundleRuntime(micro_bundle_8da4w, policy=policy, threads=1)
    expected = py.generate(prompt_ids, 24)
    native = generate_native(micro_bundle_8da4w, prompt_ids, 24, policy=policy, threads=2)
    assert native.tokens == expected
    assert (native.stats["expert_loads"], native.stats["expert_evictions"]) == (py.stats.loads, py.stats.evictions)


def test_policies_bound_resident_experts(runner, micro_bundle_8da4w, prompt_ids):
    stats = {p: generate_native(micro_bundle_8da4w, prompt_ids, 16, policy=p).stats for p in ("all", "swap", "lru:3")}
    layers, experts = 2, 4
    assert stats["all"]["expert_evictions"] == 0 and stats["all"]["expert_loads"] <= layers * experts
    assert stats["lru:3"]["expert_resident_peak"] <= 3 * layers
    assert stats["swap"]["expert_loads"] > stats["all"]["expert_loads"] < stats["lru:3"]["expert_loads"]
    # swap keeps the current token's experts, plus the one a prefill chunk is running: at most k + 1 per layer
    assert stats["swap"]["expert_evictions"] > 0 and stats["swap"]["expert_resident_peak"] <= (2 + 1) * layers


def test_budget_picks_the_cache_size_and_names_the_minimum(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    manifest = json.loads((micro_bundle_8da4w / MANIFEST_NAME).read_text())
    non_expert = sum(manifest["non_expert_bytes"].values())
    expert = max(e["bytes"] for lay in manifest["experts"].values() for e in lay.values())
    ids = ",".join(map(str, prompt_ids))
    budget = (non_expert + 3 * 2 * expert) / 1e6  # room for three experts in each of the two layers
    res = run_local(micro_bundle_8da4w, ["--budget-mb", f"{budget + 1e-4}", "--prompt-ids", ids, "--gen", "4"],
                    tmp_path / "s.json")
    assert res.stats["policy"] == "lru:3"
    too_small = (non_expert + 2 * 2 * expert) / 1e6 - 0.001
    proc = _run(runner, micro_bundle_8da4w, "--budget-mb", f"{too_small}", "--prompt-ids", ids)
    assert proc.returncode == 2
    minimum = (non_expert + 2 * 2 * expert) / 1e6
    assert f"minimum of {minimum:.1f} MB" in proc.stderr and proc.stderr.count("\n") == 1


def test_sampling_is_seeded(runner, micro_bundle_8da4w, prompt_ids):
    a, b, c = (generate_native(micro_bundle_8da4w, prompt_ids, 16, temperature=1.0, top_p=0.9, seed=s).tokens
               for s in (1, 1, 2))
    assert a == b and a != c
    assert all(0 <= t < 8192 for t in a + c)


def test_sampled_tokens_stay_in_the_nucleus(runner, micro_bundle_8da4w, prompt_ids):
    from cosmoes.runtime.python import BundleRuntime

    probs = torch.softmax(BundleRuntime(micro_bundle_8da4w, policy="all").prefill(prompt_ids).double(), -1)
    ranked = torch.argsort(probs, descending=True)
    size = int((torch.cumsum(probs[ranked], 0) < 0.3).sum()) + 1  # the fewest tokens holding 30 % of the mass
    nucleus = set(ranked[:size].tolist())
    firsts = {generate_native(micro_bundle_8da4w, prompt_ids, 1, temperature=1.0, top_p=0.3, seed=s).tokens[0]
              for s in range(12)}
    assert firsts <= nucleus and len(firsts) > 1 < size
    greedy = generate_native(micro_bundle_8da4w, prompt_ids, 6).tokens
    assert generate_native(micro_bundle_8da4w, prompt_ids, 6, temperature=1.0, top_p=1e-9, seed=5).tokens == greedy


def test_statistics_line(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    args = ["--policy", "swap", "--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "8", "--warmup", "1",
            "--repeats", "2", "--probe"]
    s = run_local(micro_bundle_8da4w, args, tmp_path / "stats.json").stats
    assert s["policy"] == "swap" and s["threads"] >= 1 and s["generated_tokens"] == 8 == len(s["tokens"])
    assert s["prompt_tokens"] == len(prompt_ids) and len(s["decode_tok_s_runs"]) == 2
    assert 0 < s["rss_after_load_mb"] <= s["peak_rss_mb"]
    assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0 and s["ttft_ms"] > 0 and s["model_load_ms"] > 0
    assert s["expert_loads"] > 0 and s["expert_load_ms"] > 0 and len(s["exrep_per_layer"]) == 2
    # evictions timed apart from loads, per token in the breakdown, and what no counter covers is what is left
    assert s["expert_evictions"] > 0 and s["expert_evict_ms"] > 0
    assert s["expert_evict_ms_mean"] == pytest.approx(s["expert_evict_ms"] / s["expert_evictions"], rel=1e-3)
    stages = s["decode_breakdown_ms"]
    assert stages["expert_evictions"] > 0
    assert sum(stages.values()) == pytest.approx(s["decode_ms_per_token"], rel=1e-3)
    assert s["mem_read_gb_s"] > 0 and s["file_read_mb_s"] > 0 and s["expert_read_ms"] > 0
    assert s["rss_end_anon_mb"] + s["rss_end_file_mb"] == pytest.approx(s["rss_end_mb"], abs=0.5)


def test_cold_experts_pick_the_same_tokens_and_say_so(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    """--cold-experts drops each evicted int4 expert from the page cache: the same tokens and loads, flagged in the
    statistics with the kernel family that ran the experts."""
    args = ["--policy", "swap", "--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "8"]
    warm = run_local(micro_bundle_8da4w, args, tmp_path / "warm.json").stats
    cold = run_local(micro_bundle_8da4w, [*args, "--cold-experts"], tmp_path / "cold.json").stats
    assert cold["tokens"] == warm["tokens"] and cold["expert_loads"] == warm["expert_loads"] > 0
    assert (warm["cold_experts"], cold["cold_experts"]) == (False, True)
    assert warm["expert_kernels"] == cold["expert_kernels"] in {"scalar", "avx2", "avxvnni", "avx512vnni", "neondot"}


@pytest.mark.parametrize("policy", ["swap", "lru:3", "all"])
def test_prefetch_asks_for_the_experts_the_python_runtime_foretells_and_keeps_the_tokens(runner, micro_bundle_8da4w,
                                                                                       policy, prompt_ids, tmp_path):
    """--prefetch asks for layer 1's experts as layer 0's output of layer 1's router picks them (bundle format 8):
    the same asks and hits as the Python runtime counts, never an expert already resident, and the same tokens and
    loads as without it, warm and cold."""
    py = BundleRuntime(micro_bundle_8da4w, policy=policy, threads=1, prefetch=True)
    expected = py.generate(prompt_ids, 16)
    args = ["--policy", policy, "--threads", "1", "--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "16"]
    plain = run_local(micro_bundle_8da4w, args, tmp_path / "plain.json").stats
    for extra in ([], ["--cold-experts"]):
        s = run_local(micro_bundle_8da4w, [*args, "--prefetch", *extra], tmp_path / "prefetch.json").stats
        assert s["tokens"] == plain["tokens"] == expected and s["prefetch"] is True
        assert s["expert_loads"] == plain["expert_loads"] == py.stats.loads
        assert (s["expert_prefetched"], s["expert_prefetch_hits"]) == (py.stats.prefetched, py.stats.prefetch_hits)
        assert s["expert_prefetch_hit_rate"] == pytest.approx(py.stats.prefetch_hits / py.stats.loads, abs=1e-6)
    assert plain["prefetch"] is False and plain["expert_prefetched"] == 0
    # a hit is a load of an expert asked for: at most the loads of layer 1 (layer 0 has no layer before it)
    assert 0 < py.stats.prefetch_hits <= py.stats.prefetched


def test_prefetch_needs_int4_experts(runner, micro_bundle_8da4w_xnnpack, prompt_ids):
    result = _run(runner, micro_bundle_8da4w_xnnpack, "--prefetch", "--prompt-len", "4", "--gen", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: --prefetch needs int4 expert segments (expert_layout "
                                                      "int4); this bundle's expert_layout is xnnpack")


def test_resident_memory_by_kind_keeps_the_embedding_read_in_place(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    from cosmoes.export.manifest import load_manifest

    m = load_manifest(micro_bundle_8da4w)
    args = ["--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "8", "--policy", "lru:3"]
    s = run_local(micro_bundle_8da4w, args, tmp_path / "stats.json").stats
    r = s["resident_mb"]
    assert list(r) == ["embedding", "attention", "head", "experts", "kv_cache", "activations", "runtime"]
    # the int8 table stays in the mapped backbone.pte: no copy in anonymous memory, only the pages of rows looked up
    embedding = m.non_expert_bytes["embedding"] / 1e6
    assert r["embedding"]["anon"] < embedding / 4
    # (all of a small backbone.pte may be resident, in whole pages; ExecuTorch maps the program and its constant
    # segment apart, and the page where they meet counts once in each mapping)
    page = os.sysconf("SC_PAGE_SIZE")
    assert 0 < r["embedding"]["file"] * 1e6 <= (-(-m.programs["backbone"]["bytes"] // page) + 1) * page + 1e-3
    # nothing is packed into anonymous memory (format 8: the layers and the head are the project's operators over
    # backbone.pte's pages, which the embedding's file figure counts, with no XNNPACK: what loading a method adds is
    # its own state); the int4 experts are their file pages, at most 3 per layer (lru:3)
    assert r["experts"]["anon"] == 0
    # (plus each method's own state: ~4 kB, ~25 kB under ASan; a micro layer's weights are only 12 kB, so no copy of
    # them is what tests/export/test_bundle.py asserts, by the backbone having no delegate)
    for kind, methods in (("attention", m.config["n_layers"] + 1), ("head", 1)):
        assert r[kind]["anon"] < m.non_expert_bytes[kind] / 1e6 / 4 + methods * 0.032
    segments = m.config["n_layers"] * 3 * max(e["bytes"] for lay in m.experts.values() for e in lay.values())
    assert 0 < r["experts"]["file"] <= (segments + 2 * 4096 * 3 * m.config["n_layers"]) / 1e6
    # the KV caches hold the positions filled, no more than the whole cache
    used = len(prompt_ids) + 8
    assert 0 < r["kv_cache"]["anon"] <= m.kv_cache_bytes() / 1e6
    assert r["kv_cache"]["anon"] >= m.memory["kv_bytes_per_position"] * used / 1e6 / 2
    assert r["activations"]["anon"] >= 0 and r["runtime"]["anon"] > 0 and r["runtime"]["file"] > 0
    total = sum(v["anon"] + v["file"] for v in r.values())
    assert total == pytest.approx(s["rss_end_mb"], abs=1.0)


@pytest.mark.parametrize("policy", ["swap", "lru:3"])
def test_expert_file_pages_are_the_resident_segments_only(runner, micro_bundle_8da4w, prompt_ids, tmp_path, policy):
    """Whatever folios the page cache holds experts.bin in (a sequential read, as an export's writes or another
    reader leave it, may cache it in large folios spanning several experts), a fault maps only the pages of the
    segment it is in: each segment is its own mapping. --no-sha: the runtime finds the page cache as it is."""
    from cosmoes.export.manifest import load_manifest
    from cosmoes.system import drop_cache

    m = load_manifest(micro_bundle_8da4w)
    experts = micro_bundle_8da4w / "experts.bin"
    drop_cache([experts])
    with open(experts, "rb") as f:  # read from storage in one sequential pass, the readahead's large folios
        while f.read(1 << 20):
            pass
    args = ["--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "8", "--policy", policy, "--no-sha"]
    s = run_local(micro_bundle_8da4w, args, tmp_path / "stats.json").stats
    page = os.sysconf("SC_PAGE_SIZE")
    segment_pages = -(-max(e["bytes"] for lay in m.experts.values() for e in lay.values()) // page) * page
    resident = s["expert_resident_peak"]  # both policies keep at most 3 per layer (k, + 1 while a chunk runs)
    assert 0 < resident <= 3 * m.config["n_layers"]
    assert 0 < s["resident_mb"]["experts"]["file"] * 1e6 <= resident * segment_pages + 1e-3


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("flip", "is corrupt (sha256 differs from the manifest)"),
    ("truncate", "(truncated or replaced)"),
    ("missing", "bundle file missing"),
    ("manifest", "corrupt bundle manifest"),
    ("version", "is newer than this runtime supports"),
    ("old-version", f"is older than this runtime supports ({FORMAT_VERSION}): re-export it: `cosmoes export "),
])
def test_damaged_bundles_are_one_line_errors(runner, micro_bundle_8da4w, tmp_path, damage, message):
    bundle = _copy(micro_bundle_8da4w, tmp_path)
    experts = bundle / "experts.bin"
    if damage == "flip":
        data = bytearray(experts.read_bytes())
        data[len(data) // 2] ^= 0xFF
        experts.write_bytes(bytes(data))
    elif damage == "truncate":
        experts.write_bytes(experts.read_bytes()[:1000])
    elif damage == "missing":
        experts.unlink()
    elif damage == "manifest":
        (bundle / MANIFEST_NAME).write_text('{"format": "cosmoes-executorch-bundle", "format_version": 1,')
    else:
        m = json.loads((bundle / MANIFEST_NAME).read_text())
        m["format_version"] = 99 if damage == "version" else 1
        (bundle / MANIFEST_NAME).write_text(json.dumps(m))
    proc = _run(runner, bundle, "--prompt-ids", "1,2,3")
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_a_table_the_file_no_longer_holds_is_refused_even_with_a_matching_manifest(runner, micro_bundle_8da4w,
                                                                                   tmp_path):
    # backbone.pte cut inside its data segments (where the int8 embedding table lies), the manifest's size and sha256
    # rewritten to match: both runtimes refuse it in one line instead of reading past the mapping
    from cosmoes.export.manifest import load_manifest, sha256_file

    bundle = _copy(micro_bundle_8da4w, tmp_path)
    assert json.loads((bundle / MANIFEST_NAME).read_text())["quant_embedding"] == "int8"
    backbone = bundle / "backbone.pte"
    backbone.write_bytes(backbone.read_bytes()[: backbone.stat().st_size * 2 // 3])
    m = json.loads((bundle / MANIFEST_NAME).read_text())
    m["programs"]["backbone"].update(bytes=backbone.stat().st_size, sha256=sha256_file(backbone))
    (bundle / MANIFEST_NAME).write_text(json.dumps(m))
    assert "backbone.pte" in _last_line_error(_run(runner, bundle, "--prompt-ids", "1,2,3"))
    with pytest.raises(CosmoesError, match=r"backbone.pte is truncated \(\d+ bytes, the program needs \d+\)"):
        load_manifest(bundle, verify=True)


@pytest.mark.parametrize("args, message", [
    (["--policy", "lru:1", "--prompt-ids", "1"], "lru needs N >= top_k = 2"),
    (["--policy", "fifo", "--prompt-ids", "1"], "unknown expert cache policy 'fifo'"),
    (["--prompt-ids", "1,99999"], "token id 99999 outside [0, 8192)"),
    (["--prompt-len", "60", "--gen", "10"], "exceed the bundle's max_seq_len 64"),
    (["--gen", "x"], "--gen expects an integer"),
])
def test_bad_options_are_one_line_errors(runner, micro_bundle_8da4w, args, message):
    proc = _run(runner, micro_bundle_8da4w, *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_missing_bundle_through_python(runner, tmp_path):
    with pytest.raises(CosmoesError, match="bundle not found"):
        generate_native(tmp_path / "nope", [1, 2], 4)


# -- hostile manifests: every number and name is checked before it is used (export/runtime/bundle.cpp) ----------
def _edit_manifest(bundle, tmp_path, edit):
    dst = _copy(bundle, tmp_path)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    edit(m, dst)
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    return dst


def _set(path, value):
    def edit(m, _dst):
        *keys, last = path
        for k in keys:
            m = m[k]
        m[last] = value
    return edit


def _outside_link(m, dst):
    (dst.parent / "elsewhere.pte").write_bytes((dst / "experts.pte").read_bytes())
    (dst / "experts.pte").unlink()
    (dst / "experts.pte").symlink_to(dst.parent / "elsewhere.pte")


def _drop_layer(m, _dst):
    del m["experts"]["1"]


@pytest.mark.parametrize("edit, message", [
    (_set(["config", "top_k"], 100), "manifest.json: config.top_k = 100 must be between 1 and num_experts (4)"),
    (_set(["config", "n_layers"], 5000), "config.n_layers = 5000 must be between 1 and 1024"),
    (_set(["config", "vocab_size"], 1e300), "config.vocab_size = 1.0000000000000001e+300 must be an integer"),
    (_set(["quant"], "4w"), 'quant = "4w" must be one of none, 8da4w, 8da8w'),
    (_set(["group_size"], None), "group_size = null must be set for quant 8da4w"),
    (_set(["tokenizer"], "../../etc"), 'tokenizer = "../../etc" must be a plain file name inside the bundle'),
    (_set(["config", "max_seq_len"], 32), "config.max_seq_len = 32 must equal max_seq_len (64)"),
    (_set(["config", "dim"], 63), "config.dim = 63 must be a multiple of n_heads (2)"),
    (_set(["config", "dim"], 6), "config.dim = 6 gives an odd head_dim"),
    (_set(["config", "n_kv_heads"], 3), "config.n_heads = 2 must be a multiple of n_kv_heads (3)"),
    (_set(["config", "router_temperature"], "hot"), 'config.router_temperature = "hot" must be a positive number'),
    (_set(["max_chunk"], 65), "max_chunk = 65 must be between 1 and max_seq_len (64)"),
    (_set(["threads"], -1), "threads = -1 must be between 0 and 1024"),
    (_set(["memory", "kv_dtype"], "bf16"), 'memory.kv_dtype = "bf16" must be "fp32" or "fp16"'),
    (_set(["memory", "kv_dtype"], "fp16"), "memory.kv_bytes_per_position = 1024 must be 512 (fp16 keys and values"),
    (_set(["programs", "backbone", "file"], "../backbone.pte"), "programs.backbone.file = \"../backbone.pte\" must "
                                                                "be a plain file name inside the bundle directory"),
    (_set(["programs", "backbone", "file"], "/etc/passwd"), "must be a plain file name inside the bundle directory"),
    (_set(["programs", "backbone", "bytes"], -5), "programs.backbone.bytes = -5 must be between 1 and"),
    (_set(["programs", "backbone", "methods"], ["embed", "context", "head", "layer_0"]),
     'programs.backbone.methods lacks "layer_1", which the runtime calls'),
    (_drop_layer, "experts has 1 layer(s), config.n_layers = 2 and num_experts = 4 need 2"),
    (_set(["memory", "kv_bytes_per_position"], 4096), "memory.kv_bytes_per_position = 4096 must be 1024"),
    (_set(["memory", "kv_buffer", "id"], 70), "memory.kv_buffer.id = 70 must be between 0 and 63"),
    (_set(["memory", "kv_buffer", "id"], 9), "memory.kv_buffer is not a buffer of memory.planned_bytes"),
    (_set(["memory", "planned_bytes", "backbone"], [1, 2]), "memory.planned_bytes.backbone buffer 1 has 2 bytes, "
                                                            "not the 65536 of the KV caches for max_seq_len 64"),
    (_set(["memory", "planned_bytes", "backbone"], [1] * 65), "must be a list of at most 64 byte counts"),
    (_set(["memory", "planned_bytes", "nope"], [1]), 'programs lacks "nope", which memory.planned_bytes.nope needs'),
])
def test_hostile_manifest_fields_are_one_line_errors(runner, micro_bundle_8da4w, tmp_path, edit, message):
    proc = _run(runner, _edit_manifest(micro_bundle_8da4w, tmp_path, edit), "--prompt-ids", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert message in proc.stderr


def _segment(layer, expert, key, value):
    return _set(["experts", str(layer), str(expert), key], value)


def _outside_link_of(name):
    def edit(m, dst):
        (dst.parent / f"elsewhere-{name}").write_bytes((dst / name).read_bytes())
        (dst / name).unlink()
        (dst / name).symlink_to(dst.parent / f"elsewhere-{name}")
    return edit


def _resegment(layer, expert, data_edit):
    """experts.bin changed by data_edit(bytearray, entry) with the file's own size and sha256 restamped: only the
    segment's recorded sha256 can tell."""
    def edit(m, dst):
        path = dst / m["expert_file"]["file"]
        data = bytearray(path.read_bytes())
        data_edit(data, m["experts"][str(layer)][str(expert)])
        path.write_bytes(bytes(data))
        m["expert_file"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return edit


def _flip_first_byte(data, entry):
    data[entry["offset"]] ^= 0xFF


def _repack(alignment):
    """experts.bin rewritten with its segments at multiples of `alignment`, the manifest to match (a bundle exported
    for smaller pages than this system's)."""
    def edit(m, dst):
        path = dst / m["expert_file"]["file"]
        data, out = path.read_bytes(), bytearray()
        for layer in m["experts"].values():
            for entry in layer.values():
                out += b"\0" * (-len(out) % alignment)
                segment = data[entry["offset"]:entry["offset"] + entry["bytes"]]
                entry["offset"] = len(out)
                out += segment
        path.write_bytes(bytes(out))
        m["expert_file"].update(bytes=len(out), sha256=hashlib.sha256(out).hexdigest(), alignment=alignment)
    return edit


def test_segments_sharing_pages_run_the_same_and_say_so(runner, micro_bundle_8da4w, prompt_ids, tmp_path):
    """A segment that starts inside a page (a bundle aligned below this system's page size, as a 4 KB-aligned one
    on a 16 KB-page phone) still runs, and the statistics and `cosmoes bench` say its pages are shared; an export
    aligns segments to 16 KB, a page of their own on every target."""
    from cosmoes.bench.harness import BenchReport, format_table

    assert json.loads((micro_bundle_8da4w / MANIFEST_NAME).read_text())["expert_file"]["alignment"] == 16384
    args = ["--prompt-ids", ",".join(map(str, prompt_ids)), "--gen", "8", "--policy", "lru:3"]
    own = run_local(micro_bundle_8da4w, args, tmp_path / "own.json")
    shared = run_local(_edit_manifest(micro_bundle_8da4w, tmp_path, _repack(64)), args, tmp_path / "shared.json")
    assert shared.tokens == own.tokens and shared.stats["expert_loads"] == own.stats["expert_loads"]
    assert own.stats["expert_pages_shared"] is False and shared.stats["expert_pages_shared"] is True
    text = format_table(BenchReport(str(micro_bundle_8da4w), {}, {}, len(prompt_ids), rows=[shared.stats]))
    assert "expert pages shared:" in text and "re-export the bundle (cosmoes export)" in text


@pytest.mark.parametrize("edit, message", [
    (_set(["expert_file", "file"], "../experts.bin"), 'expert_file.file = "../experts.bin" must be a plain file name '
                                                      "inside the bundle directory"),
    (_set(["expert_file", "bytes"], 10), "experts.0.0.offset = 0 puts the segment past the end of experts.bin (10 "
                                         "bytes)"),
    (_set(["expert_file", "alignment"], 3), "expert_file.alignment = 3 must be between 64 and"),
    (_segment(1, 2, "offset", 100), "experts.1.2.offset = 100 must be a multiple of expert_file.alignment 16384"),
    (_segment(1, 2, "offset", 0), "overlaps another expert's segment"),
    (_segment(0, 1, "bytes", 1000), "experts.0.1.bytes = 1000 must be "),
    (_segment(0, 1, "method", "layer_0_expert_1"), "experts.0.1.method must not be given for expert_layout int4"),
    (_segment(1, 3, "sha256", "x" * 64), "experts.1.3.sha256 = \"" + "x" * 64 + "\" must be 64 lowercase hex digits"),
    (_set(["expert_layout"], "none"), 'expert_layout = "none" must be int4 or xnnpack for an MoE model'),
    (_set(["quant"], "8da8w"), 'expert_layout = "int4" holds 8da4w experts, but quant is 8da8w'),
    (_set(["expert_file"], None), "expert_file must be given for expert_layout int4"),
    (_resegment(1, 2, _flip_first_byte), "the segment of expert 2 in layer 1 is corrupt (sha256 differs from "
                                         "experts.1.2.sha256); re-export the bundle"),
    (_outside_link_of("experts.bin"), "is a symbolic link to"),
])
def test_hostile_segment_fields_are_one_line_errors(runner, micro_bundle_8da4w, tmp_path, edit, message):
    """The int4 layout's own fields: the segment file, each segment's offset, size and sha256."""
    from cosmoes.export.manifest import load_manifest

    bundle = _edit_manifest(micro_bundle_8da4w, tmp_path, edit)
    proc = _run(runner, bundle, "--prompt-ids", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert message in proc.stderr
    with pytest.raises(CosmoesError):  # and the Python side refuses it too
        load_manifest(bundle, verify=True)


@pytest.mark.parametrize("edit, message", [
    (_set(["programs", "experts", "file"], "../experts.pte"), "programs.experts.file = \"../experts.pte\" must be "
                                                              "a plain file name inside the bundle directory"),
    (_set(["programs", "experts", "bytes"], -5), "programs.experts.bytes = -5 must be between 1 and"),
    (_set(["experts", "0", "1", "method"], "layer_0_expert_0"), "is already another expert's method"),
    (_set(["experts", "0", "1", "program"], "backbone"), 'experts.0.1.program = "backbone" must be "experts"'),
    (_set(["expert_file"], {"file": "experts.bin", "bytes": 1, "sha256": "0" * 64, "alignment": 4096}),
     "expert_file must be null for expert_layout xnnpack"),
    (_outside_link_of("experts.pte"), "is a symbolic link to"),
])
def test_hostile_expert_program_fields_are_one_line_errors(runner, micro_bundle_8da4w_xnnpack, tmp_path, edit,
                                                           message):
    """The xnnpack layout's own fields: the experts program and each expert's method of it."""
    proc = _run(runner, _edit_manifest(micro_bundle_8da4w_xnnpack, tmp_path, edit), "--prompt-ids", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert message in proc.stderr


def _last_line_error(proc) -> str:
    # the program was opened, so ExecuTorch's own log lines (hidden by cosmoes unless --verbose) come first
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[-1]


def test_a_memory_plan_the_program_does_not_have_is_refused(runner, micro_bundle_8da4w_xnnpack, tmp_path):
    bundle = _edit_manifest(micro_bundle_8da4w_xnnpack, tmp_path, _set(["memory", "planned_bytes", "experts"], [7]))
    line = _last_line_error(_run(runner, bundle, "--prompt-ids", "1"))
    assert line.endswith("experts.pte plans [8256] bytes of buffers, its manifest says [7] "
                         "(memory.planned_bytes.experts); re-export the bundle")


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "nested deeper than 64 levels"),
    ('{"format": "cosmoes-executorch-bundle", "format_version": 1e999}', "number out of range"),
    ('{"format": "cosmoes-executorch-bundle", "format_version": 2, "x": "\xff"}', "invalid UTF-8"),
    ('{"format": "cosmoes-executorch-bundle", "format_version": 0x2}', "invalid JSON"),
    ('{"format": "cosmoes-executorch-bundle", "x": "\\udc00"}', "lone low surrogate"),
    (" " * (17 << 20), "more than a manifest may"),
])
def test_hostile_json_is_refused_cleanly(runner, micro_bundle_8da4w, tmp_path, text, message):
    bundle = _copy(micro_bundle_8da4w, tmp_path)
    (bundle / MANIFEST_NAME).write_bytes(text.encode("latin-1"))
    proc = _run(runner, bundle, "--prompt-ids", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr


# -- altered programs whose manifest was rewritten to match: refused, never a crash --------------------------------
GARBLE_CASES = [(bundle, program, seed) for bundle in ("micro_bundle_8da4w_xnnpack", "micro_bundle_fp32")
                for program in ("backbone", "experts") for seed in range(10)]
GARBLE_CASES += [("micro_bundle_8da4w", "backbone", seed) for seed in range(10)]  # its experts: the hostile suite


def _garble(bundle, tmp_path, program, seed):
    """A copy of the bundle with 1-64 random bytes of one program overwritten and its size and sha256 rewritten."""
    import hashlib
    import random

    dst = _copy(bundle, tmp_path)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    path = dst / m["programs"][program]["file"]
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    at, n = rng.randrange(len(data)), rng.choice([1, 4, 16, 64])
    data[at:at + n] = bytes(rng.randrange(256) for _ in range(len(data[at:at + n])))
    path.write_bytes(bytes(data))
    m["programs"][program].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("bundle, program, seed", GARBLE_CASES)
def test_garbled_program_is_refused_or_runs_never_crashes(runner, bundle, program, seed, tmp_path, request):
    path = _garble(request.getfixturevalue(bundle), tmp_path, program, seed)
    proc = subprocess.run([str(runner), str(path), "--prompt-ids", "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18",
                           "--gen", "4", "--policy", "lru:2"], capture_output=True, text=True, errors="replace",
                          timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode in (0, 2), f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    if proc.returncode == 2:
        assert len(errors) == 1 and proc.stderr.rstrip("\n").endswith(errors[0])
    else:
        assert errors == []


def test_each_checkout_gets_its_own_build(monkeypatch, tmp_path):
    """A CMake build directory belongs to the checkout it was configured from (`cmake --install` reads that
    checkout's header and CMake files): the same sources in another clone key another cache entry."""
    from cosmoes.runtime import native

    here = native.source_hash()
    clone = tmp_path / "clone" / "export"
    shutil.copytree(native.source_dir(), clone)
    monkeypatch.setattr(native, "source_dir", lambda: clone)
    assert native.source_hash() != here


@pytest.mark.parametrize("policy", ["all", "swap"])
def test_an_fp16_kv_cache_gives_the_same_tokens_in_both_runtimes_at_half_the_bytes(runner, micro_bundle_8da4w,
                                                                                    micro_bundle_8da4w_kv16, policy,
                                                                                    prompt_ids):
    from cosmoes.export.manifest import load_manifest

    half, full = load_manifest(micro_bundle_8da4w_kv16), load_manifest(micro_bundle_8da4w)
    assert (half.memory["kv_dtype"], full.memory["kv_dtype"]) == ("fp16", "fp32")
    assert half.memory["kv_bytes_per_position"] * 2 == full.memory["kv_bytes_per_position"]
    py = BundleRuntime(micro_bundle_8da4w_kv16, policy=policy, threads=1)
    expected = py.generate(prompt_ids, 24)
    for threads in (1, 2):
        assert generate_native(micro_bundle_8da4w_kv16, prompt_ids, 24, policy=policy, threads=threads).tokens \
            == expected
