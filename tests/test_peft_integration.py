"""SORSA as a registered PEFT method (sorsa/peft.py): get_peft_model starts at the base model with exactly the SORSA
factors trainable, a training step equals the toolkit's own SORSA layer's, save_pretrained writes PEFT's folder
(peft_type SORSA, safetensors) that PeftModel.from_pretrained reloads bit for bit without an SVD, merge_and_unload
keeps the function, unload and disable_adapter give the base back, and two named adapters switch with set_adapter."""
import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import sorsa.peft as sp
from sorsa import SORSAConfig, apply_sorsa
from sorsa import orthonormal_loss as toolkit_orthonormal_loss

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids():
    return torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _step(model, ids, lr=1e-2, gamma=0.1, loss_fn=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    loss = model(input_ids=ids, labels=ids).loss + gamma * loss_fn(model)
    loss.backward()
    optimizer.step()


def test_get_peft_model_starts_at_the_base_and_trains_only_the_factors(builtin_model_dir):
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(builtin_model_dir), _ids())
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                sp.SorsaConfig(r=4, target_modules=TARGETS))
    assert isinstance(model, peft.PeftModel) and model.peft_config["default"].peft_type == "SORSA"
    assert _rel(_logits(model, _ids()), base_logits) <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-2] in ("sorsa_U", "sorsa_S", "sorsa_Vh") for n in trainable)
    assert len(trainable) == 3 * 3 * 2  # three factors x three targets x two blocks
    n_train, _ = model.get_nb_trainable_parameters()
    assert n_train == sum(4 * (m.out_features + m.in_features + 1) for m in model.modules()
                          if isinstance(m, sp.SorsaLinear))


def test_a_step_equals_the_toolkit_sorsa_step(builtin_model_dir):
    ids = _ids()
    ours = apply_sorsa(AutoModelForCausalLM.from_pretrained(builtin_model_dir), SORSAConfig(rank=4, target_modules=TARGETS))
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                 sp.SorsaConfig(r=4, target_modules=TARGETS))
    _step(ours, ids, loss_fn=toolkit_orthonormal_loss)
    _step(theirs, ids, loss_fn=sp.orthonormal_loss)
    layer = "model.layers.1.mlp.down_proj"
    a, b = ours.get_submodule(layer), theirs.base_model.model.get_submodule(layer)
    for mine, peft_name in (("U_p", "sorsa_U"), ("S_p", "sorsa_S"), ("Vh_p", "sorsa_Vh")):
        torch.testing.assert_close(getattr(b, peft_name)["default"].detach(), getattr(a, mine).detach(),
                                   rtol=1e-4, atol=1e-6)
    assert _rel(_logits(theirs, ids), _logits(ours, ids)) <= 1e-5


def test_save_reload_merge_unload_disable(tmp_path, builtin_model_dir, monkeypatch):
    ids = _ids()
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(builtin_model_dir), ids)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                sp.SorsaConfig(r=4, target_modules=TARGETS))
    _step(model, ids, lr=5e-2, loss_fn=sp.orthonormal_loss)
    trained = _logits(model, ids)
    assert (trained - base_logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SORSA" and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    monkeypatch.setattr(sp.SF, "svd_top", lambda *a, **k: pytest.fail("a reload must not decompose"))
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                              tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, ids), trained)
    with reloaded.disable_adapter():
        assert torch.equal(_logits(reloaded, ids), base_logits)
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, sp.SorsaLayer) for m in merged.modules())
    assert _rel(_logits(merged, ids), trained) <= 1e-5
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tmp_path / "adapter")
    assert torch.equal(_logits(again.unload(), ids), base_logits)


def test_two_named_adapters_switch(builtin_model_dir):
    ids = _ids()
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                sp.SorsaConfig(r=4, target_modules=TARGETS))
    _step(model, ids, lr=5e-2, loss_fn=sp.orthonormal_loss)
    first = _logits(model, ids)
    model.add_adapter("other", sp.SorsaConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"other"}
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(builtin_model_dir), ids)
    assert _rel(_logits(model, ids), base_logits) <= 1e-5  # the new adapter starts at the base
    model.set_adapter("default")
    assert torch.equal(_logits(model, ids), first)


def test_an_untested_peft_version_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "9.0.0")
    with pytest.raises(sp.UserError, match="tested with peft"):
        sp._check_peft()


def test_the_regularizer_callback_adds_gamma_over_lr_times_its_gradient(builtin_model_dir):
    from types import SimpleNamespace

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                sp.SorsaConfig(r=4, target_modules=TARGETS))
    params = sp._regularized(model)
    assert len(params) == 2 * 6  # U_p and Vh_p of three targets in two blocks
    with torch.no_grad():  # move away from orthonormal, so that the gradient is not zero
        for p in params:
            p.mul_(1.5)
    expected = torch.autograd.grad(sp.orthonormal_loss(model), params)
    callback = sp.OrthonormalRegularizer(0.02)
    callback.on_pre_optimizer_step(SimpleNamespace(learning_rate=0.01, gradient_accumulation_steps=2), None, None,
                                   model=model)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, 0.02 / 0.01 / 2 * g)


def test_conversion_to_and_from_the_toolkit_adapter(tmp_path, builtin_model_dir):
    from sorsa import load_adapter, save_adapter

    ids = _ids()
    ours = apply_sorsa(AutoModelForCausalLM.from_pretrained(builtin_model_dir), SORSAConfig(rank=4, target_modules=TARGETS))
    _step(ours, ids, lr=5e-2, loss_fn=toolkit_orthonormal_loss)
    save_adapter(ours, tmp_path / "toolkit")
    expected = _logits(load_adapter(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tmp_path / "toolkit"), ids)
    sp.from_toolkit_adapter(tmp_path / "toolkit", tmp_path / "peft")
    as_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tmp_path / "peft")
    assert _rel(_logits(as_peft, ids), expected) <= 1e-5
    sp.to_toolkit_adapter(tmp_path / "peft", tmp_path / "back")
    back = load_adapter(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tmp_path / "back")
    assert _rel(_logits(back, ids), expected) <= 1e-6


def test_trl_sft_trainer_trains_a_sorsa_peft_model_with_the_regularizer(tmp_path, builtin_model_dir):
    trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
                               "{% if add_generation_prompt %}assistant : {% endif %}")
    chat = [{"messages": [{"role": "user", "content": "Tom has 3 apples and buys 4 more ."},
                          {"role": "assistant", "content": "Tom has 7 apples ."}]}] * 8
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         max_length=64, seed=0)
    regularizer = sp.OrthonormalRegularizer(4e-4)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(builtin_model_dir), args=args,
                             train_dataset=Dataset.from_list(chat), processing_class=tokenizer,
                             peft_config=sp.SorsaConfig(r=4, target_modules=TARGETS), callbacks=[regularizer])
    assert isinstance(trainer.model, peft.PeftModel)
    layers = [m for m in trainer.model.modules() if isinstance(m, sp.SorsaLinear)]
    assert len(layers) == 6
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.split(".")[-2] in ("sorsa_U", "sorsa_S", "sorsa_Vh") for n in changed)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert len(regularizer.values) == 4  # the regularizer ran at every optimizer step
