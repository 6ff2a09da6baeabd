"""Facts about the host that benchmark figures name (cosmoes/system.py)."""

from pathlib import Path

from cosmoes.system import cpu_cache, cpu_description


def _cache(root: Path, index: int, level: str, kind: str, size: str) -> None:
    d = root / f"index{index}"
    d.mkdir(parents=True)
    (d / "level").write_text(level + "\n")
    (d / "type").write_text(kind + "\n")
    (d / "size").write_text(size + "\n")


def test_the_last_level_cache_is_the_deepest_data_cache(tmp_path):
    _cache(tmp_path, 0, "1", "Data", "48K")
    _cache(tmp_path, 1, "1", "Instruction", "64K")
    _cache(tmp_path, 2, "2", "Unified", "2048K")
    _cache(tmp_path, 3, "3", "Unified", "491520K")
    assert cpu_cache(tmp_path) == "L3 480 MiB"


def test_a_cache_size_that_is_not_a_number_is_skipped(tmp_path):
    _cache(tmp_path, 0, "2", "Unified", "1024K")
    _cache(tmp_path, 1, "3", "Unified", "-5K")
    _cache(tmp_path, 2, "x", "Unified", "8M")
    assert cpu_cache(tmp_path) == "L2 1 MiB"
    assert cpu_cache(tmp_path / "absent") == ""


def test_the_description_names_this_hosts_cache_when_sysfs_has_it():
    real = cpu_cache()
    described = cpu_description()
    assert " cores" in described
    assert described.endswith(", " + real) if real else described.endswith(" cores")
