"""STAR's evolutionary search (paper section 4.2; README: "Where we depart from the paper"): NSGA-II over genomes.

    python evolve.py --objective quality            # lowest validation perplexity
    python evolve.py --objective quality-cache      # Pareto front of perplexity and cache bytes
    python evolve.py --resume runs/20261126-120000  # continue a killed run

Read top-down: NSGA-II (non-dominated sorting, crowding distance, binary tournament, survival);
then the search loop (`search`): baselines, a random population, generations of children by
tournament, 2-point crossover and per-gene mutation (genome.py) each trained by star.train_candidate
under the same budget, data order and seed, survival among distinct models, and the confirmation
of the best at a longer budget; then the run's state (checkpointed after every trained model) and
the command line. Who trains (one process or a torchrun group) is workers.py; what is written for
people (report.md, figures) is report.py.
"""
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

import genome as gn
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
DEFAULTS = {"tiny": {"population": 8, "generations": 4}, "gpu": {"population": 16, "generations": 18}}
SEARCH_BASELINES = ("transformer++", "striped-mamba")  # of genome.BASELINES: trained and compared by every run
SINGLE_OBJECTIVE_ELITES = 2  # paper: 2 survivors carried over in single-objective runs
FAILED = 1e30  # the objective value of a failed candidate: worse than anything real
VERSION = 3  # of checkpoint.json (version 2 is read too: Run.load)

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
# The search loop


def search(run, pool, log=print):
    """The STAR loop: baselines, a random population, then generations of children and survival;
    then the confirmation of the best at a longer budget. Resumes wherever the run stopped."""
    s = run.settings
    run_baselines(run, pool, log)
    if not run.population and not run.pending:
        run.pending = [gn.to_compact(gn.random_genome(s["preset"]["n_livs"], run.rng)) for _ in range(s["population"])]
        run.save()
    while True:
        if run.pending:  # a generation to finish (on resume: part of it may be done)
            evaluate_pending(run, pool, log)
            check_something_trained(run)
            run.population, run.pending = next_population(run), []
            run.save()
            report_generation(run, log)
        if run.generation + 1 >= s["generations"]:
            break
        children = make_children([gn.from_compact(c) for c in run.population], run.objectives(run.population),
                                 s["population"], run.rng, gn.crossover,
                                 lambda g, rng: gn.mutate(g, rng, s["mutation"]))
        run.generation, run.pending = run.generation + 1, [gn.to_compact(c) for c in children]
        run.save()
    confirm(run, pool, log)


