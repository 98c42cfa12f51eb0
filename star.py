"""Genome -> model, data, training and evaluation, static metrics (STAR paper sections 2, 4.1, 5).

    python star.py train  (--genome G | --baseline NAME) [--preset tiny] [--steps N] [--save model.pt]
    python star.py show   (--genome G | --baseline NAME) [--plot architecture.png]
    python star.py sample --checkpoint model.pt [--prompt TEXT] [--tokens N]
    python star.py probe  (--genome G | --baseline NAME) [--tasks recall,selective_copy]
    python star.py scale  --genome G --n-livs N --how stack|stretch [--out scaled.json]
    python star.py compile [--preset gpu] [--jobs N]  # warm the compile cache: every block variant, once

G is a genome JSON file or the compact form (genome.to_compact). A model is the paper's fixed
wrapper around the evolved backbone: embedding, x = x + LIV(RMSNorm(x)) per LIV, final RMSNorm,
LM head (untied: see init_weights).
"""
import contextlib
import copy
import dataclasses
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import genome as gn
import liv
import probes

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare.txt.gz")


# Paper (section 6 of the spec): AdamW betas (0.9, 0.95), weight decay 0.1, clip 1.0 (the schedule: lr_at).
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
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width, eps=1e-6) for _ in self.genome)
        self.livs = nn.ModuleList()
        self.feature_leader = []  # per LIV: position of the LIV whose features it reads, or None
        rows = self.genome.tolist()  # python ints: torch.compile guards on them
        for i, row in enumerate(rows):
            cls = gn.lookup(row)
            cfg = liv.LIVConfig(mixer=cls.mixer, width=width, heads=heads, diff=cls.diff,
                                max_len=max_len, chunk=chunk, **cls.featurizer)
            fz_leader, ft_leader = gn.featurizer_leader(rows, i), gn.feature_leader(rows, i)
            self.feature_leader.append(ft_leader)
            shared = tuple(gn.FEATURE_SHARING[row[gn.FT_STRATEGY]]) if ft_leader is not None else ()
            self.livs.append(liv.LIV(cfg, featurizer_from=None if fz_leader is None else self.livs[fz_leader],
                                     shared_groups=shared))
        self.norm_f = nn.RMSNorm(width, eps=1e-6)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.blocks, self.head = [residual_block] * len(rows), lm_head  # compile_blocks() swaps in compiled ones
        self.labels = [f"liv:{gn.lookup(row).name}" for row in self.genome]  # profiler rows per class
        self.profiling = False  # bench.py turns on a record_function label per LIV
        self.init_weights()

    @classmethod
    def from_genome(cls, genome, vocab_size=256, width=64, heads=4, n_livs=None, how="stack", max_len=1024):
        """A genome (best_genome.json's path, a compact string, or rows) as a plain nn.Module at your
        vocabulary, width and heads; n_livs, a multiple of its depth, stacks or stretches it as
        `star.py scale` does (README: "Use the pieces in your code")."""
        g = gn.load(genome) if isinstance(genome, str) else gn.as_array(genome)
        return cls(gn.scale(g, n_livs, how) if n_livs else g, vocab_size, width, heads, max_len)

    def init_weights(self):
        """Width-aware (ours; README: "Where we depart from the paper"): projections N(0, 1/fan_in),
        residual outputs also scaled by 1/sqrt(2 * depth) as in GPT-2, embedding N(0, 1), an untied
        head N(0, 1/width). GPT-2's fixed 0.02 equals 1/sqrt(3 * 768): at width 64 it is 3.6x too
        small. Mixer-internal parameters (decay biases, filters, conv kernels) keep their own init."""
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=self.lm_head.in_features ** -0.5)
        for layer in self.livs:
            for feature in layer.features.values():
                nn.init.normal_(feature.proj.weight, std=feature.proj.in_features ** -0.5)
            std = layer.out_proj.in_features ** -0.5 / math.sqrt(2 * len(self.livs))
            nn.init.normal_(layer.out_proj.weight, std=std)

    def forward(self, idx, targets=None, caches=None):
        """idx (b, l) -> (logits (b, l, vocab), loss or None). With caches: prefill, or one step
        when the caches already hold a prefix."""
        x = self.embed(idx)  # (b, l, d)
        # Compiled graphs are training graphs: evaluation (no_grad) runs eagerly rather than compiling
        # every variant a second time as an inference graph (ours: a small share of a candidate's time).
        training = torch.is_grad_enabled()
        features = {}
        for i, norm in enumerate(self.norms):
            leader = self.feature_leader[i]
            shared = features[leader] if leader is not None else None
            label = torch.profiler.record_function(self.labels[i]) if self.profiling else contextlib.nullcontext()
            with label:
                if caches is None:  # training and evaluation: whole residual blocks, compiled or not
                    x, features[i] = (self.blocks[i] if training else residual_block)(norm, self.livs[i], x, shared)
                else:
                    x = x + self.run_liv(i, norm(x), shared, caches, features)
        return (self.head if training else lm_head)(self.norm_f, self.lm_head.weight, x, targets)

    def compile_blocks(self, enabled=True):
        """Compile per residual block rather than per model: a block's graph depends only on its
        LIV variant (class and the features it reads), a set the catalogue fixes (warm_up compiles
        it once), reused by every model of the search, where a new whole model would compile anew.
        Static shapes. A class whose graph failed to compile runs eagerly (guarded). Eager again
        with enabled=False."""
        if not enabled:
            self.blocks, self.head = [residual_block] * len(self.livs), lm_head
            return
        configure_compile()
        COMPILED.setdefault("block", torch.compile(residual_block, dynamic=False, backend=COMPILE_BACKEND))
        COMPILED.setdefault("head", torch.compile(lm_head, dynamic=False, backend=COMPILE_BACKEND))
        g = self.genome.tolist()
        self.blocks = [guarded(COMPILED["block"], residual_block, gn.lookup(row).name,
                               f"{gn.lookup(row).name} (featurizer: {gn.sharing_cell(g, i, 'weights')}, "
                               f"features: {gn.sharing_cell(g, i, 'features')})") for i, row in enumerate(g)]
        self.head = guarded(COMPILED["head"], lm_head, "head", "the LM head")

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


