"""`hf:<model>`: any Hugging Face transformers architecture with random weights, on random tokens.

The config comes from `transformers.AutoConfig.for_model(model_type, **overrides)`, so
`hf:llama --arg num_hidden_layers=2` is Llama's default shape with two layers; or from a saved
config: `hf:./my-model` (a directory), `hf:path/config.json`, or `hf:org/name` when that Hub
config is in the local cache. No weights are
downloaded; with `device="meta"` nothing is allocated at all, which lets an estimator inspect a
7B model in a second.
"""

import copy
import difflib
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import WorkloadError
from memwise.core.workload import Workload
from memwise.workloads.optional import (
    broken_package_message,
    first_line,
    hide_broken_optional_packages,
    import_failure,
    root_cause,
)

TASKS = ("auto", "masked-lm", "causal-lm", "seq2seq-lm", "base")
DEFAULT_SEQ_LEN = 128
# Shown when a model type is unknown: the architectures people try first.
COMMON_MODEL_TYPES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "t5", "bart")


def hf(
    model_type: str,
    *,
    seq_len: int | None = None,
    seed: int = 0,
    task: str = "auto",
    device: str = "cpu",
    **overrides: Any,
) -> Workload:
    """Builds the `hf:<model_type>` workload: a randomly initialized transformers model.

    The head follows `task`; `auto` picks the masked-LM head when the architecture has one (BERT,
    RoBERTa, BART, ...), else the causal-LM head (GPT-2, Llama, ...), else the seq2seq-LM head
    (T5, ...), else the bare `AutoModel`. Attention uses `attn_implementation="sdpa"` where the
    architecture supports it and the architecture's default otherwise.

    Args:
        model_type: a key of `transformers.CONFIG_MAPPING` (`bert`, `gpt2`, `llama`, ...), a local
            model directory or `config.json` path, or a Hub id (`org/name`) whose config is already
            in the local Hugging Face cache (read offline, never downloaded).
        seq_len: tokens per sequence; defaults to 128, or to `max_position_embeddings` when that
            is smaller, and must not exceed it.
        seed: seeds the initial weights and the generator of the batches.
        task: `auto`, `masked-lm`, `causal-lm`, `seq2seq-lm` or `base`.
        device: where the weights are created; `meta` creates them without storage (shapes only).
        **overrides: config attributes to change, e.g. `num_hidden_layers=2`. Each must be an
            attribute of the default config, with a value of the same type.

    Returns:
        A Workload named `hf:<model_type>` whose `make_batch(batch_size)` returns a dict of int64
        (batch, seq_len) CPU tensors: `input_ids` (random ids below `vocab_size`, drawn afresh on
        every call from one seeded generator), `attention_mask` (all ones) and, except for
        `task="base"`, `labels` (equal to `input_ids`) so the model's output has a `.loss`.
        For `task="base"` the loss is the mean of `last_hidden_state` (a stand-in that makes every
        activation take part in the backward pass).

    Raises:
        WorkloadError: transformers is missing, the model type is unknown, an override is not a
            config attribute or has the wrong type, or the architecture takes no `input_ids`.

    Known limitations:
        Vision, audio and multimodal architectures (no `input_ids` or no `vocab_size`) are not
        supported.
    """
    hidden = hide_broken_optional_packages()  # before transformers loads: it imports them when installed
    try:
        import transformers
        from transformers.models.auto import modeling_auto
    except ImportError as error:
        raise WorkloadError("hf workloads need transformers: pip install 'memwise[hf]'") from error

    _check_plain_arguments(seq_len=seq_len, seed=seed, task=task, device=device)
    name = model_type
    default_config = _base_config(transformers, name)
    model_type = default_config.model_type
    _check_overrides(default_config, overrides, name)
    if name in transformers.CONFIG_MAPPING:
        config = transformers.AutoConfig.for_model(model_type, **overrides)
    else:  # a saved config: the overrides go through the config's constructor, as for_model does
        config = type(default_config).from_dict({**default_config.to_dict(), **overrides})
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int):
        raise WorkloadError(f"hf:{name}: the config has no integer vocab_size; only text models are supported")
    seq_len = _resolve_seq_len(config, seq_len, name)
    if "use_cache" not in overrides and hasattr(config, "use_cache"):
        # A step here is one full-sequence pass, as in training: a key/value cache only costs
        # memory, and a checkpointed block replayed in backward would append to it a second time.
        config.use_cache = False

    task = _resolve_task(model_type, task, modeling_auto)
    if task == "seq2seq-lm" and getattr(config, "decoder_start_token_id", None) is None:
        # Default configs of T5-like models leave it to the pretrained checkpoint; the labels need it
        # to build decoder inputs. Those models start decoding from the pad token.
        pad_token_id = getattr(config, "pad_token_id", None)
        config.decoder_start_token_id = pad_token_id if isinstance(pad_token_id, int) else 0
    auto_class = {
        "masked-lm": transformers.AutoModelForMaskedLM,
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
        "base": transformers.AutoModel,
    }[task]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = _from_config(auto_class, config, name)

    forward_parameters = inspect.signature(model.forward).parameters
    if "input_ids" not in forward_parameters:
        raise WorkloadError(f"hf:{name}: {type(model).__name__}.forward takes no input_ids; only text models are supported")
    with_attention_mask = "attention_mask" in forward_parameters
    with_labels = task != "base"
    generator = torch.Generator().manual_seed(seed)

    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        positive_int(batch_size, "batch_size")
        input_ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator, device="cpu")
        batch = {"input_ids": input_ids}
        if with_attention_mask:
            batch["attention_mask"] = torch.ones_like(input_ids)
        if with_labels:
            batch["labels"] = input_ids.clone()
        return batch

    return Workload(
        model,
        make_batch,
        loss_fn=None if with_labels else _mean_hidden_state_loss,
        name=f"hf:{name}",
        default_batch_size=8,
        extras={"config": model.config, "task": task, "seq_len": seq_len, "assumptions": hidden},
    )


