"""Exports the tiny bundles the fuzz targets open and lays out their fuzzing directory.

    .venv/bin/python fuzz/make_seed_bundle.py WORK

writes (the exports are reused while WORK/exports/*/manifest.json exist in this cosmoes' bundle format):
    WORK/exports/moe, WORK/exports/dense   a tiny MoE and a tiny dense model, exported for the host in fp32
    WORK/exports/moe-int4                  the tiny MoE in 8da4w, its experts int4 segments of experts.bin
    WORK/bundle/    backbone.pte + experts.pte (the MoE), dense.pte (the dense backbone), backbone4.pte +
                    experts.bin (the 8da4w MoE), inside.pte (a symbolic link to backbone.pte) and outside.pte (a link
                    leading out of the directory): the files every fuzzed manifest.json may name
    WORK/seeds/     moe.json, dense.json and moe_int4.json, valid manifests for WORK/bundle, to start the manifest
                    corpora from

The shapes are the smallest the exporter accepts, so a fuzz input that gets as far as opening and running the
programs stays cheap (milliseconds). fuzz/corpus/manifest/ holds copies of the seeds as this exporter wrote them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from cosmoes.config import ModelConfig

# vocab 64 (the bundles ship no tokenizer), 2 layers so the per-layer rules are exercised.
TINY_MOE = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=16, num_experts=4, top_k=2,
                       max_seq_len=16, name="fuzz-moe")
TINY_DENSE = TINY_MOE.replace(n_layers=1, num_experts=0, name="fuzz-dense")


def export(config: ModelConfig, out: Path, quant: str = "none") -> Path:
    """A random-init checkpoint of ``config`` exported for the host (max_chunk 4) to ``out``."""
    from cosmoes.checkpoint import save_checkpoint
    from cosmoes.export.bundle import ExportConfig, export_bundle
    from cosmoes.model import Transformer, init_weights

    ckpt = out.with_name(out.name + "-ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    save_checkpoint(init_weights(Transformer(config), seed=0), ckpt)
    shutil.rmtree(out, ignore_errors=True)
    export_bundle(ckpt, out, ExportConfig(target="host", quant=quant, max_chunk=4), progress=None)
    shutil.rmtree(ckpt)
    return out


def exported(work: Path, name: str, config: ModelConfig, quant: str = "none") -> Path:
    from cosmoes.formats import FORMAT_VERSION

    out, manifest = work / "exports" / name, work / "exports" / name / "manifest.json"
    # an export from before a format change would only exercise the runtimes' version check
    current = manifest.is_file() and json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION
    return out if current else export(config, out, quant)


def seed_manifest(bundle: Path, renames: dict[str, str]) -> dict:
    """The exported manifest with its program files renamed as they lie in WORK/bundle and machine paths dropped."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for program in [*manifest["programs"].values(), *([manifest["expert_file"]] if manifest["expert_file"] else [])]:
        program["file"] = renames.get(program["file"], program["file"])
        program.pop("export_seconds", None)
    manifest.pop("source", None)
    manifest.update(created="", export_seconds=None)  # the same bytes from every export
    return manifest


def lay_out(work: Path, moe: Path, dense: Path, moe_int4: Path) -> None:
    bundle, seeds = work / "bundle", work / "seeds"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    seeds.mkdir(exist_ok=True)
    shutil.copy(moe / "backbone.pte", bundle / "backbone.pte")
    shutil.copy(moe / "experts.pte", bundle / "experts.pte")
    shutil.copy(dense / "backbone.pte", bundle / "dense.pte")
    shutil.copy(moe_int4 / "backbone.pte", bundle / "backbone4.pte")
    shutil.copy(moe_int4 / "experts.bin", bundle / "experts.bin")
    (bundle / "inside.pte").symlink_to("backbone.pte")
    outside = work / "outside.pte"
    shutil.copy(moe / "backbone.pte", outside)  # a valid program, so only the link's direction is wrong
    (bundle / "outside.pte").symlink_to(outside.resolve())
    for name, source, renames in (("moe", moe, {}), ("dense", dense, {"backbone.pte": "dense.pte"}),
                                  ("moe_int4", moe_int4, {"backbone.pte": "backbone4.pte"})):
        text = json.dumps(seed_manifest(source, renames), indent=1) + "\n"
        (seeds / f"{name}.json").write_text(text)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_seed_bundle.py WORK", file=sys.stderr)
        return 2
    work = Path(argv[0])
    work.mkdir(parents=True, exist_ok=True)
    lay_out(work, exported(work, "moe", TINY_MOE), exported(work, "dense", TINY_DENSE),
            exported(work, "moe-int4", TINY_MOE, "8da4w"))
    print(f"fuzz bundle: {work / 'bundle'}; seed manifests: {work / 'seeds'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
