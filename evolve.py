"""STAR's evolutionary search (paper section 4.2; README: "Where we depart from the paper"): NSGA-II over genomes.

    python evolve.py --objective quality            # lowest validation perplexity
    python evolve.py --objective quality-cache      # Pareto front of perplexity and cache bytes
    python evolve.py --resume runs/20261126-120000  # continue a killed run
    python evolve.py --rungs 60,240 --eta 4         # other rungs (tiny default: 120,400,1200, eta 3)

Read top-down: NSGA-II (non-dominated sorting, crowding distance, binary tournament, survival),
on objectives alone; then the search loop (`search`): baselines, a random population,
generations of children by tournament, 2-point crossover and per-gene mutation (genome.py), each
trained by star.train_candidate under the same budget, data order and seed, the best of all so far
continued to longer budgets (`promote`: asynchronous successive halving; `ranked` is the one place
rungs meet selection), survival among distinct models; then the confirmation of the search's
choice at the target budget under fresh seeds.
The run's state, its checkpoint and the command line are runs.py; who trains (one process or a
torchrun group) is workers.py; what is written for people (report.md, figures) is report.py.
"""
import contextlib
import dataclasses
import itertools
import json
import os
import shutil

import numpy as np

import config
import genome as gn
import report
import runs
import star
import workers
from runs import model_key, record

SINGLE_OBJECTIVE_ELITES = 2  # paper: 2 survivors carried over in single-objective runs

# ---------------------------------------------------------------------------------------------
# NSGA-II (Deb et al. 2002), on an objective matrix F (n, m), all minimised


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
    """Each row's front (0 = the non-dominated) and its crowding distance within that front."""
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


def best_first(rank, crowd):
    """Row indices by (rank, larger crowding distance): the order tournaments and survival prefer."""
    return sorted(range(len(rank)), key=lambda i: (rank[i], -crowd[i]))


def make_children(population, rank, crowd, n, rng, crossover, mutate):
    """n children by tournament selection, 2-point crossover and per-gene mutation."""
    children = []
    while len(children) < n:
        a, b = tournament(rank, crowd, rng), tournament(rank, crowd, rng)
        children.extend(mutate(child, rng) for child in crossover(population[a], population[b], rng))
    return children[:n]


def survivors(rank, crowd, n, n_parents, one_objective):
    """Indices into parents + children (rank and crowd of that union, parents first) of the next
    population of size n (elitist).

    Several objectives: NSGA-II's survival, whole fronts while they fit, then the rows of the next
    front with the largest crowding distance.
    One objective (paper): the 2 best of the union survive, the rest of the places go to the
    best remaining children (then parents), so that each generation renews the population.
    """
    order = sorted(range(len(rank)), key=lambda i: rank[i])  # by front, then index
    if one_objective:
        elite = order[:SINGLE_OBJECTIVE_ELITES]
        rest = [i for i in order if i not in elite]
        return (elite + [i for i in rest if i >= n_parents] + [i for i in rest if i < n_parents])[:n]
    chosen = []
    for r in range(rank.max() + 1 if len(rank) else 0):
        front = np.flatnonzero(rank == r)
        if len(chosen) + len(front) > n:
            front = front[np.argsort(-crowd[front], kind="stable")][: n - len(chosen)]
        chosen += front.tolist()
    return chosen


# ---------------------------------------------------------------------------------------------
# The search loop


