"""Compare this project's SORSA with the authors' own package (`sorsa==1.0.1`, their repository's `sorsalib/`)
step by step on a tiny Llama, each in its own virtualenv, and print what still differs, measured.

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.44.2 'accelerate<1.1' sorsa==1.0.1
    python scripts/compare_reference.py --reference-python /tmp/refvenv/bin/python [--json OUT.json]

The reference runs in a subprocess of that interpreter (its package is also named `sorsa`, and it needs
transformers 4.44); it builds the base model, initialises, perturbs the factors as training would, merges,
unmerges, computes its orthonormal loss, runs its SORSATrainer for two steps, and saves a checkpoint. This
side loads the same base and does the same with the project's code, then converts the reference checkpoint.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
TRAIN = dict(lr=1e-2, gamma=0.05, batch=2, accum=4, steps=2, max_grad_norm=0.05)

# Runs under the reference's interpreter. It only calls the reference package's public API.
REFERENCE_SIDE = r'''
import json, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from datasets import Dataset
import sorsa
from sorsa import SORSAConfig, SORSAModel
from sorsa.layer import calc_ortho, Linear
args = json.loads(sys.argv[1]); out = Path(args["out"])
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**args["tiny"])).save_pretrained(out / "base", safe_serialization=True)
ids = torch.tensor(args["ids"])
res = {}
for tag, alpha in (("scale1", None), ("alpha2r", 2 * args["rank"])):
    m = SORSAModel(SORSAConfig(base_model_name_or_path=str(out / "base"), rank=args["rank"], alpha=alpha,
                               target_modules=args["targets"]))
    m.sorsa_init(torch.float32, torch.float32)
    layers = {n[len("model."):]: l for n, l in m.named_modules() if isinstance(l, Linear)}
    res[tag] = {"W_res": {n: l.weight.tolist() for n, l in layers.items()},
                "S": {n: l.sorsa_S.tolist() for n, l in layers.items()}}
    with torch.no_grad():
        res[tag]["logits_init"] = m(input_ids=ids).logits.tolist()
        g = torch.Generator().manual_seed(3)
        for n, l in layers.items():  # as training would move them
            l.sorsa_A.add_(0.02 * torch.randn(l.sorsa_A.shape, generator=g))
            l.sorsa_B.add_(0.02 * torch.randn(l.sorsa_B.shape, generator=g))
            l.sorsa_S.mul_(1 + 0.05 * torch.randn(l.sorsa_S.shape, generator=g))
        res[tag]["logits_moved"] = m(input_ids=ids).logits.tolist()
        res[tag]["ortho"] = float(calc_ortho(m))
        before = {n: l.weight.clone() for n, l in layers.items()}
        m.merge(True)
        res[tag]["merged"] = {n: l.weight.tolist() for n, l in layers.items()}
        m.merge(False)
        res[tag]["unmerge_error"] = max((l.weight - before[n]).abs().max().item() for n, l in layers.items())
    if tag == "scale1":
        m.save_pretrained(out / "ref_checkpoint", safe_serialization=True)
        res[tag]["factors"] = {n: {"A": l.sorsa_A.tolist(), "S": l.sorsa_S.tolist(), "B": l.sorsa_B.tolist()}
                               for n, l in layers.items()}
# two optimizer steps of the reference's trainer (its transformers 4.44 fork), sequential data
t = args["train"]
rows = json.loads((out / "rows.json").read_text())
m = SORSAModel(SORSAConfig(base_model_name_or_path=str(out / "base"), rank=args["rank"], alpha=None,
                           target_modules=args["targets"]))
m.sorsa_init(torch.float32, torch.float32); m.set_trainable(True)
with torch.no_grad():  # start from the moved factors: at L_o = 0 the regularizer's gradient is float noise
    for n, l in m.named_modules():
        if isinstance(l, Linear):
            f = res["scale1"]["factors"][n[len("model."):]]
            l.sorsa_A.copy_(torch.tensor(f["A"])); l.sorsa_S.copy_(torch.tensor(f["S"])); l.sorsa_B.copy_(torch.tensor(f["B"]))
from sorsa import SORSATrainer, SORSATrainingArguments
targs = SORSATrainingArguments(output_dir=str(out / "ckpt"), per_device_train_batch_size=t["batch"],
    gradient_accumulation_steps=t["accum"], learning_rate=t["lr"], lr_scheduler_type="constant", max_steps=t["steps"],
    max_grad_norm=t["max_grad_norm"], gamma=t["gamma"], optim="sgd", use_cpu=True, report_to="none",
    save_strategy="no", logging_steps=1, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
class Seq(SORSATrainer):
    def _get_train_sampler(self, *a, **k):
        return torch.utils.data.SequentialSampler(self.train_dataset)
Seq(model=m, args=targs, train_dataset=Dataset.from_list(rows)).train()
res["trained"] = {n[len("model."):]: {"A": l.sorsa_A.tolist(), "S": l.sorsa_S.tolist(), "B": l.sorsa_B.tolist()}
                  for n, l in m.named_modules() if isinstance(l, Linear)}
import transformers
res["versions"] = {"sorsa": sorsa.__version__ if hasattr(sorsa, "__version__") else "1.0.1",
                   "transformers": transformers.__version__, "torch": torch.__version__}
(out / "reference.json").write_text(json.dumps(res))
'''


def _rows(n: int, length: int = 12, vocab: int = 96) -> list[dict]:
    """Training rows with unequal label counts (a masked prompt of 1..9 tokens)."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    rows = []
    for i in range(n):
        labels = ids[i].clone()
        labels[:1 + (3 * i) % 9] = -100
        rows.append({"input_ids": ids[i].tolist(), "labels": labels.tolist(), "attention_mask": [1] * length})
    return rows


