"""Retrain the search's choices (best_genome.json) of finished searches, and all three baselines, at a long budget on
one corpus, and print each search's margins to the baselines with their spread over search seeds.

    python data/study.py runs/study/* --steps 1200 --out runs/study/long-shakespeare.json
    python data/study.py runs/study/* --steps 1200 --data vim.bin --vocab-size 256 --out runs/study/long-vim.json

Every model trains once under the same seed, data order and preset (the runs' own, at --steps,
warm-up scaled as the confirmation's); results are kept in --out after each training, so a killed
study resumes where it stopped. The searches are grouped as --compare groups them
(report.search_kind: evolution, evolution with rungs, random search).
"""
import dataclasses
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import config  # noqa: E402
import genome as gn  # noqa: E402
import report  # noqa: E402
import star  # noqa: E402


def read_run(path):
    state = gn.read_json(os.path.join(path, "checkpoint.json"), "checkpoint")
    best = gn.from_json(gn.read_json(os.path.join(path, "best_genome.json"), "best genome"))
    return state["settings"], best


def main(argv=None):
    p = config.Parser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished search directories (each with best_genome.json)")
    p.add_argument("--steps", type=config.number("steps"), required=True, help="the long budget")
    p.add_argument("--data", default=None, help="a corpus (default: the embedded one)")
    p.add_argument("--vocab-size", type=config.number("vocab_size"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=config.number("threads"), default=1)
    p.add_argument("--out", required=True, help="results JSON (read first: a killed study resumes)")
    args = p.parse_args(argv)
    try:
        runs = {path: read_run(path) for path in args.runs}
        base = config.Preset(**next(iter(runs.values()))[0]["preset"])
        preset = dataclasses.replace(base, steps=args.steps, seed=args.seed,
                                     warmup=round(base.warmup * args.steps / base.steps))
        corpus = star.Corpus(args.data, args.vocab_size).check(preset)
        done = gn.read_json(args.out, "study results") if os.path.exists(args.out) else {}
    except ValueError as e:
        config.fail(str(e))
    torch_threads(args.threads)
    models = {name: gn.baseline(name, base.n_livs) for name in gn.BASELINES}
    models.update({gn.to_compact(g): g for _, g in runs.values()})
    for i, (name, g) in enumerate(models.items()):
        key = gn.to_compact(g)
        if key not in done:
            print(f"[{i + 1}/{len(models)}] {gn.summary(g)[:60]}", flush=True)
            done[key] = star.train_candidate(g, corpus, preset, "cpu", log=lambda s: print("  " + s, flush=True))
            config.write_file(args.out, json.dumps(done, indent=1))
        print(f"  {name[:40]}: ppl {done[key]['ppl']}", flush=True)
    print(table(runs, done))


def torch_threads(n):
    import torch
    torch.set_num_threads(n)


def table(runs, done):
    """Each run's best and its margins (% of perplexity, negative: the best is lower); then by kind
    the mean and sample sd of each margin over the search seeds."""
    ppl = {name: done[gn.to_compact(gn.baseline(name, len(next(iter(runs.values()))[1])))]["ppl"]
           for name in gn.BASELINES}
    lines = ["| search | seed | best | ppl | " + " | ".join(f"vs {n}" for n in gn.BASELINES) + " |",
             "|---" * (4 + len(gn.BASELINES)) + "|"]
    margins = {}
    for path, (s, g) in sorted(runs.items(), key=lambda r: (report.search_kind(r[1][0]), r[1][0]["seed"])):
        p = done[gn.to_compact(g)]["ppl"]
        m = [100 * (p / ppl[n] - 1) for n in gn.BASELINES]
        margins.setdefault(report.search_kind(s), []).append(m)
        lines.append(f"| {report.search_kind(s)} | {s['seed']} | {gn.summary(g)[:40]} | {p:.3f} | " +
                     " | ".join(f"{x:+.1f}%" for x in m) + " |")
    lines.append("")
    for k, ms in margins.items():
        cells = []
        for col in zip(*ms):
            sd = f" ± {statistics.stdev(col):.1f}" if len(col) > 1 else ""
            cells.append(f"{statistics.mean(col):+.1f}%{sd}")
        lines.append(f"{k} ({len(ms)} seeds): " + ", ".join(f"vs {n} {c}" for n, c in zip(gn.BASELINES, cells)))
    best = {(report.search_kind(s), s["seed"]): done[gn.to_compact(g)]["ppl"] for s, g in runs.values()}
    for k in sorted({k for k, _ in best} - {"random"}):
        seeds = sorted(seed for kk, seed in best if kk == k and ("random", seed) in best)
        d = [100 * (best[k, seed] / best["random", seed] - 1) for seed in seeds]
        if d:
            lines.append(f"{k} against random search (negative: {k} lower): " +
                         ", ".join(f"seed {seed} {x:+.1f}%" for seed, x in zip(seeds, d)) +
                         f"; mean {statistics.mean(d):+.1f}%, lower on {sum(x < 0 for x in d)} of {len(d)}")
    lines.append("baselines: " + ", ".join(f"{n} {v:.3f}" for n, v in ppl.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
