"""Genome -> model, data, training and evaluation, static metrics (STAR paper sections 2, 4.1, 5).

    python star.py train (--genome G | --baseline NAME) [--preset tiny] [--steps N] [--save model.pt]
    python star.py show  (--genome G | --baseline NAME)
    python star.py sample --checkpoint model.pt [--prompt TEXT] [--tokens N]

G is a genome JSON file or the compact form (genome.to_compact). A model is the paper's fixed
wrapper around the evolved backbone: embedding, x = x + LIV(RMSNorm(x)) per LIV, final RMSNorm,
LM head tied to the embedding.
"""
import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import genome as gn
import liv

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare.txt.gz")


@dataclass
class Preset:
    """Model size and training budget of one candidate. Every field is a command-line flag."""
    width: int = 64
    heads: int = 4
    n_livs: int = 8
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 120
    lr: float = 3e-3
    warmup: int = 12
    eval_batches: int = 8
    chunk: int = 64
    compile: bool = False
    seed: int = 0


PRESETS = {
    # CPU: ~6-17 s per candidate on 2 cores. With 4 heads, SA-3's repeat factor 4 leaves one K/V
    # head, as SA-4 (MQA) has: the two classes differ only from 8 heads on (8 costs ~25% CPU time).
    "tiny": Preset(),
    # One GPU: thin-deep proxies (paper section 5.3: full depth, reduced width), byte-level.
    "gpu": Preset(width=256, heads=8, n_livs=24, seq_len=1024, batch_size=32, steps=2000, lr=1e-3,
                  warmup=200, eval_batches=32, compile=True),
}
# Paper (section 6 of the spec): AdamW betas (0.9, 0.95), weight decay 0.1, clip 1.0, cosine.
BETAS, WEIGHT_DECAY, GRAD_CLIP, MIN_LR_RATIO = (0.9, 0.95), 0.1, 1.0, 0.1


# ---------------------------------------------------------------------------------------------
# The model