def residual_block(norm, layer, x, shared):
    """x + LIV(RMSNorm(x)), the paper's fixed wrapper, and the LIV's features (a later LIV may read
    them: always returned, so that leading or not makes no second graph)."""
    y, features = layer(norm(x), shared)
    return x + y, features  # (b, l, d)


def lm_head(norm, weight, x, targets):
    logits = norm(x) @ weight.T  # (b, l, vocab)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return logits, loss


COMPILED = {}  # the compiled block and head, shared by every model of the process
EAGER = {}  # class name (or 'head') -> why its graph failed to compile: it runs eagerly from then on
COMPILE_BACKEND = os.environ.get("STAR_COMPILE_BACKEND", "inductor")  # "eager" (tests, suite --smoke): dynamo's
# graphs and guards without code generation
USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # a user's choice wins over ours


def configure_compile():
    """Dozens of LIV variants: raise dynamo's per-function recompile limit (8). Compiled code is
    cached on disk per torch version and device kind, so a second or resumed run starts warm."""
    kind = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = USER_CACHE_DIR or os.path.join(
        os.path.expanduser("~"), ".cache", "star", f"inductor-{torch.__version__}-{kind}")
    import torch._dynamo as dynamo  # (its import writes torch's default cache directory, /tmp, if none is set)
    import torch._functorch.config as functorch_config
    # The backward graph is compiled with the forward, not at the first loss.backward(): a
    # backward-only compile error surfaces in the call that `guarded` watches.
    functorch_config.force_non_lazy_backward_lowering = True
    for name, value in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 8192)):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), value))


def guarded(compiled, eager, key, variant):
    """compiled, unless it raises for this class (key): then eager, for this call and for every
    model of the process after it, with a warning line (ours). Compilation is lazy, so a compiler
    error surfaces at a variant's first call (in the warm-up, or at a shape it never saw), before
    anything ran, the backward's too (configure_compile); EAGER keeps which variant failed and why."""
    def call(*args):
        if key not in EAGER:
            try:
                return compiled(*args)
            except torch.OutOfMemoryError:
                raise  # not the compiler's: the candidate fails (and is retried) as any other
            except Exception as e:  # noqa: BLE001
                EAGER[key] = f"{variant}: {compile_error(e)}"
                print(f"warning: compile failed for {EAGER[key]}; {key} runs eagerly from now on", file=sys.stderr)
        return eager(*args)
    return call


