"""Shared pytest fixtures: one materialized built-in model per test session (short pre-training)."""
import os

import pytest

# Tests never touch the network: the Hugging Face libraries read these when they are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Steps of the session's built-in model: enough to beat the random init clearly, a few seconds on CPU.
BUILTIN_TEST_PRETRAIN_STEPS = 25


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory):
    """A complete built-in model directory (config, safetensors, tokenizer), pre-trained briefly."""
    from sorsa.tasks.builtin import materialize_model

    return materialize_model(tmp_path_factory.mktemp("builtin") / "tiny-llama",
                             pretrain_steps=BUILTIN_TEST_PRETRAIN_STEPS, progress=False)