class Model(nn.Module):
    """A compiled backbone genome (paper section 4.1)."""

    def __init__(self, genome, vocab_size=256, width=64, heads=4, max_len=1024, chunk=64):
        super().__init__()
        self.genome = gn.as_array(genome)
        problems = gn.validate(self.genome)
        if problems:
            raise ValueError("invalid genome: " + "; ".join(problems))
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of an even size")
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width, eps=1e-6) for _ in self.genome)
        self.livs = nn.ModuleList()
        self.feature_leader = []  # per LIV: position of the LIV whose features it reads, or None
        for i, row in enumerate(self.genome.tolist()):  # python ints: torch.compile guards on them
            cls = gn.lookup(row)
            cfg = liv.LIVConfig(mixer=cls.mixer, width=width, heads=heads, diff=cls.diff,
                                max_len=max_len, chunk=chunk, **cls.featurizer)
            fz_leader = row[1] - 1 if row[2] > 1 and row[1] - 1 != i else None
            ft_leader = row[3] - 1 if row[4] > 1 and row[3] - 1 != i else None
            self.feature_leader.append(ft_leader)
            self.livs.append(liv.LIV(cfg, featurizer_from=self.livs[fz_leader] if fz_leader is not None else None,
                                     shared_groups=tuple(gn.FEATURE_SHARING[row[4]]) if ft_leader is not None else ()))
        self.norm_f = nn.RMSNorm(width, eps=1e-6)
        self.feature_leaders = set(self.feature_leader) - {None}  # LIVs whose features are read later
        self.block, self.head = residual_block, lm_head  # compile_blocks() swaps in compiled versions
        self.labels = [f"liv:{gn.lookup(row).name}" for row in self.genome]  # profiler rows per class
        self.profiling = False  # bench.py turns on a record_function label per LIV
        self.init_weights()

    def init_weights(self):
        """GPT-2 style: N(0, 0.02) projections and embedding, residual outputs scaled by depth.
        Mixer-internal parameters (decay biases, filters, conv kernels) keep their own init."""
        nn.init.normal_(self.embed.weight, std=0.02)
        for layer in self.livs:
            for feature in layer.features.values():
                nn.init.normal_(feature.proj.weight, std=0.02)
            nn.init.normal_(layer.out_proj.weight, std=0.02 / math.sqrt(2 * len(self.livs)))

    def forward(self, idx, targets=None, caches=None):
        """idx (b, l) -> (logits (b, l, vocab), loss or None). With caches: prefill, or one step
        when the caches already hold a prefix."""
        x = self.embed(idx)  # (b, l, d)
        features = {}
        for i, norm in enumerate(self.norms):
            leader = self.feature_leader[i]
            shared = features[leader] if leader is not None else None
            label = torch.profiler.record_function(self.labels[i]) if self.profiling else contextlib.nullcontext()
            with label:
                if caches is None:  # training and evaluation: whole residual blocks, compiled or not
                    x, features[i] = self.block(norm, self.livs[i], x, shared, i in self.feature_leaders)
                else:
                    x = x + self.run_liv(i, norm(x), shared, caches, features)
        return self.head(self.norm_f, self.embed.weight, x, targets)

    def compile_blocks(self, enabled=True):
        """Compile per residual block rather than per model: a block's graph depends only on its
        LIV variant, so it is compiled once and reused by every later model of the search (a new
        whole model costs 17-26 s of compilation: ANCHORS.md). Eager again with enabled=False."""
        if enabled:
            allow_many_graphs()
            COMPILED.setdefault("block", torch.compile(residual_block))
            COMPILED.setdefault("head", torch.compile(lm_head))
        self.block = COMPILED["block"] if enabled else residual_block
        self.head = COMPILED["head"] if enabled else lm_head

    def run_liv(self, i, x, shared, caches, features):
        layer = self.livs[i]
        if caches is None:
            y, features[i] = layer(x, shared)
        elif caches[i]["pos"] > 0:  # the caches hold a prefix: decode one step
            y, features[i] = layer.step(x, caches[i], shared)
        else:  # prefill
            y, features[i] = layer(x, shared, caches[i])
        return y  # (b, l, d)

    def init_caches(self, batch, max_len=None, device=None, dtype=torch.float32):
        return [layer.init_cache(batch, max_len or self.max_len, device, dtype) for layer in self.livs]


def residual_block(norm, layer, x, shared, expose):
    """x + LIV(RMSNorm(x)), the paper's fixed wrapper; the LIV's features if a later LIV reads them."""
    y, features = layer(norm(x), shared)
    return x + y, (features if expose else None)  # (b, l, d)


def lm_head(norm, weight, x, targets):
    logits = norm(x) @ weight.T  # (b, l, vocab), tied to the embedding
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return logits, loss


COMPILED = {}  # the compiled block and head, shared by every model of the process


def allow_many_graphs():
    """A search meets dozens of LIV variants: raise dynamo's per-function recompile limit (8)."""
    import torch._dynamo
    for name, value in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 8192)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), value))


def build_model(genome, preset, vocab_size=256):
    return Model(genome, vocab_size, preset.width, preset.heads, preset.seq_len, preset.chunk)


def param_counts(model):
    """(total, without embeddings): the formula (per-LIV formulas + embedding + norms).
    The tests hold it against the deduplicated sum over model.parameters()."""
    d = model.embed.embedding_dim
    livs = sum(layer.param_count() for layer in model.livs)
    non_embedding = livs + d * (len(model.livs) + 1)
    return non_embedding + model.embed.num_embeddings * d, non_embedding


def cache_bytes(model, seq_len, batch=1, bytes_per_element=2):
    """Inference-cache bytes at a sequence length (spec section 5; bf16 elements by default)."""
    return sum(layer.cache_bytes(batch, seq_len, bytes_per_element) for layer in model.livs)


