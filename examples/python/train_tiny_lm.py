"""Train a tiny character-level language model whose loss is smax's linear cross-entropy.

The text comes from a small generative grammar (so the example needs no download), the model
is an embedding, two pre-norm transformer blocks whose attention runs through smax's flash
kernels (``smax.torch.scaled_dot_product_attention``), and a classifier tied to the
embedding. ``smax.torch.LinearCrossEntropyLoss`` computes the loss from the last hidden states
and the classifier weight without ever forming the ``[tokens, vocabulary]`` logits.

    pip install "./crates/smax-py[test]"
    python examples/python/train_tiny_lm.py [--steps 300]

It prints the loss every 25 steps (it falls from ln(V) ≈ 3.1 for the 23 characters),
then a greedy sample drawn with ``smax.sample``.
"""

import argparse
import math
import random

import numpy as np
import torch
import torch.nn as nn

import smax
import smax.torch as st

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "finds", "draws", "hears"]
OBJECTS = ["the moon", "a red ball", "the river", "an apple", "the garden", "a song"]
ENDINGS = [".", " today.", " again.", " at night."]


def make_text(n_sentences: int, rng: random.Random) -> str:
    return " ".join(
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        for _ in range(n_sentences)
    )


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = st.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied classifier: small initial logits
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def hidden(self, idx):
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    text = make_text(4000, rng)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    vocab, context, batch = len(chars), 64, 32
    model = TinyLM(vocab, context=context)
    loss_fn = st.LinearCrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"vocabulary {vocab} characters, {len(data)} tokens; initial loss should be near ln(V) = {math.log(vocab):.2f}")
    first = last = None
    for step in range(args.steps + 1):
        starts = torch.randint(0, len(data) - context - 1, (batch,))
        x = torch.stack([data[s : s + context] for s in starts])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        h = model.hidden(x)
        loss = loss_fn(h, model.embed.weight, y)  # tied classifier; logits never formed
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 25 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"loss fell from {first:.3f} to {last:.3f}")
    # Greedy continuation, drawn with smax's sampler (temperature 0 = argmax).
    idx = torch.tensor([[stoi[c] for c in "the cat "]])
    with torch.no_grad():
        for _ in range(40):
            h = model.hidden(idx[:, -context:])[:, -1]
            logits = (h @ model.embed.weight.T).numpy()
            nxt = smax.sample(logits, temperature=0.0)
            idx = torch.cat([idx, torch.from_numpy(np.asarray(nxt)).view(1, 1)], dim=1)
    print("sample:", "".join(chars[i] for i in idx[0].tolist()))


if __name__ == "__main__":
    main()