def compile_error(e):
    """The compiler's own error under torch's wrappers, in one line."""
    while (e.__cause__ or getattr(e, "inner_exception", None)) is not None:
        e = e.__cause__ or e.inner_exception
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def warm_up(preset, source, device="cpu", log=None, jobs=1, part=(0, 1)):
    """Compile every residual-block variant of the catalogue once (genome.every_variant, one
    training step on the data source) so that no candidate of a search compiles anything. A
    variant that fails to compile is named in a warning, and its class runs eagerly (guarded); a
    failure that names no variant stops the warm-up with one line (ValueError). The last line
    gives the graphs and the eager classes. jobs > 1: compile_shares first (ours). part: one
    share (K, N) only. Returns (graphs compiled, seconds)."""
    from torch._dynamo.utils import counters
    jobs = min(jobs, len(gn.CATALOGUE))  # a share holds one class at least
    parallel = compile_shares(preset, source, device, jobs) if jobs > 1 else 0.0
    before, start = counters["stats"]["unique_graphs"], time.perf_counter()
    g = gn.every_variant(*part)
    result = train_candidate(g, source, dataclasses.replace(preset, n_livs=len(g), steps=1, eval_batches=1), device)
    graphs, seconds = counters["stats"]["unique_graphs"] - before, time.perf_counter() - start
    if result["status"] != "ok":
        raise ValueError(f"the compile warm-up failed ({result.get('error')}); run with --no-compile")
    log and log(f"compiled the catalogue's {len(g)} LIV variants: {graphs} graphs in {seconds:.1f} s"
                f"{f' after {jobs} processes in {parallel:.1f} s' if jobs > 1 else ''}; "
                f"eager: {', '.join(sorted(EAGER)) or 'none'}")
    return graphs, parallel + seconds


def compile_shares(preset, source, device, jobs):
    """Fill the disk cache in `jobs` processes at once, share K compiled by `star.py compile --part
    K/jobs`, so that the warm-up after them loads each graph's code rather than generating it (ours:
    one process took 8-12 minutes cold on an H200). A share that fails is a warning line: the
    warm-up after it compiles what it missed. Returns the seconds."""
    configure_compile()  # the cache directory the children inherit
    argv = [sys.executable, os.path.abspath(__file__), "compile", *config.preset_flags(preset), "--data",
            source.path, "--vocab-size", str(source.vocab_size), "--device", str(device)]
    env, start = {**os.environ, "STAR_COMPILE_BACKEND": COMPILE_BACKEND}, time.perf_counter()
    children = []
    for k in range(jobs):
        err = tempfile.TemporaryFile()  # read back only if the share fails
        children.append((err, subprocess.Popen(argv + ["--part", f"{k}/{jobs}"], stdout=subprocess.DEVNULL,
                                               stderr=err, env=env)))
    for k, (err, child) in enumerate(children):
        if child.wait():
            err.seek(0)
            last = (err.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1][:200]
            print(f"warning: compile share {k}/{jobs} failed ({last}); the warm-up compiles it here", file=sys.stderr)
        err.close()
    return time.perf_counter() - start


def build_model(genome, preset, vocab_size=256):
    return Model(genome, vocab_size, preset.width, preset.heads, preset.seq_len, preset.chunk)


def param_counts(model):
    """(total, without the input embedding): the formula (per-LIV formulas + norms + head +
    embedding). The tests hold it against the deduplicated sum over model.parameters()."""
    d, vocab = model.embed.embedding_dim, model.embed.num_embeddings
    livs = sum(layer.param_count() for layer in model.livs)
    non_embedding = livs + d * (len(model.livs) + 1) + vocab * d  # LIVs, norms, LM head
    return non_embedding + vocab * d, non_embedding


