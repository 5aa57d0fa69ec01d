"""run.py --merge for SORSA, LoRA, PiSSA and full fine-tuning: the merged directory loads with plain
transformers and reproduces the adapter model's logits; --export-lora gives the same through peft."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from sorsa import cli as run
from sorsa import load_adapter

from test_run import _train_argv


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method", ["sorsa", "lora", "pissa", "full"])
def test_merged_checkpoint_equals_adapter_model(tmp_path, builtin_model_dir, method):
    argv = _train_argv(tmp_path, builtin_model_dir, method, "-p", method, "--max-steps", "3", "--merge",
                       "--export-lora", "--lr", "5e-3")
    assert run.main(argv) == 0
    run_dir = tmp_path / "runs" / method
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()  # plain transformers
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()
    base_logits = _logits(base, ids)
    if method == "sorsa":
        adapted = load_adapter(base, run_dir / "adapter")
        assert not any(n.endswith("U_p") for n in merged.state_dict())
        from peft import PeftModel
        exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                             str(run_dir / "lora_export")).eval()
        torch.testing.assert_close(_logits(exported, ids), _logits(merged, ids), rtol=1e-4, atol=1e-4)
    elif method in ("lora", "pissa"):
        from peft import PeftModel
        adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    else:
        adapted = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    expected = _logits(adapted.eval(), ids)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-4)
    assert (expected - base_logits).abs().max() > 1e-4  # training changed the model
    assert set(merged.state_dict()) == set(AutoModelForCausalLM.from_pretrained(builtin_model_dir).state_dict())