@torch.no_grad()
def generate(model, idx, n_tokens, temperature=1.0, top_k=None, greedy=False, generator=None):
    """Sample n_tokens after the prompt idx (b, l): prefill the per-LIV caches once, then one step
    per token."""
    model.eval()
    caches = model.init_caches(idx.size(0), idx.size(1) + n_tokens, idx.device)
    logits, _ = model(idx, caches=caches)  # prefill
    out = [idx]
    for _ in range(n_tokens):
        last = logits[:, -1].float() / max(temperature, 1e-6)  # (b, vocab)
        if greedy:
            token = last.argmax(-1, keepdim=True)
        else:
            if top_k:
                kth = torch.topk(last, min(top_k, last.size(-1))).values[:, -1:]
                last = last.masked_fill(last < kth, float("-inf"))
            token = torch.multinomial(last.softmax(-1), 1, generator=generator)  # (b, 1)
        out.append(token)
        logits, _ = model(token, caches=caches)
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------------------------
# Data


class Corpus:
    """A token stream split into train (first 90%) and validation (last 10%), deterministically.

    Default: the embedded Shakespeare plays as bytes. A `.txt` file is read as bytes, a `.bin`
    file as nanoGPT's flat uint16 tokens (vocab_size required).
    """

    def __init__(self, path=None, vocab_size=None):
        self.path = path or CORPUS
        tokens = self.read(self.path, vocab_size)
        self.vocab_size = vocab_size or 256
        split = int(len(tokens) * 0.9)
        self.train, self.val = tokens[:split], tokens[split:]

    @staticmethod
    def read(path, vocab_size):
        if not os.path.exists(path):
            raise ValueError(f"data file not found: {path}")
        if path.endswith(".bin"):
            if not vocab_size:
                raise ValueError(f"{path}: a .bin token file needs --vocab-size")
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            top = int(tokens[: 1 << 20].max()) if len(tokens) else 0  # a cheap check on the first 1M tokens
            if top >= vocab_size:
                raise ValueError(f"{path}: token ids reach {top}, beyond --vocab-size {vocab_size}")
        else:
            if vocab_size not in (None, 256):
                raise ValueError("text files are read as bytes: vocabulary 256")
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                tokens = np.frombuffer(f.read(), dtype=np.uint8)
        if len(tokens) < 1000:
            raise ValueError(f"{path}: {len(tokens)} tokens, too few to train on (empty?)")
        return tokens

    def batches(self, split, n_batches, batch_size, seq_len, seed, device):
        """n_batches fixed batches (x, y), each (batch_size, seq_len), drawn by seed: every
        candidate sees the same data in the same order (common random numbers)."""
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split ({len(data)} tokens) is shorter than seq_len {seq_len}")
        rng = np.random.default_rng([seed, split == "train"])
        offsets = rng.integers(0, len(data) - seq_len - 1, size=(n_batches, batch_size))
        window = np.arange(seq_len + 1)
        for rows in offsets:
            chunk = torch.from_numpy(data[rows[:, None] + window].astype(np.int64))  # (b, l+1)
            if device.type == "cuda":
                chunk = chunk.pin_memory().to(device, non_blocking=True)
            yield chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------------
# Training and evaluation of one candidate (paper section 5: perplexity after a fixed budget)


class Diverged(RuntimeError):
    pass