def search(run, pool, log=print):
    """The STAR loop: baselines, a random population, then generations of children and survival
    (with several rungs, the best of all generations so far continue to the longer budgets after
    each generation: `promote`); then the confirmation of the best at the target budget under fresh
    seeds. Resumes wherever it stopped.
    With --random-search (ours: the control of Li and Talwalkar 2019) every generation is drawn at
    random instead, through the same training, survival and confirmation."""
    s = run.settings
    run_baselines(run, pool, log)
    if not run.population and not run.pending:
        run.pending = [gn.to_compact(g) for g in first_generation(s, run.rng)]
        run.save()
    while True:
        if run.pending:  # a generation to finish (on resume: part of it may be done, at any rung)
            train_generation(run, pool, log)
            promote(run, pool, log)
            check_something_trained(run)
            run.population, run.pending = next_population(run), []
            run.save()
            report_generation(run, log)
        if run.generation + 1 >= s["generations"]:
            break
        if s["random_search"]:  # the equal-budget control: no selection, crossover or mutation
            children = [gn.random_genome(s["preset"]["n_livs"], run.rng, s["prior"]) for _ in range(s["population"])]
        else:
            children = make_children([gn.from_compact(c) for c in run.population], *ranked(run, run.population),
                                     s["population"], run.rng, gn.crossover,
                                     lambda g, rng: gn.mutate(g, rng, s["mutation"], s["prior"]))
        run.generation, run.pending = run.generation + 1, [gn.to_compact(c) for c in children]
        run.save()
    shutil.rmtree(os.path.join(run.out, "states"), ignore_errors=True)  # (a resume with more generations retrains)
    confirm(run, pool, log)


def first_generation(s, rng):
    """Random genomes (paper section 4), or with --init hybrids (ours: LFM2 and PostNAS start from known
    designs) the baselines and, for the other places, mutants of them in turn."""
    n, size = s["preset"]["n_livs"], s["population"]
    if s["init"] == "random":
        return [gn.random_genome(n, rng, s["prior"]) for _ in range(size)]
    hybrids = [gn.baseline(name, n) for name in config.SEARCH_BASELINES]
    return hybrids[:size] + [gn.mutate(hybrids[i % len(hybrids)], rng, s["mutation"], s["prior"])
                             for i in range(size - len(hybrids))]


def ranked(run, compacts, rung=None):
    """NSGA-II's (rank, crowding) of these models, with the rung-first rule (ours, successive
    halving; the one place selection meets rungs): every model that reached a higher rung ranks
    ahead of every model of a lower one, and within a rung NSGA-II orders the results there, each
    perplexity below the top rung as predicted at the top (`judged`). With `rung`, every model's
    result at that rung."""
    level = run.levels(compacts) if rung is None else np.full(len(compacts), rung)
    F = judged(run, compacts, level, rung)
    rank, crowd, fronts_above = np.zeros(len(F), dtype=int), np.zeros(len(F)), 0
    for r in sorted(set(level.tolist()), reverse=True):
        rows = np.flatnonzero(level == r)
        rank[rows], crowd[rows] = rank_and_crowding(F[rows])
        rank[rows] += fronts_above
        fronts_above = rank[rows].max() + 1
    return rank, crowd


def judged(run, compacts, level, rung=None):
    """The objectives of each model at its level's rung, its perplexity there divided by the late
    gain its composition predicts up to the top rung (`late_gain`): below the top, a model is judged
    by the result it is predicted to reach at the target."""
    F, keys, top = run.objectives(compacts, rung), config.OBJECTIVES[run.settings["objective"]], len(run.settings["rungs"]) - 1
    for r in set(level.tolist()) - {top} if "ppl" in keys else ():
        gain, col = late_gain(run, r), keys.index("ppl")
        rows = np.flatnonzero((level == r) & (F[:, col] < runs.FAILED))  # a failed model stays failed
        F[rows, col] /= np.exp([gain(compacts[i]) for i in rows])
    return F


def late_gain(run, rung, ridge=0.1):
    """The first cut's signal (ours, issue 36; README: "What reaches the target"): short convolutions
    look good early and fade, MLP-rich designs gain most late. A ridge regression of each model's
    log(ppl at this rung / ppl at the top rung) on its composition (genome.composition), fitted on
    every model with both results: the baselines, which train through every rung first (all half
    MLP: they tell attention, recurrence and long convolution apart), and the run's models that
    reached the top. Returns compact -> predicted log gain, rounded (a torchrun group's hosts agree)."""
    def results(r):  # key -> (compact, log ppl) of the baselines and candidates with a result at rung r
        entries = [e for e in run.baselines.values() if e.get("rung", 0) == r] + list(run.at_rung(r).values())
        return {e["key"]: (e["compact"], np.log(e["ppl"])) for e in entries if e["status"] == "ok"}
    here, top = results(rung), results(len(run.settings["rungs"]) - 1)
    both = sorted(here.keys() & top.keys())
    if len(both) < 2:
        return lambda compact: 0.0
    X = np.stack([gn.composition(gn.from_compact(here[k][0])) for k in both])  # (n, features)
    y = np.array([here[k][1] - top[k][1] for k in both])  # (n,)
    mean = X.mean(0)
    w = np.linalg.solve((X - mean).T @ (X - mean) + ridge * np.eye(X.shape[1]), (X - mean).T @ (y - y.mean()))
    return lambda compact: round(float(y.mean() + (gn.composition(gn.from_compact(compact)) - mean) @ w), 12)