def _max(a, b) -> float:
    import torch

    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def our_side(work: Path, ref: dict, ids) -> dict:
    """The same steps with this project's code; returns the measured differences."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from sorsa import SORSAConfig, apply_sorsa, load_adapter, merge_adapter, orthonormal_loss, sorsa_layers, unmerge_adapter
    from sorsa.tools.convert import from_reference

    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()
    found = {}
    for tag, alpha, rule in (("scale1", None, "tail"), ("alpha2r", 2 * RANK, "reference"), ("alpha2r", 2 * RANK, "tail")):
        model = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK, alpha=alpha, alpha_init=rule), progress=False)
        layers = dict(sorsa_layers(model))
        key = f"{tag}/{rule}"
        found[f"{key}: max |W_res - reference W_res|"] = max(_max(l.weight, ref[tag]["W_res"][n]) for n, l in layers.items())
        found[f"{key}: max |S_p - reference S_p|"] = max(_max(l.S_p, ref[tag]["S"][n]) for n, l in layers.items())
        with torch.no_grad():
            found[f"{key}: max |logits - reference logits| at init"] = _max(model(input_ids=ids).logits, ref[tag]["logits_init"])
    model = _with_reference_factors(base, ref)
    with torch.no_grad():  # the reference's moved factors, then forward, L_o, merge and unmerge
        found["moved factors: max |logits - reference logits|"] = _max(model(input_ids=ids).logits,
                                                                        ref["scale1"]["logits_moved"])
        found["moved factors: |L_o - reference calc_ortho|"] = abs(orthonormal_loss(model).item() - ref["scale1"]["ortho"])
        residuals = {n: l.weight.clone() for n, l in sorsa_layers(model)}
        merge_adapter(model)
        found["merge: max |merged W - reference merged W|"] = max(
            _max(l.weight, ref["scale1"]["merged"][n]) for n, l in sorsa_layers(model))
        unmerge_adapter(model)
        found["unmerge: max |W_res after - before| (this project)"] = max(
            (l.weight - residuals[n]).abs().max().item() for n, l in sorsa_layers(model))
        found["unmerge: max |W_res after - before| (reference)"] = ref["scale1"]["unmerge_error"]
        converted = load_adapter(copy.deepcopy(base), from_reference(work / "ref_checkpoint", work / "base",
                                                                      work / "converted"))
        found["reference checkpoint -> sorsa.convert: max |logits - reference logits|"] = _max(
            converted(input_ids=ids).logits, ref["scale1"]["logits_moved"])
    found.update(_training_steps(base, ref))
    return found


def _with_reference_factors(base, ref: dict):
    """A copy of `base` with SORSA applied here and the reference's moved factors (B = U_p, S, A = Vh_p) put in."""
    import copy

    import torch

    from sorsa import SORSAConfig, apply_sorsa, sorsa_layers

    model = apply_sorsa(copy.deepcopy(base), SORSAConfig(rank=RANK), progress=False)
    with torch.no_grad():
        for n, layer in sorsa_layers(model):
            f = ref["scale1"]["factors"][n]
            for name, key in (("U_p", "B"), ("S_p", "S"), ("Vh_p", "A")):
                getattr(layer, name).copy_(torch.tensor(f[key]))
    return model