def lr_at(step, preset):
    """Linear warm-up, then cosine decay to MIN_LR_RATIO * lr."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    progress = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
    return preset.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, preset, device):
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=preset.lr, betas=BETAS, fused=device.type == "cuda")


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def evaluate(model, corpus, preset, device):
    """Validation perplexity on fixed held-out batches."""
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad(), autocast(device):
        for x, y in corpus.batches("val", preset.eval_batches, preset.batch_size, preset.seq_len, preset.seed, device):
            total += model(x, y)[1].float()
    model.train()
    return math.exp(min(total.item() / preset.eval_batches, 50.0))


def train_candidate(genome, corpus, preset, device=None, log=None, save=None):
    """Train one architecture and score it. Never raises for a bad candidate: a NaN/inf loss, an
    out-of-memory error or any exception gives status 'failed' with the error."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"status": "failed", "ppl": None, "params": None, "cache_bytes": None,
              "train_seconds": 0.0, "tokens_per_second": 0.0}
    model = None
    try:
        torch.manual_seed(preset.seed)  # the same initialisation stream for every candidate
        model = build_model(genome, preset, corpus.vocab_size).to(device)
        result["params"], result["params_non_embedding"] = param_counts(model)
        result["cache_bytes"] = cache_bytes(model, preset.seq_len)
        step_model = maybe_compile(model, preset, log)
        optimizer = make_optimizer(model, preset, device)
        log_every = max(1, preset.steps // 5)
        running = torch.zeros((), device=device)
        start = time.perf_counter()
        batches = corpus.batches("train", preset.steps, preset.batch_size, preset.seq_len, preset.seed, device)
        for step, (x, y) in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, preset)
            with autocast(device):
                _, loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()  # stays on the device: no host sync per step
            if step == 0:  # the first step carries compilation and warm-up: counted as turnover
                if device.type == "cuda":
                    torch.cuda.synchronize()
                result["first_step_seconds"] = time.perf_counter() - start
            if (step + 1) % log_every == 0 or step + 1 == preset.steps:
                mean = running.item() / log_every  # the only sync, at logging points
                running.zero_()
                if not math.isfinite(mean):
                    raise Diverged(f"loss is {mean} at step {step + 1}")
                if log:
                    tps = (step + 1) * preset.batch_size * preset.seq_len / (time.perf_counter() - start)
                    log(f"  step {step + 1:5d}/{preset.steps}  loss {mean:.4f}  {tps:,.0f} tok/s")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ppl = evaluate(model, corpus, preset, device)
        if not math.isfinite(ppl) or ppl >= math.exp(50.0):
            raise Diverged(f"validation perplexity is {ppl}")
        steady = seconds - result["first_step_seconds"]  # without the first (compiling) step
        tokens_per_second = (preset.steps - 1) * preset.batch_size * preset.seq_len / steady if steady > 0 else 0.0
        result.update(status="ok", ppl=ppl, train_seconds=seconds, tokens_per_second=tokens_per_second)
        if save:
            save_checkpoint(save, model, preset, corpus)
    except Exception as e:  # noqa: BLE001 -- a failed candidate must never stop the search
        kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
        result["error"] = f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def maybe_compile(model, preset, log):
    """Compiled residual blocks when the preset asks for it (eager, with the reason, if that fails)."""
    if not preset.compile:
        return model
    model.compile_blocks()
    return CompiledOrEager(model, log, compiled=model, undo=lambda: model.compile_blocks(False))


class CompiledOrEager:
    """torch.compile(model) (or a given compiled form), falling back to eager with a printed reason
    if the first call fails (compilation is lazy: errors surface on the first call)."""

    def __init__(self, model, log=None, compiled=None, undo=None):
        allow_many_graphs()
        self.model, self.log, self.undo, self.checked = model, log, undo, False
        self.fn = compiled if compiled is not None else torch.compile(model)

    def __call__(self, *args, **kwargs):
        if self.checked:
            return self.fn(*args, **kwargs)
        try:
            out = self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            reason = str(e).splitlines()[0] if str(e) else ""
            if self.log:
                self.log(f"  torch.compile failed ({type(e).__name__}: {reason[:200]}); running eagerly")
            if self.undo:
                self.undo()
            self.fn = self.model
            out = self.model(*args, **kwargs)
        self.checked = True
        return out


def save_checkpoint(path, model, preset, corpus):
    torch.save({"genome": model.genome.tolist(), "preset": dataclasses.asdict(preset),
                "vocab_size": corpus.vocab_size, "state_dict": model.state_dict()}, path)


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        preset = Preset(**ckpt["preset"])
        model = build_model(ckpt["genome"], preset, ckpt["vocab_size"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable star checkpoint ({type(e).__name__})") from None
    return model.to(device), preset


# ---------------------------------------------------------------------------------------------
# Command line


def add_preset_args(parser):
    """--preset plus one override flag per Preset field (--width, --steps, --lr, ...)."""
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    for f in dataclasses.fields(Preset):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, f.type), default=None)