def cache_bytes(model, seq_len, batch=1, bytes_per_element=2):
    """Inference-cache bytes at a sequence length (the quality-cache objective; bf16 elements by default)."""
    return sum(layer.cache_bytes(batch, seq_len, bytes_per_element) for layer in model.livs)


@torch.no_grad()
def generate(model, idx, n_tokens, temperature=1.0, top_k=None, greedy=False, generator=None):
    """Sample n_tokens after the prompt idx (b, l): prefill the per-LIV caches once, then one step
    per token."""
    model.eval()
    caches = model.init_caches(idx.size(0), idx.size(1) + n_tokens, idx.device, next(model.parameters()).dtype)
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
        config.input_file(path, "data file")
        size = os.path.getsize(path)
        if path.endswith(".bin"):
            if not vocab_size:
                raise ValueError(f"{path}: a .bin token file needs --vocab-size")
            if size % 2:
                raise ValueError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
            tokens = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)
            top = int(tokens[: 1 << 20].max()) if len(tokens) else 0  # a cheap check on the first 1M tokens
            if top >= vocab_size:
                raise ValueError(f"{path}: token ids reach {top}, beyond --vocab-size {vocab_size}")
        else:
            if vocab_size not in (None, 256):
                raise ValueError("text files are read as bytes: vocabulary 256")
            try:
                with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                    tokens = np.frombuffer(f.read(), dtype=np.uint8)
            except (OSError, EOFError, zlib.error) as e:  # a .gz that is not gzip, or is truncated
                raise ValueError(f"data file {path}: {e}") from None
        if len(tokens) < 1000:
            raise ValueError(f"{path}: {len(tokens)} tokens, too few to train on (empty?)")
        return tokens

    def check(self, preset):
        """Refuse a sequence length that either split cannot fill (at the edge, not mid-search)."""
        for split, data in (("train", self.train), ("validation", self.val)):
            if len(data) <= preset.seq_len + 1:
                raise ValueError(f"{self.path}: the {split} split ({len(data)} tokens) is shorter than "
                                 f"--seq-len {preset.seq_len}")
        return self

    def score(self, model, preset, device):
        return {"ppl": evaluate(model, self, preset, device)}

    def passes(self, preset):
        """How many times one candidate's training budget reads the train split."""
        return preset.steps * preset.batch_size * preset.seq_len / len(self.train)

    def batches(self, split, n_batches, batch_size, seq_len, seed, device, start=0):
        """n_batches fixed batches (x, y), each (batch_size, seq_len), drawn by seed: every
        candidate sees the same data in the same order (common random numbers). Batch i is the
        same whatever n_batches; `start` skips the first ones (a continued training)."""
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split ({len(data)} tokens) is shorter than seq_len {seq_len}")
        rng = np.random.default_rng([seed, split == "train"])
        offsets = rng.integers(0, len(data) - seq_len - 1, size=(start + n_batches, batch_size))[start:]
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


PROGRESS_SECONDS = 10.0  # while a model trains, a progress line at most this often


def decay_start(preset):
    """The step where the decay branch starts: the last `decay` share of the budget (never inside
    the warm-up). decay 1.0 is warm-up then cosine over the rest (this code's schedule before WSD)."""
    return preset.steps - min(preset.steps - min(preset.warmup, preset.steps), round(preset.decay * preset.steps))


