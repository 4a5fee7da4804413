"""`gpt`: a nanoGPT-style decoder-only transformer on random tokens, from tiny to GPT-2 124M.

The model follows Karpathy's nanoGPT (`transformer.wte/wpe/drop/h/ln_f`, `lm_head` tied to `wte`,
GELU MLP of 4x width, causal `scaled_dot_product_attention`), so its parameter count and module
names match what readers of nanoGPT expect: the `gpt2-124m` preset has 124,439,808 parameters.
"""

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.workload import Workload


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a `GPT`.

    Attributes:
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide `n_embd`.
        n_embd: width of the residual stream.
        block_size: longest sequence the position embedding covers.
        vocab_size: number of token ids.
        dropout: dropout probability (embeddings, attention, residual branches).
        bias: whether Linear and LayerNorm layers have biases (GPT-2 has them).
    """

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BadInputError(f"GPTConfig {name}: must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise BadInputError(
                f"GPTConfig n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_head so that each head gets n_embd / n_head dimensions"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"GPTConfig dropout: must be a number in [0, 1), got {self.dropout!r}")


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192),
    "gpt2-124m": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no `bias=False` before 2.1)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, channels = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (batch, seq, channels) -> (batch, heads, seq, head_dim)
        q = q.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, seq, channels)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear to 4x width, GELU, Linear back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's decoder: token + position embeddings, `n_layer` Blocks, final LayerNorm, tied LM head.

    `forward(idx)` returns logits of shape (batch, seq, vocab_size); `forward(idx, targets)` returns
    the mean next-token cross-entropy loss (targets equal to -1 are ignored).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying as in GPT-2: the output projection is the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) to keep the stream's variance flat.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        seq = idx.size(1)
        if seq > self.config.block_size:
            raise BadInputError(f"GPT input length {seq} exceeds block_size={self.config.block_size}")
        positions = torch.arange(seq, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def gpt(
    *,
    preset: str = "tiny",
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    block_size: int | None = None,
    vocab_size: int | None = None,
    seq_len: int | str | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> Workload:
    """Builds the `gpt` workload: a `GPT` from a preset, with any of its sizes overridden.

    Presets: `tiny` (2 layers, 2 heads, width 64, block 64, vocab 512), `small` (6, 6, 384, 256,
    8192) and `gpt2-124m` (12, 12, 768, 1024, 50257). Build inside `with torch.device("meta"):` to
    get the model's shapes without allocating its weights.

    Args:
        preset: one of `PRESETS`.
        n_layer: overrides the preset's number of blocks.
        n_head: overrides the preset's attention heads (must divide n_embd).
        n_embd: overrides the preset's width.
        block_size: overrides the preset's longest sequence.
        vocab_size: overrides the preset's vocabulary size.
        seq_len: tokens per sequence in a batch; defaults to block_size and must not exceed it.
            A range `"64-256"` makes every batch a random length in it (inclusive), drawn from
            the seeded generator; the workload then declares `make_largest_batch` (length 256).
        dropout: dropout probability.
        seed: seeds the initial weights and the generator of the batches.
        device: `cpu`, or `meta` to build the model without allocating its weights (for
            `memwise estimate` of models larger than this machine).

    Returns:
        A Workload named `gpt-<preset>` whose `make_batch(batch_size)` returns `(idx, targets)`:
        int64 (batch, seq_len) random token ids and the same sequences shifted by one token, drawn
        afresh on every call from one seeded generator; its model returns the loss.
        `extras["dataset"]` is a `TokenSequenceDataset` of 1024 such sequences (longest length).
    """
    if not isinstance(preset, str) or preset not in PRESETS:
        raise BadInputError(f"gpt preset: unknown preset {preset!r}; valid presets are {', '.join(PRESETS)}")
    overrides = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size, "vocab_size": vocab_size}
    seq_len, max_seq_len = _seq_len_range(seq_len)
    for name, value in {**overrides, "seq_len": seq_len}.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise BadInputError(f"gpt {name}: must be a positive integer or omitted, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInputError(f"gpt seed: must be an integer, got {seed!r}")
    given = {name: value for name, value in overrides.items() if value is not None}
    config = dataclasses.replace(PRESETS[preset], **given, dropout=dropout)
    seq_len = config.block_size if seq_len is None else seq_len
    max_seq_len = seq_len if max_seq_len is None else max_seq_len
    if max_seq_len > config.block_size:
        raise BadInputError(f"gpt seq_len={max_seq_len} exceeds block_size={config.block_size}; lower seq_len or raise block_size")

    if device not in ("cpu", "meta"):
        raise BadInputError(f"gpt device: must be 'cpu' or 'meta', got {device!r}")
    placement = torch.device("meta") if device == "meta" else contextlib.nullcontext()  # an outer device context still applies
    with torch.random.fork_rng(devices=[]), placement:
        torch.manual_seed(seed)
        model = GPT(config)
    generator = torch.Generator().manual_seed(seed)

    def make_batch(batch_size: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        positive_int(batch_size, "batch_size")
        if length is None:
            length = seq_len if max_seq_len == seq_len else int(torch.randint(seq_len, max_seq_len + 1, (1,), generator=generator))
        tokens = torch.randint(config.vocab_size, (batch_size, length + 1), generator=generator, device="cpu")
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def make_largest_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(batch_size, max_seq_len)

    name = f"gpt-{preset}"
    if given:
        name += "(" + ",".join(f"{key}={value}" for key, value in given.items()) + ")"
    if max_seq_len != seq_len:
        name += f"[seq_len={seq_len}-{max_seq_len}]"
    dataset = TokenSequenceDataset(config.vocab_size, max_seq_len, DATASET_SEQUENCES, seed)
    return Workload(model, make_batch, name=name, default_batch_size=8,
                    extras={"config": config, "seq_len": max_seq_len, "dataset": dataset},
                    make_largest_batch=make_largest_batch)


DATASET_SEQUENCES = 1024


class TokenSequenceDataset(torch.utils.data.Dataset):
    """A fixed set of random token sequences (drawn once from `seed`), for `memwise tune-loader gpt`.

    Item `i` is `(idx, targets)`: int64 (seq_len,) token ids and the same sequence shifted by one
    token, as one row of the workload's `make_batch`. Its own generator: drawing it does not change
    the workload's batches. Drawn on first read, on the CPU, so building the workload on the meta
    device (or under a fake mode) allocates nothing for it.
    """

    def __init__(self, vocab_size: int, seq_len: int, count: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.count, self.seed = vocab_size, seq_len, count, seed
        self._tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._tokens = torch.randint(self.vocab_size, (self.count, self.seq_len + 1), generator=generator, device="cpu")
        sequence = self._tokens[index]
        return sequence[:-1], sequence[1:]


def _seq_len_range(seq_len: int | str | None) -> tuple[int | None, int | None]:
    """`seq_len` as (shortest, longest): an int gives (n, None); the text `"64-256"` gives (64, 256)."""
    if not isinstance(seq_len, str):
        return seq_len, None
    low, sep, high = seq_len.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or not 0 < int(low) <= int(high):
        raise BadInputError(f"gpt seq_len: expected a positive integer or a range like '64-256' (shortest-longest), got {seq_len!r}")
    return int(low), int(high)