def evaluate_pending(run, pool, log):
    """Train the generation's genomes not trained yet, each distinct model once; checkpoint after each."""
    done, tasks, index = run.results, [], {}
    for i, compact in enumerate(run.pending):
        key, tag = model_key(compact), f"gen {run.generation:2d} cand {i + 1:2d}/{len(run.pending)}"
        if key in done or key in index:
            same = done[key]["compact"] if key in done else run.pending[index[key]]
            log(f"{tag}  {compact}  reused" + ("" if same == compact else f" (same model as {same})") +
                (f": {report.fmt_result(done[key])}" if key in done else ""))
        else:
            index[key] = i
            tasks.append((compact, "search"))
    for t, result, rank in pool.map(tasks):
        entry = record(tasks[t][0], result, rank, generation=run.generation)
        run.evaluations.append(entry)
        run.save()
        with open(os.path.join(run.out, "evaluations.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        log(f"gen {run.generation:2d} cand {index[entry['key']] + 1:2d}/{len(run.pending)}  {entry['compact']}  "
            f"{report.describe(entry, pool.world)}  ~{star.duration(time_left(run, pool.world))} left in the search")


def next_population(run):
    """NSGA-II survival over parents + children among distinct models: a model found twice takes
    one place; duplicates fill places only when there are not enough distinct models."""
    union, first = run.population + run.pending, {}
    for i, compact in enumerate(union):
        first.setdefault(model_key(compact), i)
    F = run.objectives(union)
    parents = [i for i in first.values() if i < len(run.population)]
    children = [i for i in first.values() if i >= len(run.population)]
    chosen = [(parents + children)[i] for i in survivors(F[parents], F[children], run.settings["population"])]
    spare = sorted(set(range(len(union))) - set(chosen), key=lambda i: tuple(F[i]))
    return [union[i] for i in chosen + spare[: run.settings["population"] - len(chosen)]]


def run_baselines(run, pool, log):
    """Both baselines at the search's budget, and the first once more under the second seed: the
    spread of the two is the noise floor the report states beside every margin."""
    names = {c: name for name, c in baseline_compacts(run).items()}
    tasks = [(c, "search") for c, name in names.items() if name not in run.baselines]
    if noise_entry(run) is None:
        tasks.append((baseline_compacts(run)[SEARCH_BASELINES[0]], "seed"))
    for t, result, rank in pool.map(tasks):
        compact, stage = tasks[t]
        entry = record(compact, result, rank, stage=stage)
        if stage == "seed":
            run.noise[entry["key"]] = entry
        else:
            run.baselines[names[compact]] = entry
        run.save()
        log(f"baseline {names[compact] + (' (second seed)' if stage == 'seed' else ''):27s} {report.describe(entry, pool.world)}")


def baseline_compacts(run):
    n = max(2, run.settings["preset"]["n_livs"] // 2 * 2)  # baselines need an even depth
    return {name: gn.to_compact(gn.baseline(name, n)) for name in SEARCH_BASELINES}


def noise_entry(run):
    """The first baseline retrained under the second seed at the search's budget, if done."""
    return run.noise.get(model_key(baseline_compacts(run)[SEARCH_BASELINES[0]]))


def confirm(run, pool, log):
    """Retrain the confirm_set at the confirmation's longer budget, all under the second seed
    (common random numbers among themselves): how far the search's verdicts hold."""
    s = run.settings
    tasks = [(e["compact"], "confirm") for e in confirm_set(run) if not confirmed_at_budget(run, e["key"])]
    if not s["confirm_steps"] or not tasks:
        return
    log(f"confirmation: {len(tasks)} models retrained for {s['confirm_steps']} steps under seed {s['seed'] + 1}")
    for t, result, rank in pool.map(tasks):
        entry = record(tasks[t][0], result, rank, stage="confirm", steps=s["confirm_steps"])
        run.confirmed[entry["key"]] = entry
        run.save()
        log(f"confirm {entry['summary'][:40]:40s} {report.describe(entry, pool.world)}")


def confirmed_at_budget(run, key):
    """The model's confirmed result if it was trained at today's --confirm-steps (a resume may
    change them: an older budget's result is retrained, never reported under the new one)."""
    c = run.confirmed.get(key)
    return c if c and c.get("steps") == run.settings["confirm_steps"] else None


def confirm_set(run):
    """The search entries to confirm: the top K distinct candidates (one objective) or K spread
    along the front from its lowest perplexity (several), then the baselines."""
    table, k = final_table(run), run.settings["confirm_top"]
    if len(OBJECTIVES[run.settings["objective"]]) > 1 and len(table) > k:
        table = [table[i] for i in sorted(set(np.linspace(0, len(table) - 1, k).round().astype(int)))]
    chosen = table[:k] + [run.baselines[name] for name in SEARCH_BASELINES if run.baselines[name]["status"] == "ok"]
    return list({e["key"]: e for e in chosen}.values())


def final_table(run):
    """The front of the final population (several objectives; by perplexity) or the top 10 (one)."""
    ok = [e for e in run.evaluations if e["status"] == "ok"]
    keys = OBJECTIVES[run.settings["objective"]]
    if len(keys) == 1:
        return sorted(ok, key=lambda e: e[keys[0]])[:10]
    results = run.results
    front = [results[model_key(run.population[i])] for i in non_dominated_sort(run.objectives(run.population))[0]]
    return sorted({e["key"]: e for e in front if e["status"] == "ok"}.values(), key=lambda e: e["ppl"])


def confirmed_pairs(run):
    """(label, search entry, confirmed entry) for every model of the confirm_set confirmed so far."""
    labels = {e["key"]: f"#{i + 1}" for i, e in enumerate(final_table(run))}
    labels.update({e["key"]: name for name, e in run.baselines.items()})
    pairs = [(labels[e["key"]], e, confirmed_at_budget(run, e["key"])) for e in confirm_set(run)]
    return [(label, e, c) for label, e, c in pairs if c and c["status"] == "ok"]


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
                          evaluations=run.evaluations, baselines={n: run.baselines[n] for n in SEARCH_BASELINES
                                                                   if n in run.baselines},
                          noise=noise_entry(run), top=final_table(run), confirmed=confirmed_pairs(run),
                          elapsed=run.elapsed())


# ---------------------------------------------------------------------------------------------
# The run's state, checkpointed atomically after every trained model


class Run:
    """State of one search: everything a resume needs, and nothing derivable."""
    STATE = ("settings", "generation", "population", "pending", "evaluations", "baselines", "noise", "confirmed")

    def __init__(self, out, settings):
        self.out, self.settings = out, settings
        self.generation = 0
        self.population = []  # compact genomes: the survivors of the last finished generation
        self.pending = []  # compact genomes of the generation in progress (some may be trained already)
        self.evaluations = []  # candidates at the search's budget, in order of completion
        self.baselines = {}  # name -> result at the search's budget
        self.noise = {}  # model key -> the first baseline's result under the second seed, search's budget
        self.confirmed = {}  # model key -> result at the confirmation's budget, second seed
        self.rng = np.random.default_rng(settings["seed"])
        self.started = time.time()
        self.elapsed_before = 0.0  # seconds spent before a resume

    @property
    def results(self):
        """Evaluations by model key: genomes that compile to the same model share one result."""
        return {e["key"]: e for e in self.evaluations}

    def objectives(self, compacts):
        keys, results = OBJECTIVES[self.settings["objective"]], self.results
        rows = [[r[k] if r["status"] == "ok" and r.get(k) is not None else FAILED for k in keys]
                for r in (results[model_key(c)] for c in compacts)]
        return np.array(rows, dtype=float).reshape(len(rows), len(keys))

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
    """A version-2 checkpoint in version 3's names: 'batch' became 'pending'; 'extra', results under
    'seed:<key>' and 'confirm:<key>', became 'noise' and 'confirmed' keyed by model. Else as read."""
    if not (isinstance(state, dict) and state.get("version") == 2 and isinstance(state.get("extra"), dict)):
        return state
    state = {**state, "version": 3, "noise": {}, "confirmed": {}}
    if "batch" in state:
        state["pending"] = state.pop("batch")
    for key, entry in state.pop("extra").items():
        stage, _, model = key.partition(":")
        if stage not in ("seed", "confirm"):
            raise ValueError(f"extra: unknown entry {key[:40]!r}")
        state["noise" if stage == "seed" else "confirmed"][model] = entry
    for entry in state["confirmed"].values():  # trained at the budget the settings then held
        if isinstance(entry, dict) and isinstance(state.get("settings"), dict):
            entry.setdefault("steps", state["settings"].get("confirm_steps"))
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
                       ("confirm_steps", (int,)), ("confirm_top", (int,)), ("probes", (bool,))):
        star.field(s, key, kinds, "settings")
    if s["objective"] not in OBJECTIVES:
        raise ValueError(f"unknown objective {s['objective']!r}; choose from {', '.join(OBJECTIVES)}")
    if s["preset_name"] not in star.PRESETS:
        raise ValueError(f"settings.preset_name: unknown preset {s['preset_name']!r}")
    try:
        star.check_preset(star.Preset(**s["preset"]))
    except TypeError as e:
        raise ValueError(f"settings.preset: {e}") from None
    numbers = ("population", "generations", "mutation", "threads", "confirm_steps", "confirm_top")
    for key in numbers + (("vocab_size",) if s["vocab_size"] is not None else ()):
        try:
            star.check_number(key, s[key])
        except ValueError as e:
            raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
    return s