def train_generation(run, pool, log):
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
            tasks.append((compact, workers.stage(0)))
    for entry in train_and_record(run, pool, tasks, 0):
        log(f"gen {run.generation:2d} cand {index[entry['key']] + 1:2d}/{len(run.pending)}  {entry['compact']}  "
            f"{report.describe(entry, pool.world)}  ~{star.duration(time_left(run, pool.world))} left")


def train_and_record(run, pool, tasks, rung):
    """Train tasks at a rung of this generation, recording and checkpointing each as it finishes. A
    task that is one of the baselines (--init hybrids) takes the baseline's result at this rung,
    trained under the same seed already (ours: 6-29% of such a search's compute)."""
    known = {e["key"]: e for e in run.baselines.values() if e.get("rung", 0) == rung and e["status"] == "ok"}
    rest = [t for t in tasks if model_key(t[0]) not in known]
    copies = ((c, {**{k: v for k, v in known[model_key(c)].items() if k not in runs.NAMING}, "copied": True,
                   "steps_trained": 0, "seconds": 0.0}, 0) for c, _ in tasks if model_key(c) in known)
    trained = ((rest[t][0], result, rank) for t, result, rank in pool.map(rest))
    for compact, result, rank in itertools.chain(copies, trained):
        entry = record(compact, result, rank, generation=run.generation, rung=rung)
        run.evaluations.append(entry)
        run.save()
        path = os.path.join(run.out, "evaluations.jsonl")
        with config.writing(path), open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        yield entry


def promote(run, pool, log):
    """Asynchronous successive halving across generations (Li et al. 2020, ASHA; ours in STAR): at
    each rung, the best of all candidates that reached the rung below (of every generation so far,
    by NSGA-II's order of their judged results there) continue to this rung, once, while it holds
    fewer than 1/eta of them (`promotable`), from the state kept at the rung below's decay
    (workers.Evaluator); then the next rung, with what this one added. Deterministic in the
    results: a resumed or distributed run promotes the same."""
    for rung in range(1, len(run.settings["rungs"])):
        compacts = promotable(run, rung)
        if compacts:
            log(f"gen {run.generation:2d} rung {rung}: {len(compacts)} more of the best at {run.settings['rungs'][rung - 1]} "
                f"steps continue to {run.settings['rungs'][rung]} (at most 1/{run.settings['eta']} of them)")
        for entry in train_and_record(run, pool, [(c, workers.stage(rung)) for c in compacts], rung):
            log(f"gen {run.generation:2d} rung {rung}  {entry['compact']}  {report.describe(entry, pool.world)}  "
                f"~{star.duration(time_left(run, pool.world))} left")
    prune_states(run)


def prune_states(run):
    """Delete the kept states that can never be continued (ours, for disk): a model's state at a rung
    it has passed. Every other stays: as the first cut's fit learns (`late_gain`), a model can rise."""
    for rung, steps in enumerate(run.settings["rungs"][:-1]):
        above = run.at_rung(rung + 1)
        for key, e in run.at_rung(rung).items():
            if key in above and not above[key].get("transient"):
                with contextlib.suppress(OSError):
                    os.remove(workers.state_path(run.out, e["compact"], steps))


def promotable(run, rung):
    """The best models of the rung below that have no result at this rung (a transient failure there
    is tried again), best first, while this rung holds fewer than 1/eta of the rung below (ours: as
    the first cut's signal moves, the compute stays the plan's)."""
    order, here, eta = best_at(run, rung - 1), run.at_rung(rung), run.settings["eta"]
    room = len(order) // eta - sum(not e.get("transient") for e in here.values())
    return [c for c in order if model_key(c) not in here or here[model_key(c)].get("transient")][:max(0, room)]


