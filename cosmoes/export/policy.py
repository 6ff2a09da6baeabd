"""The expert cache policies a bundle runs under (§3.4.2, Eq. 8): their grammar, in one place for Python. No torch.

  all    every expert stays resident once loaded
  swap   Eq. 8: per layer exactly the experts the current token selected
  lru:N  at most N experts per layer (N >= top_k, else one token's experts would not fit)

The native runtime (export/runtime/runtime.cpp, ``Policy::parse``) reads the same grammar with the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosmoes.errors import CosmoesError


@dataclass(frozen=True)
class CachePolicy:
    """Which experts stay resident: kind all, swap or lru; capacity is the N of lru:N (experts per layer)."""

    kind: str
    capacity: int | None = None

    def __str__(self) -> str:
        return f"lru:{self.capacity}" if self.kind == "lru" else self.kind

    def experts_per_layer(self, top_k: int, num_experts: int) -> int:
        """Experts resident per layer once the cache is full (the worst case)."""
        if self.kind == "all":
            return num_experts
        if self.kind == "swap":
            return top_k
        return min(self.capacity, num_experts)


def parse_policy(policy: str, top_k: int) -> CachePolicy:
    """``all`` | ``swap`` | ``lru:N``; an LRU cache smaller than top_k could not hold one token's experts."""
    text = str(policy).strip().lower()
    if text in ("all", "swap"):
        return CachePolicy(text)
    head, _, num = text.partition(":")
    if head != "lru" or not num.isdigit():
        raise CosmoesError(f"unknown expert cache policy {policy!r}: use all, swap or lru:N (e.g. lru:4)")
    if int(num) < top_k:
        raise CosmoesError(f"expert cache policy {policy}: lru needs N >= top_k = {top_k} experts per layer")
    return CachePolicy("lru", int(num))


def valid_policies(top_k: int, num_experts: int) -> list[str]:
    """Every policy the runtimes accept for a model: swap, lru:N for N = top_k .. num_experts, then all."""
    return ["swap", *[f"lru:{n}" for n in range(top_k, num_experts + 1)], "all"]


def sweep_policies(top_k: int, num_experts: int) -> list[str]:
    """The policies a benchmark sweep runs: swap, lru:N for N = top_k, 2·top_k, ... below num_experts, then all."""
    return ["swap", *[f"lru:{n}" for n in range(top_k, num_experts, top_k)], "all"]


__all__ = ["CachePolicy", "parse_policy", "valid_policies", "sweep_policies"]
