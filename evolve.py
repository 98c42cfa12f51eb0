"""STAR's evolutionary search (paper section 4.2; STAR_SPEC.md section 5): NSGA-II over backbone genomes.

    python evolve.py --objective quality            # lowest validation perplexity
    python evolve.py --objective quality-cache      # Pareto front of perplexity and cache bytes
    python evolve.py --resume runs/20261126-120000  # continue a killed run

The whole algorithm is in this file: fast non-dominated sorting, crowding distance, binary
tournament on (rank, crowding), 2-point crossover and per-gene mutation (genome.py), repair,
and elitist survival of parents plus children. Each candidate is trained and scored by
star.train_candidate under the same budget, data order and initialisation seed.
"""
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

import genome as gn
import star

OBJECTIVES = {  # all minimised
    "quality": ("ppl",),
    "quality-size": ("ppl", "params"),
    "quality-cache": ("ppl", "cache_bytes"),
    "quality-latency": ("ppl", "latency_ms"),
}
DEFAULTS = {"tiny": {"population": 8, "generations": 4}, "gpu": {"population": 16, "generations": 18}}
BASELINES = ("transformer++", "striped-mamba")
SINGLE_OBJECTIVE_ELITES = 2  # paper: 2 survivors carried over in single-objective runs
FAILED = 1e30  # the objective value of a failed candidate: worse than anything real
VERSION = 1  # of checkpoint.json

# ---------------------------------------------------------------------------------------------
# NSGA-II (Deb et al. 2002)


