"""Orchestration over the whole toolchain: the small-scale reproduction of Tables 2–3 and the end-to-end demo."""
