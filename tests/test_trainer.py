"""The orthonormal regularizer inside the Hugging Face Trainer: the exact gradient the optimizer sees,
once per step, after clipping; logging; adapter-only checkpoints and an exact resume."""
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, default_data_collator

from sorsa import SORSAConfig, apply_sorsa, sorsa_layers
from sorsa.train.trainer import SORSATrainer, SORSATrainingArguments, regularizer_coefficient

VOCAB = 64


def tiny_sorsa_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    return apply_sorsa(model, SORSAConfig(rank=4), progress=False)


def tiny_dataset(n=32, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, max_steps=3, max_grad_norm=0.05,
                gamma=0.5, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return SORSATrainingArguments(**base)


def reference_ortho_grads(model):
    """∇ of mean(‖UᵀU − I‖_F, ‖Vh Vhᵀ − I‖_F) written out independently of sorsa.functional, in float64."""
    params, terms = [], []
    for _, layer in sorsa_layers(model):
        U = layer.U_p.detach().double().requires_grad_(True)
        Vh = layer.Vh_p.detach().double().requires_grad_(True)
        eye = torch.eye(U.shape[1], dtype=torch.double)
        terms += [((U.T @ U - eye) ** 2).sum().sqrt(), ((Vh @ Vh.T - eye) ** 2).sum().sqrt()]
        params += [U, Vh]
    grads = torch.autograd.grad(torch.stack(terms).mean(), params)
    return grads


class RecordingTrainer(SORSATrainer):
    """Records the adapter gradients right after clipping and at the moment the optimizer steps."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.clipped, self.seen, self.expected_reg = [], [], []

    def _adapter_grads(self):
        return [p.grad.detach().clone() for _, l in sorsa_layers(self.model) for p in (l.U_p, l.Vh_p)]

    def _clip_grad_norm(self, model):
        out = super()._clip_grad_norm(model)
        self.clipped.append(self._adapter_grads())
        self.clipped_total_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                                                 if p.grad is not None))
        self.norms = getattr(self, "norms", []) + [self.clipped_total_norm.item()]
        return out

    def create_optimizer(self, *a, **kw):
        opt = super().create_optimizer(*a, **kw)
        inner_step = opt.step

        def step(*args, **kwargs):
            self.seen.append(self._adapter_grads())
            self.expected_reg.append(reference_ortho_grads(self.model))
            return inner_step(*args, **kwargs)

        opt.step = step
        return opt


def test_coefficient_is_gamma_over_lr_over_accumulation():
    assert regularizer_coefficient(4e-4, 3e-5, 64) == pytest.approx(4e-4 / 3e-5 / 64, rel=1e-12)
    assert regularizer_coefficient(0.5, 1e-3, 4) == pytest.approx(125.0, rel=1e-12)


def test_optimizer_sees_clipped_task_gradient_plus_coef_times_ortho_gradient_once(tmp_path):
    model = tiny_sorsa_model()
    # Move the adapters off the Stiefel manifold so that ∇L_o is not zero.
    with torch.no_grad():
        for _, layer in sorsa_layers(model):
            layer.U_p.mul_(1.3), layer.Vh_p.add_(0.05 * torch.randn_like(layer.Vh_p))
    args = make_args(tmp_path)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=tiny_dataset(), data_collator=default_data_collator)
    trainer.train()
    coef = 0.5 / 1e-3 / 4
    assert len(trainer.seen) == len(trainer.clipped) == len(trainer.expected_reg) == 3 == trainer.state.global_step
    assert len(trainer.regularizer.values) == 0  # all were logged
    for clipped, seen, reg in zip(trainer.clipped, trainer.seen, trainer.expected_reg):
        for c, s, r in zip(clipped, seen, reg):
            expected = c.double() + coef * r
            # float32 arithmetic vs a float64 reference
            torch.testing.assert_close(s.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
            assert (coef * r).abs().max() > 1e-3  # the regularizer term is really there
    # Clipping was active: the task gradient norm after clipping equals max_grad_norm.
    assert all(n == pytest.approx(0.05, rel=1e-4) for n in trainer.norms)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3 and all(r["ortho_loss"] > 0 for r in logged)


def test_gamma_zero_adds_nothing(tmp_path):
    trainer = RecordingTrainer(model=tiny_sorsa_model(), args=make_args(tmp_path, gamma=0.0, max_steps=1),
                               train_dataset=tiny_dataset(), data_collator=default_data_collator)
    trainer.train()
    assert trainer.regularizer is None
    for c, s in zip(trainer.clipped[0], trainer.seen[0]):
        assert torch.equal(c, s)


def test_checkpoints_hold_the_adapter_only_and_resume_is_exact(tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, max_grad_norm=1.0, gamma=4e-2)
    full = SORSATrainer(model=tiny_sorsa_model(), args=make_args(tmp_path / "a", **args),
                        train_dataset=tiny_dataset(), data_collator=default_data_collator)
    full.train()
    ckpt = tmp_path / "a" / "ckpt" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    # An interrupted run: only checkpoint-2 exists; resuming must end at the same adapter.
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "b" / "ckpt" / "checkpoint-2")
    resumed = SORSATrainer(model=tiny_sorsa_model(), args=make_args(tmp_path / "b", **args),
                           train_dataset=tiny_dataset(), data_collator=default_data_collator)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "ckpt" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (n, a), (_, b) in zip(sorsa_layers(full.model), sorsa_layers(resumed.model)):
        for f in ("U_p", "S_p", "Vh_p"):
            torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=0, atol=1e-6, msg=f"{n}.{f}")
    moved = max((a.U_p - a.U_0).abs().max().item() for _, a in sorsa_layers(full.model))
    assert moved > 1e-4  # training really changed the adapter


def test_the_private_trainer_api_this_project_relies_on_still_exists(tmp_path):
    """sorsa/trainer.py overrides `_save` and `_load_from_checkpoint`, and the DeepSpeed trainer reads
    `loss_is_scaled_for_ga`, `model_accepts_loss_kwargs`, `compute_loss_func` and
    `current_gradient_accumulation_steps`: a transformers release that renames any of them fails here."""
    import inspect

    from transformers import Trainer

    assert list(inspect.signature(Trainer._save).parameters) == ["self", "output_dir", "state_dict"]
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint",
                                                                                  "model"]
    assert {"model", "inputs", "return_outputs", "num_items_in_batch"} <= set(
        inspect.signature(Trainer.compute_loss).parameters)
    assert {"model", "inputs", "num_items_in_batch"} <= set(inspect.signature(Trainer.training_step).parameters)
    trainer = SORSATrainer(model=tiny_sorsa_model(), args=make_args(tmp_path, max_steps=1),
                           train_dataset=tiny_dataset(), data_collator=default_data_collator)
    for attribute in ("loss_is_scaled_for_ga", "model_accepts_loss_kwargs", "compute_loss_func",
                      "is_deepspeed_enabled"):
        assert hasattr(trainer, attribute), attribute
    trainer.train()  # set during training
    assert trainer.current_gradient_accumulation_steps == 4


# ----------------------------------------------------------------------------- loss normalisation

def unequal_dataset(n=10, length=12):
    """Rows whose label counts differ (a masked prompt of 1..9 tokens), so the two normalisations differ."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, :1 + (3 * i) % 9] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


class BatchRecordingTrainer(SORSATrainer):
    """Records every micro-batch in the order the Trainer used it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def _token_loss(model, batch):
    """(sum of the next-token cross entropy over the labelled positions, their number)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total, int((labels != -100).sum())


def hand_trained_adapters(model, batches, normalization, accum, lr, max_norm, gamma):
    """The adapters after SGD on `batches` in float64, written out from the definitions: the task gradient of
    each window (reference: Σ_mb mean_mb / accum; tokens: Σ_mb sum_mb / window tokens), clipped to `max_norm`
    over all adapter tensors, plus (gamma / lr / accum) ∇L_o after clipping, then p -= lr · g."""
    model = model.double()
    params = [p for _, layer in sorsa_layers(model) for p in (layer.U_p, layer.S_p, layer.Vh_p)]
    for start in range(0, len(batches), accum):
        window = batches[start:start + accum]
        parts = [_token_loss(model, b) for b in window]
        if normalization == "reference":
            task = sum(total / count for total, count in parts) / accum
        else:
            task = sum(total for total, _ in parts) / sum(count for _, count in parts)
        grads = list(torch.autograd.grad(task, params))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, max_norm / (norm.item() + 1e-6))
        grads = [g * factor for g in grads]
        reg = reference_ortho_grads(model)  # (U_p, Vh_p) per layer, float64
        coef = gamma / lr / accum
        for i, r in enumerate(reg):  # params are (U, S, Vh) per layer; reg is (U, Vh) per layer
            grads[3 * (i // 2) + (0 if i % 2 == 0 else 2)] += coef * r
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return {f"{n}.{f}": getattr(layer, f).detach().clone() for n, layer in sorsa_layers(model)
            for f in ("U_p", "S_p", "Vh_p")}


@pytest.mark.parametrize("normalization", ["reference", "tokens"])
def test_loss_normalisation_equals_a_float64_hand_computation(tmp_path, normalization):
    """Accumulation 4 over 5 micro-batches of unequal label counts (a full window, then a partial one), clipping
    active: the adapter after the two steps equals the float64 computation of the chosen normalisation and
    differs from the other one's."""
    import copy

    lr, max_norm, gamma, accum = 1.0, 0.02, 0.1, 4
    model = tiny_sorsa_model()
    with torch.no_grad():  # off the Stiefel manifold: at L_o ≈ 0 the gradient of the unsquared norm is float noise
        for _, layer in sorsa_layers(model):
            layer.U_p.mul_(1.1), layer.Vh_p.mul_(0.9)
    start = copy.deepcopy(model)
    args = make_args(tmp_path, optim="sgd", learning_rate=lr, max_grad_norm=max_norm, gamma=gamma, max_steps=-1,
                     num_train_epochs=1, gradient_accumulation_steps=accum, loss_normalization=normalization)
    trainer = BatchRecordingTrainer(model=model, args=args, train_dataset=unequal_dataset(),
                                    data_collator=default_data_collator)
    trainer.train()
    assert trainer.state.global_step == 2 and len(trainer.batches) == 5
    norms = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    assert len(norms) == 2 and min(norms) > max_norm  # clipping was active on both steps
    trained = {f"{n}.{f}": getattr(layer, f).detach().double() for n, layer in sorsa_layers(trainer.model)
               for f in ("U_p", "S_p", "Vh_p")}
    other = "tokens" if normalization == "reference" else "reference"
    expected = hand_trained_adapters(copy.deepcopy(start), trainer.batches, normalization, accum, lr, max_norm, gamma)
    alternative = hand_trained_adapters(copy.deepcopy(start), trainer.batches, other, accum, lr, max_norm, gamma)
    diff = max((trained[k] - expected[k]).abs().max().item() for k in trained)
    gap = max((alternative[k] - expected[k]).abs().max().item() for k in trained)
    moved = max((expected[k] - getattr(dict(sorsa_layers(start))[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1])
                 .double()).abs().max().item() for k in expected)
    assert moved > 5e-3  # two real steps
    assert diff < 2e-6, f"{normalization}: trainer vs float64 hand computation differ by {diff:.2e}"
    assert gap > 100 * 2e-6, f"the two normalisations differ by only {gap:.2e} here"


def test_fp16_loss_scale_is_applied_to_the_regularizer_gradient_too(tmp_path):
    """fp16 with a loss scaler and no clipping: the gradients are still scaled when the regularizer adds its
    term, so the term must be scaled too; the optimizer then sees task gradient + coef · ∇L_o. Autocast
    fp16 runs on the CPU but accelerate makes no scaler there, so the test installs one."""
    from transformers import TrainerCallback

    scale = 1024.0

    class Before(TrainerCallback):
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append([p.grad.detach().clone() for _, l in sorsa_layers(model) for p in (l.U_p, l.Vh_p)])

    model = tiny_sorsa_model()
    with torch.no_grad():  # off the manifold, where ∇L_o is well defined in float32
        for _, layer in sorsa_layers(model):
            layer.U_p.mul_(1.3), layer.Vh_p.mul_(0.8)
    # SGD: the scaler unscales before the step (a fused AdamW would unscale inside its own kernel)
    args = make_args(tmp_path, fp16=True, max_grad_norm=0.0, max_steps=1, gamma=0.5, optim="sgd")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=tiny_dataset(), data_collator=default_data_collator)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    before = Before()
    trainer.callback_handler.callbacks.insert(0, before)  # sees the gradients before the regularizer
    assert trainer._unapplied_grad_scale() == scale
    trainer.train()
    coef = 0.5 / 1e-3 / 4
    assert len(trainer.seen) == 1
    for b, s, r in zip(before.grads[0], trainer.seen[0], trainer.expected_reg[0]):
        expected = b.double() / scale + coef * r
        torch.testing.assert_close(s.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        assert (coef * r).abs().max() > 1e-3
    # with clipping the Trainer unscales first, so nothing is applied twice
    clipped = SORSATrainer(model=tiny_sorsa_model(), args=make_args(tmp_path / "c", fp16=True, max_grad_norm=1.0),
                           train_dataset=tiny_dataset(), data_collator=default_data_collator)
    clipped.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    assert clipped._unapplied_grad_scale() == 1.0


def test_gamma_zero_still_logs_the_orthonormality(tmp_path):
    """An ablation without the regularizer still logs L_o at every step, so it shows the drift."""
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        values = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.values.append(reference_ortho_value(model))

    trainer = SORSATrainer(model=tiny_sorsa_model(), args=make_args(tmp_path, gamma=0.0, max_steps=3,
                                                                    learning_rate=5e-2),
                           train_dataset=tiny_dataset(), data_collator=default_data_collator)
    trainer.callback_handler.callbacks.insert(0, Measure())
    trainer.train()
    assert trainer.regularizer is None
    logged = [r["ortho_loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 3
    for value, expected in zip(logged, Measure.values):
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert logged[-1] > 100 * logged[0] and logged[-1] > 1e-3  # the adapters drift off orthonormal


def reference_ortho_value(model) -> float:
    terms = []
    for _, layer in sorsa_layers(model):
        U, Vh = layer.U_p.detach().double(), layer.Vh_p.detach().double()
        eye = torch.eye(U.shape[1], dtype=torch.double)
        terms += [((U.T @ U - eye) ** 2).sum().sqrt(), ((Vh @ Vh.T - eye) ** 2).sum().sqrt()]
    return torch.stack(terms).mean().item()
