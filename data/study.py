"""Retrain the search's choices (best_genome.json) of finished searches, and all three baselines, at the
target budget under fresh seeds on one corpus, and print each choice's paired margins to the baselines
and to random search's choice of the same search seed.

    python data/study.py runs/study/* --steps 1200 --seeds 11,12,13 --out runs/study/target-shakespeare.json
    python data/study.py runs/study/* --steps 1200 --seeds 11,12,13 --data vim.bin --vocab-size 256 \
        --out runs/study/target-vim.json
    python data/study.py runs/study/evolution-0 --steps 1200 --lr-factors 0.5,2 --out runs/study/target-embedded.json

Every model trains under each seed, with the same data order per seed and the runs' own preset
(schedule included) at --steps; choose seeds no search or confirmation used (a search with seed S
confirms under S + 1, S + 2, S + 3). Results are kept in --out after each training, so a killed
study resumes where it stopped. Margins are paired: the mean over seeds of the per-seed difference
of log perplexity, with its 95% Student-t interval (report.margin). The searches are grouped as
--compare groups them (report.search_kind). With --lr-factors the baselines also train at the runs' lr
times each factor, paired with their own lr (issue 28: is the shared lr a handicap?).
"""
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import config  # noqa: E402
import genome as gn  # noqa: E402
import report  # noqa: E402
import runs as run_files  # noqa: E402
import star  # noqa: E402


def read_run(path):
    """A finished search, read and checked as `evolve.py --resume` reads it (older versions upgraded),
    and its choice."""
    run = run_files.Run.load(path)
    if run.pending or run.generation + 1 < run.settings["generations"]:  # its choice may still change
        raise ValueError(f"{path}: not a finished search (generation {run.generation + 1} of "
                         f"{run.settings['generations']})")
    return run, gn.load(os.path.join(path, "best_genome.json"))


def read_results(path, runs_read):
    """The results of an earlier study at --out (none if it does not exist), each entry checked:
    never a run's checkpoint, a device, or anything but {key: training result}."""
    config.output_file(path, "study results", regular=True)
    if os.path.exists(path) and any(os.path.exists(p) and os.path.samefile(path, p) for p in
           (os.path.join(r, "checkpoint.json") for r in runs_read)):
        raise ValueError(f"--out {path} is a search's checkpoint, not a study's results")
    done = gn.read_json(path, "study results") if os.path.exists(path) else {}
    if not isinstance(done, dict) or {"version", "settings"} <= set(done):
        raise ValueError(f"study results {path}: not a study's results (a JSON object of training results)")
    for key, e in list(done.items()):
        where = f"study results {path}, {key[:60]}"
        if key.split("/")[0].isdigit():  # before budgets were in the key (issue 38): its budget is its steps
            done.pop(key)
            if isinstance(e, dict) and isinstance(e.get("steps_trained"), int):
                done[f"{e['steps_trained']} steps/{key}"] = e
        if not isinstance(e, dict) or e.get("status") not in ("ok", "failed") or not isinstance(e.get("seed"), int):
            raise ValueError(f"{where}: not a training result (status ok or failed, a seed)")
        if e["status"] == "ok" and not (isinstance(e.get("ppl"), (int, float)) and 1 <= e["ppl"] < math.inf):
            raise ValueError(f"{where}: ppl {e.get('ppl')!r} for a model that trained")
    return done


def search_lines(path, run):
    """One search: its compute, and how well each rung's order (under the search's seed) predicts the
    order at the target, over the models (baselines included) that reached the target."""
    rungs, at = run.settings["rungs"], {}  # (model, rung) -> ppl
    for e in run.evaluations:
        at[e["key"], e["rung"]] = e["ppl"] if e["status"] == "ok" else None
    for name, e in run.baselines.items():  # by model: a hybrid met again as a candidate is one point
        steps = name.partition("@")[2]
        at[e["key"], rungs.index(int(steps)) if steps else 0] = e["ppl"] if e["status"] == "ok" else None
    top = [m for m, r in at if r == len(rungs) - 1 and all(at.get((m, i)) for i in range(len(rungs)))]
    run = SimpleNamespace(trainings=run.evaluations, settings=run.settings)
    if len(rungs) < 2:
        return [f"{path}: {report.compute(run)}"]
    return [f"{path}: {report.compute(run)}; over the {len(top)} models at {rungs[-1]} steps, " + "; ".join(
        f"{rungs[r]} steps against {rungs[-1]}: " + report.correlation_line(
            [at[m, r] for m in top], [at[m, len(rungs) - 1] for m in top])
        for r in range(len(rungs) - 1))]