def lr_at(step, preset):
    """Warmup-stable-decay (Hägele et al. 2024, who find a 20% decay matches cosine at equal budget):
    a linear warm-up, the peak lr, then a cosine-shaped decay to MIN_LR_RATIO * lr over the last
    `decay` share of the budget (ours: the decay's shape and floor). The lr before the decay does
    not depend on the budget, so a model kept at decay_start continues to any longer budget."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    start = decay_start(preset)
    if step < start:
        return preset.lr
    progress = (step - start) / max(1, preset.steps - start)
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


def train_candidate(genome, source, preset, device=None, log=None, save=None, resume=None, keep=None):
    """Train one architecture on a data source and score it (paper section 5: a score after a
    fixed budget). Never raises for a bad candidate: a NaN/inf loss, an out-of-memory error or any
    exception gives status 'failed' with the error.

    Continued training (ours, for successive halving): `keep(state)` receives the state where the
    decay starts (kept_state); a longer budget given it as `resume` continues from it, and ends as
    one uninterrupted training would (the lr before the decay and the data order are budget-free).

    A data source is what a Corpus and a probes.Task share: `vocab_size`, `batches(split,
    n_batches, batch_size, seq_len, seed, device, start)` yielding (x, y) of (b, l) token ids, and
    `score(model, preset, device)` -> {'ppl': ...} for text or {'accuracy': ...} for a task."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"status": "failed", "ppl": None, "params": None, "cache_bytes": None,
              "train_seconds": 0.0, "tokens_per_second": 0.0}
    model = None
    try:
        model, optimizer, first = start_training(genome, source, preset, device, resume, result)
        progress = Progress(preset, first, device, log)
        batches = source.batches("train", preset.steps - first, preset.batch_size, preset.seq_len, preset.seed,
                                 device, first)
        for step, (x, y) in enumerate(batches, first):  # x, y: (b, l)
            if keep and step == decay_start(preset):
                keep(kept_state(model, optimizer, step))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, preset)
            with autocast(device):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step(step, loss)
        result.update(progress.finish())
        scoring = time.perf_counter()
        with autocast(device):
            result.update(checked_scores(source.score(model, preset, device)))
        result["eval_seconds"] = time.perf_counter() - scoring
        if save:
            save_checkpoint(save, model, preset, source)
        result["status"] = "ok"  # only now: a model that could not be saved is not a success
    except Exception as e:  # noqa: BLE001 -- a failed candidate must never stop the search
        kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
        result["error"] = f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def start_training(genome, source, preset, device, resume, result):
    """The model (its sizes into result), its optimiser and the first step: 0, or a kept state's."""
    torch.manual_seed(preset.seed)  # the same initialisation stream for every candidate
    model = build_model(genome, preset, source.vocab_size).to(device)
    result["params"], result["params_non_embedding"] = param_counts(model)
    result["cache_bytes"] = cache_bytes(model, preset.seq_len)
    if preset.compile:
        model.compile_blocks()
    optimizer = make_optimizer(model, preset, device)
    first = 0
    if resume is not None:
        try:
            first = continue_from(model, optimizer, resume, preset)
        except Exception as e:  # noqa: BLE001 -- another model's state, another shape, a damaged one
            print(f"warning: a kept state of {gn.summary(genome)} does not load ({type(e).__name__}: "
                  f"{str(e).strip()[:120]}); it trains from scratch", file=sys.stderr, flush=True)
            return start_training(genome, source, preset, device, None, result)  # a fresh model: the same result
    result["steps_trained"] = preset.steps - first
    return model, optimizer, first


def continue_from(model, optimizer, resume, preset):
    """Load a kept state of this very model (its key), at or before this budget's decay; the first step."""
    if resume["key"] != gn.to_compact(gn.canonical(model.genome)):
        raise ValueError("kept for another model")
    if not isinstance(resume["step"], int) or not 0 <= resume["step"] <= decay_start(preset):
        raise ValueError(f"kept at step {resume['step']!r}, not before the decay at {decay_start(preset)}")
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(copy.deepcopy(resume["optimizer"]))  # (tensors already in place would be shared)
    return resume["step"]


def kept_state(model, optimizer, step):
    """What a continued training needs, copied to the CPU: the weights, AdamW's moments, the step,
    and which model it is (a state never continues another)."""
    to_cpu = lambda tree: {k: to_cpu(v) if isinstance(v, dict) else v.to("cpu", copy=True)  # noqa: E731
                           if torch.is_tensor(v) else v for k, v in tree.items()}
    return {"model": to_cpu(model.state_dict()), "optimizer": to_cpu(optimizer.state_dict()), "step": step,
            "key": gn.to_compact(gn.canonical(model.genome))}


def checked_scores(scores):
    if not all(math.isfinite(v) for v in scores.values()) or scores.get("ppl", 0) >= math.exp(50.0):
        raise Diverged(f"validation scores are {scores}")
    return scores