def check_compact(compact, depths, where):
    try:
        g = gn.from_compact(star.field({"genome": compact}, "genome", (str,), where))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    problems = gn.validate(g)
    if problems or len(g) not in depths:
        raise ValueError(f"{where}: {problems[0] if problems else f'{len(g)} LIVs, the run has {depths[0]}'}")


def check_result(e, depths, where):
    """One trained model's entry: the fields the search and the report read."""
    check_compact(star.field(e, "compact", (str,), where), depths, where)
    if star.field(e, "status", (str,), where) not in ("ok", "failed"):
        raise ValueError(f"{where}.status is {e['status']!r}, not ok or failed")
    ppl = star.field(e, "ppl", (int, float, type(None)), where)
    if e["status"] == "ok" and not (ppl is not None and math.isfinite(ppl) and ppl >= 1):
        raise ValueError(f"{where}.ppl is {ppl!r} for a model that trained")
    for key in ("params", "cache_bytes"):
        star.field(e, key, (int, type(None)), where)
    for key in ("seconds", "train_seconds"):
        if not star.field(e, key, (int, float), where) >= 0:
            raise ValueError(f"{where}.{key} is negative")
    star.field(e, "summary", (str,), where)


def check_state(state):
    """The checkpoint's schema, so that a corrupt or hand-edited one is refused at start with the
    field that is wrong, not halfway through a generation."""
    if star.field(state, "version", (int,), "checkpoint") != VERSION:
        raise ValueError(f"version {state['version']}; this code reads version {VERSION}")
    s = check_settings(star.field(state, "settings", (dict,), "checkpoint"))
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
    for name, e in star.field(state, "baselines", (dict,), "checkpoint").items():
        if name not in SEARCH_BASELINES:
            raise ValueError(f"baselines: unknown baseline {name!r}")
        check_result(e, depths[1:], f"baselines.{name}")
    for stage in ("noise", "confirmed"):
        for key, e in star.field(state, stage, (dict,), "checkpoint").items():
            check_result(e, depths, f"{stage}.{key[:40]}")
            if model_key(e["compact"]) != key:
                raise ValueError(f"{stage}.{key[:40]} holds the result of another model ({e['compact'][:40]})")
            if stage == "confirmed" and not star.field(e, "steps", (int,), f"confirmed.{key[:40]}") >= 1:
                raise ValueError(f"confirmed.{key[:40]}.steps is {e['steps']}, not a budget")
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
    """Seconds left: the mean wall time of a model trained so far, times the models still to train
    (this generation's, the later generations'), plus the confirmation's models at its budget (they
    are trained, not probed or timed), / processes."""
    trained = run.evaluations + list(run.baselines.values())
    s = run.settings
    search = len({model_key(c) for c in run.pending} - set(run.results))
    search += (s["generations"] - run.generation - 1) * s["population"]
    confirm = 0
    if s["confirm_steps"]:
        done = sum(c.get("steps") == s["confirm_steps"] for c in run.confirmed.values())
        confirm = max(0, s["confirm_top"] + len(SEARCH_BASELINES) - done)
        confirm *= s["confirm_steps"] / s["preset"]["steps"]
    seconds = sum(e["seconds"] for e in trained) / max(1, len(trained))
    measure = sum(e.get("measure_seconds", 0.0) for e in trained) / max(1, len(trained))
    return (seconds * search + (seconds - measure) * confirm) / world


