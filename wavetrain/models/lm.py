"""The language-model shell shared by every attention mechanism.

tokens (B, N) -> embedding (+ positions) -> L residual blocks -> final LayerNorm -> logits (B, N, V).

Everything that differs between the papers' shells is an option of ``cfg.model`` (see conf/config.yaml):
position signal (learned table, sinusoidal, none), pre/post norm, tied head, dropout sites, init scheme,
interference modules between blocks, per-layer attention overrides (DWARF condM's full-attention layer).
The shell never branches on which attention it holds: attention modules come from ``hydra.utils.instantiate``.
"""
from __future__ import annotations

import math
import warnings

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wavetrain.models.blocks import Block, FeedForward

POSITIONS = ("learned", "sinusoidal", "none")
INITS = ("normal", "torch_default")


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p ω_i), PE[p, 2i+1] = cos(p ω_i), ω_i = 10000^(-2i/D) (spec wavefield.md §1)."""
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    omega = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(position * omega)
    table[:, 1::2] = torch.cos(position * omega)[:, : dim // 2]
    return table


class LanguageModel(nn.Module):
    """Decoder-only LM over a stack of ``Block``s; ``forward(ids) -> logits``."""

    def __init__(self, vocab_size: int, dim: int, blocks: list[Block], *, position: str, position_rows: int,
                 dropout: float, embedding_dropout: bool, final_norm: bool, tie_head: bool) -> None:
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"model.position={position!r} is not a position signal: use one of {list(POSITIONS)}")
        self.position = position
        self.position_rows = position_rows
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(position_rows, dim) if position == "learned" else None
        if position == "sinusoidal":
            self.register_buffer("sinusoids", sinusoidal_table(position_rows, dim), persistent=False)
        self.embedding_dropout = nn.Dropout(dropout if embedding_dropout else 0.0)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_head:
            self.head.weight = self.token_embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.token_embedding(ids)
        if self.position == "learned":
            if n > self.position_rows:
                raise ValueError(f"sequence of {n} tokens is longer than the {self.position_rows} learned positions: "
                                 f"raise seq_len (or model.position_rows) and retrain")
            x = x + self.position_embedding.weight[:n]
        elif self.position == "sinusoidal":
            table = self.sinusoids if n <= self.sinusoids.shape[0] else sinusoidal_table(n, x.shape[-1]).to(x.device)
            x = x + table[:n].to(x.dtype)
        return self.embedding_dropout(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


def build_attention(cfg: DictConfig, dim: int | None = None, layer_idx: int = 0,
                    attention_cfg: DictConfig | None = None) -> nn.Module:
    """Instantiate ``cfg.attention`` (or ``attention_cfg``) as a (B, N, D) -> (B, N, D) causal module."""
    spec = attention_cfg if attention_cfg is not None else cfg.attention
    return instantiate(spec, dim=dim if dim is not None else cfg.scale.d_model, n_heads=cfg.scale.n_heads,
                       seq_len=cfg.seq_len, layer_idx=layer_idx, n_layers=cfg.scale.n_layers, _convert_="all")


def _block_index(value: int, n_layers: int, key: str) -> int:
    """A block index, negative ones counting from the last block (-1 = last), checked against the depth."""
    index = int(value)
    if not -n_layers <= index < n_layers:
        raise ValueError(f"{key} names block {index}, outside the model's {n_layers} blocks (0..{n_layers - 1}, "
                         f"or negative from the end)")
    return index % n_layers


def interference_blocks(spec: DictConfig, n_layers: int) -> list[int]:
    """Blocks that carry an interference module: explicit ``blocks``, or every ``interval``-th block (1-based
    multiples: interval 3 gives blocks 2, 5, 8, ...), minus ``skip_blocks`` (negative = from the end)."""
    if spec.get("blocks") is not None:
        blocks = [_block_index(b, n_layers, "model.interference.blocks") for b in spec.blocks]
    else:
        interval = int(spec.interval)
        if interval < 1:
            raise ValueError(f"model.interference.interval={interval} must be >= 1")
        blocks = [i for i in range(n_layers) if (i + 1) % interval == 0]
    skipped = {int(b) % n_layers for b in spec.get("skip_blocks") or []}
    return [b for b in blocks if b not in skipped]


def _build_interference(spec: DictConfig | None, dim: int, n_layers: int) -> tuple[dict[int, nn.Module], str]:
    if spec is None:
        return {}, "after_attention"
    module_spec = {k: v for k, v in OmegaConf.to_container(spec, resolve=True).items()
                   if k not in ("blocks", "interval", "skip_blocks", "site")}
    blocks = interference_blocks(spec, n_layers)
    if not blocks:
        # e.g. DWARF +RP (interval 3: blocks 2, 5) on a 2-layer model: the run equals the condition without pooling.
        warnings.warn(f"model.interference places no module in a {n_layers}-layer model (interval "
                      f"{spec.get('interval')}, blocks {spec.get('blocks')}): this run has no interference pooling; "
                      f"use scale.n_layers >= {spec.get('interval') or 'the listed block + 1'} or "
                      f"model.interference.blocks=[...] to place it", stacklevel=2)
    modules = {block: instantiate(module_spec, dim=dim, module_idx=k) for k, block in enumerate(blocks)}
    return modules, spec.get("site", "after_attention")


def apply_init(model: nn.Module, scheme: str, std: float) -> None:
    """Global init pass, then each module's ``post_init`` hook (the re-inits the specs run after it).

    normal: every Linear N(0, std²) with zero bias, every Embedding N(0, std²) (GPT-2, Wave Field, DWARF).
    torch_default: PyTorch's own inits, learned positions zero (the WDA reference, spec wda.md §1)."""
    if scheme not in INITS:
        raise ValueError(f"model.init={scheme!r} is not an init scheme: use one of {list(INITS)}")
    for module in model.modules():
        if scheme == "normal" and isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    if scheme == "torch_default" and getattr(model, "position_embedding", None) is not None:
        nn.init.zeros_(model.position_embedding.weight)
    for module in model.modules():
        if hasattr(module, "post_init"):
            module.post_init()


