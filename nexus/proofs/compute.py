"""The compute of the `poc` kind: per-nonce inputs, the target vector and batched
distances with the seeded transformer. Imports torch, so only workers and
verifiers load it; the API validates proof requests without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nexus.proofs.base import BatchHook
from nexus.proofs.model import deterministic_torch, model_for, pick_device
from nexus.proofs.poc import preset_of
from nexus.proofs.seeds import rng
from nexus.proofs.shapes import ModelShape

__all__ = ["describe_device", "distances", "nonce_inputs", "pick_device", "target_vector"]


def nonce_inputs(seed: str, node: str, nonce: int, shape: ModelShape) -> tuple[np.ndarray, np.ndarray]:
    """(seq_len x dim float32 embeddings, vocabulary permutation) for one nonce."""
    base = f"{seed}_{node}_nonce{nonce}"
    embeddings = rng(base).standard_normal((shape.seq_len, shape.dim), dtype=np.float32)
    permutation = rng(f"{base}_permutation").permutation(shape.vocab_size)
    return embeddings, permutation


def target_vector(seed: str, vocab_size: int) -> np.ndarray:
    target = rng(f"{seed}_target").standard_normal(vocab_size)
    return target / np.linalg.norm(target)


def distances(
    seed: str,
    parameters: dict[str, Any],
    node: str,
    nonces: list[int],
    device: torch.device | None = None,
    batch_size: int | None = None,
    on_batch: BatchHook | None = None,
) -> np.ndarray:
    """Distance of every nonce (float64), computed in batches on `device`."""
    preset = preset_of(parameters)
    device = device or pick_device()
    batch_size = batch_size or preset.batch_size(device.type)
    shape = ModelShape.from_parameters(parameters)
    out = np.empty(len(nonces), dtype=np.float64)
    with deterministic_torch():
        model = model_for(seed, parameters, device)
        target = torch.from_numpy(target_vector(seed, shape.vocab_size)).to(device)
        for start in range(0, len(nonces), batch_size):
            batch = nonces[start:start + batch_size]
            out[start:start + len(batch)] = _batch_distances(model, seed, node, batch, shape, target, device)
            if on_batch is not None:
                on_batch(start + len(batch), len(nonces))
    return out


def _batch_distances(model, seed: str, node: str, batch: list[int], shape: ModelShape,
                     target: torch.Tensor, device: torch.device) -> np.ndarray:
    inputs = [nonce_inputs(seed, node, n, shape) for n in batch]
    embeddings = torch.from_numpy(np.stack([e for e, _ in inputs])).to(device)
    permutations = torch.from_numpy(np.stack([p for _, p in inputs])).to(device)
    logits = model.last_logits(embeddings).double()
    permuted = logits.gather(1, permutations)
    unit = permuted / permuted.norm(dim=1, keepdim=True)
    return (unit - target).norm(dim=1).cpu().numpy()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}-threads"