def best_at(run, rung):
    """The models that trained at this rung, best first by NSGA-II's order of their judged results
    there (`judged`); ties (a front's two ends, both of infinite crowding) by the results, never by
    arrival."""
    ok = sorted((e["compact"] for e in run.at_rung(rung).values() if e["status"] == "ok"),
                key=lambda c: (*run.objectives([c], rung)[0], c))
    return [ok[i] for i in best_first(*ranked(run, ok, rung))] if ok else []


def next_population(run):
    """NSGA-II survival over parents + children among distinct models: a model found twice takes
    one place; duplicates fill places only when there are not enough distinct models."""
    union, first = run.population + run.pending, {}
    for i, compact in enumerate(union):
        first.setdefault(model_key(compact), i)
    parents = [i for i in first.values() if i < len(run.population)]
    distinct = parents + [i for i in first.values() if i >= len(run.population)]
    one_objective = len(config.OBJECTIVES[run.settings["objective"]]) == 1
    chosen = [distinct[i] for i in survivors(*ranked(run, [union[i] for i in distinct]), run.settings["population"],
                                             len(parents), one_objective)]
    F, level = run.objectives(union), run.levels(union)
    spare = sorted(set(range(len(union))) - set(chosen), key=lambda i: (-level[i], *F[i]))
    return [union[i] for i in chosen + spare[: run.settings["population"] - len(chosen)]]


def run_baselines(run, pool, log):
    """The baselines at the first rung, then continued through every later rung ('name@steps'):
    every margin of the report is to them, at the budget of the result it is a margin of."""
    rungs = run.settings["rungs"]
    for r in range(len(rungs)):
        todo = [(name + (f"@{rungs[r]}" if r else ""), c) for name, c in baseline_compacts(run).items()]
        todo = [t for t in todo if t[0] not in run.baselines]
        for t, result, rank in pool.map([(c, workers.stage(r)) for _, c in todo]):
            run.baselines[todo[t][0]] = entry = record(todo[t][1], result, rank, rung=r)
            run.save()
            log(f"baseline {todo[t][0]:18s} {report.describe(entry, pool.world)}  "
                f"~{star.duration(time_left(run, pool.world))} left")


def baseline_compacts(run, n_livs=None):
    n = gn.baseline_depth(n_livs or run.settings["preset"]["n_livs"])
    return {name: gn.to_compact(gn.baseline(name, n)) for name in config.SEARCH_BASELINES}


def confirm(run, pool, log):
    """Retrain the finalists at the confirmation's budget (the target) under --confirm-seeds seeds never
    used by the search (its seed + 1, + 2, ..., common to all models), and once at the larger size if
    asked: how far the search's verdicts hold, with the seed-to-seed spread they have to clear."""
    s, size = run.settings, runs.large_size(run.settings)
    if not s["confirm_steps"]:
        return
    tasks = [t for t in confirmation_tasks(run) if not confirmed_result(run, *t)]
    if not tasks:
        return
    log(f"confirmation: {len(tasks)} trainings of {s['confirm_steps']} steps "
        f"(seeds {', '.join(map(str, confirmation_seeds(s)))}{'; larger size' if size else ''})")
    for t, result, rank in pool.map(tasks):
        compact, kind, seed = tasks[t]
        entry = record(compact, result, rank, stage=kind, steps=s["confirm_steps"], seed=seed,
                       **({"width": size[1]} if kind == "large" else {}))
        run.confirmed[runs.confirmed_key(compact, kind, seed)] = entry
        run.save()
        log(f"{kind} {entry['summary'][:40]:40s} seed {seed}  {report.describe(entry, pool.world)}  "
            f"~{star.duration(time_left(run, pool.world))} left")