def dominates(a, b):
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(F):
    """Fronts of the objective matrix F (n, m), best first, as lists of row indices."""
    n = len(F)
    dominated_by = [[] for _ in range(n)]  # i -> the rows that i dominates
    count = np.zeros(n, dtype=int)  # how many rows dominate i
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(F[i], F[j]):
                dominated_by[i].append(j)
                count[j] += 1
            elif dominates(F[j], F[i]):
                dominated_by[j].append(i)
                count[i] += 1
    fronts, current = [], [i for i in range(n) if count[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in dominated_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def crowding_distance(F):
    """Crowding distance of each row of one front F (n, m): boundaries infinite, gaps normalised."""
    n, m = F.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(F[:, k], kind="stable")
        span = F[order[-1], k] - F[order[0], k]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            distance[order[1:-1]] += (F[order[2:], k] - F[order[:-2], k]) / span
    return distance


def rank_and_crowding(F):
    rank, crowd = np.zeros(len(F), dtype=int), np.zeros(len(F))
    for r, front in enumerate(non_dominated_sort(F)):
        rank[front] = r
        crowd[front] = crowding_distance(F[front])
    return rank, crowd


def tournament(rank, crowd, rng):
    """Binary tournament: lower rank wins, then larger crowding distance."""
    a, b = rng.choice(len(rank), size=2, replace=False)
    if rank[a] != rank[b]:
        return a if rank[a] < rank[b] else b
    return a if crowd[a] >= crowd[b] else b


def make_children(population, F, n, rng, crossover, mutate):
    """n children by tournament selection, 2-point crossover and per-gene mutation."""
    rank, crowd = rank_and_crowding(F)
    children = []
    while len(children) < n:
        a, b = tournament(rank, crowd, rng), tournament(rank, crowd, rng)
        children.extend(mutate(child, rng) for child in crossover(population[a], population[b], rng))
    return children[:n]


def survivors(F_parents, F_children, n):
    """Indices into parents + children of the next population of size n (elitist).

    Several objectives: NSGA-II's survival by (rank, crowding) over the union.
    One objective (paper): the 2 best of the union survive, the rest of the places go to the
    best remaining children (then parents), so that each generation renews the population.
    """
    F = np.concatenate([F_parents, F_children])
    n_parents = len(F_parents)
    if F.shape[1] == 1:
        order = [int(i) for i in np.argsort(F[:, 0], kind="stable")]
        elite = order[:SINGLE_OBJECTIVE_ELITES]
        rest = [i for i in order if i not in elite]
        rest = [i for i in rest if i >= n_parents] + [i for i in rest if i < n_parents]
        return (elite + rest)[:n]
    chosen = []
    for front in non_dominated_sort(F):
        if len(chosen) + len(front) <= n:
            chosen += front
        else:
            crowd = crowding_distance(F[front])
            order = np.argsort(-crowd, kind="stable")
            chosen += [front[i] for i in order[: n - len(chosen)]]
            break
    return chosen


# ---------------------------------------------------------------------------------------------
# The run: settings, checkpoint, evaluation


class Run:
    """State of one search, checkpointed atomically after every candidate."""

    def __init__(self, out, settings):
        self.out, self.settings = out, settings
        self.generation = 0
        self.population, self.batch = [], []  # compact genomes
        self.evaluations = []  # result dicts, in order of completion
        self.baselines = {}
        self.rng = np.random.default_rng(settings["seed"])
        self.started = time.time()
        self.elapsed_before = 0.0  # seconds spent before a resume

    @property
    def results(self):
        """Evaluations by model key: genomes that compile to the same model share one result."""
        return {e["key"]: e for e in self.evaluations}

    def objectives(self, compacts):
        keys, results = OBJECTIVES[self.settings["objective"]], self.results
        rows = []
        for c in compacts:
            r = results[model_key(c)]
            rows.append([r[k] if r["status"] == "ok" and r.get(k) is not None else FAILED for k in keys])
        return np.array(rows, dtype=float)

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    def save(self):
        state = {"version": VERSION, "settings": self.settings, "generation": self.generation,
                 "population": self.population, "batch": self.batch, "evaluations": self.evaluations,
                 "baselines": self.baselines, "rng": self.rng.bit_generator.state, "elapsed": self.elapsed()}
        atomic_write(os.path.join(self.out, "checkpoint.json"), json.dumps(state))

    @classmethod
    def load(cls, out):
        path = os.path.join(out, "checkpoint.json")
        if not os.path.exists(path):
            raise ValueError(f"no checkpoint to resume: {path} does not exist")
        state = gn.read_json(path, "checkpoint")
        try:
            check_state(state)
        except ValueError as e:
            raise ValueError(f"{path}: corrupt checkpoint: {e}") from None
        run = cls(out, state["settings"])
        run.generation, run.population, run.batch = state["generation"], state["population"], state["batch"]
        run.evaluations, run.baselines = state["evaluations"], state["baselines"]
        run.rng.bit_generator.state = state["rng"]
        run.elapsed_before = state["elapsed"]
        return run


# ---------------------------------------------------------------------------------------------
# Checks of a run's settings (new or resumed) and of a checkpoint's schema, at start


def check_settings(s):
    """A run's settings, from the command line or a checkpoint, checked in one place."""
    for key, kinds in (("objective", (str,)), ("preset_name", (str,)), ("preset", (dict,)), ("population", (int,)),
                       ("generations", (int,)), ("mutation", (int, float)), ("seed", (int,)),
                       ("data", (str, type(None))), ("vocab_size", (int, type(None)))):
        field(s, key, kinds, "settings")
    if s["objective"] not in OBJECTIVES:
        raise ValueError(f"unknown objective {s['objective']!r}; choose from {', '.join(OBJECTIVES)}")
    if s["preset_name"] not in star.PRESETS:
        raise ValueError(f"settings.preset_name: unknown preset {s['preset_name']!r}")
    try:
        star.check_preset(star.Preset(**s["preset"]))
    except TypeError as e:
        raise ValueError(f"settings.preset: {e}") from None
    for key in ("population", "generations", "mutation") + (("vocab_size",) if s["vocab_size"] is not None else ()):
        try:
            star.check_number(key, s[key])
        except ValueError as e:
            raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
    return s


def field(obj, key, kinds, where):
    """obj[key] if it is one of kinds (a bool is no int here); else a ValueError naming the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: no field '{key}'")
    value = obj[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ValueError(f"{where}.{key} is {str(value)[:40]!r}, not {' or '.join(k.__name__ for k in kinds)}")
    return value


def check_compact(compact, n_livs, where):
    try:
        g = gn.from_compact(field({"genome": compact}, "genome", (str,), where))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    problems = gn.validate(g)
    if problems or len(g) != n_livs:
        raise ValueError(f"{where}: {problems[0] if problems else f'{len(g)} LIVs, the run has {n_livs}'}")


def check_result(e, n_livs, where):
    """One trained model's entry: the fields the search and the report read."""
    check_compact(field(e, "compact", (str,), where), n_livs, where)
    if field(e, "status", (str,), where) not in ("ok", "failed"):
        raise ValueError(f"{where}.status is {e['status']!r}, not ok or failed")
    ppl = field(e, "ppl", (int, float, type(None)), where)
    if e["status"] == "ok" and not (ppl is not None and math.isfinite(ppl) and ppl >= 1):
        raise ValueError(f"{where}.ppl is {ppl!r} for a model that trained")
    for key in ("params", "cache_bytes"):
        field(e, key, (int, type(None)), where)
    for key in ("seconds", "train_seconds"):
        if not field(e, key, (int, float), where) >= 0:
            raise ValueError(f"{where}.{key} is negative")
    field(e, "summary", (str,), where)


def check_state(state):
    """The checkpoint's schema, so that a corrupt or hand-edited one is refused at start with the
    field that is wrong, not halfway through a generation."""
    if field(state, "version", (int,), "checkpoint") != VERSION:
        raise ValueError(f"version {state['version']}; this code reads version {VERSION}")
    s = check_settings(field(state, "settings", (dict,), "checkpoint"))
    n = s["preset"]["n_livs"]
    if not 0 <= field(state, "generation", (int,), "checkpoint") < max(s["generations"], state["generation"] + 1):
        raise ValueError(f"generation {state['generation']} is negative")
    for key in ("population", "batch"):
        for i, compact in enumerate(field(state, key, (list,), "checkpoint")):
            check_compact(compact, n, f"{key}[{i}]")
    for i, e in enumerate(field(state, "evaluations", (list,), "checkpoint")):
        check_result(e, n, f"evaluations[{i}]")
        if not 0 <= field(e, "generation", (int,), f"evaluations[{i}]") <= state["generation"]:
            raise ValueError(f"evaluations[{i}].generation is {e['generation']}, after the run's {state['generation']}")
    for name, e in field(state, "baselines", (dict,), "checkpoint").items():
        if name not in BASELINES:
            raise ValueError(f"baselines: unknown baseline {name!r}")
        check_result(e, max(2, n // 2 * 2), f"baselines.{name}")
    try:
        np.random.default_rng().bit_generator.state = field(state, "rng", (dict,), "checkpoint")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"rng: not a PCG64 state ({type(e).__name__}: {e})") from None
    if not field(state, "elapsed", (int, float), "checkpoint") >= 0:
        raise ValueError("elapsed is negative")


def model_key(compact):
    return gn.to_compact(gn.canonical(gn.from_compact(compact)))


def atomic_write(path, text):
    """Write then rename: a kill at any moment leaves either the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Evaluator:
    """Trains and scores genomes under the run's fixed budget (and measures latency if asked)."""

    def __init__(self, settings, device):
        self.preset = star.Preset(**settings["preset"])
        self.corpus = star.Corpus(settings["data"], settings["vocab_size"]).check(self.preset)  # read once, reused
        self.device = device
        self.latency = settings["objective"] == "quality-latency"

    def __call__(self, genome):
        result = star.train_candidate(genome, self.corpus, self.preset, self.device)
        if self.latency and result["status"] == "ok":
            import bench  # only the latency objective needs it
            try:
                result["latency_ms"] = bench.search_latency(genome, self.preset, self.corpus.vocab_size, self.device)
            except Exception as e:  # noqa: BLE001
                result.update(status="failed", error=f"latency: {type(e).__name__}: {e}"[:300])
        return result


def fmt_result(r):
    return f"ppl {r['ppl']:.3f}" if r["status"] == "ok" else f"FAILED ({r.get('error')})"


def fmt_count(n):
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def evaluate_batch(run, evaluate, log):
    """Evaluate the generation's genomes not yet evaluated; checkpoint after each one."""
    done = run.results
    for i, compact in enumerate(run.batch):
        tag = f"gen {run.generation:2d} cand {i + 1:2d}/{len(run.batch)}"
        key = model_key(compact)
        if key in done:
            same = "" if done[key]["compact"] == compact else f" (same model as {done[key]['compact']})"
            log(f"{tag}  {compact}  reused{same}: {fmt_result(done[key])}")
            continue
        t0 = time.time()
        result = evaluate(gn.from_compact(compact))
        seconds = time.time() - t0
        entry = {"generation": run.generation, "genome": gn.from_compact(compact).tolist(), "compact": compact,
                 "key": key, "summary": gn.summary(gn.from_compact(compact)), "seconds": round(seconds, 2), **result}
        run.evaluations.append(entry)
        done[key] = entry
        run.save()
        with open(os.path.join(run.out, "evaluations.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        latency = f"  latency {result['latency_ms']:.2f} ms" if "latency_ms" in result else ""
        log(f"{tag}  {compact}  {fmt_result(result)}  params {fmt_count(result['params'])}  "
            f"cache {fmt_count(result['cache_bytes'])}B{latency}  {seconds:.1f}s")


def run_baselines(run, evaluate, log):
    n = max(2, run.settings["preset"]["n_livs"] // 2 * 2)  # baselines need an even depth
    for name in BASELINES:
        if name in run.baselines:
            continue
        g = gn.baseline(name, n)
        t0 = time.time()
        result = evaluate(g)
        run.baselines[name] = {"genome": g.tolist(), "compact": gn.to_compact(g), "summary": gn.summary(g),
                               "seconds": round(time.time() - t0, 2), **result}
        run.save()
        log(f"baseline {name:14s} {fmt_result(result)}  params {fmt_count(result['params'])}  "
            f"cache {fmt_count(result['cache_bytes'])}B  {time.time() - t0:.1f}s")


class NothingTrained(RuntimeError):
    pass


def check_something_trained(run):
    """A search in which every model failed has nothing to report: stop with the first error."""
    trained = run.evaluations + list(run.baselines.values())
    if trained and not any(e["status"] == "ok" for e in trained):
        raise NothingTrained(f"every candidate and both baselines failed; the first error: {trained[0].get('error')}")


def search(run, evaluate, log=print):
    """The STAR loop: initial random population, then generations of children and survival."""
    s = run.settings
    P, G = s["population"], s["generations"]
    run_baselines(run, evaluate, log)
    if not run.population and not run.batch:
        run.batch = [gn.to_compact(gn.random_genome(s["preset"]["n_livs"], run.rng)) for _ in range(P)]
        run.save()
    while True:
        if run.batch:  # a generation to finish (on resume: part of it may be done)
            evaluate_batch(run, evaluate, log)
            check_something_trained(run)
            if run.generation == 0:
                run.population = list(run.batch)
            else:
                keep = survivors(run.objectives(run.population), run.objectives(run.batch), P)
                union = run.population + run.batch
                run.population = [union[i] for i in keep]
            run.batch = []
            run.save()
            report_generation(run, log)
        if run.generation + 1 >= G:
            return
        children = make_children([gn.from_compact(c) for c in run.population], run.objectives(run.population),
                                 P, run.rng, gn.crossover, lambda g, rng: gn.mutate(g, rng, s["mutation"]))
        run.generation, run.batch = run.generation + 1, [gn.to_compact(c) for c in children]
        run.save()


def report_generation(run, log):
    F = run.objectives(run.population)
    front = non_dominated_sort(F)[0]
    elapsed = run.elapsed()
    evals = max(1, len(run.evaluations) + len(run.baselines))
    remaining = (run.settings["generations"] - run.generation - 1) * run.settings["population"]
    eta = elapsed / evals * remaining
    log(f"generation {run.generation} done: best ppl {F[:, 0].min():.3f}, front {len(front)}, "
        f"{elapsed / 60:.1f} min so far, ~{eta / 60:.1f} min left{turnover_note(run)}")


def turnover(entry):
    """Seconds of a candidate outside steady-state training steps: building, compiling (the first
    step), evaluation, bookkeeping -- the time between one candidate's training and the next's."""
    return entry["seconds"] - (entry["train_seconds"] - entry.get("first_step_seconds", 0.0))


def turnover_note(run):
    ok = [e for e in run.evaluations if e["generation"] == run.generation and e["status"] == "ok"]
    if not ok:
        return ""
    mean_turnover = sum(map(turnover, ok)) / len(ok)
    mean_train = sum(e["train_seconds"] for e in ok) / len(ok)
    return (f"; {sum(e['seconds'] for e in ok) / len(ok):.1f} s per candidate, turnover {mean_turnover:.2f} s "
            f"({100 * mean_turnover / max(mean_train, 1e-9):.1f}% of training)")


# ---------------------------------------------------------------------------------------------
# Results: report.md, best_genome.json, pareto.png


def final_table(run):
    """The front of the final population (several objectives) or the top 10 (quality)."""
    ok = [e for e in run.evaluations if e["status"] == "ok"]
    if len(OBJECTIVES[run.settings["objective"]]) == 1:
        return sorted(ok, key=lambda e: e["ppl"])[:10]
    results = run.results
    F = run.objectives(run.population)
    front = [results[model_key(run.population[i])] for i in non_dominated_sort(F)[0]]
    return sorted({e["key"]: e for e in front if e["status"] == "ok"}.values(), key=lambda e: e["ppl"])


def motif_counts(compacts):
    """Class frequencies, sharing patterns and adjacent class pairs over a set of genomes."""
    classes, sharing, pairs, total = Counter(), Counter(), Counter(), 0
    for c in compacts:
        g = gn.from_compact(c)
        names = [gn.lookup(row).name for row in g]
        classes.update(names)
        total += len(names)
        for i, row in enumerate(g):
            if row[2] > 1 and row[1] != i + 1:
                sharing["featurizer weights"] += 1
            if row[4] > 1 and row[3] != i + 1:
                sharing[f"features {gn.FEATURE_SHARING[row[4]]}"] += 1
        pairs.update(zip(names, names[1:]))
    return classes, sharing, pairs, max(total, 1)


def write_report(run):
    s, keys = run.settings, OBJECTIVES[run.settings["objective"]]
    table = final_table(run)
    lines = [f"# STAR search: objective `{s['objective']}`", "",
             f"Preset `{s['preset_name']}` ({', '.join(f'{k}={v}' for k, v in s['preset'].items())}); "
             f"population {s['population']}, {s['generations']} generations, mutation {s['mutation']}, "
             f"seed {s['seed']}, data {s['data'] or 'embedded Shakespeare (bytes)'}, device {s['device']}. "
             f"{len(run.evaluations)} candidates trained in {run.elapsed() / 60:.1f} min.", ""]
    if "latency_ms" in keys:
        lines += [f"Latency: {s.get('latency_note', '')}", ""]
    title = "Top 10 by perplexity" if len(keys) == 1 else "Pareto front of the final population"
    cols = ["", "architecture", "ppl", "params", "cache bytes"] + (["latency ms"] if "latency_ms" in keys else [])
    lines += [f"## {title}, with the baselines (same budget, seed and data)", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = [(f"#{i + 1} (gen {e['generation']})", e) for i, e in enumerate(table)]
    rows += [(f"baseline {name}", e) for name, e in run.baselines.items()]
    for label, e in rows:
        cells = [label, f"`{e['summary']}`", f"{e['ppl']:.3f}" if e["status"] == "ok" else "failed",
                 f"{e['params']:,}" if e["params"] else "-", f"{e['cache_bytes']:,}" if e["cache_bytes"] else "0"]
        if "latency_ms" in keys:
            cells.append(f"{e['latency_ms']:.2f}" if "latency_ms" in e else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if table:
        best = table[0]
        lines += ["", "## Best evolved genome against the baselines", "",
                  f"Best: `{best['summary']}` (`{best['compact']}`), perplexity {best['ppl']:.3f}.", ""]
        for name, b in run.baselines.items():
            if b["status"] != "ok":
                lines.append(f"- {name}: failed ({b.get('error')})")
                continue
            parts = [f"perplexity {100 * (b['ppl'] - best['ppl']) / b['ppl']:.1f}% better" if best["ppl"] <= b["ppl"]
                     else f"perplexity {100 * (best['ppl'] - b['ppl']) / b['ppl']:.1f}% worse"]
            for k in ("params", "cache_bytes", "latency_ms"):
                if b.get(k) and best.get(k) is not None:
                    parts.append(f"{k} {100 * (best[k] - b[k]) / b[k]:+.1f}%")
            lines.append(f"- vs {name} (ppl {b['ppl']:.3f}): " + ", ".join(parts))
    lines += motif_section(run, table)
    failed = [e for e in run.evaluations if e["status"] != "ok"]
    if failed:
        lines += ["", f"## Failed candidates ({len(failed)})", ""]
        lines += [f"- gen {e['generation']} `{e['compact']}`: {e.get('error')}" for e in failed]
    atomic_write(os.path.join(run.out, "report.md"), "\n".join(lines) + "\n")


def motif_section(run, table):
    initial = [e["compact"] for e in run.evaluations if e["generation"] == 0]
    final = [e["compact"] for e in table]
    c0, s0, _, n0 = motif_counts(initial)
    c1, s1, pairs, n1 = motif_counts(final)
    lines = ["", "## Motifs: final front/top against the initial population", "",
             "| LIV class | share of LIVs, final | share of LIVs, initial |", "|---|---|---|"]
    for name, _ in (c1 + c0).most_common():
        lines.append(f"| {name} | {100 * c1[name] / n1:.0f}% | {100 * c0[name] / n0:.0f}% |")
    lines += ["", "| sharing | LIVs that share, final | initial |", "|---|---|---|"]
    for name, _ in (s1 + s0).most_common():
        lines.append(f"| {name} | {100 * s1[name] / n1:.0f}% | {100 * s0[name] / n0:.0f}% |")
    lines += ["", "Most frequent adjacent class pairs in the final front/top: " +
              (", ".join(f"{a} -> {b} ({n})" for (a, b), n in pairs.most_common(5)) or "none")]
    return lines


def write_outputs(run, log):
    write_report(run)
    ok = [e for e in run.evaluations if e["status"] == "ok"]
    if ok:
        best = min(ok, key=lambda e: e["ppl"])
        atomic_write(os.path.join(run.out, "best_genome.json"), gn.to_json(best["genome"]))
    plot_front(run)
    log(f"results in {run.out}: report.md, best_genome.json, evaluations.jsonl")


def plot_front(run):
    """pareto.png when matplotlib happens to be installed (it is not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = OBJECTIVES[run.settings["objective"]]
    ok = [e for e in run.evaluations if e["status"] == "ok"]
    x_key = keys[1] if len(keys) > 1 else "params"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([e[x_key] for e in ok], [e["ppl"] for e in ok], c=[e["generation"] for e in ok], cmap="viridis", s=18)
    for name, b in run.baselines.items():
        if b["status"] == "ok":
            ax.scatter([b[x_key]], [b["ppl"]], marker="*", s=120, label=name)
    ax.set_xlabel(x_key), ax.set_ylabel("validation perplexity"), ax.legend()
    ax.set_title(f"{run.settings['objective']}: candidates coloured by generation", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(run.out, "pareto.png"), dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = star.Parser(description="STAR evolutionary architecture search (NSGA-II over LIV genomes)")
    p.add_argument("--objective", default=None, help=f"one of {', '.join(OBJECTIVES)} (default quality)")
    p.add_argument("--population", type=star.number("population"), default=None, metavar="N",
                   help="genomes per generation (" + ", ".join(f"{k} {v['population']}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--generations", type=star.number("generations"), default=None, metavar="N",
                   help="generations, the initial one included (" +
                        ", ".join(f"{k} {v['generations']}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--mutation", type=star.number("mutation"), default=None, metavar="P",
                   help="per-gene mutation probability (default 0.1)")
    p.add_argument("--data", default=None, help="a .txt (bytes) or .bin (uint16 tokens) file; default: embedded Shakespeare")
    p.add_argument("--vocab-size", type=star.number("vocab_size"), default=None, help="vocabulary of a .bin token file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="output directory (default runs/<date>-<time>)")
    p.add_argument("--resume", default=None, help="continue the run in this directory")
    star.add_preset_args(p)
    p.set_defaults(preset=None)  # None: not given (on --resume, the run's own preset)
    return p.parse_args(argv)


def settings_from_args(args, log):
    name = star.preset_name(args.preset or "auto")
    if (args.preset or "auto") == "auto":
        log(f"preset auto: {name} ({'CUDA found' if name == 'gpu' else 'no CUDA'})")
    preset = star.preset_from_args(args, name)
    defaults = DEFAULTS[name]
    settings = {"objective": args.objective or "quality", "preset_name": name, "preset": dataclasses.asdict(preset),
                "population": defaults["population"] if args.population is None else args.population,
                "generations": defaults["generations"] if args.generations is None else args.generations,
                "mutation": 0.1 if args.mutation is None else args.mutation,
                "seed": preset.seed, "data": args.data, "vocab_size": args.vocab_size}
    return check_settings(settings)


def check_resume_conflicts(args, saved):
    """Flags given with --resume must agree with the run's settings (--generations may grow)."""
    given = {"objective": args.objective, "population": args.population, "mutation": args.mutation,
             "data": args.data, "vocab_size": args.vocab_size, "preset_name": args.preset}
    given.update({f.name: getattr(args, f.name) for f in dataclasses.fields(star.Preset)})
    for key, value in given.items():
        if value is None:
            continue
        have = saved["preset"][key] if key in saved["preset"] else saved[key]
        if value != have:
            flag = "--" + ("preset" if key == "preset_name" else key.replace("_", "-"))
            raise ValueError(f"--resume: {flag} {value} conflicts with the run's {have}")


def main(argv=None):
    args = parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        if args.resume:
            run = Run.load(args.resume)
            check_resume_conflicts(args, run.settings)
            if args.generations:
                run.settings["generations"] = args.generations
            log(f"resuming {args.resume} at generation {run.generation} "
                f"({len(run.evaluations)} candidates already evaluated)")
        else:
            settings = settings_from_args(args, log)
            out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
            if os.path.exists(os.path.join(out, "checkpoint.json")):
                raise ValueError(f"{out} already holds a run: use --resume {out} or another --out")
            run = Run(out, settings)
        device = star.resolve_device(args.device)
        run.settings["device"] = device
        if run.settings["objective"] == "quality-latency":
            import bench
            run.settings["latency_note"] = bench.search_latency_note(device)
        evaluate = Evaluator(run.settings, device)
        star.output_dir(run.out)  # created only once everything else has been checked
    except ValueError as e:
        star.fail(e)
    if args.resume:  # the checkpoint is the truth: rewrite the log from it
        atomic_write(os.path.join(run.out, "evaluations.jsonl"), "".join(json.dumps(e) + "\n" for e in run.evaluations))
    s = run.settings
    log(f"STAR search: objective {s['objective']}, preset {s['preset_name']}, population {s['population']}, "
        f"{s['generations']} generations, {s['preset']['n_livs']} LIVs, on {device}; writing to {run.out}\n"
        f"{star.budget_note(evaluate.corpus, evaluate.preset)}")
    run.save()
    try:
        search(run, evaluate, log)
    except KeyboardInterrupt:  # everything finished is in the checkpoint already
        star.fail(f"interrupted: continue with python evolve.py --resume {run.out}")
    except NothingTrained as e:
        write_outputs(run, log)
        star.fail(e)
    write_outputs(run, log)


if __name__ == "__main__":
    main()
