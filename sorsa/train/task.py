"""The two kinds of runs, each answering the recipe's questions in one place so that the recipe does not branch on
them: a causal LM trained on instruction data and scored by generation (MetaMathQA, CodeFeedback; GSM-8K, MATH,
HumanEval, MBPP), and a sequence classifier trained and scored on a GLUE task (a new head trained fully beside the
method's adapters)."""
from __future__ import annotations

from ..core.dtypes import dtype_name, precision_dtype
from ..core.errors import UserError
from ..eval.measurement import Measurement
from ..methods import CAUSAL_LM, SEQ_CLS
from ..tasks.glue import glue_task, is_glue


class GenerationTask:
    """A causal LM: the Alpaca-style prompt/response data, loss on the response, greedy generation at test."""

    task_type = CAUSAL_LM

    def model_class(self, cfg) -> tuple[type, dict]:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM, {}

    def rows(self, cfg, train_file: str | None, validation: bool = False):
        """The training rows (the dataset or file, sliced), less the --val-size rows held out (`validation`:
        those rows instead)."""
        from ..tasks.data import load_train_dataset, split_validation

        dataset = load_train_dataset(cfg.train_dataset, cfg.split, train_file, cfg.cache_path)
        return split_validation(dataset, cfg.val_size)[1 if validation else 0]

    def tokenize(self, rows, tokenizer, cfg):
        from ..tasks.data import tokenize_train_dataset

        return tokenize_train_dataset(rows, tokenizer, cfg.train_dataset, cfg.length)

    def collator(self, tokenizer):
        from ..tasks.data import CausalLMCollator

        return CausalLMCollator(tokenizer.pad_token_id)

    def prepare(self, method, model, cfg, targets):
        return method.prepare(model, cfg, targets, task_type=self.task_type)

    def measurement(self, cfg, dataset: str, model_path: str, test_file: str | None) -> Measurement:
        """Greedy generation with the backend, max new tokens (the benchmark's default unless given) and
        precision of the run."""
        from ..eval.benchmarks import default_max_new_tokens
        from ..eval.generate import resolve_backend

        return Measurement.generation(dataset, model_path, "rwkv" if cfg.rwkv else resolve_backend(cfg.backend),
                                      cfg.max_new_tokens or default_max_new_tokens(dataset), cfg.test_precision,
                                      test_file)

    def predictor(self, cfg, measurement: Measurement):
        """A factory of the generation backend for `measurement`."""
        from ..eval.benchmarks import STOP_STRINGS
        from ..eval.generate import make_generator

        s = measurement.settings
        return lambda: make_generator(s["model"], backend=s["backend"], max_new_tokens=s["max_new_tokens"],
                                      batch_size=cfg.valid_batch_size, stop=STOP_STRINGS[measurement.dataset],
                                      dtype=dtype_name(precision_dtype(cfg.test_precision)),
                                      trust_remote_code=cfg.trust_remote_code)


class ClassificationTask:
    """A sequence classifier on a GLUE task: the new head is trained fully (in float32) beside the method's
    adapters on the encoder; scored by its predictions on the task's validation split."""

    task_type = SEQ_CLS

    def model_class(self, cfg) -> tuple[type, dict]:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification, {"num_labels": glue_task(cfg.train_dataset).num_labels}

    def rows(self, cfg, train_file: str | None, validation: bool = False):
        from ..tasks.glue import load_glue_train

        return load_glue_train(cfg.train_dataset, cfg.split, train_file, cfg.cache_path)

    def tokenize(self, rows, tokenizer, cfg):
        from ..tasks.glue import tokenize_glue

        return tokenize_glue(rows, tokenizer, cfg.train_dataset, cfg.length)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)  # pads input_ids / attention_mask (/ token_type_ids)

    def prepare(self, method, model, cfg, targets):
        from ..methods.classifier import prepare_classifier

        return prepare_classifier(cfg, model, targets)

    def measurement(self, cfg, dataset: str, model_path: str, test_file: str | None) -> Measurement:
        """The classifier's input length and precision of the run."""
        return Measurement.classification(dataset, model_path, cfg.length, cfg.test_precision, test_file)

    def predictor(self, cfg, measurement: Measurement):
        from ..eval.classify import make_classifier

        labels = glue_task(measurement.dataset).num_labels
        return lambda: make_classifier(measurement.settings["model"], num_labels=labels, max_length=cfg.length,
                                       batch_size=cfg.valid_batch_size,
                                       dtype=dtype_name(precision_dtype(cfg.test_precision)),
                                       trust_remote_code=cfg.trust_remote_code)


GENERATION, CLASSIFICATION = GenerationTask(), ClassificationTask()


def training_task(cfg) -> GenerationTask | ClassificationTask:
    """The kind of model a run trains: a GLUE training set makes a classifier."""
    return CLASSIFICATION if is_glue(cfg.train_dataset) else GENERATION


def test_task(cfg, trained: bool) -> GenerationTask | ClassificationTask:
    """How cfg.test_dataset is measured on the run's model (`trained`: the run's own, else cfg.model). A trained
    classifier is scored only on a GLUE task with its own label count (MNLI's model on MNLI-mm, not SST-2's on
    MNLI); a GLUE task of a generation run scores cfg.model as a classifier."""
    classifier = trained and is_glue(cfg.train_dataset)
    if not is_glue(cfg.test_dataset):
        if classifier:
            raise UserError(f"run {cfg.name!r} is a sequence classifier trained on {cfg.train_dataset}; score it on "
                            f"a GLUE task (--test-dataset {cfg.train_dataset}), not {cfg.test_dataset}")
        return GENERATION
    task = glue_task(cfg.test_dataset)
    trained_labels = glue_task(cfg.train_dataset).num_labels if is_glue(cfg.train_dataset) else None
    if trained and trained_labels != task.num_labels:
        raise UserError(f"run {cfg.name!r} was trained on {cfg.train_dataset}, which cannot be scored as "
                        f"{task.name} ({task.num_labels} label(s)); score a run trained on that task")
    return CLASSIFICATION


def measurement_of(cfg, dataset: str, model_path: str, test_file: str | None) -> Measurement:
    """The measurement of `dataset` on `model_path` with the run's settings (a GLUE task: as a classifier)."""
    return (CLASSIFICATION if is_glue(dataset) else GENERATION).measurement(cfg, dataset, model_path, test_file)
