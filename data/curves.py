"""The learning-curve table (issue 36): tiny genomes, each trained once to the target with a result at
every budget a rung could use, to measure how well an early cut predicts the target.

    python data/curves.py --out data/curves.json                # build (or continue) the table
    python data/curves.py --out data/curves.json --threads 1    # beside other work

The genomes: the three hybrids, mutants of them, random genomes under the catalogue prior (the
paper's) and under the balanced prior (genome.PRIORS), drawn from --genome-seed. Each trains once
under training seed 0 through the budgets 60, 120, 240, 400, 800, 1,200 as asynchronous successive
halving does: each budget continues from the state kept where the previous one's decay started
(star.train_candidate's keep and resume), so the result at a budget is the one a rung of that budget
would give. The first --second-seed models (the hybrids first) also train under seed 1, for each
budget's seed noise. Results are written after every model, so a killed build continues.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import config  # noqa: E402
import evolve  # noqa: E402
import genome as gn  # noqa: E402
import report  # noqa: E402
import runs  # noqa: E402
import star  # noqa: E402

BUDGETS = (60, 120, 240, 400, 800, 1200)


def genomes(n_livs, genome_seed, n_random, n_balanced, n_mutants):
    """(source, genome) in training order: the hybrids, then the others interleaved, so that a table
    cut short still holds every kind."""
    rng, seen = np.random.default_rng(genome_seed), set()

    def distinct(source, n, draw):  # n genomes no other kind or draw has given
        out = []
        while len(out) < n:
            g = draw(len(out))
            if gn.to_compact(g) not in seen:
                seen.add(gn.to_compact(g))
                out.append((source, g))
        return out
    hybrids = distinct("hybrid", 3, lambda i: gn.baseline(list(gn.BASELINES)[i], n_livs))
    mutants = distinct("mutant", n_mutants, lambda i: gn.mutate(hybrids[i % 3][1], rng, p=0.2, prior="balanced"))
    random = distinct("random", n_random, lambda i: gn.random_genome(n_livs, rng))
    balanced = distinct("balanced", n_balanced, lambda i: gn.random_genome(n_livs, rng, "balanced"))
    order, kinds = [], [random, balanced, mutants]
    while any(kinds):
        for kind in kinds:
            if kind:
                order.append(kind.pop(0))
    return hybrids + order


def curve(g, corpus, preset, log):
    """One model through every budget, each continuing from the last kept state: {budget: result}."""
    results, kept = {}, []
    for budget in BUDGETS:
        resume = kept[-1] if kept else None
        r = star.train_candidate(g, corpus, dataclasses.replace(preset, steps=budget), "cpu", resume=resume,
                                 keep=kept.append)
        results[budget] = {k: r.get(k) for k in ("status", "ppl", "train_seconds", "steps_trained", "error")}
        log(f"    {budget} steps: ppl {r['ppl']}" if r["status"] == "ok" else f"    {budget} steps: {r.get('error')}")
        if r["status"] != "ok":
            break
    return results, r


# ---------------------------------------------------------------------------------------------
# The analysis: how well a first cut predicts the target (issue 36, items 2 and 3)

TARGET = 1200


def complete(table, seed=0):
    """The models trained through every budget under this seed: {compact: {source, ppl: {budget: ppl}, ...}}."""
    out = {}
    for e in table.values():
        ppl = {int(b): r["ppl"] for b, r in e["budgets"].items() if r["status"] == "ok"}
        if e["seed"] == seed and all(b in ppl for b in BUDGETS):
            out[e["genome"]] = {**e, "ppl": ppl}
    return out


def composition(compact):
    """A genome's features (genome.composition) from its compact form."""
    return gn.composition(gn.from_compact(compact))


def late_gain_loo(models, budget, ridge=1.0):
    """Each model's predicted log(ppl at budget / ppl at the target) from its composition, by a ridge
    regression fitted on every other model (leave one out: never judged on a model it was fitted on)."""
    keys = list(models)
    X = np.stack([composition(k) for k in keys])  # (n, features)
    y = np.array([math.log(models[k]["ppl"][budget] / models[k]["ppl"][TARGET]) for k in keys])  # (n,)
    predicted = {}
    for i, k in enumerate(keys):
        rest = np.arange(len(keys)) != i
        mu, sd = X[rest].mean(0), X[rest].std(0) + 1e-9
        Z = (X[rest] - mu) / sd
        w = np.linalg.solve(Z.T @ Z + ridge * np.eye(Z.shape[1]), Z.T @ (y[rest] - y[rest].mean()))
        predicted[k] = float(y[rest].mean() + ((X[i] - mu) / sd) @ w)
    return predicted