def confirmation_tasks(run):
    """(compact, stage, seed) of every training the confirmation holds: each finalist under each seed,
    and once at the larger size if asked."""
    s, size = run.settings, runs.large_size(run.settings)
    tasks = [(e["compact"], "confirm", seed) for _, e in finalists(run) for seed in confirmation_seeds(s)]
    return tasks + ([(scaled(run, e["compact"]), "large", s["seed"] + 1) for _, e in finalists(run)] if size else [])


def finalist_count(s):
    """How many models the confirmation retrains per seed: the top (on a front, also its end for each
    baseline: at most), the rank check, the baselines."""
    ends = len(config.SEARCH_BASELINES) if len(config.OBJECTIVES[s["objective"]]) > 1 else 0
    return s["confirm_top"] + ends + s["rank_check"] + len(config.SEARCH_BASELINES)


def confirmation_seeds(s):
    return [s["seed"] + 1 + i for i in range(s["confirm_seeds"])]


def scaled(run, compact):
    """A confirmed model at the larger depth: a candidate stacked (Composer), a baseline rebuilt."""
    n_livs = runs.large_size(run.settings)[0]
    names = {c: name for name, c in baseline_compacts(run).items()}
    if compact in names:
        return baseline_compacts(run, n_livs)[names[compact]]
    return gn.to_compact(gn.scale(gn.from_compact(compact), n_livs, "stack"))


def confirmed_result(run, compact, stage, seed):
    """The model's result at today's confirmation budget (and size), under this seed, if trained
    (a resume may change them: an older budget's result is retrained, never reported as the new)."""
    c = run.confirmed.get(runs.confirmed_key(compact, stage, seed))
    size = runs.large_size(run.settings)
    fits = c and c.get("steps") == run.settings["confirm_steps"] and (stage == "confirm" or c.get("width") == size[1])
    return c if fits else None


def finalists(run):
    """The search entries to confirm: the top K distinct candidates (one objective), or along the
    front (several) its lowest perplexity, for each baseline the smallest member level with it or
    better in the search (front_ends), and K - 1 spread between; then the rank check, R candidates
    spread from just below the top to the bottom of the search's ranking; then the baselines."""
    table, k = final_table(run), run.settings["confirm_top"]
    if len(config.OBJECTIVES[run.settings["objective"]]) > 1:
        spread = [table[i] for i in sorted(set(np.linspace(0, len(table) - 1, k).round().astype(int)))] if table else []
        table = list({e["key"]: e for e in table[:1] + front_ends(run, table) + spread}.values())
        k = len(table)
    rest, r = [e for e in ranking(run) if e["key"] not in {t["key"] for t in table[:k]}], run.settings["rank_check"]
    checks = [rest[i] for i in sorted(set(np.linspace(0, len(rest) - 1, r).round().astype(int)))] \
        if rest and r else []
    chosen = [("top", e) for e in table[:k]] + [("rank check", e) for e in checks] + \
        [("baseline", top_rung_baseline(run, n)) for n in config.SEARCH_BASELINES if run.baselines[n]["status"] == "ok"]
    first = {}
    for kind, e in chosen:  # a model chosen twice (a candidate that is a baseline) is confirmed once
        first.setdefault(e["key"], (kind, e))
    return list(first.values())


def front_ends(run, front):
    """For each baseline, the front member with the smallest second objective whose perplexity is
    level with the baseline's at the same rung, or better (ours: the cache or size claim of the paper)."""
    key, ends = config.OBJECTIVES[run.settings["objective"]][1], []
    for name in config.SEARCH_BASELINES:
        rungs = run.settings["rungs"]
        at = {0: run.baselines.get(name), **{r: run.baselines.get(f"{name}@{b}") for r, b in enumerate(rungs[1:], 1)}}
        level = [e for e in front if at.get(e["rung"]) and at[e["rung"]]["status"] == "ok" and e.get(key) is not None
                 and e["ppl"] <= at[e["rung"]]["ppl"]]
        ends += [min(level, key=lambda e: e[key])] if level else []
    return ends


def top_rung_baseline(run, name):
    """A baseline's result at the highest rung (where the search's best were compared), else its first."""
    later = run.baselines.get(f"{name}@{run.settings['rungs'][-1]}")
    return {**run.baselines[name], **later} if later and later["status"] == "ok" else run.baselines[name]