def report_generation(run, log):
    F = run.objectives(run.population)
    log(f"generation {run.generation} done: best {OBJECTIVES[run.settings['objective']][0]} {F[:, 0].min():.3f}, "
        f"front {len(non_dominated_sort(F)[0])}, "
        f"{run.elapsed() / 60:.1f} min so far{report.turnover_note(run.evaluations, run.generation)}")
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
                   help="steps of the confirmation stage (default 4x --steps; 0 skips it)")
    p.add_argument("--confirm-top", type=star.number("confirm_top"), default=None, metavar="K",
                   help="candidates confirmed beside the baselines (default 3)")
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


def settings_from_args(args, log):
    name = star.preset_name(args.preset or "auto")
    if (args.preset or "auto") == "auto":
        log(f"preset auto: {name} ({'CUDA found' if name == 'gpu' else 'no CUDA'})")
    preset = star.preset_from_args(args, name)
    defaults = DEFAULTS[name]

    def given(value, default):
        return default if value is None else value
    settings = {"objective": args.objective or "quality", "preset_name": name, "preset": dataclasses.asdict(preset),
                "population": given(args.population, defaults["population"]),
                "generations": given(args.generations, defaults["generations"]),
                "mutation": given(args.mutation, 0.1), "seed": preset.seed, "data": args.data,
                "vocab_size": args.vocab_size, "threads": given(args.threads, torch.get_num_threads()),
                "confirm_steps": given(args.confirm_steps, 4 * preset.steps), "confirm_top": given(args.confirm_top, 3)}
    settings["probes"] = bool(args.probes) or "recall_error" in OBJECTIVES.get(settings["objective"], ())
    return check_settings(settings)


