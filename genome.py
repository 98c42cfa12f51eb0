"""The STAR genome (paper section 4; the README's legend reads it): its three levels as data,
validation and repair, the variation operators, text forms and the baselines.

- Featurizer genome: per class, how features are computed (`LIVClass.featurizer`: expansion,
  repeat factor, short convolution, state size).
- Operator genome: 5 integers per LIV class (featurizer class, token mixing, sparsity mask,
  nonlinearity, channel mixing), in the 21-class `CATALOGUE` (the paper's 17, then 4 of ours).
- Backbone genome: an (n_livs, 5) integer array, one row per LIV in depth:
      0 LIV class (1..21, an index into CATALOGUE)
      1 featurizer-sharing group (1..n_livs)   2 featurizer-sharing strategy (1 none, 2 all weights)
      3 feature-group-sharing group (1..n_livs) 4 feature-group strategy (FEATURE_SHARING)
  A group is led by its first member in depth. In the canonical (valid) form a group gene holds
  the 1-based position of the LIV's leader, and a LIV that shares nothing is its own leader.

Nothing here needs torch: the search can run its bookkeeping without it. All randomness comes
from a `numpy.random.Generator` passed in.
"""
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LIVClass:
    name: str
    operator: tuple      # operator genome: (featurizer class, token mixing, sparsity, nonlinearity, channel mixing)
    mixer: str           # liv.MIXERS key implementing the token mixing
    featurizer: dict = field(default_factory=dict)  # featurizer genome (liv.LIVConfig fields)
    layout: str = ""     # classes with the same layout may share computed features
    diff: bool = False

    @property
    def groups(self):
        """Feature groups the class computes (and so can share)."""
        return {"attention": "CBV", "recurrence": "CBVA", "delta": "CBVA", "short_conv": "CBV",
                "long_conv": "CBV", "gated": "CV"}[self.mixer]

    @property
    def family(self):
        """The figures' colour: the mixer, with sliding-window attention apart from full attention."""
        return "sliding" if self.featurizer.get("window") else self.mixer


# Token mixing codes (paper section 3): 1 diagonal, 2 low-rank, 3 scaled Toeplitz, 4 semi-separable.
# Nonlinearity codes (ours beyond the paper's examples): 1 identity, 2 softmax, 4 SiLU.
# Channel mixing: 1 diagonal, 2 dense, 3 grouped (heads). Sparsity: 1 none, 2 banded.
_BASE = [
    LIVClass("SA-1", (1, 2, 1, 2, 3), "attention", {}, "mha"),
    LIVClass("SA-2", (2, 2, 1, 2, 3), "attention", {"feature_conv": 3}, "mha"),
    LIVClass("SA-3", (3, 2, 1, 2, 3), "attention", {"kv_repeat": 4}, "gqa"),
    LIVClass("SA-4", (4, 2, 1, 2, 3), "attention", {"kv_repeat": 0}, "mqa"),
    LIVClass("Rec-1", (5, 4, 1, 1, 1), "recurrence", {"state": 16, "feature_conv": 3}, "rec16"),
    LIVClass("Rec-2", (6, 4, 1, 1, 1), "recurrence", {"state": 2, "feature_conv": 3}, "rec2"),
    LIVClass("GConv-1", (7, 3, 1, 1, 1), "short_conv", {"kernel": 3}, "conv"),
    LIVClass("GConv-2", (8, 3, 1, 1, 1), "long_conv", {}, "conv"),
]
GMEMLESS = LIVClass("GMemless", (9, 1, 1, 4, 2), "gated", {"expansion": 8 / 3}, "gated")
# Differential variants (paper): featurizer classes 10..17 (ours: the numbering is not published).
_DIFF = [LIVClass(c.name + "-Diff", (10 + i,) + c.operator[1:], c.mixer, c.featurizer, c.layout + "-diff", True)
         for i, c in enumerate(_BASE)]
# Beyond the paper (ours): the operators of 2025's hybrids, numbered after the paper's 17 so that
# every earlier genome keeps its meaning. Delta-1 shares features with Delta-1 only, SWA-1 with
# SWA-1 only (layouts "delta" and "swa"); their Diff forms likewise among themselves.
SWA_WINDOW = 64  # tokens (ours): half the tiny preset's sequence, a sixteenth of the gpu preset's
_NEW = [
    LIVClass("Delta-1", (18, 4, 1, 1, 1), "delta", {"feature_conv": 3}, "delta"),
    LIVClass("SWA-1", (19, 2, 2, 2, 3), "attention", {"window": SWA_WINDOW}, "swa"),
]
_NEW_DIFF = [LIVClass(c.name + "-Diff", (18 + len(_NEW) + i,) + c.operator[1:], c.mixer, c.featurizer,
                      c.layout + "-diff", True) for i, c in enumerate(_NEW)]
