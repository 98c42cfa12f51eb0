"""STAR's evolutionary search (paper section 4.2; README: "Where we depart from the paper"): NSGA-II over genomes.

    python evolve.py --objective quality            # lowest validation perplexity
    python evolve.py --objective quality-cache      # Pareto front of perplexity and cache bytes
    python evolve.py --resume runs/20261126-120000  # continue a killed run
    python evolve.py --rungs 60,240                 # select at 240 steps by successive halving

Read top-down: NSGA-II (non-dominated sorting, crowding distance, binary tournament, survival);
then the search loop (`search`): baselines, a random population, generations of children by
tournament, 2-point crossover and per-gene mutation (genome.py) each trained by star.train_candidate
under the same budget, data order and seed (the best continued to longer budgets, if --rungs),
survival among distinct models, and the confirmation
of the best at a longer budget; then the run's state (checkpointed after every trained model) and
the command line. Who trains (one process or a torchrun group) is workers.py; what is written for
people (report.md, figures) is report.py.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
import uuid

import numpy as np
import torch

import genome as gn
import probes
import report
import star
import workers

OBJECTIVES = {  # all minimised
    "quality": ("ppl",),
    "quality-size": ("ppl", "params"),
    "quality-cache": ("ppl", "cache_bytes"),
    "quality-latency": ("ppl", "latency_ms"),
    "quality-recall": ("ppl", "recall_error"),  # recall_error = 1 - mean accuracy of the capability probes
    "recall": ("recall_error",),
}
DEFAULTS = {  # per preset; the tiny confirmation (2 seeds of 6 models at 2x) keeps the bare run near 11 min on 2 cores
    "tiny": {"population": 8, "generations": 4, "confirm_factor": 2, "confirm_top": 2, "confirm_seeds": 2, "rank_check": 2},
    "gpu": {"population": 16, "generations": 18, "confirm_factor": 4, "confirm_top": 3, "confirm_seeds": 3, "rank_check": 3},
}
SEARCH_BASELINES = ("transformer++", "striped-mamba")  # of genome.BASELINES: trained and compared by every run
SINGLE_OBJECTIVE_ELITES = 2  # paper: 2 survivors carried over in single-objective runs
FAILED = 1e30  # the objective value of a failed candidate: worse than anything real
VERSION = 5  # of checkpoint.json (versions 2 to 4 are read too: Run.load)

# ---------------------------------------------------------------------------------------------
# NSGA-II (Deb et al. 2002)


def dominates(a, b):
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(F, level=None):
    """Fronts of the objective matrix F (n, m), best first, as lists of row indices. With `level`
    (n,), the rung each row's values come from (ours: successive halving), every row of a higher
    rung ranks ahead of every row of a lower one: the fronts of the highest rung, then the next."""
    if level is not None:
        return [[int(rows[i]) for i in front] for r in sorted(set(level.tolist()), reverse=True)
                for rows in [np.flatnonzero(level == r)] for front in non_dominated_sort(F[rows])]
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


def rank_and_crowding(F, level=None):
    rank, crowd = np.zeros(len(F), dtype=int), np.zeros(len(F))
    for r, front in enumerate(non_dominated_sort(F, level)):
        rank[front] = r
        crowd[front] = crowding_distance(F[front])
    return rank, crowd


def tournament(rank, crowd, rng):
    """Binary tournament: lower rank wins, then larger crowding distance."""
    a, b = rng.choice(len(rank), size=2, replace=False)
    if rank[a] != rank[b]:
        return a if rank[a] < rank[b] else b
    return a if crowd[a] >= crowd[b] else b


def best_first(F, level=None):
    """Row indices by (rank, larger crowding distance): the order tournaments and survival prefer."""
    rank, crowd = rank_and_crowding(F, level)
    return sorted(range(len(F)), key=lambda i: (rank[i], -crowd[i]))


def make_children(population, F, n, rng, crossover, mutate, level=None):
    """n children by tournament selection, 2-point crossover and per-gene mutation."""
    rank, crowd = rank_and_crowding(F, level)
    children = []
    while len(children) < n:
        a, b = tournament(rank, crowd, rng), tournament(rank, crowd, rng)
        children.extend(mutate(child, rng) for child in crossover(population[a], population[b], rng))
    return children[:n]


def survivors(F_parents, F_children, n, level=None):
    """Indices into parents + children of the next population of size n (elitist); `level`, of
    the union, as in non_dominated_sort.

    Several objectives: NSGA-II's survival by (rank, crowding) over the union.
    One objective (paper): the 2 best of the union survive, the rest of the places go to the
    best remaining children (then parents), so that each generation renews the population.
    """
    F = np.concatenate([F_parents, F_children])
    n_parents = len(F_parents)
    if F.shape[1] == 1:
        order = [int(i) for i in np.lexsort((F[:, 0], -(np.zeros(len(F)) if level is None else level)))]
        elite = order[:SINGLE_OBJECTIVE_ELITES]
        rest = [i for i in order if i not in elite]
        rest = [i for i in rest if i >= n_parents] + [i for i in rest if i < n_parents]
        return (elite + rest)[:n]
    chosen = []
    for front in non_dominated_sort(F, level):
        if len(chosen) + len(front) <= n:
            chosen += front
        else:
            crowd = crowding_distance(F[front])
            order = np.argsort(-crowd, kind="stable")
            chosen += [front[i] for i in order[: n - len(chosen)]]
            break
    return chosen


# ---------------------------------------------------------------------------------------------
# The search loop


def search(run, pool, log=print):
    """The STAR loop: baselines, a random population, then generations of children and survival
    (with --rungs, each generation's best retrained at the longer budgets first: successive
    halving); then the confirmation of the best at a longer budget. Resumes wherever it stopped.
    With --random-search (ours: the control of Li and Talwalkar 2019) every generation is drawn at
    random instead, through the same training, survival and confirmation."""
    s = run.settings
    run_baselines(run, pool, log)
    if not run.population and not run.pending:
        run.pending = [gn.to_compact(gn.random_genome(s["preset"]["n_livs"], run.rng)) for _ in range(s["population"])]
        run.save()
    while True:
        if run.pending:  # a generation to finish (on resume: part of it may be done, at any rung)
            evaluate_pending(run, pool, log)
            for rung in range(1, len(s["rungs"])):
                train_at_rung(run, pool, log, rung, promoted(run, rung))
            check_something_trained(run)
            run.population, run.pending = next_population(run), []
            run.save()
            report_generation(run, log)
        if run.generation + 1 >= s["generations"]:
            break
        if s["random_search"]:  # the equal-budget control: no selection, crossover or mutation
            children = [gn.random_genome(s["preset"]["n_livs"], run.rng) for _ in range(s["population"])]
        else:
            children = make_children([gn.from_compact(c) for c in run.population], run.objectives(run.population),
                                     s["population"], run.rng, gn.crossover,
                                     lambda g, rng: gn.mutate(g, rng, s["mutation"]), run.levels(run.population))
        run.generation, run.pending = run.generation + 1, [gn.to_compact(c) for c in children]
        run.save()
    confirm(run, pool, log)


def evaluate_pending(run, pool, log):
    """Train the generation's genomes not trained yet, each distinct model once; checkpoint after each."""
    done, tasks, index = run.at_rung(0), [], {}
    for i, compact in enumerate(run.pending):
        key, tag = model_key(compact), f"gen {run.generation:2d} cand {i + 1:2d}/{len(run.pending)}"
        if (key in done and not done[key].get("transient")) or key in index:
            same = run.pending[index[key]] if key in index else done[key]["compact"]
            log(f"{tag}  {compact}  reused" + ("" if same == compact else f" (same model as {same})") +
                (f": {report.fmt_result(done[key])}" if key not in index else ""))
        else:
            index[key] = i
            tasks.append((compact, stage(0)))
    for entry in train(run, pool, tasks, 0):
        log(f"gen {run.generation:2d} cand {index[entry['key']] + 1:2d}/{len(run.pending)}  {entry['compact']}  "
            f"{report.describe(entry, pool.world)}  ~{star.duration(time_left(run, pool.world))} left in the search")


