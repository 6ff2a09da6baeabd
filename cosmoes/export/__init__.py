"""On-device export (§3.4.2): ExecuTorch bundles with one loadable, freeable method per expert, and their runtime."""

from cosmoes.export.manifest import FORMAT_VERSION, Manifest, load_manifest, write_manifest

__all__ = ["FORMAT_VERSION", "Manifest", "load_manifest", "write_manifest"]