CATALOGUE = _BASE + [GMEMLESS] + _DIFF + _NEW + _NEW_DIFF   # genome gene 0 = position in this list + 1
CLASS_INDEX = {c.name: i + 1 for i, c in enumerate(CATALOGUE)}

FEATURE_SHARING = {1: "", 2: "BV", 3: "B", 4: "CB"}  # strategy -> shared feature groups (ours)
GENES = 5
# The backbone row's columns, by name: every file reads a row through these, not bare indices.
CLASS, FZ_GROUP, FZ_STRATEGY, FT_GROUP, FT_STRATEGY = range(GENES)


def featurizer_leader(g, i):
    """0-based position of the LIV whose featurizer weights LIV i reuses, or None (its own)."""
    return _leader(g, i, FZ_GROUP, FZ_STRATEGY)


def feature_leader(g, i):
    """0-based position of the LIV whose computed features LIV i reads, or None (its own)."""
    return _leader(g, i, FT_GROUP, FT_STRATEGY)


def sharing_cell(g, i, what):
    """How LIV i shares, for tables: its featurizer ('weights') or its computed features
    ('features'): 'weights of LIV 3', 'B, V of LIV 3', 'leads' (a later LIV shares from it) or 'own'."""
    leader_of = featurizer_leader if what == "weights" else feature_leader
    leader = leader_of(g, i)
    if leader is not None:
        shared = "weights" if what == "weights" else ", ".join(FEATURE_SHARING[g[i][FT_STRATEGY]])
        return f"{shared} of LIV {leader + 1}"
    return "leads" if any(leader_of(g, j) == i for j in range(len(g))) else "own"


def _leader(g, i, group, strategy):
    leader = int(g[i][group]) - 1
    return leader if g[i][strategy] > 1 and leader != i else None


def allowed_values(n_livs):
    """Allowed values (inclusive ranges) of the 5 backbone genes of one LIV."""
    return [(1, len(CATALOGUE)), (1, n_livs), (1, 2), (1, n_livs), (1, len(FEATURE_SHARING))]


def lookup(genome_row):
    return CATALOGUE[int(genome_row[CLASS]) - 1]


FAMILIES = ("gated", "attention", "sliding", "recurrence", "delta", "short_conv", "long_conv")


def composition(genome):
    """A genome's share of LIVs in each family (FAMILIES), and of differential ones: what the first
    cut's late-gain fit reads (evolve.late_gain; ours)."""
    classes = [lookup(row) for row in as_array(genome)]
    return np.array([np.mean([c.family == f for c in classes]) for f in FAMILIES] + [np.mean([c.diff for c in classes])])


def as_array(genome):
    """Rows of 5 integers (lists or an integer array) -> an (n, 5) int64 array. Anything else is
    refused by position: inf, NaN, 1.5, true, an integer beyond int64 (never converted or clipped)."""
    rows = genome if isinstance(genome, (list, tuple, np.ndarray)) else []
    if not (len(rows) and all(isinstance(r, (list, tuple, np.ndarray)) and len(r) == GENES for r in rows)):
        raise ValueError(f"a genome is a list of 5-integer rows, one per LIV; got {str(genome)[:60]}")
    if not (isinstance(genome, np.ndarray) and np.issubdtype(genome.dtype, np.integer)):
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if not _is_int64(v):
                    raise ValueError(f"LIV {i + 1}, gene {j + 1}: {v!r} is not an integer within int64")
    return np.array(rows, dtype=np.int64)