def train(run, pool, tasks, rung):
    """Train tasks at a rung of this generation, recording and checkpointing each as it finishes."""
    for t, result, rank in pool.map(tasks):
        entry = record(tasks[t][0], result, rank, generation=run.generation, rung=rung)
        run.evaluations.append(entry)
        run.save()
        path = os.path.join(run.out, "evaluations.jsonl")
        with star.writing(path), open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        yield entry


def stage(rung):
    """The Evaluator's stage (workers.py) of a training at this rung."""
    return f"rung {rung}" if rung else "search"


def rung_sizes(s, n):
    """How many of a generation's n models train at each rung (ours: successive halving, Jamieson
    and Talwalkar 2016): n, then at each rung ceil(n_below * steps_below / steps), so that every rung
    costs about the same compute (60, 240: the best quarter continue)."""
    sizes = [n]
    for below, steps in zip(s["rungs"], s["rungs"][1:]):
        sizes.append(math.ceil(sizes[-1] * below / steps))
    return sizes


def promoted(run, rung):
    """The generation's models that continue to this rung: the best rung_sizes of those that
    trained at the rung below, by NSGA-II's order of their results there (reused models included)."""
    keys = list(dict.fromkeys(model_key(c) for c in run.pending))
    below = run.at_rung(rung - 1)
    ok = [below[k]["compact"] for k in keys if k in below and below[k]["status"] == "ok"]
    order = best_first(run.objectives(ok, rung - 1)) if ok else []
    return [ok[i] for i in order[: rung_sizes(run.settings, len(keys))[rung]]]


def train_at_rung(run, pool, log, rung, compacts):
    """Retrain the promoted models from scratch at the rung's budget (ours: each result is that of
    one training under the rung's own cosine schedule; README: "Successive halving")."""
    done = run.at_rung(rung)
    tasks = [(c, stage(rung)) for c in compacts if model_key(c) not in done or done[model_key(c)].get("transient")]
    if tasks:
        log(f"gen {run.generation:2d} rung {rung}: {len(compacts)} of the generation's best continue to "
            f"{run.settings['rungs'][rung]} steps ({len(tasks)} to train)")
    for entry in train(run, pool, tasks, rung):
        log(f"gen {run.generation:2d} rung {rung}  {entry['compact']}  {report.describe(entry, pool.world)}  "
            f"~{star.duration(time_left(run, pool.world))} left in the search")


def next_population(run):
    """NSGA-II survival over parents + children among distinct models: a model found twice takes
    one place; duplicates fill places only when there are not enough distinct models."""
    union, first = run.population + run.pending, {}
    for i, compact in enumerate(union):
        first.setdefault(model_key(compact), i)
    F, level = run.objectives(union), run.levels(union)
    parents = [i for i in first.values() if i < len(run.population)]
    children = [i for i in first.values() if i >= len(run.population)]
    chosen = [(parents + children)[i] for i in survivors(F[parents], F[children], run.settings["population"],
                                                         level[parents + children])]
    spare = sorted(set(range(len(union))) - set(chosen), key=lambda i: (-level[i], *F[i]))
    return [union[i] for i in chosen + spare[: run.settings["population"] - len(chosen)]]


