"""The poc distance is a function of (seed, parameters, node, nonce) alone: same inputs, same
distance, in this process and in another one; any change of input changes it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nexus.proofs.compute import distances, nonce_inputs, target_vector
from nexus.proofs.poc import PRESETS, r_target_for
from nexus.proofs.shapes import ModelShape

pytestmark = pytest.mark.timeout(120)

TINY = PRESETS["tiny"].parameters
NONCES = [0, 1, 2, 3, 97, 1000, 123_456]

_CHILD = """
import json, sys
import torch
from nexus.proofs.compute import distances
from nexus.proofs.poc import PRESETS
seed, node, nonces, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
print(json.dumps([float(d) for d in distances(seed, PRESETS["tiny"].parameters, node, nonces)]))
"""


def distances_in_another_process(seed: str, node: str, nonces: list[int]) -> list[float]:
    """The child computes on as many CPU threads as this process: a float32 matmul splits its sums by
    thread, so another thread count moves a distance by ~1e-8 (well inside the verifier's tolerance, as
    the batch-size test shows), and an earlier test in this process may have set the count."""
    threads = str(torch.get_num_threads())
    out = subprocess.run([sys.executable, "-c", _CHILD, seed, node, json.dumps(nonces), threads],
                         capture_output=True, text=True, check=True, timeout=90)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_seed_and_nonce_give_the_same_distance_on_two_runs():
    first = distances("seed-1", TINY, "node-a", NONCES)
    second = distances("seed-1", TINY, "node-a", NONCES)
    assert first.tolist() == second.tolist()


def test_batch_size_moves_a_distance_far_less_than_the_verification_tolerance():
    """float32 matmuls block differently per batch shape (~1e-8 here): a verifier recomputing a
    sample in other batches must land well inside distance_tolerance (1e-4)."""
    whole = distances("seed-1", TINY, "node-a", NONCES)
    one_by_one = distances("seed-1", TINY, "node-a", NONCES, batch_size=1)
    np.testing.assert_allclose(whole, one_by_one, rtol=0, atol=1e-6)


def test_same_seed_and_nonce_give_the_same_distance_in_two_processes():
    here = distances("seed-1", TINY, "node-a", NONCES).tolist()
    there = distances_in_another_process("seed-1", "node-a", NONCES)
    assert here == there


def test_seed_node_and_nonce_each_change_the_distance():
    base = distances("seed-1", TINY, "node-a", [5])[0]
    assert distances("seed-2", TINY, "node-a", [5])[0] != base
    assert distances("seed-1", TINY, "node-b", [5])[0] != base
    assert distances("seed-1", TINY, "node-a", [6])[0] != base


def test_inputs_and_target_are_reproducible_and_well_formed():
    shape = ModelShape.from_parameters(TINY)
    emb1, perm1 = nonce_inputs("s", "n", 7, shape)
    emb2, perm2 = nonce_inputs("s", "n", 7, shape)
    assert emb1.shape == (shape.seq_len, shape.dim) and emb1.dtype == np.float32
    assert np.array_equal(emb1, emb2) and np.array_equal(perm1, perm2)
    assert sorted(perm1.tolist()) == list(range(shape.vocab_size))
    target = target_vector("s", shape.vocab_size)
    assert abs(np.linalg.norm(target) - 1.0) < 1e-12


def test_r_target_lets_about_the_intended_fraction_through():
    """The radius formula in poc.py predicts the pass rate; measure it on real nonces."""
    found = distances("fraction-check", TINY, "node-a", list(range(2000)))
    observed = float((found < TINY["r_target"]).mean())
    assert 0.06 < observed < 0.14, observed  # 10 % intended; binomial sd over 2000 nonces is 0.7 %
    assert r_target_for(0.5, 1024) == pytest.approx(np.sqrt(2.0), abs=1e-6)