def extrapolated(ppl, b):
    """log ppl at the target from the last two budgets up to b, on a straight line in log-log (a power
    law in the steps); needs the result at the budget before b (in a search: one more decay branch)."""
    if b == BUDGETS[0]:
        raise ValueError(f"no budget before {b} steps to extrapolate from")
    p = BUDGETS[BUDGETS.index(b) - 1]
    slope = (math.log(ppl[b]) - math.log(ppl[p])) / (math.log(b) - math.log(p))
    return math.log(ppl[b]) + slope * (math.log(TARGET) - math.log(b))


def signals(models):
    """The first-cut signals, each a function (model, budget) -> a score (lower is better): the raw
    result at the budget; the result less its predicted late gain (composition, leave one out); the
    result extrapolated along its own curve."""
    gains = {b: late_gain_loo(models, b) for b in BUDGETS[:-1]}
    return {"raw": lambda k, b: math.log(models[k]["ppl"][b]),
            "composition": lambda k, b: math.log(models[k]["ppl"][b]) - (gains[b][k] if b != TARGET else 0.0),
            "curve": lambda k, b: extrapolated(models[k]["ppl"], b)}


def cost(rungs, eta, n, branches=False):
    """Candidate-steps of successive halving over n models: each rung's share continued from the decay of
    the rung below (star.decay_start under the tiny preset), as the search plans it; branches: each
    cut also needs the result at the budget before it (the curve signal), one more decay branch."""
    decay = lambda b: star.decay_start(dataclasses.replace(config.PRESETS["tiny"], steps=b))  # noqa: E731
    kept = [0] + [decay(b) for b in rungs[:-1]]
    if branches and BUDGETS[0] in rungs[:-1]:
        raise ValueError(f"no budget before {BUDGETS[0]} steps to branch at")
    before = [BUDGETS[BUDGETS.index(b) - 1] for b in rungs[:-1]] if branches else []
    extra = [p - decay(p) for p in before] + [0] * (len(rungs) - len(before))
    return sum(n // eta ** r * (b - start + x) for r, (b, start, x) in enumerate(zip(rungs, kept, extra)))


def simulate(models, pool, rungs, eta, n, score, rng):
    """One search: n models drawn from pool, the top 1/eta of each rung by score continue, the choice
    the best at the target by its result there. Its log-ppl at the target."""
    alive = list(rng.choice(pool, size=min(n, len(pool)), replace=False))
    for r, b in enumerate(rungs[:-1]):
        alive = sorted(alive, key=lambda k: score(k, b))[: max(1, len(alive) // eta)]
    return min(math.log(models[k]["ppl"][TARGET]) for k in alive)


RULES = [  # (name, rungs, eta, signal at the cuts)
    ("120,400,1200 raw (issue 28's default)", (120, 400, 1200), 3, "raw"),
    ("60,240,1200 raw", (60, 240, 1200), 3, "raw"),
    ("240,800,1200 raw", (240, 800, 1200), 3, "raw"),
    ("400,1200 raw", (400, 1200), 3, "raw"),
    ("120,400,1200 composition", (120, 400, 1200), 3, "composition"),
    ("240,800,1200 composition", (240, 800, 1200), 3, "composition"),
    ("120,400,1200 curve", (120, 400, 1200), 3, "curve"),
    ("240,800,1200 curve", (240, 800, 1200), 3, "curve"),
]


def search_loop(models, pool, hybrids, rng, first_cut=True, population=8, generations=4, rungs=(120, 400, 1200), eta=3):
    """One search as evolve.py runs it (its promotable, best_at and late_gain on a runs.Run), with
    genomes drawn from the pool instead of bred: generations of `population` at the first rung, each
    followed by the promotions; the baselines (the hybrids) through every rung first. first_cut=False:
    the raw result at each cut. The choice's log-ppl at the target."""
    run = runs.Run("unused", {"objective": "quality", "rungs": list(rungs), "eta": eta, "population": population, "seed": 0})
    entry = lambda k, r: {"key": runs.model_key(k), "status": "ok", "ppl": models[k]["ppl"][rungs[r]], "compact": k,  # noqa: E731
                          "rung": r}
    run.baselines = {f"{h}@{b}": entry(h, r) for h in hybrids for r, b in enumerate(rungs)}
    drawn = list(rng.choice(pool, size=min(len(pool), population * generations), replace=False))
    raw = mock.patch.object(evolve, "late_gain", lambda run, rung: lambda c: 0.0)
    with contextlib.nullcontext() if first_cut else raw:
        for g in range(generations):
            run.evaluations += [{**entry(k, 0), "generation": g} for k in drawn[g * population:(g + 1) * population]]
            for r in range(1, len(rungs)):
                run.evaluations += [{**entry(k, r), "generation": g} for k in evolve.promotable(run, r)]
    return min(math.log(e["ppl"]) for e in run.evaluations if e["rung"] == len(rungs) - 1)


def analyse(table, draws=1000, reference=27, seed=0, loop_draws=300):
    """The report of items 2 and 3 as markdown lines."""
    if not isinstance(table, dict) or not all(isinstance(e, dict) and {"seed", "genome", "source", "budgets"} <= set(e)
                                              for e in table.values()):
        raise ValueError("not a curve table (data/curves.py writes one)")
    models = complete(table)
    hybrids = [gn.to_compact(gn.baseline(name, 8)) for name in gn.BASELINES]
    pool = [k for k in models if models[k]["source"] != "hybrid"]
    if not set(hybrids) <= set(models) or len(pool) < 3:
        raise ValueError(f"the table holds {len(models)} models through every budget under seed 0: the analysis needs "
                         "the three hybrids and at least three others")
    mamba = math.log(models[hybrids[1]]["ppl"][TARGET])
    keys = list(models)
    lines = [f"{len(models)} models through every budget (seed 0); Spearman of each budget's order with {TARGET} steps:", ""]
    lines += ["| budget | rho, raw | rho, composition (leave one out) | rho, curve | transformer++, striped-mamba, "
              "striped-hyena: rank, raw | the same, composition |", "|---|---|---|---|---|---|"]
    sig = signals(models)
    for b in BUDGETS[:-1]:
        places = []
        for name in ("raw", "composition"):
            scores = sorted(sig[name](k, b) for k in keys)
            places.append(", ".join(str(1 + scores.index(sig[name](h, b))) for h in hybrids))
        target = [models[k]["ppl"][TARGET] for k in keys]
        rho = [report.spearman([sig[name](k, b) for k in keys], target) if name != "curve" or b != BUDGETS[0]
               else float("nan") for name in ("raw", "composition", "curve")]
        lines.append(f"| {b} | " + " | ".join(f"{x:.2f}" if x == x else "-" for x in rho) + " | "
                     + " | ".join(f"{p} of {len(keys)}" for p in places) + " |")
    lines += ["", f"Simulated searches ({draws} draws each, at the compute of {reference} models under issue 28's default rule; "
              "the choice against StripedMamba at 1,200 steps, seed 0):", "",
              "| rule | models drawn | mean margin | 10th-90th percentile | beats StripedMamba |", "|---|---|---|---|---|"]
    budget = cost((120, 400, 1200), 3, reference)
    for name, rungs, eta, signal in RULES:
        spend = functools.partial(cost, rungs, eta, branches=signal == "curve")
        n = max([k for k in range(1, len(pool) + 1) if spend(k) <= budget] or [1])
        rng = np.random.default_rng(seed)
        margins = np.array([simulate(models, pool, rungs, eta, n, sig[signal], rng) - mamba for _ in range(draws)])
        pct = lambda x: f"{100 * (math.exp(x) - 1):+.1f}%"  # noqa: E731
        lines.append(f"| {name} | {n} | {pct(margins.mean())} | {pct(np.percentile(margins, 10))} to "
                     f"{pct(np.percentile(margins, 90))} | {100 * np.mean(margins < 0):.0f}% |")
    lines += ["", f"The search's own loop ({loop_draws} draws: 4 generations of 8 genomes drawn from the table, evolve.py's "
              "promotions; the same compute under both cuts):", "", "| first cut | mean margin | 10th-90th percentile | "
              "beats StripedMamba |", "|---|---|---|---|"]
    for first_cut in (False, True):
        rng = np.random.default_rng(seed)
        margins = np.array([search_loop(models, pool, hybrids, rng, first_cut) - mamba for _ in range(loop_draws)])
        lines.append(f"| {'late gain (the default)' if first_cut else 'raw'} | {pct(margins.mean())} | "
                     f"{pct(np.percentile(margins, 10))} to {pct(np.percentile(margins, 90))} | {100 * np.mean(margins < 0):.0f}% |")
    lines += ["", "Priors: the share of each kind's models below StripedMamba at 1,200 steps, and their spread:", "",
              "| genomes | n | below StripedMamba | median margin | 10th-90th percentile |", "|---|---|---|---|---|"]
    for source in ("random", "balanced", "mutant"):
        m = np.array([math.log(models[k]["ppl"][TARGET]) - mamba for k in keys if models[k]["source"] == source])
        if len(m):
            lines.append(f"| {source} | {len(m)} | {100 * np.mean(m < 0):.0f}% | {100 * (math.exp(np.median(m)) - 1):+.1f}% | "
                         f"{100 * (math.exp(np.percentile(m, 10)) - 1):+.1f}% to {100 * (math.exp(np.percentile(m, 90)) - 1):+.1f}% |")
    return lines + noise_lines(table)


def noise_lines(table):
    """Each budget's seed noise: the sd over models of the per-model log-ppl difference between the
    two seeds, against the spread between models."""
    second = complete(table, 1)
    both = [(a, second[k]) for k, a in complete(table).items() if k in second]
    if len(both) < 3:
        return []
    lines = ["", f"Seed noise ({len(both)} models under seeds 0 and 1): per budget, the sd of a model's log-ppl "
             "between seeds against the sd between models:", ""]
    for b in BUDGETS:
        d = [math.log(x["ppl"][b]) - math.log(y["ppl"][b]) for x, y in both]
        spread = np.std([math.log(x["ppl"][b]) for x, _ in both], ddof=1)
        lines.append(f"- {b} steps: {100 * np.std(d, ddof=1) / math.sqrt(2):.2f}% per seed; between models {100 * spread:.1f}%")
    return lines


def shard(text):
    """--shard K/N: (K, N) with 0 <= K < N."""
    k, _, n = text.partition("/")
    if not (k.isascii() and k.isdigit() and n.isascii() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 0 <= K < N")
    return int(k), int(n)


def main(argv=None):
    p = config.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the table (JSON; read first: a killed build continues)")
    p.add_argument("--genome-seed", type=config.number("seed"), default=36)
    p.add_argument("--random", type=config.number("population"), default=24, help="genomes under the catalogue prior")
    p.add_argument("--balanced", type=config.number("population"), default=12, help="genomes under the balanced prior")
    p.add_argument("--mutants", type=config.number("population"), default=9, help="mutants of the hybrids")
    p.add_argument("--second-seed", type=config.number("population"), default=16, help="models also under seed 1")
    p.add_argument("--seeds", default="0,1", help="the training seeds this process builds (0, 1 or both): two "
                   "processes may build a table's two seeds into two files")
    p.add_argument("--shard", type=shard, default=(0, 1), metavar="K/N",
                   help="build every Nth model from the Kth (N processes, N files: merge them by key)")
    p.add_argument("--threads", type=config.number("threads"), default=2)
    p.add_argument("--analyse", action="store_true", help="print the analysis of the table in --out; train nothing")
    args = p.parse_args(argv)
    if args.analyse:
        try:
            return print("\n".join(analyse(gn.read_json(args.out, "curve table"))))
        except ValueError as e:
            config.fail(f"{args.out}: {e}")
    try:
        config.output_file(args.out, "curve table")
        done = gn.read_json(args.out, "curve table") if os.path.exists(args.out) else {}
        if not isinstance(done, dict):
            raise ValueError(f"{args.out}: not a curve table (a JSON object keyed by seed and genome)")
        preset = config.PRESETS["tiny"]
        corpus = star.Corpus().check(preset)
    except ValueError as e:
        config.fail(str(e))
    import torch
    torch.set_num_threads(args.threads)
    models = genomes(preset.n_livs, args.genome_seed, args.random, args.balanced, args.mutants)
    jobs = [(0, m) for m in models] + [(1, m) for m in models[:args.second_seed]]
    jobs = [(seed, m) for seed, m in jobs if str(seed) in args.seeds.split(",")][args.shard[0]::args.shard[1]]
    for i, (seed, (source, g)) in enumerate(jobs):
        key = f"{seed}/{gn.to_compact(g)}"
        if key in done:
            continue
        start = time.perf_counter()
        print(f"[{i + 1}/{len(jobs)}, seed {seed}, {source}] {gn.summary(g)}", flush=True)
        results, last = curve(g, corpus, dataclasses.replace(preset, seed=seed), lambda s: print(s, flush=True))
        done[key] = {"seed": seed, "source": source, "genome": gn.to_compact(g), "params": last["params"],
                     "cache_bytes": last["cache_bytes"], "seconds": time.perf_counter() - start,
                     "budgets": results}
        config.write_file(args.out, json.dumps(done, indent=1), "curve table")
    print(f"{len(done)} of {len(jobs)} curves in {args.out}")


if __name__ == "__main__":
    main()
