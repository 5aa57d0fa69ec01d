"""SORSA on RWKV6 through run.py --rwkv: unchanged output at init, and train → merge → the official .pth
that the `rwkv` inference package reads reproduces the merged model's logits; the RWKV test backend."""
import json
import os
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from sorsa import cli as run  # noqa: E402
from sorsa.core.targets import RWKV_TARGETS
from sorsa import SORSAConfig, apply_sorsa, sorsa_layers  # noqa: E402
from sorsa.rwkv6 import RWKV6Config, RWKV6ForCausalLM, load_rwkv6, load_rwkv_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def rwkv_model_dir(tmp_path_factory):
    from sorsa.tasks.builtin import materialize_model

    return materialize_model(tmp_path_factory.mktemp("rwkv") / "tiny-rwkv6", pretrain_steps=0, progress=False,
                             arch="rwkv6")


def test_sorsa_on_rwkv6_targets_the_eight_layers_and_keeps_the_output():
    torch.manual_seed(0)
    model = RWKV6ForCausalLM(RWKV6Config(vocab_size=97, hidden_size=64, num_hidden_layers=2, head_size=16,
                                         intermediate_size=128, time_mix_extra_dim=8, time_decay_extra_dim=16)).eval()
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    apply_sorsa(model, SORSAConfig(rank=8, target_modules=RWKV_TARGETS), progress=False)
    names = [n for n, _ in sorsa_layers(model)]
    assert len(names) == 8 * 2 and "rwkv.blocks.1.feed_forward.receptance" in names
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_rwkv_train_merge_pth_matches_rwkv_package_and_tests(tmp_path, rwkv_model_dir):
    rwkv_model = pytest.importorskip("rwkv.model")
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart_rwkv.yaml"),
            "--model", str(rwkv_model_dir), "--run-path", str(tmp_path / "runs"), "--cache-path", str(tmp_path / "c"),
            "--max-steps", "6", "--limit", "4", "--max-new-tokens", "24", "--lr", "5e-3"]
    assert run.main(argv) == 0
    run_dir = tmp_path / "runs" / "quickstart_rwkv"
    merged_dir = run_dir / "merged"
    merged = load_rwkv6(merged_dir).eval()
    base = load_rwkv6(rwkv_model_dir).eval()
    tokens = torch.randint(4, 200, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = merged(tokens[None]).logits[0]
        assert (ours - base(tokens[None]).logits[0]).abs().max() > 1e-4  # training changed the weights
    ref = rwkv_model.RWKV(str(merged_dir / "model.pth"), strategy="cpu fp32", verbose=False)
    theirs, _ = ref.forward(tokens.tolist(), None, full_output=True)  # (T, V)
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
    results = json.loads((run_dir / "eval" / "gsm-8k" / "results.json").read_text())
    assert results["total"] == 4 and results["settings"]["backend"] == "rwkv"
    rows = [json.loads(line) for line in (run_dir / "eval" / "gsm-8k" / "generations.jsonl").read_text().splitlines()]
    # The recurrent generator's completions are the merged model's greedy continuations, token by token, as its
    # parallel forward gives them (an empty completion is a first token that is EOS: checked, not assumed away).
    tokenizer = load_rwkv_tokenizer(merged_dir)
    for row in rows:
        assert row["completion"] == greedy_by_parallel_forward(merged, tokenizer, row["prompt"], 24)


def greedy_by_parallel_forward(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by re-running the whole sequence through the parallel forward at every step, stopping at
    EOS or GSM-8K's stop string as the generation backend does."""
    from sorsa.eval.benchmarks import STOP_STRINGS
    from sorsa.eval.generate import truncate_at_stop

    stop, ids, new = STOP_STRINGS["gsm-8k"], tokenizer(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            if any(s in tokenizer.decode(new[-32:]) for s in stop):
                break
    return truncate_at_stop(tokenizer.decode(new), stop)
