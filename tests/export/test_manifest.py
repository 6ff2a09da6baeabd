"""cosmoes.export.manifest: what a bundle's manifest records, and one-line errors for every kind of broken bundle
(missing, truncated, altered or garbage files, newer format, refused quantisation, missing methods), raised before
any model code runs — also through the CLI (exit 2, one line)."""

import json
import shutil
import sys

import pytest

from cosmoes.cli import main
from cosmoes.errors import CosmoesError
from cosmoes.export.manifest import FORMAT_VERSION, Manifest, load_manifest, pte_method_names, sha256_file


@pytest.fixture
def bundle(micro_bundle_fp32, tmp_path):
    """A private copy of the fp32 micro bundle that a test may break."""
    return shutil.copytree(micro_bundle_fp32, tmp_path / "bundle")


def edit_manifest(bundle, **changes):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def restamp(bundle, program="experts"):
    """Make the manifest agree with the file as it is now, so the .pte checks themselves are exercised."""
    data = json.loads((bundle / "manifest.json").read_text())
    prog = data["programs"][program]
    prog["bytes"] = (bundle / prog["file"]).stat().st_size
    prog["sha256"] = sha256_file(bundle / prog["file"])
    (bundle / "manifest.json").write_text(json.dumps(data))


def one_line_error(bundle, verify=True) -> str:
    with pytest.raises(CosmoesError) as exc:
        load_manifest(bundle, verify=verify)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_manifest_records_format_config_and_programs(micro_bundle_fp32, micro_config):
    m = load_manifest(micro_bundle_fp32)
    assert isinstance(m, Manifest)
    assert m.format_version == FORMAT_VERSION and m.cosmoes_version and m.created
    assert (m.target, m.quant, m.quant_embedding, m.group_size) == ("host", "none", "none", None)
    assert m.model_config() == micro_config
    assert m.max_seq_len == micro_config.max_seq_len and m.max_chunk == 16
    assert m.tokenizer == "tokenizer" and (micro_bundle_fp32 / "tokenizer" / "tokenizer.json").is_file()
    backbone = ["embed", "context"] + [f"layer_{i}" for i in range(micro_config.n_layers)] + ["head"]
    assert m.programs["backbone"]["methods"] == backbone
    for prog in m.programs.values():
        path = micro_bundle_fp32 / prog["file"]
        assert prog["bytes"] == path.stat().st_size and prog["sha256"] == sha256_file(path)


def test_manifest_lists_every_expert_with_its_method_and_bytes(micro_bundle_fp32, micro_config):
    m = load_manifest(micro_bundle_fp32)
    cfg = micro_config
    stored = set(pte_method_names(micro_bundle_fp32 / "experts.pte"))
    assert sorted(m.experts) == list(range(cfg.n_layers))
    for layer in range(cfg.n_layers):
        assert sorted(m.experts[layer]) == list(range(cfg.num_experts))
        for e in range(cfg.num_experts):
            entry = m.expert(layer, e)
            assert entry["program"] == "experts" and entry["method"] in stored
            # fp32 SwiGLU expert: three dim x ffn matrices of 4-byte floats
            assert entry["bytes"] == 3 * cfg.dim * cfg.ffn_dim * 4
    assert stored == set(m.programs["experts"]["methods"])
    assert m.expert_bytes() <= m.programs["experts"]["bytes"]
    assert m.non_expert_bytes["embedding"] == cfg.vocab_size * cfg.dim * 4
    # attention + two norms + router per layer; the KV caches are planned memory, not stored weights
    per_layer = cfg.attention_params() + 2 * cfg.dim + cfg.dim * cfg.num_experts
    assert cfg.n_layers * per_layer * 4 <= m.non_expert_bytes["attention"] <= 1.02 * cfg.n_layers * per_layer * 4
    with pytest.raises(CosmoesError, match="no expert 9 in layer 0"):
        m.expert(0, 9)


def test_missing_bundle_and_missing_manifest(tmp_path):
    assert "bundle not found" in one_line_error(tmp_path / "nope")
    assert "no manifest.json" in one_line_error(tmp_path)


def test_corrupt_and_foreign_manifest(bundle):
    (bundle / "manifest.json").write_text('{"format": "cosmoes-executorch-bundle", "format_version": ')
    assert one_line_error(bundle).startswith(f"{bundle / 'manifest.json'}: not valid JSON (")
    (bundle / "manifest.json").write_text('{"hello": 1}')
    assert one_line_error(bundle) == f"{bundle / 'manifest.json'}: format is missing: not a cosmoes bundle manifest"


def test_newer_format_version_asks_for_an_upgrade(bundle):
    edit_manifest(bundle, format_version=FORMAT_VERSION + 1)
    assert one_line_error(bundle) == (f"{bundle / 'manifest.json'}: format_version = {FORMAT_VERSION + 1} is newer "
                                      f"than this cosmoes supports ({FORMAT_VERSION}); upgrade cosmoes")