def main(argv=None):
    p = config.Parser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished search directories (each with best_genome.json)")
    p.add_argument("--steps", type=config.number("steps"), required=True, help="the target budget")
    p.add_argument("--seeds", default="11,12,13", help="training seeds, separated by commas (fresh ones)")
    p.add_argument("--data", default=None, help="a corpus (default: the embedded one)")
    p.add_argument("--vocab-size", type=config.number("vocab_size"), default=None)
    p.add_argument("--threads", type=config.number("threads"), default=2)
    p.add_argument("--lr-factors", default=None, metavar="F,F", help="also train each baseline at the runs' lr "
                   "times each factor (e.g. 0.5,2), paired with its own lr: is the shared lr a handicap?")
    p.add_argument("--out", required=True, help="results JSON (read first: a killed study resumes)")
    args = p.parse_args(argv)
    try:
        seeds = [config.check_number("seed", int(x)) for x in args.seeds.split(",")]
        factors = [config.check_number("lr", float(x)) for x in args.lr_factors.split(",")] if args.lr_factors else []
        runs = {path: read_run(path) for path in args.runs}
        presets = {json.dumps({**r.settings["preset"], "seed": 0}, sort_keys=True) for r, _ in runs.values()}
        if len(presets) > 1:
            raise ValueError("the runs differ in their preset (width, depth, schedule...): study them apart")
        base = config.Preset(**next(iter(runs.values()))[0].settings["preset"])
        preset = dataclasses.replace(base, steps=args.steps)
        corpus = star.Corpus(args.data, args.vocab_size).check(preset)
        done = read_results(args.out, args.runs)
    except ValueError as e:
        config.fail(str(e))
    import torch
    torch.set_num_threads(args.threads)
    models = {name: gn.baseline(name, base.n_livs) for name in gn.BASELINES}
    models.update({gn.to_compact(g): g for _, g in runs.values()})
    jobs = [(seed, name, g, 1.0) for seed in seeds for name, g in models.items()]
    jobs += [(seed, name, models[name], f) for seed in seeds for f in factors for name in gn.BASELINES]
    for i, (seed, name, g, factor) in enumerate(jobs):
        key = study_key(args.steps, seed, g, factor)
        if key not in done:
            print(f"[{i + 1}/{len(jobs)}, seed {seed}, lr x{factor:g}] {gn.summary(g)[:60]}", flush=True)
            result = star.train_candidate(g, corpus, dataclasses.replace(preset, seed=seed, lr=preset.lr * factor), "cpu")
            done[key] = {**result, "seed": seed}
            try:
                config.write_file(args.out, json.dumps(done, indent=1), "study results")
            except ValueError as e:
                config.fail(f"{e}; the results before this training are kept")
        print(f"  {name[:40]}: ppl {done[key]['ppl']}", flush=True)
    print(table(runs, done, seeds, args.steps))
    print("\n".join(line for path, (run, _) in runs.items() for line in search_lines(path, run)))
    if factors:
        print("\n".join(lr_lines(done, seeds, factors, base.n_livs, runs, args.steps)))


def study_key(steps, seed, g, factor=1.0):
    lr = "" if factor == 1.0 else f"lr x{factor:g}/"
    return f"{steps} steps/{seed}/{lr}{gn.to_compact(g)}"


