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
    assert one_line_error(bundle).startswith("corrupt bundle manifest")
    (bundle / "manifest.json").write_text('{"hello": 1}')
    assert "not a cosmoes bundle manifest" in one_line_error(bundle)


def test_newer_format_version_asks_for_an_upgrade(bundle):
    edit_manifest(bundle, format_version=FORMAT_VERSION + 1)
    assert one_line_error(bundle) == (f"bundle format {FORMAT_VERSION + 1} is newer than this cosmoes supports "
                                      f"({FORMAT_VERSION}); upgrade cosmoes")


def test_older_format_version_asks_for_a_re_export(bundle):
    edit_manifest(bundle, format_version=FORMAT_VERSION - 1)
    assert one_line_error(bundle) == (f"bundle format {FORMAT_VERSION - 1} is older than this cosmoes supports "
                                      f"({FORMAT_VERSION}): re-export it with `cosmoes export`")


def test_refused_and_unknown_quantisation_in_manifest(bundle):
    edit_manifest(bundle, quant="4w")
    assert "4w is not supported by the XNNPACK delegate" in one_line_error(bundle)
    edit_manifest(bundle, quant="int3")
    assert "unknown quantisation 'int3'" in one_line_error(bundle)


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
