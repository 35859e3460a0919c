"""Shared fixtures: per-test seeds, a tiny random Llama (spec + model) and calibration windows.

Everything is tiny (hidden 16, two layers, vocabulary 64) so that the whole compression-math
suite runs in seconds on two CPU cores.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Set before any test module imports
# triton (triton.jit reads it when a kernel is decorated), so that the whole suite sees one mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tensors here are tiny: one intra-op thread avoids thread start-up and spin-wait costs that,
# on a small shared machine, make a 16x32 matmul take milliseconds instead of microseconds.
torch.set_num_threads(1)

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_MAX_LEN = 32


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test's node id: fresh per test, reproducible across runs.
    Set LREXPORT_TEST_SEED to another integer to draw a different set of random inputs."""
    salt = os.environ.get("LREXPORT_TEST_SEED", "")
    return zlib.crc32(f"{salt}{request.node.nodeid}".encode()) & 0x7FFFFFFF


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def tgen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_hf_config():
    import transformers

    return transformers.LlamaConfig(**TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_spec(tiny_hf_config):
    from lrexport.models.spec import spec_from_hf_config

    return spec_from_hf_config(tiny_hf_config)


@pytest.fixture(scope="session")
def make_tiny_model(tiny_spec):
    """``make_tiny_model(seed=0, max_len=32)`` -> a fresh random LlamaLR (float32, eval mode).

    The global torch RNG is forked, so building a model does not disturb other tests.
    """
    from lrexport.models.llama import build_model

    def make(seed: int = 0, max_len: int = TINY_MAX_LEN):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(tiny_spec, max_len=max_len)

    return make


@pytest.fixture
def tiny_model(make_tiny_model, seed):
    return make_tiny_model(seed=seed)


@pytest.fixture(scope="session")
def make_windows(tiny_spec):
    """``make_windows(seed, num=5, length=12)`` -> int64 token windows ``[num, length]``."""

    def make(seed: int, num: int = 5, length: int = 12) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, tiny_spec.vocab_size, (num, length), generator=g, dtype=torch.int64)

    return make


@pytest.fixture
def calib_windows(make_windows, seed) -> torch.Tensor:
    """Fresh random calibration windows ``[5, 12]`` for this test."""
    return make_windows(seed + 1)