def test_older_format_version_names_the_command_that_re_exports_it(bundle):
    source = json.loads((bundle / "manifest.json").read_text())["source"]["checkpoint"]
    edit_manifest(bundle, format_version=FORMAT_VERSION - 1)
    assert one_line_error(bundle) == (f"{bundle / 'manifest.json'}: format_version = {FORMAT_VERSION - 1} is older "
                                      f"than this cosmoes supports ({FORMAT_VERSION}); re-export it: "
                                      f"`cosmoes export {source} --target host --out {bundle}`")


def test_older_format_of_a_preset_names_the_preset_and_its_seed(bundle):
    edit_manifest(bundle, format_version=2, source={"preset": "wearable-moe", "seed": 3}, target="android")
    assert one_line_error(bundle).endswith(f"re-export it: `cosmoes export wearable-moe --seed 3 --target android "
                                           f"--out {bundle}`")


def test_refused_and_unknown_quantisation_in_manifest(bundle):
    edit_manifest(bundle, quant="4w")
    assert "4w is not supported by the XNNPACK delegate" in one_line_error(bundle)
    edit_manifest(bundle, quant="int3")
    assert one_line_error(bundle).endswith('quant = "int3" must be "none", "8da4w", "8da8w" or "4w"')


def test_missing_program_file(bundle):
    (bundle / "experts.pte").unlink()
    assert one_line_error(bundle, verify=False).startswith("bundle file missing")


