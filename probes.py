"""Capability probes: MAD's synthetic tasks (Poli et al. 2024, "Mechanistic Design and Scaling of
Hybrid Architectures", arXiv 2403.17844) as a second measurement of a genome beside perplexity.

A fresh model of the genome (the preset's width and depth, the task's own small vocabulary) is
trained on each task and scored by its accuracy where the task asks for an answer (targets are
-100, ignored, everywhere else):

    recall             key-value pairs with random keys: at every key seen before, its value
                       (in-context recall, multi-query)
    noisy_recall       the same with pairs of noise tokens interleaved
    selective_copy     tokens scattered among blanks; after the copy token, the tokens in order
    memorization       a key -> value table fixed across all examples: the value of each key

This module offers data and a scorer and imports nothing of the project: star.probe drives the
training. Each generator is a pure function of (numpy Generator, number of examples) returning inputs and
targets (n, seq_len), aligned: targets[t] is what the model must output at position t. Sizes are
MAD's shapes scaled down to train in seconds on a CPU (ours); the paper's sizes are parameters.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


def recall(rng, n, vocab=16, seq_len=32, noise_vocab=0, frac_noise=0.0):
    """Multi-query in-context recall (MAD): keys 0..h-1, values h..2h-1 with h = (vocab - noise_vocab) // 2,
    a random key -> value map per example; noise tokens (the top noise_vocab ids) replace whole pairs."""
    half, pairs = (vocab - noise_vocab) // 2, seq_len // 2 + 1
    table = rng.integers(half, 2 * half, size=(n, half))  # (n, h): each example's map
    keys = rng.integers(0, half, size=(n, pairs))  # (n, p)
    values = np.take_along_axis(table, keys, 1)
    noise = rng.random((n, pairs)) < frac_noise
    earlier = np.tril(np.ones((pairs, pairs), dtype=bool), -1)  # [j, i]: pair i comes before pair j
    seen = ((keys[:, :, None] == keys[:, None, :]) & ~noise[:, None, :] & earlier).any(-1) & ~noise  # (n, p)
    if noise_vocab:
        keys = np.where(noise, rng.integers(2 * half, 2 * half + noise_vocab, size=(n, pairs)), keys)
        values = np.where(noise, rng.integers(2 * half, 2 * half + noise_vocab, size=(n, pairs)), values)
    sequence = np.stack([keys, values], -1).reshape(n, 2 * pairs)  # k v k v ...
    answers = np.stack([np.where(seen, values, IGNORE), np.full_like(keys, IGNORE)], -1).reshape(n, 2 * pairs)
    return sequence[:, :seq_len], answers[:, :seq_len]  # at a key's position: its value, if seen before


def noisy_recall(rng, n, vocab=32, seq_len=32, noise_vocab=16, frac_noise=0.2):
    """Noisy in-context recall (MAD): recall with a fifth of the pairs replaced by noise."""
    return recall(rng, n, vocab, seq_len, noise_vocab, frac_noise)


def selective_copy(rng, n, vocab=16, seq_len=32, n_copy=4):
    """Selective copying (MAD): n_copy tokens among blanks, the copy token, then the tokens in order."""
    blank, copy, body = vocab - 2, vocab - 1, seq_len - n_copy - 1
    tokens = rng.integers(0, vocab - 2, size=(n, n_copy))
    where = np.sort(rng.random((n, body)).argsort(1)[:, :n_copy], 1)  # (n, n_copy) positions, in order
    inputs = np.full((n, seq_len), blank)
    np.put_along_axis(inputs, where, tokens, 1)
    inputs[:, body] = copy
    targets = np.full((n, seq_len), IGNORE)
    targets[:, body + 1:] = tokens
    return inputs, targets


def memorization(rng, n, vocab=1024, seq_len=32):
    """Memorization (MAD): (key, insert) pairs; at each insert token, the key's value from a table that
    is the same in every example (fixed seed): it must be stored in the weights."""
    keys, insert = (vocab - 1) // 2, vocab - 1
    table = np.random.default_rng(12345).permutation(keys) + keys  # key k -> value table[k]
    k = rng.integers(0, keys, size=(n, seq_len // 2))
    inputs = np.stack([k, np.full_like(k, insert)], -1).reshape(n, seq_len)
    targets = np.stack([np.full_like(k, IGNORE), table[k]], -1).reshape(n, seq_len)
    return inputs, targets


@dataclass(frozen=True)
class Task:
    """A probe task as a data source for star.train_candidate (the protocol star.Corpus shares:
    vocab_size, batches(...) and score(...)); star.probe trains a genome on each task."""
    name: str
    make: object  # generator (rng, n) -> (inputs, targets)
    vocab_size: int
    seq_len: int
    steps: int
    batch: int
    lr: float

    sizes: dict = dataclasses.field(default_factory=dict)  # the generator's size arguments

    def batches(self, split, n_batches, batch_size, seq_len, seed, device, start=0):
        rng = np.random.default_rng([seed, split == "train", sum(map(ord, self.name))])
        for i in range(start + n_batches):
            batch = self.make(rng, batch_size, **self.sizes)
            if i >= start:
                yield tuple(torch.from_numpy(a.astype(np.int64)).to(device) for a in batch)

    def score(self, model, preset, device):
        """{'accuracy': share of answer positions where the model's most likely token is the answer}
        (the caller chooses the precision: star.train_candidate scores under its autocast)."""
        model.eval()
        right = total = 0
        with torch.no_grad():
            for x, y in self.batches("test", preset.eval_batches, preset.batch_size, self.seq_len, preset.seed, device):
                answer = y != IGNORE
                right += (model(x)[0].argmax(-1)[answer] == y[answer]).sum().item()
                total += answer.sum().item()
        model.train()
        return {"accuracy": right / max(total, 1)}

    def preset(self, preset):
        """The search's width, depth and seed; the task's length, budget and a cosine schedule (the
        budgets below were set under it); eager, since the compile warm-up sees the search's
        shapes only (README: "Compilation")."""
        return dataclasses.replace(preset, seq_len=self.seq_len, steps=self.steps, batch_size=self.batch, lr=self.lr,
                                   warmup=self.steps // 10, decay=1.0, eval_batches=4, compile=False)


# Budgets (ours), the smallest at which the separation is clear and stable on the tiny preset: with
# 160 steps of 64 sequences a Transformer++ learns in-context recall under every seed tried (0-5;
# with 100 steps it failed under two: attention's induction forms suddenly, after a plateau), and
# noisy recall with 240 (0-3; with 160 it failed under seed 1).
TASKS = {t.name: t for t in (
    Task("recall", recall, 16, 32, 160, 64, 6e-3),
    Task("noisy_recall", noisy_recall, 32, 32, 240, 64, 6e-3),
    Task("selective_copy", selective_copy, 16, 32, 100, 64, 6e-3),
    Task("memorization", memorization, 1024, 32, 60, 32, 3e-3),
)}
# MAD's own sizes (Poli et al. 2024: recall over 128 tokens, 16 tokens copied out of 256), for the gpu
# preset (config.PROBES); the budgets are the tiny ones, not yet tuned on a GPU. Memorization keeps its table.
MAD_TASKS = {**TASKS,
             "recall": dataclasses.replace(TASKS["recall"], seq_len=128, sizes={"seq_len": 128}),
             "noisy_recall": dataclasses.replace(TASKS["noisy_recall"], seq_len=128, sizes={"seq_len": 128}),
             "selective_copy": dataclasses.replace(TASKS["selective_copy"], seq_len=256,
                                                   sizes={"seq_len": 256, "n_copy": 16})}