def trained(done, steps, seeds, g, factor=1.0):
    """One model's results under the seeds, in the form report.mean and report.margin read."""
    return SimpleNamespace(runs=[done[study_key(steps, seed, g, factor)] for seed in seeds])


def lr_lines(done, seeds, factors, n_livs, runs, steps):
    """Each baseline at each lr factor: its mean ppl and its paired margin to the shared lr (x1); then
    each run's choice (at the shared lr) against each baseline at the baseline's best lr."""
    model, lines, best = functools.partial(trained, done, steps, seeds), [], {}
    for name in gn.BASELINES:
        g = gn.baseline(name, n_livs)
        at = {f: model(g, f) for f in [1.0, *factors]}
        best[name] = min(at, key=lambda f: report.mean(at[f], "ppl"))
        lines.append(f"{name}: lr x1 {report.mean(at[1.0], 'ppl'):.3f}; " + "; ".join(
            f"x{f:g} {report.mean(at[f], 'ppl'):.3f} ({report.fmt_margin(*report.margin(at[f], at[1.0], 'ppl'), 'ppl')})"
            for f in factors))
    for path, (_, g) in runs.items():
        lines.append(f"{path} against each baseline at its best lr: " + "; ".join(
            f"{name} x{f:g} {report.fmt_margin(*report.margin(model(g), model(gn.baseline(name, n_livs), f), 'ppl'), 'ppl')}"
            for name, f in best.items()))
    return lines


def table(runs, done, seeds, steps):
    """Each run's choice: its mean over the seeds and its paired margins to each baseline (negative:
    the choice is lower); then, by kind, the mean margin over search seeds and how many are called."""
    model = functools.partial(trained, done, steps, seeds)
    n = len(next(iter(runs.values()))[1])
    baselines = {name: model(gn.baseline(name, n)) for name in gn.BASELINES}
    lines = ["| search | seed | choice | ppl (mean) | " + " | ".join(f"vs {b} (paired)" for b in gn.BASELINES) + " |",
             "|---" * (4 + len(gn.BASELINES)) + "|"]
    margins, choices = {}, {}
    for _, (run, g) in sorted(runs.items(), key=lambda r: (report.search_kind(r[1][0].settings),
                                                            r[1][0].settings["seed"])):
        s = run.settings
        c, kind = model(g), report.search_kind(s)
        choices[kind, s["seed"]] = c
        m = [report.margin(c, b, "ppl") for b in baselines.values()]
        margins.setdefault(kind, []).append(m)
        lines.append(f"| {kind} | {s['seed']} | `{gn.summary(g)}` | {report.mean(c, 'ppl'):.3f} | " +
                     " | ".join(report.fmt_margin(*x, "ppl") for x in m) + " |")
    lines.append("")
    for kind, ms in margins.items():
        lines.append(f"{kind}: " + "; ".join(f"vs {b} {over_seeds(col)}" for b, col in zip(gn.BASELINES, zip(*ms))))
    against = {}
    for kind, seed in sorted(k for k in choices if k[0] != "random" and ("random", k[1]) in choices):
        d, low, high = against.setdefault(kind, {})[seed] = report.margin(choices[kind, seed], choices["random", seed], "ppl")
        lines.append(f"{kind}, seed {seed}, against random search: {report.fmt_margin(d, low, high, 'ppl')}")
    for kind, ms in against.items():
        lines.append(f"{kind} against random search: {over_seeds(list(ms.values()))}")
    lines.append("baselines (mean): " + ", ".join(f"{b} {report.mean(c, 'ppl'):.3f}" for b, c in baselines.items()))
    return "\n".join(lines)


def over_seeds(margins):
    """Paired margins (d, low, high), one per search seed: their mean, and how many are below beyond the interval."""
    below = sum(report.called(low, high) and d < 0 for d, low, high in margins)
    return (f"{100 * (math.exp(statistics.mean(m[0] for m in margins)) - 1):+.1f}% on average, below beyond the "
            f"interval on {below} of {len(margins)} search seeds")


if __name__ == "__main__":
    main()