def _is_int64(v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(v) and v == int(v) and -2**63 <= int(v) < 2**63


# ---------------------------------------------------------------------------------------------
# Validation and repair


def _featurizer_ok(g, leader, i):
    return g[leader, CLASS] == g[i, CLASS]  # weight sharing needs identical featurizers: the same class


def _feature_supported(g, i):
    return set(FEATURE_SHARING[g[i, FT_STRATEGY]]) <= set(lookup(g[i]).groups)


def _feature_ok(g, leader, i):
    return _feature_supported(g, i) and lookup(g[leader]).layout == lookup(g[i]).layout


_SHARING = [  # (group column, strategy column, can lead, can follow leader)
    (FZ_GROUP, FZ_STRATEGY, lambda g, i: True, _featurizer_ok),
    (FT_GROUP, FT_STRATEGY, _feature_supported, _feature_ok),
]


def repair(genome):
    """A valid genome, deterministically (paper section 4.1): genes clipped to their ranges, groups
    renamed after their leader (first member in depth), impossible sharing reset to none."""
    g = as_array(genome).copy()
    for col, (lo, hi) in enumerate(allowed_values(len(g))):
        g[:, col] = np.clip(g[:, col], lo, hi)
    for group, strategy, can_lead, can_follow in _SHARING:
        leaders = {}  # raw group id -> position of its leader
        for i in range(len(g)):
            raw = g[i, group]
            if g[i, strategy] > 1 and raw not in leaders and can_lead(g, i):
                leaders[raw] = i
            elif g[i, strategy] > 1 and raw in leaders and can_follow(g, leaders[raw], i):
                pass
            else:
                g[i, strategy] = 1
            g[i, group] = leaders[raw] + 1 if g[i, strategy] > 1 else i + 1
    return g


def canonical(genome):
    """The genome without sharing that has no effect: a leader without followers shares nothing.
    Genomes with the same canonical form compile to the same model (the search trains it once)."""
    g = repair(genome)
    for group, strategy, _, _ in _SHARING:
        for i in range(len(g)):
            followers = (g[:, group] == i + 1) & (g[:, strategy] > 1)
            if g[i, strategy] > 1 and followers.sum() == 1:  # only itself
                g[i, strategy] = 1
    return g


def validate(genome):
    """The problems of a genome, in words; [] for a valid one."""
    try:
        g = as_array(genome)
    except ValueError as e:
        return [str(e)]
    problems = []
    for col, (lo, hi) in enumerate(allowed_values(len(g))):
        for i in np.flatnonzero((g[:, col] < lo) | (g[:, col] > hi)):
            problems.append(f"LIV {i + 1}: gene {col + 1} = {g[i, col]} is outside {lo}..{hi}")
    if problems:
        return problems
    names = {FZ_GROUP: "featurizer", FT_GROUP: "feature-group"}
    for group, strategy, can_lead, can_follow in _SHARING:
        for i in range(len(g)):
            leader = g[i, group] - 1
            what = f"LIV {i + 1} ({lookup(g[i]).name}): {names[group]} sharing"
            if g[i, strategy] == 1 and leader != i:
                problems.append(f"{what}: shares nothing but names group {leader + 1} (must be its own, {i + 1})")
            elif g[i, strategy] > 1 and leader == i and not can_lead(g, i):
                problems.append(f"{what}: strategy {g[i, strategy]} is impossible for this class")
            elif g[i, strategy] > 1 and leader != i:
                if leader > i or g[leader, strategy] == 1 or g[leader, group] != leader + 1:
                    problems.append(f"{what}: group {leader + 1} is not led by an earlier sharing LIV")
                elif not can_follow(g, leader, i):
                    problems.append(f"{what}: incompatible with its leader {lookup(g[leader]).name}")
    return problems


# ---------------------------------------------------------------------------------------------
# Variation operators (paper section 4.2), all followed by repair


PRIORS = ("catalogue", "balanced")


def draw(col, lo, hi, n, rng, prior="catalogue"):
    """n values of one gene column. The class gene under the 'catalogue' prior (the paper's) is
    uniform over the 21 classes, so the MLP (GMemless) fills 1 place in 21; under 'balanced' (ours)
    a place is GMemless with probability 1/2, else a token mixer drawn uniformly, as in the hybrids."""
    if col != CLASS or prior == "catalogue":
        return rng.integers(lo, hi + 1, size=n)
    mixers = [c for c in range(lo, hi + 1) if c != CLASS_INDEX["GMemless"]]
    return np.where(rng.random(n) < 0.5, CLASS_INDEX["GMemless"], rng.choice(mixers, size=n))


def random_genome(n_livs, rng, prior="catalogue"):
    """A random valid backbone genome of n_livs LIVs."""
    cols = [draw(col, lo, hi, n_livs, rng, prior) for col, (lo, hi) in enumerate(allowed_values(n_livs))]
    return repair(np.stack(cols, axis=1))


def mutate(genome, rng, p=0.1, prior="catalogue"):
    """Per-gene mutation: each gene is redrawn from its allowed values with probability p."""
    g = as_array(genome).copy()
    for col, (lo, hi) in enumerate(allowed_values(len(g))):
        hit = rng.random(len(g)) < p
        g[hit, col] = draw(col, lo, hi, int(hit.sum()), rng, prior)
    return repair(g)


def crossover(a, b, rng):
    """2-point crossover of two backbone genomes of the same depth, cut between LIVs."""
    a, b = as_array(a), as_array(b)
    if len(a) != len(b):
        raise ValueError("crossover needs genomes of the same depth")
    i, j = sorted(rng.choice(len(a) + 1, size=2, replace=False))
    c1, c2 = a.copy(), b.copy()
    c1[i:j], c2[i:j] = b[i:j], a[i:j]
    return repair(c1), repair(c2)


def scale(genome, n_livs, how):
    """The genome at a depth that is a multiple of its own (Composer's two extrapolations): 'stack'
    repeats the whole sequence, 'stretch' repeats each LIV in place. Each copy keeps the original
    sharing pattern: its groups are led by the same copy of the original leader."""
    g = as_array(genome)
    n, copies = len(g), n_livs // len(g)
    if n_livs < n or n_livs % n:
        raise ValueError(f"--n-livs {n_livs} is not a multiple of the genome's {n} LIVs")
    if how not in ("stack", "stretch"):
        raise ValueError(f"--how {how!r}: choose stack or stretch")
    at = (lambda i, c: c * n + i) if how == "stack" else (lambda i, c: i * copies + c)  # 0-based positions
    out = np.empty((n_livs, GENES), dtype=np.int64)
    for c in range(copies):
        for i, row in enumerate(g):
            out[at(i, c)] = row
            out[at(i, c), [FZ_GROUP, FT_GROUP]] = [at(row[FZ_GROUP] - 1, c) + 1, at(row[FT_GROUP] - 1, c) + 1]
    return out


def every_variant(part=0, parts=1):
    """A genome holding every residual-block variant once: each class on its own, as a follower of
    a featurizer, and as a follower of each feature-sharing strategy it supports. A block's compiled
    graph depends only on its variant, so this is the whole set a search can meet (star.warm_up).
    part of parts: the classes c with (c - 1) % parts == part, a share for one process (ours)."""
    rows = []
    for c, cls in enumerate(CATALOGUE, start=1):
        if (c - 1) % parts != part:
            continue
        lead = len(rows) + 1
        rows += [[c, lead, 2, lead, 2], [c, lead, 2, lead + 1, 1]]  # leader; a featurizer follower
        rows += [[c, len(rows) + 1, 1, lead, s] for s, groups in FEATURE_SHARING.items()
                 if s > 1 and set(groups) <= set(cls.groups)]
    return repair(rows)


# ---------------------------------------------------------------------------------------------
# Text forms


def to_compact(genome):
    """One-line form for the command line: LIVs joined by '-', genes by '.': '1.1.1.1.1-9.2.1.2.1'."""
    return "-".join(".".join(str(int(v)) for v in row) for row in as_array(genome))


def from_compact(text):
    rows = [liv.split(".") for liv in text.strip().split("-")]
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if not (v.isascii() and v.isdigit()):
                raise ValueError(f"not a compact genome: {text[:60]!r}: LIV {i + 1}, gene {j + 1} is {v!r}, "
                                 "not an integer (expected e.g. 1.1.1.1.1-9.2.1.1.1)")
    return as_array([[int(v) for v in row] for row in rows])


def to_json(genome):
    g = as_array(genome)
    return json.dumps({"format": "star-genome", "n_livs": len(g), "summary": summary(g),
                       "genome": g.tolist()}, indent=1)


def from_json(data):
    """A genome from parsed JSON: our file format ({"genome": rows, ...}) or bare rows."""
    if isinstance(data, dict) and "genome" not in data:
        raise ValueError("no 'genome' field")
    return as_array(data["genome"] if isinstance(data, dict) else data)


def read_json(path, what):
    """Parsed JSON of a file, or one line naming the path and what is wrong with it: missing, a
    directory, unreadable, not UTF-8, not JSON, nested too deeply. Every JSON input goes through here."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{what} {path}: {(e.strerror or str(e)).lower()}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{what} {path}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: not JSON ({e})") from None


def load(spec):
    """A genome from a JSON file path or a compact string (a baseline name is refused: see baseline)."""
    if spec in BASELINES:
        raise ValueError(f"{spec!r} is a baseline: use --baseline")
    if os.path.exists(spec) or spec.endswith(".json"):
        try:
            return from_json(read_json(spec, "genome file"))
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith("genome file") else f"genome file {spec}: {e}") from None
    return from_compact(spec)


def liv_label(g, i):
    """A LIV's class, with its sharing: '<f3' featurizer of LIV 3, '<BV3' features B, V of LIV 3."""
    label, fz, ft = lookup(g[i]).name, featurizer_leader(g, i), feature_leader(g, i)
    if fz is not None:
        label += f"<f{fz + 1}"
    if ft is not None:
        label += f"<{FEATURE_SHARING[g[i, FT_STRATEGY]]}{ft + 1}"
    return label


def summary(genome):
    """Readable summary, the shortest repeating motif and its count: 'SA-1 GMemless | x12'."""
    g = as_array(genome)
    labels = [liv_label(g, i) for i in range(len(g))]
    for period in range(1, len(labels) + 1):
        if len(labels) % period == 0 and labels == labels[:period] * (len(labels) // period):
            repeats = len(labels) // period
            return " ".join(labels[:period]) + (f" | x{repeats}" if repeats > 1 else "")


UNITS = {  # what each base class computes, in words (reports and the README's legend)
    "SA-1": "multi-head softmax attention with RoPE",
    "SA-2": "SA-1 with a short causal convolution (3) on Q, K and V",
    "SA-3": "grouped-query attention: 4 query heads per K/V head",
    "SA-4": "multi-query attention: one K/V head",
    "Rec-1": "gated linear recurrence with data-dependent decay, state 16 per head, short convolution on features",
    "Rec-2": "Rec-1 with state 2 per head",
    "GConv-1": "double-gated short convolution, y = C * conv3(B * V)",
    "GConv-2": "double-gated long convolution, implicit filter as long as the sequence (Hyena)",
    "GMemless": "SwiGLU MLP, hidden 8/3 of the width: no token mixing",
    "Delta-1": "gated delta rule (Gated DeltaNet): a k x k state per head that erases before it writes, "
               "L2-normalised q and k, short convolution on features (ours, beyond the paper)",
    "SWA-1": f"sliding-window attention: each token sees the last {SWA_WINDOW}, a cache of {SWA_WINDOW} positions "
             "(ours, beyond the paper)",
}
TOKEN_MIXING = {1: "diagonal", 2: "low-rank", 3: "scaled Toeplitz", 4: "semi-separable"}


def legend():
    """How to read genomes, summaries and classes, as markdown lines (the README has the same text)."""
    rows = [f"| {c.name} | {'.'.join(map(str, c.operator))} | {TOKEN_MIXING[c.operator[1]]} | {UNITS[c.name]} |"
            for c in _BASE + [GMEMLESS] + _NEW]
    return [
        "A genome has one row of 5 genes per LIV (linear input-varying operator), in depth order: its class; its "
        "featurizer-sharing group and strategy (1 none, 2 reuse all featurizer weights of the group's first LIV); its "
        "feature-sharing group and strategy (1 none, 2 B and V, 3 B, 4 C and B: reuse features that the group's first "
        "LIV computed). C, B and V are a LIV's query-, key- and value-like features. Compact form: LIVs joined by `-`, "
        "genes by `.`, e.g. `1.1.1.1.1-9.2.1.2.1`.", "",
        "Summaries: `SA-1<f3` reuses the featurizer weights of LIV 3; `SA-1<BV3` reads the B and V features of LIV 3 "
        "(for attention: its K/V cache, so it keeps none); `x4` after a motif: it repeats 4 times.", "",
        "| class | operator genome | token mixing | unit |", "|---|---|---|---|", *rows,
        "| X-Diff | 10..17, 20, 21 | as X | differential X: two copies with their own C and B and a shared V, "
        "y1 - lambda * y2 (lambda per head), then a per-head norm |", "",
        "Baselines: Transformer++ repeats (SA-1, GMemless); StripedMamba repeats (Rec-1, GMemless, Rec-1, GMemless, "
        "SA-1, GMemless); StripedHyena is StripedMamba with GConv-2 for Rec-1."]


# ---------------------------------------------------------------------------------------------
# Baselines (paper section 5: Transformer++ and striped hybrids)


def _striped(n_livs, pattern):
    names = [pattern[i % len(pattern)] for i in range(n_livs)]
    return repair([[CLASS_INDEX[name], i + 1, 1, i + 1, 1] for i, name in enumerate(names)])


BASELINES = {
    "transformer++": ("SA-1", "GMemless"),
    "striped-mamba": ("Rec-1", "GMemless", "Rec-1", "GMemless", "SA-1", "GMemless"),
    "striped-hyena": ("GConv-2", "GMemless", "GConv-2", "GMemless", "SA-1", "GMemless"),
}


def baseline_depth(n_livs):
    """The baselines' depth beside candidates of n_livs: the nearest even depth at or below, >= 2."""
    return max(2, n_livs // 2 * 2)


def baseline(name, n_livs=24):
    """A baseline backbone at any even depth (paper: 24 LIVs)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    if n_livs < 2 or n_livs % 2:
        raise ValueError(f"baselines need an even number of LIVs, got {n_livs}")
    return _striped(n_livs, BASELINES[name])