def resolve_vocab_size(cfg: DictConfig, vocab_size: int | None) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    declared = cfg.tokenizer.get("vocab_size")
    if declared is None:
        raise ValueError(f"tokenizer={cfg.tokenizer.kind} takes its vocabulary size from the corpus: pass "
                         f"vocab_size= to build_model, or pick a tokenizer that declares tokenizer.vocab_size")
    return int(declared)


def build_model(cfg: DictConfig, vocab_size: int | None = None) -> LanguageModel:
    """Build the LM described by a composed config: LongTensor (B, N) -> logits (B, N, V)."""
    scale, shell = cfg.scale, cfg.model
    dim, n_layers = int(scale.d_model), int(scale.n_layers)
    check_compile_setting(shell.get("compile", "auto"))
    for key in ("d_model", "n_layers", "n_heads", "ffn_dim"):
        if int(scale[key]) <= 0:
            raise ValueError(f"scale.{key}={scale[key]} must be positive")
    if dim % int(scale.n_heads):
        raise ValueError(f"scale.d_model={dim} is not divisible by scale.n_heads={scale.n_heads}: "
                         f"choose n_heads dividing d_model")
    interference, site = _build_interference(shell.get("interference"), dim, n_layers)
    overrides = {_block_index(k, n_layers, "model.layer_attention"): v
                 for k, v in (shell.get("layer_attention") or {}).items()}
    blocks = []
    for layer in range(n_layers):
        blocks.append(Block(
            dim, build_attention(cfg, dim, layer, overrides.get(layer)),
            FeedForward(dim, int(scale.ffn_dim), float(scale.dropout), list(shell.ffn_dropout)),
            norm=shell.norm, attn_output_dropout=float(scale.dropout) if shell.attn_output_dropout else 0.0,
            interference=interference.get(layer), interference_site=site,
            checkpoint_attention=bool(shell.activation_checkpointing)))
    rows = shell.get("position_rows") or int(cfg.seq_len)
    if shell.position == "learned" and rows < int(cfg.seq_len):
        raise ValueError(f"model.position_rows={rows} is shorter than seq_len={cfg.seq_len}: set "
                         f"model.position_rows=null (one row per position) or a value >= seq_len")
    model = LanguageModel(resolve_vocab_size(cfg, vocab_size), dim, blocks, position=shell.position,
                          position_rows=int(rows), dropout=float(scale.dropout),
                          embedding_dropout=bool(shell.embedding_dropout), final_norm=bool(shell.final_norm),
                          tie_head=bool(shell.tie_head))
    apply_init(model, shell.init, float(shell.init_std))
    return model


def check_compile_setting(setting: object) -> None:
    """Refuse a ``model.compile`` value other than auto, true or false, naming the fix."""
    if setting != "auto" and not isinstance(setting, bool):
        raise ValueError(f"model.compile={setting!r} is not a compile setting: use model.compile=auto (compiled on "
                         f"CUDA, eager on CPU), model.compile=true or model.compile=false")


def compile_enabled(setting: object, device: torch.device) -> bool:
    """Whether ``model.compile`` = ``setting`` compiles the model on ``device``: auto compiles on CUDA only (on a
    CPU the code generation costs more than it saves at the sizes trained there), true and false decide."""
    check_compile_setting(setting)
    return device.type == "cuda" if setting == "auto" else bool(setting)


# torch.compile backend of compile_blocks: inductor generates fused kernels; the tests trace with aot_eager, which
# runs the same graphs (forward and backward) without code generation, in seconds on a CPU.
COMPILE_BACKEND = "inductor"


def compile_in_place(module: nn.Module, backend: str | None = None) -> None:
    """``module.compile()`` with static shapes (``dynamic=False``: the FFT lengths are derived from them in Python)
    and the COMPILE_BACKEND unless ``backend`` is given."""
    module.compile(backend=backend or COMPILE_BACKEND, dynamic=False)


def compile_blocks(model: LanguageModel, backend: str | None = None) -> None:
    """torch.compile every residual block in place (``nn.Module.compile``), as torchtitan does.

    In place, so the module tree, the state_dict keys, checkpoints, resume and ``load_model`` are those of the eager
    model.  Per block, so the blocks of one model, which run the same code on parameters of the same shapes, share
    one compiled graph (one forward and one backward to generate, whatever the depth) and compile time stays short.
    A new input shape or the switch to eval mode compiles once more (:func:`compile_in_place`: static shapes)."""
    for block in model.blocks:
        compile_in_place(block, backend)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied head counts once)."""
    return sum(p.numel() for p in model.parameters())