def test_truncated_program_is_caught_by_size_even_without_verify(bundle):
    data = (bundle / "experts.pte").read_bytes()
    (bundle / "experts.pte").write_bytes(data[: len(data) // 2])
    assert "truncated or replaced" in one_line_error(bundle, verify=False)


def test_altered_bytes_are_caught_by_sha256_only_when_verifying(bundle):
    path = bundle / "experts.pte"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "sha256 differs" in one_line_error(bundle)
    assert load_manifest(bundle, verify=False).quant == "none"  # size matches: the cheap check passes


def test_garbage_pte_gives_one_line_not_a_native_crash(bundle):
    # The native loader aborts the whole process on some malformed files; the manifest check must stop first.
    path = bundle / "experts.pte"
    path.write_bytes(bytes(range(256)) * 64)
    restamp(bundle)
    assert "is not an ExecuTorch program" in one_line_error(bundle)


@pytest.mark.parametrize("start", [8 + 32, 4096])
def test_pte_with_valid_header_but_scrambled_body(bundle, start):
    path = bundle / "experts.pte"
    data = bytearray(path.read_bytes())
    data[start:start + 20000] = bytes((i * 7919) % 251 for i in range(20000))
    path.write_bytes(bytes(data))
    restamp(bundle)
    message = one_line_error(bundle)
    assert "ExecuTorch" in message or "lacks method" in message


def test_truncated_pte_with_matching_manifest_is_reported_as_truncated(bundle):
    path = bundle / "experts.pte"
    path.write_bytes(path.read_bytes()[:1000])
    restamp(bundle)
    message = one_line_error(bundle)
    assert "is truncated" in message and "1000 bytes" in message


def test_method_listed_but_absent_from_program(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    data["programs"]["experts"]["methods"].append("layer_7_expert_7")
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert "lacks method 'layer_7_expert_7'" in one_line_error(bundle)


def test_cli_reports_broken_bundle_in_one_line_with_exit_2(bundle, monkeypatch, capsys):
    (bundle / "experts.pte").write_bytes(b"\0" * 10)
    monkeypatch.setattr(sys, "argv", ["cosmoes", "inspect", str(bundle)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: bundle file ") and err.count("\n") == 1 and "Traceback" not in err


# -- the manifest schema (cosmoes.schema.ManifestSchema): each rule's exact one-line error ------------------------------
# The micro bundle: 2 layers of 4 experts (top_k 2), max_seq_len 64, programs backbone and experts, quant none.

def edit_field(bundle, dotted: str, value=None, delete: bool = False):
    """Set (or delete) one dotted field of the bundle's manifest.json."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    *parents, key = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    if delete:
        del node[key]
    else:
        node[key] = value
    path.write_text(json.dumps(data))


PLAIN = "must be a plain file name inside the bundle"
MANIFEST_RULES = [
    ("config.top_k", 100, "config.top_k = 100 must be between 1 and num_experts (4)"),
    ("config.n_heads", 0, "config.n_heads = 0 must be at least 1"),
    ("config.dim", 10 ** 400, "config.dim = a 401-digit integer must be at most 65536"),
    ("config.hidden_size", 64, "config.hidden_size = 64 is not a known field"),
    ("format", "cosmoes-bundle", 'format = "cosmoes-bundle" is not "cosmoes-executorch-bundle": not a cosmoes bundle '
                                 "manifest"),
    ("format_version", "2", 'format_version = "2" must be an integer'),
    ("format_version", 2.0, "format_version = 2.0 must be an integer"),
    ("target", "watch", 'target = "watch" must be "android", "host" or "ios"'),
    ("quant_embedding", "int3", 'quant_embedding = "int3" must be "none", "int8" or "int4"'),
    ("max_seq_len", 32, "max_seq_len = 32 must equal config.max_seq_len (64)"),
    ("max_chunk", 0, "max_chunk = 0 must be at least 1"),
    ("max_chunk", 65, "max_chunk = 65 must be between 1 and max_seq_len (64)"),
    ("threads", -1, "threads = -1 must be at least 0"),
    ("threads", 1025, "threads = 1025 must be at most 1024"),
    ("threads", True, "threads = true must be an integer"),
    ("group_size", 48, "group_size = 48 must be a multiple of 32"),
    ("group_size", 0, "group_size = 0 must be at least 32"),
    ("programs.experts.file", "../experts.pte", f'programs.experts.file = "../experts.pte" {PLAIN}'),
    ("programs.experts.file", "/etc/passwd", f'programs.experts.file = "/etc/passwd" {PLAIN}'),
    ("programs.experts.file", "sub/experts.pte", f'programs.experts.file = "sub/experts.pte" {PLAIN}'),
    ("programs.experts.file", "sub\\experts.pte", f'programs.experts.file = "sub\\\\experts.pte" {PLAIN}'),
    ("programs.experts.file", "..", f'programs.experts.file = ".." {PLAIN}'),
    ("programs.experts.file", "", f'programs.experts.file = "" {PLAIN}'),
    ("programs.experts.bytes", -1, "programs.experts.bytes = -1 must be at least 0"),
    ("programs.experts.sha256", "abc", 'programs.experts.sha256 = "abc" must match ^[0-9a-f]{64}$'),
    ("programs.experts.methods", "layer_0_expert_0", 'programs.experts.methods = "layer_0_expert_0" must be a list'),
    ("programs.experts.methods", [1], "programs.experts.methods.0 = 1 must be a string"),
    ("experts.0.1.method", "nope", 'experts.0.1.method = "nope" is not a method of program "experts"'),
    ("experts.1.0.program", "nope", 'experts.1.0.program = "nope" is not a program of this bundle (backbone, '
                                    "experts)"),
    ("experts.0.0.bytes", 0, "experts.0.0.bytes = 0 must be at least 1"),
    ("experts.0.9", {"program": "experts", "method": "layer_0_expert_0", "bytes": 1},
     'experts.0 has an entry "9" beyond config.num_experts = 4'),
    ("experts.x", {}, 'experts has an entry "x" beyond config.n_layers = 2'),
    ("config.num_experts", 0, "experts must be empty for a dense model (config.num_experts = 0)"),
    ("non_expert_bytes.embedding", -1, "non_expert_bytes.embedding = -1 must be at least 0"),
    ("non_expert_bytes.embedding", 1.5, "non_expert_bytes.embedding = 1.5 must be an integer"),
    ("memory.kv_bytes_per_position", 4096, "memory.kv_bytes_per_position = 4096 must be 1024 (fp32 keys and values "
                                           "of config.n_layers layers)"),
    ("memory.kv_dtype", "fp16", "memory.kv_bytes_per_position = 1024 must be 512 (fp16 keys and values "
                                "of config.n_layers layers)"),
    ("memory.kv_dtype", "bf16", 'memory.kv_dtype = "bf16" must be "fp32" or "fp16"'),
    ("memory.kv_buffer.id", 7, "memory.kv_buffer is not a buffer of memory.planned_bytes"),
    ("memory.kv_buffer.id", -1, "memory.kv_buffer.id = -1 must be at least 0"),
    ("memory.kv_buffer.program", "experts", "memory.kv_buffer is not a buffer of memory.planned_bytes"),
    ("memory.planned_bytes.nope", [1], 'memory.planned_bytes names "nope", not a program of this bundle'),
    ("memory.planned_bytes.backbone", [1, 2], "memory.planned_bytes.backbone buffer 1 has 2 bytes, not the 65536 of "
                                              "the KV caches for max_seq_len 64"),
    ("memory.planned_bytes.backbone", [1, -2], "memory.planned_bytes.backbone.1 = -2 must be at least 0"),
    ("tokenizer", "../../etc", f'tokenizer = "../../etc" {PLAIN}'),
    ("tokenizer", "/tmp", f'tokenizer = "/tmp" {PLAIN}'),
    ("source.seed", "0", 'source.seed = "0" must be an integer'),
    ("export_seconds", float("inf"), "export_seconds = Infinity must be a finite number"),
    ("created", 5, "created = 5 must be a string"),
    ("surprise", 1, "surprise = 1 is not a known field"),
]


@pytest.mark.parametrize("dotted,value,message", MANIFEST_RULES)
def test_each_manifest_rule_is_one_line_naming_file_field_and_value(bundle, dotted, value, message):
    edit_field(bundle, dotted, value)
    assert one_line_error(bundle, verify=False) == f"{bundle / 'manifest.json'}: {message}"


@pytest.mark.parametrize("dotted,message", [
    ("programs", "programs is missing"), ("config", "config is missing"), ("experts.1", "experts.1 is missing "
                                                                                     "(config.n_layers = 2)"),
    ("experts.0.3", "experts.0.3 is missing (config.num_experts = 4)"), ("config.dim", "config.dim is missing"),
    ("format_version", "format_version is missing"),
])
def test_missing_manifest_fields(bundle, dotted, message):
    edit_field(bundle, dotted, delete=True)
    assert one_line_error(bundle, verify=False) == f"{bundle / 'manifest.json'}: {message}"


def test_programs_must_have_every_method_the_model_runs(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    data["programs"]["backbone"]["methods"].remove("head")
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert one_line_error(bundle, verify=False).endswith(
        'programs have no method "head" (the config needs embed, context, head, layer_i for i < n_layers 2)')


def test_8da4w_needs_a_group_size(bundle):
    edit_manifest(bundle, quant="8da4w", group_size=None)
    assert one_line_error(bundle, verify=False).endswith("group_size = null must be set for quant 8da4w")


@pytest.mark.parametrize("data,message", [
    (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b"\xef\xbb\xbf{}", "not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0))"),
    (b"\xff\xfe{}", "not valid UTF-8 (byte 0)"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON (nested too deeply)"),
    (b'{"format":' * 50_000 + b"1" + b"}" * 50_000, "not valid JSON (nested too deeply)"),
    (b"[1, 2]", "must hold a JSON object, not [1, 2]"),
    (b'"x"', 'must hold a JSON object, not "x"'),
    (b'{"format": "cosmoes-executorch-bundle", "format": "x"}', 'not valid JSON (duplicate key "format")'),
])
def test_damaged_manifest_files_are_one_line(bundle, data, message):
    (bundle / "manifest.json").write_bytes(data)
    assert one_line_error(bundle, verify=False) == f"{bundle / 'manifest.json'}: {message}"


def test_huge_numbers_in_the_manifest_text(bundle):
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"max_chunk": 16', '"max_chunk": 1e400'))
    assert one_line_error(bundle, verify=False).endswith("max_chunk = Infinity must be an integer")
    (bundle / "manifest.json").write_text(text.replace('"max_chunk": 16', '"max_chunk": 1' + "0" * 400))
    assert one_line_error(bundle, verify=False).endswith("max_chunk = a 401-digit integer must be at most 1048576")
    (bundle / "manifest.json").write_text(text.replace('"max_chunk": 16', '"max_chunk": NaN'))
    assert one_line_error(bundle, verify=False).endswith("max_chunk = NaN must be an integer")


def test_a_program_symlinked_out_of_the_bundle_is_refused_before_it_is_opened(bundle, tmp_path):
    outside = tmp_path / "elsewhere.pte"
    (bundle / "experts.pte").rename(outside)
    (bundle / "experts.pte").symlink_to(outside)
    assert one_line_error(bundle) == (f'{bundle / "manifest.json"}: programs.experts.file = "experts.pte" links to '
                                      f"{outside}, outside the bundle")
    (bundle / "experts.pte").unlink()
    (bundle / "tokenizer").rename(tmp_path / "tok")
    (bundle / "tokenizer").symlink_to(tmp_path / "tok")
    outside.rename(bundle / "experts.pte")
    assert one_line_error(bundle, verify=False).endswith(f'tokenizer = "tokenizer" links to {tmp_path / "tok"}, '
                                                         "outside the bundle")


def test_a_symlink_that_stays_inside_the_bundle_is_fine(bundle):
    (bundle / "store").mkdir()
    (bundle / "experts.pte").rename(bundle / "store" / "experts.pte")
    (bundle / "experts.pte").symlink_to("store/experts.pte")
    assert load_manifest(bundle).programs["experts"]["file"] == "experts.pte"


def test_cli_reports_a_schema_error_in_one_line_with_exit_2(bundle, monkeypatch, capsys):
    edit_field(bundle, "config.top_k", 100)
    monkeypatch.setattr(sys, "argv", ["cosmoes", "inspect", str(bundle)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == f"error: {bundle / 'manifest.json'}: config.top_k = 100 must be between 1 and num_experts (4)\n"
