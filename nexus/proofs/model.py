"""The seeded Llama-style transformer behind the proof-of-compute kind.

All weights come from one pool of N(0, weight_std) values drawn from the proof
seed; each tensor is the pool read cyclically from an offset derived from a hash
of the tensor's name. Building the model therefore costs one pool draw plus
copies, yet nobody can compute anything before the seed is known.

The forward pass is written out by hand (RMSNorm, rotary attention with a causal
mask, SwiGLU) instead of calling fused kernels, so CPU and CUDA run the same
float32 arithmetic and a verifier on other hardware lands within tolerance.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import threading
from typing import Any, Iterator

import numpy as np
import torch

from nexus.proofs.seeds import offset_for, rng
from nexus.proofs.shapes import ModelShape


def tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every weight tensor by name; the names seed the pool offsets."""
    d, f = shape.dim, shape.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(shape.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (d, d),
            p + "attention.wk.weight": (d, d),
            p + "attention.wv.weight": (d, d),
            p + "attention.wo.weight": (d, d),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
        })
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (shape.vocab_size, d)
    return shapes


def weight_pool(seed: str, shape: ModelShape) -> np.ndarray:
    return (rng(f"{seed}_weights").standard_normal(shape.pool_size) * shape.weight_std).astype(np.float32)


def tensor_from_pool(pool: np.ndarray, name: str, dims: tuple[int, ...]) -> np.ndarray:
    """pool[(offset + i) % len(pool)] for i < numel, reshaped to dims."""
    offset = offset_for(name, len(pool))
    values = np.resize(np.roll(pool, -offset), math.prod(dims))
    if name.endswith("norm.weight"):
        # Norm gains sit around one, as in a trained Llama: gains near zero would
        # shrink every layer's contribution below the verification tolerance,
        # letting a prover skip the layers unnoticed.
        values = values + np.float32(1.0)
    return values.reshape(dims)


class SeededTransformer:
    """Input embeddings (batch, seq, dim) -> last-token logits (batch, vocab), float32."""

    def __init__(self, seed: str, shape: ModelShape, device: torch.device):
        self.shape = shape
        self.device = device
        pool = weight_pool(seed, shape)
        self.weights = {
            name: torch.from_numpy(tensor_from_pool(pool, name, dims)).to(device)
            for name, dims in tensor_shapes(shape).items()
        }
        self.cos, self.sin = _rotary_tables(shape, device)
        causal = torch.ones(shape.seq_len, shape.seq_len, dtype=torch.bool, device=device).tril()
        self.mask = torch.zeros(shape.seq_len, shape.seq_len, device=device).masked_fill(~causal, float("-inf"))

    @torch.inference_mode()
    def last_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for i in range(self.shape.n_layers):
            p = f"layers.{i}."
            x = x + self._attention(self._norm(x, p + "attention_norm.weight"), p)
            x = x + self._feed_forward(self._norm(x, p + "ffn_norm.weight"), p)
        last = self._norm(x[:, -1, :], "norm.weight")
        return last @ self.weights["output.weight"].T

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.shape.norm_eps)
        return x * scale * self.weights[name]

    def _attention(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, head_dim = self.shape.n_heads, self.shape.head_dim

        def project(name: str) -> torch.Tensor:
            out = x @ self.weights[prefix + f"attention.{name}.weight"].T
            return out.view(batch, seq, heads, head_dim).transpose(1, 2)

        q, k, v = _rotate(project("wq"), self.cos, self.sin), _rotate(project("wk"), self.cos, self.sin), project("wv")
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim) + self.mask
        mixed = torch.softmax(scores, dim=-1) @ v
        mixed = mixed.transpose(1, 2).reshape(batch, seq, self.shape.dim)
        return mixed @ self.weights[prefix + "attention.wo.weight"].T

    def _feed_forward(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.weights
        gate = torch.nn.functional.silu(x @ w[prefix + "feed_forward.w1.weight"].T)
        up = x @ w[prefix + "feed_forward.w3.weight"].T
        return (gate * up) @ w[prefix + "feed_forward.w2.weight"].T


def _rotary_tables(shape: ModelShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed in float64 with numpy so every device starts from identical tables.
    half = shape.head_dim // 2
    inv_freq = 1.0 / (shape.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / shape.head_dim))
    angles = np.outer(np.arange(shape.seq_len, dtype=np.float64), inv_freq)
    cos = torch.from_numpy(np.cos(angles).astype(np.float32)).to(device)
    sin = torch.from_numpy(np.sin(angles).astype(np.float32)).to(device)
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on (batch, heads, seq, head_dim), half-split layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=2)
def _cached_model(seed: str, parameters_json: str, device_name: str) -> SeededTransformer:
    shape = ModelShape.from_parameters(json.loads(parameters_json))
    return SeededTransformer(seed, shape, torch.device(device_name))


def model_for(seed: str, parameters: dict[str, Any], device: torch.device) -> SeededTransformer:
    """One model per (seed, parameters, device) per process: segments of one proof reuse it."""
    return _cached_model(seed, json.dumps(parameters, sort_keys=True), str(device))


_flags_lock = threading.Lock()
_flags_users = 0
_saved_flags: tuple = ()


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Full float32 matmuls (no TF32) and deterministic kernels while any proof runs.

    The flags are process-wide and a threads-pool worker runs several jobs at
    once, so the first user saves and sets them and the last one restores them
    (a segment finishing early must not turn TF32 back on under another)."""
    global _flags_users, _saved_flags
    with _flags_lock:
        if _flags_users == 0:
            _saved_flags = _read_flags()
            _write_flags((True, True, "highest", False, False))
        _flags_users += 1
    try:
        yield
    finally:
        with _flags_lock:
            _flags_users -= 1
            if _flags_users == 0:
                _write_flags(_saved_flags)


def _read_flags() -> tuple:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


def _write_flags(flags: tuple) -> None:
    deterministic, warn_only, precision, cuda_tf32, cudnn_tf32 = flags
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