def _training_steps(base, ref: dict) -> dict:
    """Two optimizer steps of this project's trainer on the reference's data order, both normalisations."""

    import torch
    from datasets import Dataset
    from transformers import default_data_collator

    from sorsa import sorsa_layers
    from sorsa.train.trainer import SORSATrainer, SORSATrainingArguments

    class Sequential(SORSATrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    rows = _rows(TRAIN["batch"] * TRAIN["accum"] * TRAIN["steps"])
    found = {}
    for normalization in ("reference", "tokens"):
        model = _with_reference_factors(base, ref)  # the same start as the reference side
        args = SORSATrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=TRAIN["batch"],
            gradient_accumulation_steps=TRAIN["accum"], learning_rate=TRAIN["lr"], lr_scheduler_type="constant",
            max_steps=TRAIN["steps"], max_grad_norm=TRAIN["max_grad_norm"], gamma=TRAIN["gamma"], optim="sgd",
            use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0, data_seed=0,
            disable_tqdm=True, dataloader_num_workers=0, loss_normalization=normalization)
        Sequential(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   data_collator=default_data_collator).train()
        diff = 0.0
        for n, layer in sorsa_layers(model):
            r = ref["trained"][n]
            diff = max(diff, _max(layer.U_p, r["B"]), _max(layer.S_p, r["S"]), _max(layer.Vh_p, r["A"]))
        found[f"2 SGD steps (accumulation 4, unequal label counts, clipping on), loss_normalization={normalization}: "
              "max |adapter - reference adapter|"] = diff
    return found


def layer_speed(reps: int = 5) -> dict:
    """Forward+backward of one adapted 1024 x 1024 layer, rank 64, batch 4 x 128: this project's two thin
    matmuls against the reference's dense (B S) A product (the layer math written out, interleaved)."""
    import torch
    import torch.nn as nn

    from reference_forward import DenseDelta  # scripts/
    from sorsa import SORSALinear
    from sorsa.core import functional as SF

    torch.manual_seed(0)
    layer = SORSALinear(nn.Linear(1024, 1024, bias=False), 64)
    layer.set_factors(*SF.initial_adapter(*SF.svd_top(layer.weight, 64, "randomized", niter=1)))
    x = torch.randn(4, 128, 1024)

    dense = DenseDelta(layer)  # the reference's forward: the out x in delta built on every call
    times = {"this project": [], "reference (dense delta)": []}
    for _ in range(reps):
        for name, fn in (("this project", layer), ("reference (dense delta)", dense)):
            start = time.perf_counter()
            fn(x).sum().backward()
            times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"layer forward+backward median s": med, "reference / this project": med["reference (dense delta)"]
            / med["this project"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", required=True, help="python of a virtualenv with sorsa==1.0.1 and "
                        "transformers==4.44.2 (see the module docstring)")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="sorsa-compare-"))
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    (work / "rows.json").write_text(json.dumps(_rows(TRAIN["batch"] * TRAIN["accum"] * TRAIN["steps"])))
    spec = {"out": str(work), "tiny": TINY, "rank": RANK, "targets": TARGETS, "ids": ids.tolist(), "train": TRAIN}
    done = subprocess.run([args.reference_python, "-c", REFERENCE_SIDE, json.dumps(spec)], cwd=work,
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        sys.exit(f"the reference side failed:\n{done.stderr[-3000:]}")
    ref = json.loads((work / "reference.json").read_text())
    found = {"reference versions": ref["versions"], **our_side(work, ref, ids), **layer_speed()}
    for key, value in found.items():
        print(f"{key}: {value if not isinstance(value, float) else f'{value:.3g}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