def run_baselines(run, pool, log):
    """Both baselines at the search's budget, and at each later rung ('name@steps'): every margin
    of the report is to them, at the budget of the result it is a margin of."""
    rungs = run.settings["rungs"]
    todo = [(name + (f"@{rungs[r]}" if r else ""), c, r) for name, c in baseline_compacts(run).items()
            for r in range(len(rungs))]
    todo = [t for t in todo if t[0] not in run.baselines]
    for t, result, rank in pool.map([(c, stage(r)) for _, c, r in todo]):
        name, compact, rung = todo[t]
        run.baselines[name] = entry = record(compact, result, rank, rung=rung)
        run.save()
        log(f"baseline {name:16s} {report.describe(entry, pool.world)}")


def baseline_compacts(run, n_livs=None):
    n = max(2, (n_livs or run.settings["preset"]["n_livs"]) // 2 * 2)  # baselines need an even depth
    return {name: gn.to_compact(gn.baseline(name, n)) for name in SEARCH_BASELINES}


def confirm(run, pool, log):
    """Retrain the confirm_set at the confirmation's longer budget under --confirm-seeds seeds (the
    search's seed + 1, + 2, ..., common to all models), and once at the larger size if asked: how
    far the search's verdicts hold, with the seed-to-seed spread they have to clear."""
    s = run.settings
    if not s["confirm_steps"]:
        return
    tasks = [(e["compact"], "confirm", seed) for _, e in confirm_set(run) for seed in confirm_seeds(s)]
    if large_size(s):
        tasks += [(scaled(run, e["compact"]), "large", s["seed"] + 1) for _, e in confirm_set(run)]
    tasks = [t for t in tasks if not confirmation(run, *t)]
    if not tasks:
        return
    log(f"confirmation: {len(tasks)} trainings of {s['confirm_steps']} steps "
        f"(seeds {', '.join(map(str, confirm_seeds(s)))}{'; larger size' if large_size(s) else ''})")
    for t, result, rank in pool.map(tasks):
        compact, stage, seed = tasks[t]
        entry = record(compact, result, rank, stage=stage, steps=s["confirm_steps"], seed=seed,
                       **({"width": large_size(s)[1]} if stage == "large" else {}))
        run.confirmed[confirmation_id(compact, stage, seed)] = entry
        run.save()
        log(f"{stage} {entry['summary'][:40]:40s} seed {seed}  {report.describe(entry, pool.world)}")


def confirm_seeds(s):
    return [s["seed"] + 1 + i for i in range(s["confirm_seeds"])]


def large_size(s):
    """(n_livs, width) of the larger-model confirmation, or None when not asked for."""
    if not (s["confirm_n_livs"] or s["confirm_width"]):
        return None
    return s["confirm_n_livs"] or s["preset"]["n_livs"], s["confirm_width"] or s["preset"]["width"]


def scaled(run, compact):
    """A confirmed model at the larger depth: a candidate stacked (Composer), a baseline rebuilt."""
    n_livs = large_size(run.settings)[0]
    names = {c: name for name, c in baseline_compacts(run).items()}
    if compact in names:
        return baseline_compacts(run, n_livs)[names[compact]]
    return gn.to_compact(gn.scale(gn.from_compact(compact), n_livs, "stack"))


def confirmation_id(compact, stage, seed):
    return f"{stage}/{seed}/{model_key(compact)}"


def confirmation(run, compact, stage, seed):
    """The model's result at today's confirmation budget (and size), under this seed, if trained
    (a resume may change them: an older budget's result is retrained, never reported as the new)."""
    c = run.confirmed.get(confirmation_id(compact, stage, seed))
    size = large_size(run.settings)
    fits = c and c.get("steps") == run.settings["confirm_steps"] and (stage == "confirm" or c.get("width") == size[1])
    return c if fits else None


def confirm_set(run):
    """The search entries to confirm: the top K distinct candidates (one objective) or K spread
    along the front from its lowest perplexity (several); then the rank check, R candidates from
    the middle to the bottom of the search's ranking; then the baselines."""
    table, k = final_table(run), run.settings["confirm_top"]
    if len(OBJECTIVES[run.settings["objective"]]) > 1 and len(table) > k:
        table = [table[i] for i in sorted(set(np.linspace(0, len(table) - 1, k).round().astype(int)))]
    rest, r = [e for e in ranking(run) if e["key"] not in {t["key"] for t in table[:k]}], run.settings["rank_check"]
    checks = [rest[i] for i in sorted(set(np.linspace(len(rest) // 2, len(rest) - 1, r).round().astype(int)))] \
        if rest and r else []
    chosen = [("top", e) for e in table[:k]] + [("rank check", e) for e in checks] + \
        [("baseline", top_rung_baseline(run, n)) for n in SEARCH_BASELINES if run.baselines[n]["status"] == "ok"]
    first = {}
    for kind, e in chosen:  # a model chosen twice (a candidate that is a baseline) is confirmed once
        first.setdefault(e["key"], (kind, e))
    return list(first.values())


def top_rung_baseline(run, name):
    """A baseline's result at the highest rung (where the search's best were compared), else its first."""
    later = run.baselines.get(f"{name}@{run.settings['rungs'][-1]}")
    return later if later and later["status"] == "ok" else run.baselines[name]


def ranking(run):
    """The distinct trained candidates, best first: by the highest rung reached, then by the first
    objective there (one rung: by the first objective)."""
    key = OBJECTIVES[run.settings["objective"]][0]
    ok = [e for e in run.candidates() if e["status"] == "ok" and e.get(key) is not None]
    return sorted(ok, key=lambda e: (-e["rung"], e[key]))


def final_table(run):
    """The front of the final population (several objectives; by perplexity) or the top 10 (one)."""
    keys = OBJECTIVES[run.settings["objective"]]
    if len(keys) == 1:
        return ranking(run)[:10]
    results = run.results
    F, level = run.objectives(run.population), run.levels(run.population)
    front = [results[model_key(run.population[i])] for i in non_dominated_sort(F, level)[0]]
    return sorted({e["key"]: e for e in front if e["status"] == "ok"}.values(), key=lambda e: e["ppl"])


def confirmed_rows(run):
    """report.Confirmed rows for every model of the confirm_set confirmed so far under some seed."""
    s, rank = run.settings, {e["key"]: i + 1 for i, e in enumerate(ranking(run))}
    names = {run.baselines[name]["key"]: name for name in SEARCH_BASELINES}
    rows = []
    for kind, e in confirm_set(run):
        runs = [c for c in (confirmation(run, e["compact"], "confirm", seed) for seed in confirm_seeds(s)) if c]
        runs = [c for c in runs if c["status"] == "ok"]
        large = large_size(s) and confirmation(run, scaled(run, e["compact"]), "large", s["seed"] + 1)
        label = names.get(e["key"]) or f"#{rank[e['key']]}"
        if runs:
            rows.append(report.Confirmed(label, kind, e, runs, large if large and large["status"] == "ok" else None))
    return rows


class NothingTrained(RuntimeError):
    pass


def check_something_trained(run):
    """A search in which every model failed has nothing to report: stop with the first error."""
    trained = run.evaluations + list(run.baselines.values())
    if trained and not any(e["status"] == "ok" for e in trained):
        raise NothingTrained(f"every candidate and both baselines failed; the first error: {trained[0].get('error')}")


def results(run):
    """The run as report.py reads it."""
    return report.Results(out=run.out, settings=run.settings, objectives=OBJECTIVES[run.settings["objective"]],
                          evaluations=run.candidates(), baselines={n: run.baselines[n] for n in SEARCH_BASELINES
                                                                   if n in run.baselines},
                          rung_baselines={n: {r: run.baselines.get(f"{n}@{b}") for r, b in enumerate(
                              run.settings["rungs"][1:], 1)} for n in SEARCH_BASELINES}, trainings=run.evaluations,
                          top=final_table(run), confirmed=confirmed_rows(run),
                          elapsed=run.elapsed())


# ---------------------------------------------------------------------------------------------
# The run's state, checkpointed atomically after every trained model


class Run:
    """State of one search: everything a resume needs, and nothing derivable."""
    STATE = ("settings", "generation", "population", "pending", "evaluations", "baselines", "confirmed")

    def __init__(self, out, settings):
        self.out, self.settings = out, settings
        self.generation = 0
        self.population = []  # compact genomes: the survivors of the last finished generation
        self.pending = []  # compact genomes of the generation in progress (some may be trained already)
        self.evaluations = []  # candidates at each rung's budget ('rung' 0: the search's), in order of completion
        self.baselines = {}  # name -> result at the search's budget
        self.confirmed = {}  # 'stage/seed/model key' -> result at the confirmation's budget (confirmation_id)
        self.rng = np.random.default_rng(settings["seed"])
        self.started = time.time()
        self.elapsed_before = 0.0  # seconds spent before a resume

    def at_rung(self, rung=None):
        """Results by model key (genomes that compile to the same model share one) at this rung, or
        at the highest each reached (None); what is measured at the first rung only (latency, probes)
        carried up."""
        merged = {}
        for e in sorted(self.evaluations, key=lambda e: e["rung"]):  # stable: a retrain replaces
            if rung is None or e["rung"] <= rung:
                first = merged.get(e["key"], e)
                merged[e["key"]] = {**first, **e, "generation": first["generation"]}
        return {k: e for k, e in merged.items() if rung is None or e["rung"] == rung}

    @property
    def results(self):
        return self.at_rung()

    def candidates(self):
        """One entry per distinct trained model, in order of first training, at its highest rung."""
        results = self.results
        return list({e["key"]: results[e["key"]] for e in self.evaluations}.values())

    def objectives(self, compacts, rung=None):
        keys, results = OBJECTIVES[self.settings["objective"]], self.at_rung(rung)
        rows = [[r[k] if r["status"] == "ok" and r.get(k) is not None else FAILED for k in keys]
                for r in (results[model_key(c)] for c in compacts)]
        return np.array(rows, dtype=float).reshape(len(rows), len(keys))

    def levels(self, compacts):
        """The highest rung each model reached: selection compares results there, higher first."""
        results = self.results
        return np.array([results[model_key(c)]["rung"] for c in compacts], dtype=int)

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    def save(self):
        state = {"version": VERSION, **{k: getattr(self, k) for k in self.STATE},
                 "rng": self.rng.bit_generator.state, "elapsed": self.elapsed()}
        star.atomic_write(os.path.join(self.out, "checkpoint.json"), json.dumps(state))

    @classmethod
    def load(cls, out):
        path = os.path.join(out, "checkpoint.json")
        if not os.path.exists(path):
            raise ValueError(f"no checkpoint to resume: {path} does not exist")
        state = gn.read_json(path, "checkpoint")
        try:
            state = upgrade(state)
            check_state(state)
        except ValueError as e:
            raise ValueError(f"{path}: corrupt checkpoint: {e}") from None
        run = cls(out, state["settings"])
        for key in cls.STATE[1:]:
            setattr(run, key, state[key])
        run.rng.bit_generator.state = state["rng"]
        run.elapsed_before = state["elapsed"]
        return run


def upgrade(state):
    """An older checkpoint in version 5's names; else as read. Version 2 -> 3: 'batch' became
    'pending'; 'extra', results under 'seed:<key>' and 'confirm:<key>', became 'noise' and
    'confirmed' keyed by model. 3 -> 4: the noise run is gone (the spread is measured over the
    confirmation's seeds); confirmed results are keyed 'confirm/<seed>/<key>', the seed the search's
    + 1; the settings gain the confirmation's new flags, off. 4 -> 5: one rung, the search's budget."""
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        return state
    if state.get("version") == 2 and isinstance(state.get("extra"), dict):
        state = {**state, "version": 3, "noise": {}, "confirmed": {}}
        if "batch" in state:
            state["pending"] = state.pop("batch")
        for key, entry in state.pop("extra").items():
            stage, _, model = key.partition(":")
            if stage not in ("seed", "confirm"):
                raise ValueError(f"extra: unknown entry {key[:40]!r}")
            state["noise" if stage == "seed" else "confirmed"][model] = entry
        for entry in state["confirmed"].values():  # trained at the budget the settings then held
            if isinstance(entry, dict):
                entry.setdefault("steps", state["settings"].get("confirm_steps"))
    if state.get("version") == 3 and isinstance(state.get("confirmed"), dict):
        seed = state["settings"].get("seed", 0) + 1 if isinstance(state["settings"].get("seed"), int) else None
        state = {**state, "version": 4, "confirmed": {f"confirm/{seed}/{key}": {"stage": "confirm", **e, "seed": seed} if isinstance(
            e, dict) else e for key, e in state["confirmed"].items()}, "settings": {
            "confirm_seeds": 1, "rank_check": 0, "random_search": False, "confirm_n_livs": None, "confirm_width": None,
            "run_id": uuid.uuid4().hex, **state["settings"]}}
        state.pop("noise", None)
    if state.get("version") == 4 and isinstance(state["settings"].get("preset"), dict):
        state = {**state, "version": 5, "settings": {"rungs": [state["settings"]["preset"].get("steps")],
                                                     **state["settings"]}}
        for e in state.get("evaluations") or []:
            if isinstance(e, dict):
                e.setdefault("rung", 0)
    return state


def model_key(compact):
    return gn.to_compact(gn.canonical(gn.from_compact(compact)))


# ---------------------------------------------------------------------------------------------
# Checks of a run's settings (new or resumed) and of a checkpoint's schema, at start


def check_settings(s):
    """A run's settings, from the command line or a checkpoint, checked in one place."""
    for key, kinds in (("objective", (str,)), ("preset_name", (str,)), ("preset", (dict,)), ("population", (int,)),
                       ("generations", (int,)), ("mutation", (int, float)), ("seed", (int,)),
                       ("data", (str, type(None))), ("vocab_size", (int, type(None))), ("threads", (int,)),
                       ("confirm_steps", (int,)), ("confirm_top", (int,)), ("probes", (bool,)),
                       ("confirm_seeds", (int,)), ("rank_check", (int,)), ("random_search", (bool,)),
                       ("confirm_n_livs", (int, type(None))), ("confirm_width", (int, type(None))),
                       ("run_id", (str,)), ("rungs", (list,))):
        star.field(s, key, kinds, "settings")
    if s["objective"] not in OBJECTIVES:
        raise ValueError(f"unknown objective {s['objective']!r}; choose from {', '.join(OBJECTIVES)}")
    if s["preset_name"] not in star.PRESETS:
        raise ValueError(f"settings.preset_name: unknown preset {s['preset_name']!r}")
    try:
        star.check_preset(star.Preset(**s["preset"]))
    except TypeError as e:
        raise ValueError(f"settings.preset: {e}") from None
    numbers = ("population", "generations", "mutation", "threads", "confirm_steps", "confirm_top", "confirm_seeds",
               "rank_check")
    for key in numbers + tuple(k for k in ("vocab_size", "confirm_n_livs", "confirm_width") if s[k] is not None):
        try:
            star.check_number(key, s[key])
        except ValueError as e:
            raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
    check_rungs(s["rungs"], s["preset"]["steps"])
    if large_size(s):
        n, n_livs = s["preset"]["n_livs"], large_size(s)[0]
        if n_livs % n:
            raise ValueError(f"--confirm-n-livs {n_livs} is not a multiple of the search's {n} LIVs (a stacked copy)")
        try:
            star.check_preset(star.Preset(**{**s["preset"], "n_livs": n_livs, "width": large_size(s)[1]}))
        except ValueError as e:
            raise ValueError(f"--confirm-width/--confirm-n-livs: {e}") from None
    return s


def check_rungs(rungs, steps):
    if not rungs or not all(isinstance(b, int) and not isinstance(b, bool) for b in rungs):
        raise ValueError(f"--rungs: {rungs!r} is not a list of step budgets")
    for b in rungs:
        star.check_number("steps", b)
    if rungs[0] != steps or any(a >= b for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"--rungs {','.join(map(str, rungs))}: the budgets must rise, from the search's "
                         f"--steps {steps}")


def check_compact(compact, depths, where):
    try:
        g = gn.from_compact(star.field({"genome": compact}, "genome", (str,), where))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    problems = gn.validate(g)
    if problems or (depths and len(g) not in depths):
        raise ValueError(f"{where}: {problems[0] if problems else f'{len(g)} LIVs, the run has {depths[0]}'}")


def check_result(e, depths, where):
    """One trained model's entry: every field a run writes, each of its kind and range, and the
    fields that name the model (compact, genome, key, summary) naming the same one."""
    check_compact(star.field(e, "compact", (str,), where), depths, where)
    g = gn.from_compact(e["compact"])
    if star.field(e, "genome", (list,), where) != g.tolist() or star.field(e, "key", (str,), where) != model_key(
            e["compact"]) or star.field(e, "summary", (str,), where) != gn.summary(g):
        raise ValueError(f"{where}: its genome, key or summary is not that of {e['compact'][:40]}")
    if star.field(e, "status", (str,), where) not in ("ok", "failed"):
        raise ValueError(f"{where}.status is {e['status']!r}, not ok or failed")
    ppl = star.field(e, "ppl", (int, float, type(None)), where)
    if e["status"] == "ok" and not (ppl is not None and math.isfinite(ppl) and ppl >= 1):
        raise ValueError(f"{where}.ppl is {ppl!r} for a model that trained")
    if e["status"] == "failed":
        star.field(e, "error", (str,), where)
    for key in ("params", "params_non_embedding", "cache_bytes", "rank"):
        if e.get(key) is not None and star.field(e, key, (int,), where) < 0:
            raise ValueError(f"{where}.{key} is negative")
    for key in ("seconds", "train_seconds", "measure_seconds", "first_step_seconds", "eval_seconds",
                "tokens_per_second", "latency_ms"):
        if (key in e or key in ("seconds", "train_seconds")) and not (
                math.isfinite(star.field(e, key, (int, float), where)) and e[key] >= 0):
            raise ValueError(f"{where}.{key} is {e[key]!r}, not a finite number >= 0")
    check_probes(e, where)


def check_probes(e, where):
    """Probe scores: shares in [0, 1] of known tasks, and a recall error that is 1 - their mean."""
    scores, error = e.get("probes"), e.get("recall_error")
    if scores is None and error is None:
        return
    star.field(e, "probes", (dict,), where)
    for task, share in scores.items():
        if task not in probes.TASKS or not isinstance(share, (int, float)) or isinstance(share, bool) \
                or not 0 <= share <= 1:
            raise ValueError(f"{where}.probes.{str(task)[:20]} is {share!r}: not a share of a known task")
    error = star.field(e, "recall_error", (int, float), where)
    if not scores or abs(error - (1 - sum(scores.values()) / len(scores))) > 1e-9:
        raise ValueError(f"{where}.recall_error is {error!r}, not 1 - the mean of its probe scores")


def check_state(state):
    """The checkpoint's schema, so that a corrupt or hand-edited one is refused at start with the
    field that is wrong, not halfway through a generation."""
    if star.field(state, "version", (int,), "checkpoint") != VERSION:
        raise ValueError(f"version {state['version']}; this code reads version {VERSION}")
    s = check_settings(star.field(state, "settings", (dict,), "checkpoint"))
    star.field(s, "device", (str,), "settings")
    if "latency_note" in s:
        star.field(s, "latency_note", (str,), "settings")
    n = (s["preset"]["n_livs"],)
    depths = n + (max(2, n[0] // 2 * 2),)  # candidates, and baselines (an even depth)
    if star.field(state, "generation", (int,), "checkpoint") < 0:
        raise ValueError(f"generation {state['generation']} is negative")
    for key in ("population", "pending"):
        for i, compact in enumerate(star.field(state, key, (list,), "checkpoint")):
            check_compact(compact, n, f"{key}[{i}]")
    for i, e in enumerate(star.field(state, "evaluations", (list,), "checkpoint")):
        check_result(e, n, f"evaluations[{i}]")
        if not 0 <= star.field(e, "generation", (int,), f"evaluations[{i}]") <= state["generation"]:
            raise ValueError(f"evaluations[{i}].generation is {e['generation']}, after the run's {state['generation']}")
        if not 0 <= star.field(e, "rung", (int,), f"evaluations[{i}]") < len(s["rungs"]):
            raise ValueError(f"evaluations[{i}].rung is {e['rung']}; the run has {len(s['rungs'])} rung(s)")
    later = {f"{n}@{b}": r for n in SEARCH_BASELINES for r, b in enumerate(s["rungs"][1:], 1)}
    for name, e in star.field(state, "baselines", (dict,), "checkpoint").items():
        if name not in SEARCH_BASELINES and name not in later:
            raise ValueError(f"baselines: unknown baseline {name[:40]!r}")
        check_result(e, depths[1:], f"baselines.{name}")
        if e.get("rung", 0) != later.get(name, 0):
            raise ValueError(f"baselines.{name}.rung is {e['rung']!r}, not the rung its name says")
    for key, e in star.field(state, "confirmed", (dict,), "checkpoint").items():
        where = f"confirmed.{key[:48]}"  # the larger size at any depth: the flags may change on resume
        check_result(e, None if star.field(e, "stage", (str,), where) == "large" else depths, where)
        seed, steps = star.field(e, "seed", (int,), where), star.field(e, "steps", (int,), where)
        if confirmation_id(e["compact"], e["stage"], seed) != key or e["stage"] not in ("confirm", "large"):
            raise ValueError(f"{where} holds the result of another model, stage or seed ({e['compact'][:40]}, "
                             f"{e['stage']}, seed {seed})")
        if steps < 1:
            raise ValueError(f"{where}.steps is {steps}, not a budget")
    try:
        np.random.default_rng().bit_generator.state = star.field(state, "rng", (dict,), "checkpoint")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"rng: not a PCG64 state ({type(e).__name__}: {e})") from None
    if not star.field(state, "elapsed", (int, float), "checkpoint") >= 0:
        raise ValueError("elapsed is negative")


# ---------------------------------------------------------------------------------------------
# Progress lines


def record(compact, result, rank, **where):
    """A trained model's entry as the checkpoint keeps it."""
    g = gn.from_compact(compact)
    return {**where, "genome": g.tolist(), "compact": compact, "key": model_key(compact), "summary": gn.summary(g),
            "rank": rank, **result}


def time_left(run, world=1):
    """Seconds left: the mean wall time of a training at the search's budget so far (a rung's by its
    steps), times the trainings still to come (this generation's at each rung, the later
    generations'), plus the confirmation's at its budget (not probed or timed; the larger size's by
    its depth x width^2), / processes."""
    s = run.settings
    trained, cost = run.evaluations + list(run.baselines.values()), [b / s["rungs"][0] for b in s["rungs"]]
    sizes = rung_sizes(s, s["population"])
    search = len({model_key(c) for c in run.pending} - set(run.at_rung(0))) + (
        s["generations"] - run.generation - 1) * sum(n * c for n, c in zip(sizes, cost))
    for r in range(1, len(cost) if run.pending else 0):
        search += max(0, sizes[r] - sum(e["generation"] == run.generation and e["rung"] == r
                                        for e in run.evaluations)) * cost[r]
    confirm = 0
    if s["confirm_steps"]:
        models = s["confirm_top"] + s["rank_check"] + len(SEARCH_BASELINES)
        large = large_size(s)
        todo = {"confirm": models * s["confirm_seeds"], "large": models if large else 0}
        for c in run.confirmed.values():
            todo[c["stage"]] -= c["steps"] == s["confirm_steps"]
        scale = large[0] / s["preset"]["n_livs"] * (large[1] / s["preset"]["width"]) ** 2 if large else 0
        confirm = (max(0, todo["confirm"]) + max(0, todo["large"]) * scale) * s["confirm_steps"] / s["preset"]["steps"]
    units = sum(cost[e.get("rung", 0)] for e in trained)
    seconds = sum(e["seconds"] for e in trained) / max(1, units)
    measure = sum(e.get("measure_seconds", 0.0) for e in trained) / max(1, units)
    return (seconds * search + (seconds - measure) * confirm) / world


def report_generation(run, log):
    F, level = run.objectives(run.population), run.levels(run.population)
    log(f"generation {run.generation} done: best {OBJECTIVES[run.settings['objective']][0]} "
        f"{F[best_first(F, level)[0], 0]:.3f}, front {len(non_dominated_sort(F, level)[0])}, "
        f"{run.elapsed() / 60:.1f} min so far{report.turnover_note(run.candidates(), run.generation)}")
    report.write_outputs(results(run))


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
    p.add_argument("--confirm-steps", type=star.number("confirm_steps"), default=None, metavar="N",
                   help="steps of the confirmation stage (" + ", ".join(
                       f"{k} {v['confirm_factor']}x" for k, v in DEFAULTS.items()) +
                        " --steps, or the last of --rungs; 0 skips it)")
    for flag, what in (("confirm_top", "best candidates confirmed beside the baselines"),
                       ("confirm_seeds", "seeds each confirmed model is retrained under: the spread margins must clear"),
                       ("rank_check", "candidates from the middle and bottom of the search confirmed too")):
        p.add_argument("--" + flag.replace("_", "-"), type=star.number(flag), default=None, metavar="K",
                       help=f"{what} (" + ", ".join(f"{k} {v[flag]}" for k, v in DEFAULTS.items()) + ")")
    p.add_argument("--confirm-n-livs", type=star.number("confirm_n_livs"), default=None, metavar="N",
                   help="also confirm at this depth (a multiple of --n-livs; candidates stacked), one seed")
    p.add_argument("--confirm-width", type=star.number("confirm_width"), default=None, metavar="W",
                   help="also confirm at this width, one seed")
    p.add_argument("--rungs", type=rung_list, default=None, metavar="STEPS,STEPS",
                   help="successive halving: each generation's best continue to these budgets, retrained "
                        "(e.g. 60,240; the first is --steps; default: one rung)")
    p.add_argument("--random-search", action="store_true", default=None,
                   help="the equal-budget control: every generation drawn at random (no selection, crossover, mutation)")
    p.add_argument("--lease", type=star.number("lease"), default=120.0, metavar="SECONDS",
                   help="under torchrun: a task whose process shows no life for this long is trained elsewhere")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                   help="print finished runs side by side (e.g. a search and its --random-search control) and exit")
    p.add_argument("--probes", action="store_true", default=None,
                   help="also run the capability probes on every candidate (implied by the recall objectives)")
    p.add_argument("--threads", type=star.number("threads"), default=None, metavar="N",
                   help="torch threads per process, part of the run's settings (default: torch's, "
                        f"{torch.get_num_threads()} here)")
    p.add_argument("--data", default=None, help="a .txt (bytes) or .bin (uint16 tokens) file; default: embedded Shakespeare")
    p.add_argument("--vocab-size", type=star.number("vocab_size"), default=None, help="vocabulary of a .bin token file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--out", default=None, help="output directory (default runs/<date>-<time>)")
    p.add_argument("--resume", default=None, help="continue the run in this directory")
    star.add_preset_args(p)
    p.set_defaults(preset=None)  # None: not given (on --resume, the run's own preset)
    return p.parse_args(argv)


def rung_list(text):
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not step budgets separated by commas, e.g. 60,240") from None


def settings_from_args(args, log):
    name = star.preset_name(args.preset or "auto")
    if (args.preset or "auto") == "auto":
        log(f"preset auto: {name} ({'CUDA found' if name == 'gpu' else 'no CUDA'})")
    if args.rungs and args.steps is None:
        args.steps = args.rungs[0]
    preset = star.preset_from_args(args, name)
    defaults = DEFAULTS[name]

    def given(value, default):
        return default if value is None else value
    settings = {"objective": args.objective or "quality", "preset_name": name, "preset": dataclasses.asdict(preset),
                "population": given(args.population, defaults["population"]),
                "generations": given(args.generations, defaults["generations"]),
                "mutation": given(args.mutation, 0.1), "seed": preset.seed, "data": args.data,
                "vocab_size": args.vocab_size, "threads": given(args.threads, torch.get_num_threads()),
                "confirm_steps": given(args.confirm_steps,  # longer than any selection: of the last rung
                                       defaults["confirm_factor"] * (args.rungs or [preset.steps])[-1]),
                "confirm_n_livs": args.confirm_n_livs, "confirm_width": args.confirm_width,
                "random_search": bool(args.random_search), "run_id": uuid.uuid4().hex,
                "rungs": args.rungs or [preset.steps]}
    for key in ("confirm_top", "confirm_seeds", "rank_check"):
        settings[key] = given(getattr(args, key), defaults[key])
    settings["probes"] = bool(args.probes) or "recall_error" in OBJECTIVES.get(settings["objective"], ())
    return check_settings(settings)


def check_resume_conflicts(args, saved):
    """Flags given with --resume must agree with the run's settings; --generations and the
    confirmation's flags may change (they do not alter what was trained), checked again."""
    given = {"objective": args.objective, "population": args.population, "mutation": args.mutation,
             "data": args.data, "vocab_size": args.vocab_size, "preset_name": args.preset, "threads": args.threads,
             "probes": args.probes, "random_search": args.random_search, "rungs": args.rungs}
    given.update({f.name: getattr(args, f.name) for f in dataclasses.fields(star.Preset)})
    for key, value in given.items():
        have = saved["preset"][key] if key in saved["preset"] else saved[key]
        if value is not None and value != have:
            flag = "--" + ("preset" if key == "preset_name" else key.replace("_", "-"))
            raise ValueError(f"--resume: {flag} {value} conflicts with the run's {have}")
    for key in ("generations", "confirm_steps", "confirm_top", "confirm_seeds", "rank_check", "confirm_n_livs",
                "confirm_width"):
        if getattr(args, key) is not None:
            saved[key] = getattr(args, key)
    check_settings(saved)


def open_run(args, world, log, shared=None):
    """A new run, or the one in --resume; when torchrun restarts a failed group, the run in --out
    that this group started (its run id, kept in the store that outlives restarts), and no other."""
    if world > 1 and not (args.out or args.resume):
        raise ValueError("a search under torchrun needs --out DIR (a restarted group resumes from it)")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and not args.resume:
        started = shared.get("run_id").decode() if shared is not None and shared.check(["run_id"]) else None
        if started is None:
            raise ValueError("torchrun restarted the group, but its first attempt started no run (it was refused); "
                             "nothing is resumed")
        run = Run.load(args.out)
        if run.settings["run_id"] != started:
            raise ValueError(f"{args.out} holds run {run.settings['run_id']}, not run {started} that this group started")
        log(f"resuming {args.out} at generation {run.generation} ({len(run.evaluations)} candidates already trained): "
            f"torchrun restarted the group of run {started}")
        return run
    if args.resume:
        run = Run.load(args.resume)
        check_resume_conflicts(args, run.settings)
        log(f"resuming {args.resume} at generation {run.generation} ({len(run.evaluations)} candidates already trained)")
        return run
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(os.path.join(out, "checkpoint.json")):
        raise ValueError(f"{out} already holds a run: use --resume {out} or another --out")
    return Run(out, settings_from_args(args, log))


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare)
    store, shared, rank, world = workers.distributed()
    if rank > 0:
        return workers.serve(store, rank, world)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        run, evaluator = start(args, world, log, shared)
    except ValueError as e:
        if store is not None:
            store.set("settings", json.dumps({"abort": str(e)}))
        star.fail(e)
    pool = workers.StoreWorkers(evaluator, store, rank, world, args.lease) if store is not None \
        else workers.Workers(evaluator)
    if store is not None:
        shared.set("run_id", run.settings["run_id"])  # a restart of this group resumes this run, no other
        store.set("settings", json.dumps({**run.settings, "lease": args.lease}))
    s = run.settings
    log(f"STAR search: objective {s['objective']}, preset {s['preset_name']}, population {s['population']}, "
        f"{s['generations']} generations, {s['preset']['n_livs']} LIVs, on {s['device']} x {world} process(es), "
        f"{s['threads']} thread(s) each; writing to {run.out}\n{star.budget_note(evaluator.corpus, evaluator.preset)}")
    try:
        star.atomic_write(os.path.join(run.out, "evaluations.jsonl"), "".join(json.dumps(e) + "\n" for e in run.evaluations))
        run.save()
        search(run, pool, log)
    except (KeyboardInterrupt, NothingTrained) as e:  # everything finished is in the checkpoint already
        with contextlib.suppress(ValueError):  # a report that cannot be written is not the news here
            report.write_outputs(results(run))
        star.fail(e if isinstance(e, NothingTrained) else f"interrupted: continue with python evolve.py --resume {run.out}")
    except ValueError as e:  # a write failed (a full device, ...): what was saved before it resumes
        star.fail(f"{e}; continue with python evolve.py --resume {run.out} once it can be written")
    finally:
        pool.close()
    try:
        report.write_outputs(results(run), log)
    except ValueError as e:
        star.fail(e)


def compare(dirs):
    """Print finished runs side by side (report.compare_section): their checkpoints are checked as a resume's are."""
    try:
        runs = [results(Run.load(d)) for d in dirs]
        if len({(r.objectives, r.settings["confirm_steps"], r.settings["preset_name"]) for r in runs}) > 1:
            raise ValueError("--compare: the runs differ in objective, preset or confirmation budget")
        print("\n".join(report.compare_section(runs)))
    except ValueError as e:
        star.fail(e)


def start(args, world, log, shared=None):
    """The run (new or resumed) on its device, and its evaluator; every check before any write."""
    run = open_run(args, world, log, shared)
    device = star.resolve_device(args.device)
    run.settings["device"] = device
    torch.set_num_threads(run.settings["threads"])
    if run.settings["objective"] == "quality-latency":
        import bench  # only the latency objective needs it
        run.settings["latency_note"] = bench.search_latency_note(device)
    evaluator = workers.Evaluator(run.settings, workers.rank_device(device) if world > 1 else device,
                                  log if world == 1 else lambda s: log(f"[rank 0] {s}"))
    star.output_dir(run.out)  # created only once everything else has been checked
    return run, evaluator


if __name__ == "__main__":
    main()
