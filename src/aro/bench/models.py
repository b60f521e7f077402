"""Benchmark models: a GPT-style pre-norm decoder and a fine-grained MoE variant.

Both are small, byte-level (vocabulary 256) and deterministic given the seed. Layout follows
GPT-2 (learned positional embedding, pre-norm blocks, optional weight tying) with RMSNorm and
``scaled_dot_product_attention``. Attention projections are separate ``q``, ``k``, ``v``, ``o``
matrices (not fused) so that every matrix has one role in the residual stream.

The MoE variant (Sigma-MoE-like) replaces the MLP with top-k routed fine-grained experts held as
3-D tensors ``w_up [E, d, h]`` and ``w_down [E, h, d]`` and a linear ``router``. Without a
balancing term, routing can collapse onto a few experts, and an expert that gets no tokens gets
no gradient; ``balance_coef`` adds the Switch Transformer load-balancing loss
(Fedus et al. 2022, eq. 4: ``E * sum_i f_i * P_i``, f_i the fraction of routed slots that go to
expert i, P_i its mean router probability; 1 when balanced, up to E / k when collapsed) to the
training loss, never to the reported losses. It is computed per process on the local batch, so a
balanced model under data parallelism trains like a single process only up to that term.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "ModelConfig", "PRESETS", "balance_loss", "build_model", "lm_loss"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy, computed in float32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = False
    n_experts: int = 0  # 0: dense MLP
    top_k: int = 2
    expert_hidden: int = 0  # per-expert hidden size (MoE only)
    balance_coef: float = 0.0  # weight of the load-balancing loss (MoE only; 0: none)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # about 0.2M parameters: smoke tests and the quickest runs
    "tiny": ModelConfig(d_model=64, n_layers=3, n_heads=2, seq_len=64),
    # about 0.9M: the quick and standard benchmark model
    "small": ModelConfig(d_model=128, n_layers=4, n_heads=4, seq_len=128),
    "small-tied": ModelConfig(d_model=128, n_layers=4, n_heads=4, seq_len=128, tie_embeddings=True),
    # about 3.3M
    "medium": ModelConfig(d_model=192, n_layers=6, n_heads=6, seq_len=128),
    # about 19M
    "large": ModelConfig(d_model=384, n_layers=10, n_heads=6, seq_len=256),
    # MoE: 8 experts of hidden 128 (fine-grained: a quarter of the dense MLP's 4d), top-2, about 1.4M parameters
    "moe-small": ModelConfig(d_model=128, n_layers=4, n_heads=4, seq_len=128, n_experts=8, top_k=2, expert_hidden=128),
    # the same with the load-balancing loss at Switch Transformer's weight, 0.01
    "moe-small-balanced": ModelConfig(d_model=128, n_layers=4, n_heads=4, seq_len=128, n_experts=8, top_k=2,
                                      expert_hidden=128, balance_coef=0.01),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # heads counted from the projection's width (-1), so a tensor-parallel q/k/v that computes
        # only this rank's heads runs the same code (aro.bench.parallel.tensor_parallel)
        B, T, d = x.shape
        head = d // self.n_heads
        q, k, v = (proj(x).view(B, T, -1, head).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def balance_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss ``E * sum_i f_i * P_i``.

    ``gates`` [N, E] are the router probabilities, ``load`` [E] the routed slots per expert
    (top-k: N * k in all). f carries no gradient; the loss reaches the router through P.
    """
    E = gates.shape[-1]
    f = load.to(gates.dtype) / load.sum()
    return E * (f * gates.mean(dim=0)).sum()


class MoE(nn.Module):
    """Top-k routed experts; ``w_up[e]`` is ``d x h`` (x @ w_up[e]), ``w_down[e]`` is ``h x d``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, E = cfg.d_model, cfg.expert_hidden, cfg.n_experts
        self.top_k = cfg.top_k
        self.balance_coef = cfg.balance_coef
        self.router = nn.Linear(d, E, bias=False)
        self.w_up = nn.Parameter(torch.empty(E, d, h))
        self.w_down = nn.Parameter(torch.empty(E, h, d))
        # set by each forward: routed slots per expert (no gradient), and the weighted balancing
        # loss of a training forward (None in eval mode or with balance_coef 0)
        self.last_load: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        gates = self.router(flat).softmax(dim=-1)
        weights, experts = gates.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        E = self.w_up.shape[0]
        self.last_load = torch.bincount(experts.flatten(), minlength=E).detach()
        self.last_balance_loss = None
        if self.training and self.balance_coef:
            self.last_balance_loss = self.balance_coef * balance_loss(gates, self.last_load)
        out = torch.zeros_like(flat)
        for e in range(E):
            token, slot = (experts == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = F.gelu(flat[token] @ self.w_up[e]) @ self.w_down[e]
            out.index_add_(0, token, h * weights[token, slot, None])
        return out.view(B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02), residual-output projections scaled by 1/sqrt(2L)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue
            residual = name.endswith(("attn.o.weight", "mlp.down.weight", "mlp.w_down"))
            nn.init.normal_(p, std=residual_std if residual else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(self(idx), targets)

    def train_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """What a training step differentiates: :meth:`loss` plus :meth:`aux_loss` (if any)."""
        loss = self.loss(idx, targets)
        aux = self.aux_loss()
        return loss if aux is None else loss + aux

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing losses of the last training forward, summed over the
        layers; None for a dense model or without ``balance_coef``."""
        terms = [moe.last_balance_loss for moe in self._moe_layers() if moe.last_balance_loss is not None]
        return torch.stack(terms).sum() if terms else None

    def expert_load(self) -> list[torch.Tensor]:
        """Routed slots per expert in each MoE layer during the last forward (empty if dense)."""
        return [moe.last_load for moe in self._moe_layers() if moe.last_load is not None]

    def _moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]


def build_model(name_or_cfg: str | ModelConfig, seed: int) -> GPT:
    """The preset (or config) with weights drawn from ``seed``: the same for every optimizer."""
    cfg = PRESETS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg)
