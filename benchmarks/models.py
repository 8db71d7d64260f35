"""Benchmark models: an encoder-decoder Transformer of the Multi30K class (the CIFAR ResNet-18 is
timm_ext's ``cifar_resnet18``, the model the sweeps train).

The Transformer writes its attention with explicit q/k/v/out nn.Linear modules (fairseq's layout),
so every projection is a module FNGD and KFAC can see; nn.MultiheadAttention would hide them
behind F.multi_head_attention_forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mem, mask=None, causal=False):
        n, t, d = x.shape
        s = mem.shape[1]
        h = self.heads
        q = self.q_proj(x).view(n, t, h, d // h).transpose(1, 2)
        k = self.k_proj(mem).view(n, s, h, d // h).transpose(1, 2)
        v = self.v_proj(mem).view(n, s, h, d // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, d))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, cross: bool):
        super().__init__()
        self.self_attn = Attention(d, heads)
        self.ln1 = nn.LayerNorm(d)
        self.cross = Attention(d, heads) if cross else None
        self.ln2 = nn.LayerNorm(d) if cross else None
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ln3 = nn.LayerNorm(d)

    def forward(self, x, mem=None, src_mask=None, causal=False):
        x = self.ln1(x + self.self_attn(x, x, None if causal else src_mask, causal=causal))
        if self.cross is not None:
            x = self.ln2(x + self.cross(x, mem, src_mask))
        return self.ln3(x + self.fc2(F.relu(self.fc1(x))))


class Seq2Seq(nn.Module):
    """Post-norm encoder-decoder Transformer; decoder input and output embeddings shared."""

    def __init__(self, vocab: int = 8000, d: int = 256, heads: int = 4, ffn: int = 1024, layers: int = 3,
                 share: bool = True, pad: int = 1):
        super().__init__()
        self.pad, self.scale = pad, math.sqrt(d)
        self.src_emb = nn.Embedding(vocab, d, padding_idx=pad)
        self.tgt_emb = nn.Embedding(vocab, d, padding_idx=pad)
        self.enc = nn.ModuleList(Layer(d, heads, ffn, cross=False) for _ in range(layers))
        self.dec = nn.ModuleList(Layer(d, heads, ffn, cross=True) for _ in range(layers))
        self.out = nn.Linear(d, vocab, bias=False)
        if share:
            self.out.weight = self.tgt_emb.weight

    @staticmethod
    def positions(t: int, d: int, device) -> torch.Tensor:
        pos = torch.arange(t, device=device)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, device=device) / d)
        pe = torch.zeros(t, d, device=device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return pe

    def forward(self, src, prev):
        d = self.src_emb.embedding_dim
        src_mask = (src != self.pad)[:, None, None, :]
        x = self.src_emb(src) * self.scale + self.positions(src.shape[1], d, src.device)
        for layer in self.enc:
            x = layer(x, src_mask=src_mask)
        y = self.tgt_emb(prev) * self.scale + self.positions(prev.shape[1], d, prev.device)
        for layer in self.dec:
            y = layer(y, x, src_mask=src_mask, causal=True)
        return self.out(y)


def seq2seq_batch(n: int, t: int, vocab: int, pad: int = 1, seed: int = 0, device="cpu"):
    """Random token batch with per-sentence lengths (padding at the end), as fairseq batches look."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (n, t), generator=g)
    tgt = torch.randint(4, vocab, (n, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] >= lengths[:, None]
    src[mask], tgt[mask] = pad, pad
    prev = torch.cat([torch.full((n, 1), 2), tgt[:, :-1]], dim=1)
    prev[mask] = pad
    return src.to(device), prev.to(device), tgt.to(device)


def seq2seq_loss(model: Seq2Seq, batch) -> torch.Tensor:
    """Label-smoothed cross-entropy, mean over sentences of each sentence's token sum (per-sentence loss)."""
    src, prev, tgt = batch
    logits = model(src, prev)
    tok = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=model.pad, reduction="none", label_smoothing=0.1)
    return tok.sum(1).mean()
