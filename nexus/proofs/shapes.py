"""The shape of the seeded transformer: plain data, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int
    seq_len: int
    pool_size: int
    weight_std: float
    rope_theta: float
    norm_eps: float

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> "ModelShape":
        return cls(**{name: parameters[name] for name in cls.__dataclass_fields__})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