def ranking(run):
    """The distinct trained candidates, best first: by the highest rung reached, then by the first
    objective there (one rung: by the first objective)."""
    key = config.OBJECTIVES[run.settings["objective"]][0]
    ok = [e for e in run.candidates() if e["status"] == "ok" and e.get(key) is not None]
    return sorted(ok, key=lambda e: (-e["rung"], e[key]))


def final_table(run):
    """The front of the final population (several objectives; by perplexity) or the top 10 (one)."""
    if len(config.OBJECTIVES[run.settings["objective"]]) == 1:
        return ranking(run)[:10]
    best, (rank, _) = run.at_rung(), ranked(run, run.population)
    front = [best[model_key(run.population[i])] for i in np.flatnonzero(rank == 0)]
    return sorted({e["key"]: e for e in front if e["status"] == "ok"}.values(), key=lambda e: e["ppl"])


def confirmation_table(run):
    """report.Confirmed rows for every finalist confirmed so far under some seed."""
    s, rank = run.settings, {e["key"]: i + 1 for i, e in enumerate(ranking(run))}
    names = {run.baselines[name]["key"]: name for name in config.SEARCH_BASELINES}
    rows = []
    for kind, e in finalists(run):
        seeds = [confirmed_result(run, e["compact"], "confirm", seed) for seed in confirmation_seeds(s)]
        trained = [c for c in seeds if c and c["status"] == "ok"]
        large = runs.large_size(s) and confirmed_result(run, scaled(run, e["compact"]), "large", s["seed"] + 1)
        label = names.get(e["key"]) or f"#{rank[e['key']]}"
        if trained:
            rows.append(report.Confirmed(label, kind, e, trained, large if large and large["status"] == "ok" else None))
    return rows


class NothingTrained(RuntimeError):
    pass


def check_something_trained(run):
    """A search in which every model failed has nothing to report: stop with the first error."""
    trained = run.evaluations + list(run.baselines.values())
    if trained and not any(e["status"] == "ok" for e in trained):
        raise NothingTrained(f"every candidate and both baselines failed; the first error: {trained[0].get('error')}")


def for_report(run):
    """The run as report.py reads it."""
    return report.Results(out=run.out, settings=run.settings, objectives=config.OBJECTIVES[run.settings["objective"]],
                          evaluations=run.candidates(), baselines={n: run.baselines[n] for n in config.SEARCH_BASELINES
                                                                   if n in run.baselines},
                          rung_baselines={n: {r: run.baselines.get(f"{n}@{b}") for r, b in enumerate(
                              run.settings["rungs"][1:], 1)} for n in config.SEARCH_BASELINES}, trainings=run.evaluations,
                          top=final_table(run), confirmed=confirmation_table(run),
                          elapsed=run.elapsed())


def time_left(run, world=1):
    """Seconds left: the steps the settings still plan (planned_steps less those trained) at the
    seconds per step measured so far: the search's with its measurements (probes, latency), the
    confirmation's without them (it takes none), / processes."""
    searched, confirmed = run.evaluations + list(run.baselines.values()), list(run.confirmed.values())
    steps = [sum(report.trained(e, run.settings) for e in part) for part in (searched, searched + confirmed)]
    seconds = sum(e["seconds"] for e in searched), sum(e["seconds"] - e.get("measure_seconds", 0.0)
                                                        for e in searched + confirmed)
    search, confirm = planned_steps(run.settings)
    return (max(0, search - steps[0]) * seconds[0] / max(1, steps[0]) +
            max(0, confirm - (steps[1] - steps[0])) * seconds[1] / max(1, steps[1])) / world