def preset_from_args(args, name=None):
    name = name or args.preset
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset) if getattr(args, f.name) is not None}
    preset = dataclasses.replace(PRESETS[name], **overrides)
    for key in ("width", "heads", "n_livs", "seq_len", "batch_size", "steps", "eval_batches", "chunk"):
        if getattr(preset, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1")
    return preset


def genome_from_args(args, n_livs):
    if args.baseline:
        return gn.baseline(args.baseline, n_livs)
    g = gn.load(args.genome)
    problems = gn.validate(g)
    if problems:
        raise ValueError(f"invalid genome: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return g


def show(genome, preset, vocab_size=256):
    model = build_model(genome, preset, vocab_size)
    print(f"{gn.summary(genome)}\n{'#':>3}  {'class':<13}{'featurizer':<12}{'features':<12}{'params':>10}{'cache (bf16)':>14}")
    for i, (row, layer) in enumerate(zip(model.genome, model.livs)):
        fz = f"LIV {row[1]}" if row[2] > 1 and row[1] != i + 1 else ("leads" if row[2] > 1 else "own")
        ft = f"{gn.FEATURE_SHARING[row[4]]} of {row[3]}" if row[4] > 1 and row[3] != i + 1 else ("leads" if row[4] > 1 else "own")
        print(f"{i + 1:>3}  {gn.lookup(row).name:<13}{fz:<12}{ft:<12}{layer.param_count():>10,}"
              f"{layer.cache_bytes(1, preset.seq_len, 2):>14,}")
    total, non_emb = param_counts(model)
    print(f"total: {total:,} parameters ({non_emb:,} without embeddings), "
          f"cache {cache_bytes(model, preset.seq_len):,} bytes at {preset.seq_len} tokens")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 1 (not a usage block and code 2)."""

    def error(self, message):
        sys.exit(f"error: {message}")


def main(argv=None):
    parser = Parser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "show"):
        p = sub.add_parser(name)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--genome", help="genome JSON file or compact form")
        source.add_argument("--baseline", help=f"one of {', '.join(gn.BASELINES)}")
        add_preset_args(p)
        p.add_argument("--data", help="a .txt (bytes) or .bin (uint16 tokens) file; default: embedded Shakespeare")
        p.add_argument("--vocab-size", type=int)
        p.add_argument("--device", default=None)
        p.add_argument("--save", help="write the trained model to this checkpoint")
    p = sub.add_parser("sample")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


def run(args):
    if args.command == "sample":
        model, preset = load_checkpoint(args.checkpoint)
        if args.tokens < 1:
            raise ValueError("--tokens must be at least 1")
        vocab = model.embed.num_embeddings
        if vocab == 256:
            prompt = list(args.prompt.encode("utf-8"))
        else:  # a token model: the prompt is token ids
            try:
                prompt = [int(t) for t in args.prompt.split()]
            except ValueError:
                prompt = [-1]
            if not prompt or not all(0 <= t < vocab for t in prompt):
                raise ValueError(f"this model reads tokens: --prompt is space-separated ids below {vocab}")
        if not prompt:
            raise ValueError("--prompt is empty")
        idx = torch.tensor([prompt])
        if idx.size(1) + args.tokens > preset.seq_len and any(l.cfg.mixer == "long_conv" for l in model.livs):
            raise ValueError(f"prompt + tokens exceed the model's long-filter length {preset.seq_len}")
        out = generate(model, idx, args.tokens, args.temperature, args.top_k,
                       generator=torch.Generator().manual_seed(args.seed))[0].tolist()
        print(bytes(out).decode("utf-8", errors="replace") if model.embed.num_embeddings == 256 else " ".join(map(str, out)))
        return
    preset = preset_from_args(args)
    g = genome_from_args(args, preset.n_livs)
    if args.command == "show":
        show(g, preset, args.vocab_size or 256)
        return
    corpus = Corpus(args.data, args.vocab_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"training {gn.summary(g)} ({len(g)} LIVs) on {device}, preset {args.preset}: "
          f"{preset.steps} steps of {preset.batch_size} x {preset.seq_len} tokens", flush=True)
    result = train_candidate(g, corpus, preset, device, log=lambda s: print(s, flush=True), save=args.save)
    print(json.dumps({"genome": gn.to_compact(g), **result}))
    if result["status"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