class Progress:
    """The bookkeeping around the training step: the first step's time (it carries compilation and
    warm-up: counted as turnover), the mean loss read back every tenth of the run (one host sync)
    and checked for divergence, a progress line at most every PROGRESS_SECONDS, throughput at the end."""

    def __init__(self, preset, first, device, log):
        self.preset, self.device, self.log = preset, device, log
        self.every = max(1, preset.steps // 10)
        self.running, self.first, self.checked, self.first_step = torch.zeros((), device=device), first, first, 0.0
        self.start = self.printed = time.perf_counter()

    def step(self, step, loss):
        self.running += loss.detach()  # stays on the device: no host sync per step
        if step == self.first:
            self.sync()
            self.first_step = time.perf_counter() - self.start
        if (step + 1) % self.every == 0 or step + 1 == self.preset.steps:
            self.check(step + 1)

    def check(self, done):
        mean = self.running.item() / (done - self.checked)
        self.running.zero_()
        self.checked = done
        if not math.isfinite(mean):
            raise Diverged(f"loss is {mean} at step {done}")
        now, p = time.perf_counter(), self.preset
        if self.log and now - self.printed >= PROGRESS_SECONDS and done < p.steps:
            self.printed = now
            self.log(f"  step {done}/{p.steps}  loss {mean:.4f}  "
                     f"{(done - self.first) * p.batch_size * p.seq_len / (now - self.start):,.0f} tok/s  "
                     f"{duration((now - self.start) / (done - self.first) * (p.steps - done))} left")

    def finish(self):
        self.sync()
        seconds, p = time.perf_counter() - self.start, self.preset
        steady = seconds - self.first_step  # without the first (compiling) step
        tokens_per_second = (p.steps - self.first - 1) * p.batch_size * p.seq_len / steady if steady > 0 else 0.0
        return {"first_step_seconds": self.first_step, "train_seconds": seconds, "tokens_per_second": tokens_per_second}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def probe(genome, preset, device="cpu", tasks=None, log=None):
    """The capability probes (MAD): a fresh model of the genome trained on each task (probes.Task;
    default probes.TASKS); {'status': 'ok', 'accuracy': {task: share}, 'mean': ...}, or 'failed'."""
    accuracy = {}
    for task in tasks or probes.TASKS.values():
        name = task.name
        result = train_candidate(genome, task, task.preset(preset), device, log)
        if result["status"] != "ok":
            return {"status": "failed", "error": f"probe {name}: {result.get('error')}"}
        accuracy[name] = result["accuracy"]
        if log:
            log(f"  probe {name}: accuracy {accuracy[name]:.3f} ({result['train_seconds']:.1f} s)")
    return {"status": "ok", "accuracy": accuracy, "mean": float(np.mean(list(accuracy.values())))}


def duration(seconds):
    """'42 s', '3.5 min' or '2.1 h'."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def save_checkpoint(path, model, preset, corpus):
    config.write_file(path, lambda f: torch.save({"genome": model.genome.tolist(), "preset": dataclasses.asdict(
        preset), "vocab_size": corpus.vocab_size, "state_dict": model.state_dict()}, f), "checkpoint")


def load_checkpoint(path, device="cpu"):
    """(model, preset) from a file that `star.py train --save` wrote; ValueError naming the file if not."""
    config.input_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        preset = config.Preset(**ckpt["preset"])
        model = build_model(ckpt["genome"], preset, ckpt["vocab_size"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable star checkpoint ({type(e).__name__})") from None
    return model.to(device), preset


# ---------------------------------------------------------------------------------------------
# Command line: the flags and every check of their values are config.py's (star_parser)


def checked_genome(args):
    """The command's preset and genome, checked against each other."""
    preset = config.preset_from_args(args)
    g = config.genome_from_args(args, preset.n_livs)
    return config.check_preset(preset, g), g


def train_command(args):
    preset, g = checked_genome(args)
    device = config.resolve_device(args.device)
    if args.save:
        config.output_file(args.save, "checkpoint", regular=True)
    corpus = Corpus(args.data, args.vocab_size).check(preset)
    print(f"training {gn.summary(g)} ({len(g)} LIVs) on {device}, preset {config.preset_name(args.preset)}\n"
          f"{config.budget_note(preset, len(corpus.train))}", flush=True)
    result = train_candidate(g, corpus, preset, device, log=lambda s: print(s, flush=True), save=args.save)
    print(json.dumps({"genome": gn.to_compact(g), **result}))
    if result["status"] != "ok":
        config.fail(f"training failed: {result.get('error')}")


def show_command(args):
    """Each LIV's class, sharing, parameters and cache; the architecture drawn too with --plot."""
    preset, g = checked_genome(args)
    plot = args.plot and config.output_file(args.plot, "plot")
    if plot and not plot.lower().endswith(".png"):
        raise ValueError(f"--plot {plot}: the architecture is drawn as a PNG; name the file .png")
    model = build_model(g, preset, args.vocab_size or 256)
    print(f"{gn.summary(g)}\n{'#':>3}  {'class':<13}{'featurizer':<12}{'features':<14}{'params':>10}{'cache (bf16)':>14}")
    for i, layer in enumerate(model.livs):
        print(f"{i + 1:>3}  {gn.lookup(g[i]).name:<13}{gn.sharing_cell(g, i, 'weights'):<12}"
              f"{gn.sharing_cell(g, i, 'features'):<14}{layer.param_count():>10,}{layer.cache_bytes(1, preset.seq_len, 2):>14,}")
    total, non_emb = param_counts(model)
    print(f"total: {total:,} parameters ({non_emb:,} without embeddings), "
          f"cache {cache_bytes(model, preset.seq_len):,} bytes at {preset.seq_len} tokens")
    if plot:
        try:
            import plots  # matplotlib is optional
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
        config.write_file(plot, lambda f: plots.architecture([(gn.summary(g)[:40], g)], f), "plot")
        print(f"architecture drawn to {plot}")


def probe_command(args):
    preset, g = checked_genome(args)
    tasks = config.probe_tasks(args)
    result = probe(g, preset, config.resolve_device(args.device), tasks, log=lambda s: print(s, flush=True))
    print(json.dumps({"genome": gn.to_compact(g), **result}))
    if result["status"] != "ok":
        config.fail(result["error"])


def scale_command(args):
    out = args.out and config.output_file(args.out, "genome file")
    g = config.genome_from_args(args, args.n_livs)
    g = gn.scale(g, args.n_livs, args.how) if args.genome else g
    if out:
        config.write_file(out, gn.to_json(g) + "\n", "genome file")
    print(f"{gn.summary(g)}\n{gn.to_compact(g)}" + (f"\nwritten to {out}" if out else ""))


def compile_command(args):
    preset = config.check_preset(dataclasses.replace(config.preset_from_args(args), compile=True))
    device = config.resolve_device(args.device)
    corpus = Corpus(args.data, args.vocab_size).check(preset)
    jobs = 1 if args.part else args.jobs or config.compile_jobs()
    graphs, _ = warm_up(preset, corpus, device, lambda s: print(s, flush=True), jobs, args.part or (0, 1))
    print(f"compiled code is cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    if not graphs:
        config.fail("no graph was compiled (the compile backend failed: see above)")


def sample_command(args):
    model, preset = load_checkpoint(args.checkpoint)
    prompt = config.prompt_ids(args.prompt, model.embed.num_embeddings)
    room = preset.seq_len - len(prompt) if any(layer.cfg.mixer == "long_conv" for layer in model.livs) else 200
    tokens = args.tokens or min(200, room)
    if tokens > room:
        raise ValueError(f"prompt + tokens exceed the model's long-filter length {preset.seq_len}")
    out = generate(model, torch.tensor([prompt]), tokens, args.temperature, args.top_k,
                   generator=torch.Generator().manual_seed(args.seed))[0].tolist()
    print(bytes(out).decode("utf-8", errors="replace") if model.embed.num_embeddings == 256 else " ".join(map(str, out)))


COMMANDS = {"train": train_command, "show": show_command, "sample": sample_command, "probe": probe_command,
            "scale": scale_command, "compile": compile_command}


def main(argv=None):
    parser = config.star_parser(__doc__.split("\n")[0])
    args = parser.parse_args(argv)
    if args.command is None:  # no command: list them
        parser.print_help(sys.stderr)
        sys.exit(1)
    try:
        COMMANDS[args.command](args)
    except ValueError as e:
        config.fail(e)


if __name__ == "__main__":
    main()