def planned_steps(s):
    """(search, confirmation) training steps the settings plan before anything trains: the
    baselines through every rung; each generation's candidates at the first rung, and at each later
    rung the share 1/eta^r that ASHA promotes, each continued from the decay of the rung below (a
    model met twice trains once: fewer); the confirmation from scratch (the larger size counted in
    steps of the search's size, scaled by depth x width^2)."""
    preset, rungs, large = config.Preset(**s["preset"]), s["rungs"], runs.large_size(s)
    kept = [0] + [star.decay_start(dataclasses.replace(preset, steps=b)) for b in rungs[:-1]]
    search = sum((s["population"] * s["generations"] // s["eta"] ** r + len(config.SEARCH_BASELINES)) * (b - start)
                 for r, (b, start) in enumerate(zip(rungs, kept)))
    scale = large[0] / preset.n_livs * (large[1] / preset.width) ** 2 if large else 0
    return search, round(finalist_count(s) * (s["confirm_seeds"] + scale) * s["confirm_steps"])


def planned_compute(s):
    """(trainings, steps, tokens) the settings plan (planned_steps; the larger size's tokens as at the search's size)."""
    n = sum(s["population"] * s["generations"] // s["eta"] ** r for r in range(len(s["rungs"])))
    n += len(config.SEARCH_BASELINES) * len(s["rungs"])
    n += finalist_count(s) * (s["confirm_seeds"] + bool(runs.large_size(s))) if s["confirm_steps"] else 0
    steps = sum(planned_steps(s))
    return n, steps, steps * s["preset"]["batch_size"] * s["preset"]["seq_len"]


def report_generation(run, log):
    F, (rank, crowd) = run.objectives(run.population), ranked(run, run.population)
    log(f"generation {run.generation} done: best {config.OBJECTIVES[run.settings['objective']][0]} "
        f"{F[best_first(rank, crowd)[0], 0]:.3f}, front {int((rank == 0).sum())}, "
        f"{run.elapsed() / 60:.1f} min so far{report.turnover_note(run.candidates(), run.generation)}")
    report.write_outputs(for_report(run))


# ---------------------------------------------------------------------------------------------
# Command line: its flags and checks, and the run's state on disk, are runs.py's


def main(argv=None):
    args = runs.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    log = lambda s: print(s, flush=True)  # noqa: E731
    run, pool = runs.start(args, log)
    if run is None:  # a torchrun worker, done
        return
    s = run.settings
    log(f"STAR search: objective {s['objective']}, preset {s['preset_name']}, population {s['population']}, "
        f"{s['generations']} generations, {s['preset']['n_livs']} LIVs, on {s['device']} x {pool.world} process(es), "
        f"{s['threads']} thread(s) each; writing to {run.out}\n{config.budget_note(pool.evaluate.preset, len(pool.evaluate.corpus.train))}")
    trainings, steps, tokens = planned_compute(s)
    log(f"compute: about {trainings} trainings, {steps:,} steps, {report.fmt_count(tokens)} tokens (rungs "
        f"{','.join(map(str, s['rungs']))}, eta {s['eta']}; confirmation {s['confirm_steps']} steps x "
        f"{s['confirm_seeds']} seeds); the time left is estimated from the measured speed after each training")
    try:
        config.write_file(os.path.join(run.out, "evaluations.jsonl"), "".join(json.dumps(e) + "\n" for e in run.evaluations))
        run.save()
        search(run, pool, log)
    except (KeyboardInterrupt, NothingTrained) as e:  # everything finished is in the checkpoint already
        with contextlib.suppress(ValueError):  # a report that cannot be written is not the news here
            report.write_outputs(for_report(run))
        config.fail(e if isinstance(e, NothingTrained) else f"interrupted: continue with python evolve.py --resume {run.out}")
    except ValueError as e:  # a write failed (a full device, ...): what was saved before it resumes
        config.fail(f"{e}; continue with python evolve.py --resume {run.out} once it can be written")
    finally:
        pool.close()
    try:
        report.write_outputs(for_report(run), log)
    except ValueError as e:
        config.fail(e)


def compare(dirs):
    """Print finished runs side by side (report.compare_section): their checkpoints are checked as a
    resume's are, and only runs that pair are set beside each other (runs.check_comparable)."""
    try:
        loaded = [runs.Run.load(d) for d in dirs]
        runs.check_comparable(dirs, loaded, lambda run: [t for t in confirmation_tasks(run)
                                                         if not confirmed_result(run, *t)])
        print("\n".join(report.compare_section([for_report(r) for r in loaded])))
    except ValueError as e:
        config.fail(e)


if __name__ == "__main__":
    main()