def check_resume_conflicts(args, saved):
    """Flags given with --resume must agree with the run's settings; --generations and the
    confirmation's flags may change (they do not alter what was trained)."""
    given = {"objective": args.objective, "population": args.population, "mutation": args.mutation,
             "data": args.data, "vocab_size": args.vocab_size, "preset_name": args.preset, "threads": args.threads,
             "probes": args.probes}
    given.update({f.name: getattr(args, f.name) for f in dataclasses.fields(star.Preset)})
    for key, value in given.items():
        have = saved["preset"][key] if key in saved["preset"] else saved[key]
        if value is not None and value != have:
            flag = "--" + ("preset" if key == "preset_name" else key.replace("_", "-"))
            raise ValueError(f"--resume: {flag} {value} conflicts with the run's {have}")
    for key in ("generations", "confirm_steps", "confirm_top"):
        if getattr(args, key) is not None:
            saved[key] = getattr(args, key)


def open_run(args, world, log):
    """A new run, or the one in --resume (or in --out, when torchrun restarts a failed group)."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if world > 1 and not (args.out or args.resume):
        raise ValueError("a search under torchrun needs --out DIR (a restarted group resumes from it)")
    resume = args.resume or (args.out if restarted and os.path.exists(os.path.join(args.out, "checkpoint.json"))
                             else None)
    if resume:
        run = Run.load(resume)
        check_resume_conflicts(args, run.settings)
        log(f"resuming {resume} at generation {run.generation} ({len(run.evaluations)} candidates already trained)")
        return run
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(os.path.join(out, "checkpoint.json")):
        raise ValueError(f"{out} already holds a run: use --resume {out} or another --out")
    return Run(out, settings_from_args(args, log))


def main(argv=None):
    args = parse_args(argv)
    store, rank, world = workers.distributed()
    if rank > 0:
        return workers.serve(store, rank, world)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        run, evaluator = start(args, world, log)
    except ValueError as e:
        if store is not None:
            store.set("settings", json.dumps({"abort": str(e)}))
        star.fail(e)
    pool = workers.StoreWorkers(evaluator, store, rank, world) if store is not None else workers.Workers(evaluator)
    if store is not None:
        store.set("settings", json.dumps(run.settings))
    star.atomic_write(os.path.join(run.out, "evaluations.jsonl"), "".join(json.dumps(e) + "\n" for e in run.evaluations))
    s = run.settings
    log(f"STAR search: objective {s['objective']}, preset {s['preset_name']}, population {s['population']}, "
        f"{s['generations']} generations, {s['preset']['n_livs']} LIVs, on {s['device']} x {world} process(es), "
        f"{s['threads']} thread(s) each; writing to {run.out}\n{star.budget_note(evaluator.corpus, evaluator.preset)}")
    run.save()
    try:
        search(run, pool, log)
    except KeyboardInterrupt:  # everything finished is in the checkpoint already
        report.write_outputs(results(run))
        star.fail(f"interrupted: continue with python evolve.py --resume {run.out}")
    except NothingTrained as e:
        report.write_outputs(results(run))
        star.fail(e)
    finally:
        pool.close()
    report.write_outputs(results(run), log)


def start(args, world, log):
    """The run (new or resumed) on its device, and its evaluator; every check before any write."""
    run = open_run(args, world, log)
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