def _mean_hidden_state_loss(output: Any, batch: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        hidden = output[0]
    return hidden.float().mean()


def _check_plain_arguments(*, seq_len: Any, seed: Any, task: Any, device: Any) -> None:
    # The registry does not check the arguments of hf (it takes **overrides), so check them here.
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise WorkloadError(f"hf seq_len: must be a positive integer, got {seq_len!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WorkloadError(f"hf seed: must be an integer, got {seed!r}")
    if task not in TASKS:
        raise WorkloadError(f"hf task: unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise WorkloadError(f"hf device: {device!r} is not a torch device; use e.g. cpu, cuda or meta") from error


def _base_config(transformers: Any, name: Any) -> Any:
    """The config `name` stands for: a model type, a local model directory or config.json, or a Hub
    id whose config is in the local cache (never downloaded)."""
    mapping = transformers.CONFIG_MAPPING
    if isinstance(name, str) and name in mapping:
        return transformers.AutoConfig.for_model(name)
    path = Path(os.path.expanduser(str(name)))
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        if path.is_dir() and not (path / "config.json").is_file():
            raise WorkloadError(f"hf:{name}: the directory has no config.json; give a model directory or its config.json")
        try:
            return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise WorkloadError(f"hf:{name}: cannot read the config: {type(error).__name__}: {first_line(error)}") from error
    if isinstance(name, str) and "/" in name and not name.startswith((".", "/", "~")):
        try:
            return transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        except OSError as error:
            raise WorkloadError(
                f"hf:{name}: its config is not in the local Hugging Face cache ({_hub_cache()}); memwise does not "
                f"download: fetch it with `hf download {name} config.json`, or give a local model directory or config.json"
            ) from error
        except (ValueError, KeyError) as error:
            raise WorkloadError(f"hf:{name}: cannot read the cached config: {type(error).__name__}: {first_line(error)}") from error
    if path.suffix == ".json" or os.sep in str(name):
        raise WorkloadError(f"hf:{name}: no such file or directory")
    known = list(mapping.keys())
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise WorkloadError(
        f"hf: unknown transformers model type {name!r}; {hint}"
        f"common types are {', '.join(COMMON_MODEL_TYPES)} ({len(known)} in all, see transformers.CONFIG_MAPPING); "
        "or give a local model directory, a config.json, or a Hub id (org/name) whose config is cached"
    )


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _check_overrides(default_config: Any, overrides: dict[str, Any], model_type: str) -> None:
    # AutoConfig.for_model accepts any keyword and stores it silently, so a typo would be ignored.
    for key, value in list(overrides.items()):
        if not hasattr(default_config, key):
            valid = sorted(name for name in default_config.to_dict() if not name.startswith("_"))
            raise WorkloadError(
                f"hf:{model_type}: unknown config key {key!r}; valid keys are {', '.join(valid)}, "
                "and seq_len, seed, task, device"
            )
        default = getattr(default_config, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                overrides[key] = float(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True  # None or a structured default: transformers validates it.
        if not ok:
            raise WorkloadError(
                f"hf:{model_type}: config key {key}={value!r} should be of type {type(default).__name__}, "
                f"like its default {default!r}"
            )


def _resolve_seq_len(config: Any, seq_len: int | None, model_type: str) -> int:
    max_positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_positions, int) or isinstance(max_positions, bool) or max_positions <= 0:
        return DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, max_positions)
    if seq_len > max_positions:
        raise WorkloadError(
            f"hf:{model_type}: seq_len={seq_len} exceeds max_position_embeddings={max_positions}; "
            "lower seq_len or raise max_position_embeddings"
        )
    return seq_len


def _resolve_task(model_type: str, task: str, modeling_auto: Any) -> str:
    supported = {
        "masked-lm": model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "causal-lm": model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "seq2seq-lm": model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "base": model_type in modeling_auto.MODEL_MAPPING_NAMES,
    }
    if task == "auto":
        # Masked LM first: encoders such as BERT also register a causal-LM head that warns when used.
        for candidate in ("masked-lm", "causal-lm", "seq2seq-lm", "base"):
            if supported[candidate]:
                return candidate
        raise WorkloadError(f"hf:{model_type}: transformers has no text model class for this type")
    if not supported[task]:
        available = [name for name, ok in supported.items() if ok]
        raise WorkloadError(
            f"hf:{model_type}: task {task!r} is not available for this type; available: {', '.join(available) or 'none'}"
        )
    return task


def _from_config(auto_class: Any, config: Any, model_type: str) -> torch.nn.Module:
    try:
        # A copy, because a failed attempt leaves "sdpa" recorded in the config it was given.
        return auto_class.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    except (ValueError, ImportError):
        pass  # The architecture has no SDPA attention: use its default implementation.
    try:
        return auto_class.from_config(config)
    except Exception as error:
        cause, package = root_cause(error)
        if package is not None and package not in ("transformers", "torch") and import_failure(package) is not None:
            reason = broken_package_message(package, import_failure(package))
        elif cause is not error:
            reason = f"{type(cause).__name__} in {package or 'unknown code'}: {first_line(cause)}"
        else:
            reason = f"{type(error).__name__}: {error}"
        raise WorkloadError(f"hf:{model_type}: building {auto_class.__name__} failed: {reason}") from error
