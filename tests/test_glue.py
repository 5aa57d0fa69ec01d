"""GLUE with encoders: tiny DeBERTa-v2 (v3's layout) and RoBERTa built from configs with a word-level tokenizer
made here; hand-written rows in each task's hub schema; SORSA / LoRA / full fine-tuning through run.py; the
merged checkpoint reloads with AutoModelForSequenceClassification and gives the adapter model's logits; STS-B
regression; the GLUE metrics against hand-computed values; the configs load."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sorsa import cli as run
from sorsa.eval.classify import Classifier
from sorsa.eval.data_files import Example
from sorsa.eval.glue import BENCHMARKS, correlations, f1_binary, matthews_correlation
from sorsa.tasks.data import DataError
from sorsa.tasks.glue import GLUE_TASKS, load_glue_rows

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a cat dog sat on mat good bad movie film is was not very great awful i liked hated it what who "
         "where did he she go see fun boring sentence grammatical man woman ran quickly slowly yes no").split()
# Hand-written rows in each task's hub schema (nyu-mll/glue), labels as the hub gives them.
ROWS = {
    "glue-sst2": [{"sentence": "a good movie", "label": 1, "idx": 0}, {"sentence": "a bad film", "label": 0, "idx": 1}],
    "glue-cola": [{"sentence": "the cat sat on the mat", "label": 1, "idx": 0},
                  {"sentence": "sat the on cat mat", "label": 0, "idx": 1}],
    "glue-mrpc": [{"sentence1": "the dog ran", "sentence2": "the dog ran quickly", "label": 1, "idx": 0},
                  {"sentence1": "the dog ran", "sentence2": "she liked it", "label": 0, "idx": 1}],
    "glue-qqp": [{"question1": "who is he", "question2": "who is he", "label": 1, "idx": 0},
                 {"question1": "where did she go", "question2": "what is fun", "label": 0, "idx": 1}],
    "glue-stsb": [{"sentence1": "a man ran", "sentence2": "a man ran", "label": 5.0, "idx": 0},
                  {"sentence1": "a man ran", "sentence2": "the cat sat", "label": 0.4, "idx": 1},
                  {"sentence1": "a woman ran", "sentence2": "a man ran", "label": 3.2, "idx": 2}],
    "glue-mnli": [{"premise": "the cat sat", "hypothesis": "the cat sat on the mat", "label": 1, "idx": 0},
                  {"premise": "the dog ran", "hypothesis": "the dog ran", "label": 0, "idx": 1},
                  {"premise": "the dog ran", "hypothesis": "the dog is not here", "label": 2, "idx": 2}],
    "glue-qnli": [{"question": "who ran", "sentence": "the man ran", "label": 0, "idx": 0},
                  {"question": "who ran", "sentence": "the cat sat", "label": 1, "idx": 1}],
    "glue-rte": [{"sentence1": "the man ran quickly", "sentence2": "the man ran", "label": 0, "idx": 0},
                 {"sentence1": "the man ran", "sentence2": "the woman sat", "label": 1, "idx": 1}],
}
ROWS["glue-mnli-mm"] = ROWS["glue-mnli"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _encoder_dir(path: Path, arch: str) -> Path:
    """A tiny pre-trained-encoder checkpoint (masked-LM weights, no classification head) and its tokenizer."""
    from transformers import AutoModelForMaskedLM, DebertaV2Config, RobertaConfig

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  pad_token_id=0)
    if arch == "deberta":  # DeBERTa-v3-base's attention layout, shrunk
        config = DebertaV2Config(**common, max_position_embeddings=64, relative_attention=True, position_buckets=16,
                                 pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                                 max_relative_positions=-1, type_vocab_size=0, position_biased_input=False)
    else:
        config = RobertaConfig(**common, max_position_embeddings=70, type_vocab_size=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {arch: _encoder_dir(root / arch, arch) for arch in ("deberta", "roberta")}


def _write_rows(path: Path, rows: list[dict], repeat: int = 1) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * repeat))
    return path


def _argv(tmp_path, model_dir, name, task, *extra):
    train = _write_rows(tmp_path / f"{task}-train.jsonl", ROWS[task], repeat=8)
    test = _write_rows(tmp_path / f"{task}-valid.jsonl", ROWS[task])
    return ["--name", name, "--model", str(model_dir), "--train-dataset", task, "--train-file", str(train),
            "--test-file", str(test), "--split", "", "--run-path", str(tmp_path / "runs"), "-r", "4", "--lr", "5e-3",
            "--batch-size", "4", "--accum-steps", "1", "--max-steps", "6", "--mix-precision", "fp32",
            "--test-precision", "fp32", "--length", "32", "--logging-steps", "1", "--save-steps", "100", *extra]


def _logits(model, tokenizer, task):
    texts = [[r[c] for c in GLUE_TASKS[task].text_columns] for r in ROWS[task]]
    return Classifier(model, tokenizer, max_length=32).logits([json.dumps(t) for t in texts])


# ----------------------------------------------------------------------------- train -> merge -> reload -> test

@pytest.mark.parametrize("arch,method,task", [("deberta", "sorsa", "glue-mnli"), ("roberta", "lora", "glue-sst2"),
                                              ("roberta", "sorsa", "glue-stsb"), ("deberta", "pissa", "glue-rte")])
def test_train_merge_reload_matches_adapter_logits(tmp_path, encoders, arch, method, task):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    argv = _argv(tmp_path, encoders[arch], "run", task, "-p", method)
    assert run.main(argv + ["--train", "--merge", "--test"]) == 0
    run_dir = tmp_path / "runs" / "run"
    num_labels = GLUE_TASKS[task].num_labels
    tok = AutoTokenizer.from_pretrained(encoders[arch])
    base = AutoModelForSequenceClassification.from_pretrained(encoders[arch], num_labels=num_labels)
    if method == "sorsa":
        from sorsa import load_adapter

        adapted = load_adapter(base, run_dir / "adapter")
        info = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        heads = {"deberta": ["pooler", "classifier"], "roberta": ["classifier"]}[arch]
        assert info["modules_to_save"] == heads
        saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
        assert any(k.startswith("modules_to_save.classifier.") for k in saved)
    else:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged")
    assert merged.config.num_labels == num_labels and type(merged).__name__ == type(base).__name__
    expected, got = _logits(adapted, tok, task), _logits(merged, tok, task)
    assert expected.shape == (len(ROWS[task]), num_labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # training moved the encoder: its weights differ from the base's (the head is new either way)
    fresh = AutoModelForSequenceClassification.from_pretrained(encoders[arch], num_labels=num_labels).state_dict()
    trained = merged.state_dict()
    moved = max((trained[k].float() - v.float()).abs().max().item() for k, v in fresh.items()
                if v.is_floating_point() and not k.startswith(("classifier", "pooler")))
    assert moved > 1e-3  # measured 3.8e-3 to 9.8e-3 over the four cases
    results = json.loads((run_dir / "eval" / task / "results.json").read_text())
    assert results["total"] == len(ROWS[task]) and results["split"] == GLUE_TASKS[task].eval_split
    # the scored predictions are the merged model's own
    predictions = [json.loads(line)["prediction"]
                   for line in (run_dir / "eval" / task / "generations.jsonl").read_text().splitlines()]
    if num_labels == 1:
        assert predictions == pytest.approx(got[:, 0].tolist(), abs=1e-5)
        assert results["metric"] == "pearson" and results["score"] == pytest.approx(
            correlations(got[:, 0].tolist(), [r["label"] for r in ROWS[task]])["pearson"], abs=1e-6)
    else:
        assert predictions == got.argmax(-1).tolist()
        assert results["accuracy"] == pytest.approx(
            (got.argmax(-1) == torch.tensor([r["label"] for r in ROWS[task]])).float().mean().item())
    done = json.loads((run_dir / "train_done.json").read_text())
    assert done["steps"] == 6 and done["trainable_params"] > 0


def test_full_fine_tuning_and_mnli_mismatched(tmp_path, encoders):
    """Full fine-tuning writes a whole classifier; the MNLI model also scores MNLI-mm; a mismatch is refused."""
    from transformers import AutoModelForSequenceClassification

    argv = _argv(tmp_path, encoders["roberta"], "full", "glue-mnli", "-p", "full", "--lr", "1e-3")
    assert run.main(argv + ["--train", "--merge"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "runs" / "full" / "merged")
    assert merged.config.num_labels == 3
    rp = ["--run-path", str(tmp_path / "runs"), "--test-precision", "fp32"]
    mm = _write_rows(tmp_path / "mm.jsonl", ROWS["glue-mnli-mm"])
    assert run.main(["--name", "full", "--test", "--test-dataset", "glue-mnli-mm", "--test-file", str(mm), *rp]) == 0
    assert json.loads((tmp_path / "runs" / "full" / "eval" / "glue-mnli-mm" / "results.json").read_text())["total"] == 3
    assert run.main(["--name", "full", "--test", "--test-dataset", "glue-sst2", *rp]) == 2  # 2 labels, not 3
    assert run.main(["--name", "full", "--test", "--test-dataset", "gsm-8k", *rp]) == 2
    # the report has a GLUE table with MNLI-mm
    assert run.main(["--report", "full", *rp, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## GLUE" in md and "MNLI-mm" in md


def test_modules_to_save_are_trained_saved_and_restored(encoders, tmp_path):
    """A user-named module trains fully next to the head; save -> load restores it; resume restores it too."""
    from transformers import AutoModelForSequenceClassification

    from sorsa import load_adapter, save_adapter
    from sorsa.core.adapter_io import restore_trained_factors
    from sorsa.methods.classifier import prepare_classifier
    from sorsa.train.settings import RunConfig

    cfg = RunConfig(peft="sorsa", rank=4, train_dataset="glue-sst2", mix_precision=["fp32"],
                    modules_to_save=["roberta.embeddings.LayerNorm"])
    model = prepare_classifier(cfg, AutoModelForSequenceClassification.from_pretrained(encoders["roberta"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.dense.weight", "classifier.out_proj.bias", "roberta.embeddings.LayerNorm.weight"} <= trainable
    assert not any(n.startswith("roberta.encoder.layer.0.attention.self.query.base_layer") for n in trainable)
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)
        model.roberta.embeddings.LayerNorm.bias.add_(0.5)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(AutoModelForSequenceClassification.from_pretrained(encoders["roberta"]), tmp_path / "a")
    for name in ("classifier.out_proj.weight", "roberta.embeddings.LayerNorm.bias"):
        torch.testing.assert_close(loaded.get_parameter(name), model.get_parameter(name), rtol=0, atol=0)
    resumed = prepare_classifier(cfg, AutoModelForSequenceClassification.from_pretrained(encoders["roberta"]))
    restore_trained_factors(resumed, tmp_path / "a")
    torch.testing.assert_close(resumed.classifier.out_proj.weight, model.classifier.out_proj.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no module 'nope'"):
        prepare_classifier(RunConfig(peft="sorsa", rank=4, train_dataset="glue-sst2", modules_to_save=["nope"]),
                           AutoModelForSequenceClassification.from_pretrained(encoders["roberta"]))


# ----------------------------------------------------------------------------- data and metrics

@pytest.mark.parametrize("task", sorted(ROWS))
def test_every_schema_loads_from_a_local_file(tmp_path, task):
    rows = load_glue_rows(task, _write_rows(tmp_path / "rows.jsonl", ROWS[task]))
    t = GLUE_TASKS[task]
    assert [r["label"] for r in rows] == [r["label"] for r in ROWS[task]]
    assert all(set(r) == {*t.text_columns, "label"} for r in rows)
    assert isinstance(rows[0]["label"], float if t.is_regression else int)
    examples = BENCHMARKS[task].load_examples(tmp_path / "rows.jsonl")
    assert json.loads(BENCHMARKS[task].prompt(examples[0])) == [ROWS[task][0][c] for c in t.text_columns]


def test_bad_glue_rows_are_one_clear_error(tmp_path):
    hidden = _write_rows(tmp_path / "test.jsonl", [{"sentence": "a good movie", "label": -1, "idx": 0}])
    with pytest.raises(DataError, match="hidden test labels"):
        load_glue_rows("glue-sst2", hidden)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['hypothesis'\]"):
        load_glue_rows("glue-mnli", _write_rows(tmp_path / "m.jsonl", [{"premise": "x", "label": 0}]))
    with pytest.raises(DataError, match="not one of 0..1"):
        load_glue_rows("glue-rte", _write_rows(tmp_path / "r.jsonl", [{"sentence1": "a", "sentence2": "b",
                                                                         "label": 2}]))
    (tmp_path / "x.tsv").write_text("sentence\tlabel\na good movie\t1\n")
    with pytest.raises(DataError, match="unknown extension"):
        load_glue_rows("glue-sst2", tmp_path / "x.tsv")
    with pytest.raises(ValueError, match="is not a label 0..1"):
        BENCHMARKS["glue-sst2"].score([Example(id=0, question="", gold="1", meta={"label": 1})], ["positive"])


def _summary(task, predictions, labels):
    bench = BENCHMARKS[task]
    examples = [Example(id=i, question="", gold=str(y), meta={"label": y}) for i, y in enumerate(labels)]
    return bench.summarize(bench.score(examples, [str(p) for p in predictions]))


def test_metrics_against_hand_computed_values():
    # TP = 2, FP = 1, FN = 1, TN = 2: accuracy 4/6, F1 = 2·2/(2·2+1+1) = 2/3, MCC = (2·2−1·1)/√(3·3·3·3) = 1/3
    predictions, labels = [1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0]
    mrpc = _summary("glue-mrpc", predictions, labels)
    assert mrpc["accuracy"] == pytest.approx(4 / 6) and mrpc["correct"] == 4 and mrpc["total"] == 6
    assert mrpc["f1"] == pytest.approx(2 / 3, abs=1e-12) and mrpc["metric"] == "accuracy"
    cola = _summary("glue-cola", predictions, labels)
    assert cola["matthews_correlation"] == pytest.approx(1 / 3, abs=1e-12) and cola["score"] == cola["matthews_correlation"]
    assert _summary("glue-qqp", predictions, labels)["f1"] == pytest.approx(2 / 3)
    assert matthews_correlation([1, 1, 1], [1, 0, 1]) == 0.0  # constant predictions
    assert f1_binary([0, 0], [1, 1]) == 0.0
    # Pearson: x = 1..4, y = (1, 3, 2, 4): Σdxdy = 4, Σdx² = Σdy² = 5 -> 0.8.
    # Spearman with a tie: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / √(4.5·5) = 0.948683...
    stsb = _summary("glue-stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert stsb["pearson"] == pytest.approx(0.8, abs=1e-12) and stsb["metric"] == "pearson" and stsb["score"] == stsb["pearson"]
    assert correlations([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])["spearman"] == pytest.approx(4.5 / 22.5 ** 0.5, abs=1e-12)
    assert stsb["accuracy"] == pytest.approx(0.5)  # |error| <= 0.5 for the first and last pair only
    assert correlations([2.0, 2.0], [1.0, 3.0]) == {"pearson": None, "spearman": None}
    mnli = _summary("glue-mnli", [0, 1, 2, 2], [0, 1, 1, 2])
    assert (mnli["accuracy"], mnli["metric"], mnli["split"]) == (0.75, "accuracy", "validation_matched")
    assert BENCHMARKS["glue-mnli-mm"].task.eval_split == "validation_mismatched"


# ----------------------------------------------------------------------------- configs

GLUE_CONFIGS = sorted((ROOT / "configs" / "glue").glob("*.yaml"))


def test_there_is_a_config_per_task_and_method():
    names = {p.stem for p in GLUE_CONFIGS}
    tasks = [t.removeprefix("glue-") for t in GLUE_TASKS if t != "glue-mnli-mm"]
    assert names == {f"deberta_v3_base_{m}_{t}" for m in ("sorsa", "lora", "pissa", "full") for t in tasks}


@pytest.mark.parametrize("path", GLUE_CONFIGS, ids=lambda p: p.name)
def test_every_glue_config_loads(path):
    text = path.read_text()
    assert text.startswith("#") and "Launch:" in text and "Effective batch" in text and "validation" in text
    cfg = run.resolve_config(["--config", str(path), "--train"])
    method, task = path.stem.split("_")[-2:]
    assert cfg.name == path.stem and cfg.peft == method and cfg.model == "microsoft/deberta-v3-base"
    assert cfg.train_dataset == f"glue-{task}" and cfg.test_dataset == f"glue-{task}" and cfg.split is None
    assert yaml.safe_load(text)["train_dataset"] == f"glue-{task}"
    if method in ("lora", "pissa", "sorsa"):
        assert cfg.rank == 8


def test_eval_score_scores_a_file_of_glue_predictions(tmp_path, capsys):
    from sorsa.eval import score

    rows = [{"sentence1": "a", "sentence2": "b", "label": y} for y in [1, 0, 1, 1, 0, 0]]
    data = _write_rows(tmp_path / "mrpc.jsonl", rows)
    gens = tmp_path / "preds.jsonl"
    gens.write_text("".join(json.dumps({"id": i, "completion": str(p)}) + "\n" for i, p in enumerate([1, 0, 0, 1, 1, 0])))
    assert score.main(["--test-dataset", "glue-mrpc", "--generations", str(gens), "--test-file", str(data)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["correct"], summary["total"]) == (4, 6) and summary["f1"] == pytest.approx(2 / 3)


def test_a_hub_training_slice_is_loaded_by_the_hub_not_loaded_whole_and_cut(monkeypatch, tmp_path):
    """--split '[:3]' on the hub asks for train[:3] (MNLI's train split has 393k rows); a local file is cut here."""
    import sorsa.tasks.glue as G

    asked = []

    def hub_rows(task, split, cache_dir):
        asked.append(split)
        return [{"sentence": f"s{i}", "label": i % 2} for i in range(3)]

    monkeypatch.setattr(G, "_hub_rows", hub_rows)
    ds = G.load_glue_train("glue-sst2", "[:3]")
    assert asked == ["train[:3]"] and len(ds) == 3 and ds[2] == {"sentence": "s2", "label": 0}
    local = tmp_path / "sst2.jsonl"
    local.write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n" for i in range(5)))
    assert [r["sentence"] for r in G.load_glue_train("glue-sst2", "[1:3]", local)] == ["s1", "s2"]


def test_glue_table_shows_the_whole_validation_split_as_the_other_tables_do(tmp_path):
    """A run first scored on a subset file (eval/glue-sst2/) and then on the hub's whole split (eval/glue-sst2-<hash>/):
    the GLUE table shows the whole split's score, as read_accuracy does."""
    from sorsa.tools.report import glue_table, read_accuracy
    from sorsa.train.runs import RunDir

    run = RunDir(tmp_path / "r")
    run.write_records({"peft": "sorsa", "model": "m"})
    for folder, test_file, score in (("glue-sst2", "subset.jsonl", 0.5), ("glue-sst2-0a1b2c3d", None, 0.925)):
        (run.eval_root / folder).mkdir(parents=True)
        (run.eval_root / folder / "results.json").write_text(json.dumps(
            {"dataset": "glue-sst2", "test_file": test_file, "limit": None, "score": score, "accuracy": score}))
    row = [line for line in glue_table([run.path]).splitlines() if line.startswith("| r |")]
    assert row and "| 92.50 |" in row[0] and "50.00" not in row[0]
    assert read_accuracy(run.path, "glue-sst2") == pytest.approx(92.5)
