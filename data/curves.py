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
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import config  # noqa: E402
import genome as gn  # noqa: E402
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


def main(argv=None):
    p = config.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the table (JSON; read first: a killed build continues)")
    p.add_argument("--genome-seed", type=config.number("seed"), default=36)
    p.add_argument("--random", type=config.number("population"), default=24, help="genomes under the catalogue prior")
    p.add_argument("--balanced", type=config.number("population"), default=12, help="genomes under the balanced prior")
    p.add_argument("--mutants", type=config.number("population"), default=9, help="mutants of the hybrids")
    p.add_argument("--second-seed", type=config.number("population"), default=16, help="models also under seed 1")
    p.add_argument("--threads", type=config.number("threads"), default=2)
    args = p.parse_args(argv)
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
