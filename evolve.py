"""STAR's evolutionary search (paper section 4.2; README: "Where we depart from the paper"): NSGA-II over genomes.

    python evolve.py --objective quality            # lowest validation perplexity
    python evolve.py --objective quality-cache      # Pareto front of perplexity and cache bytes
    python evolve.py --resume runs/20261126-120000  # continue a killed run

The whole algorithm is in this file: fast non-dominated sorting, crowding distance, binary
tournament on (rank, crowding), 2-point crossover and per-gene mutation (genome.py), repair,
and elitist survival of parents plus children. Each candidate is trained and scored by
star.train_candidate under the same budget, data order and initialisation seed.
"""
import dataclasses
import itertools
import json
import math
import os
import sys
import threading
import time
from collections import Counter

import numpy as np
import torch

import genome as gn
import probes
import star

OBJECTIVES = {  # all minimised
    "quality": ("ppl",),
    "quality-size": ("ppl", "params"),
    "quality-cache": ("ppl", "cache_bytes"),
    "quality-latency": ("ppl", "latency_ms"),
    "quality-recall": ("ppl", "recall_error"),  # recall_error = 1 - mean accuracy of the capability probes
    "recall": ("recall_error",),
}
DEFAULTS = {"tiny": {"population": 8, "generations": 4}, "gpu": {"population": 16, "generations": 18}}
BASELINES = ("transformer++", "striped-mamba")
SINGLE_OBJECTIVE_ELITES = 2  # paper: 2 survivors carried over in single-objective runs
FAILED = 1e30  # the objective value of a failed candidate: worse than anything real
VERSION = 2  # of checkpoint.json

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
# The run: settings and checkpoint


class Run:
    """State of one search, checkpointed atomically after every trained model."""
    STATE = ("settings", "generation", "population", "batch", "evaluations", "baselines", "extra")

    def __init__(self, out, settings):
        self.out, self.settings = out, settings
        self.generation = 0
        self.population, self.batch = [], []  # compact genomes
        self.evaluations = []  # candidates at the search's budget, in order of completion
        self.baselines = {}  # name -> result at the search's budget
        self.extra = {}  # 'seed:<key>' (the noise floor) and 'confirm:<key>' (the confirmation) -> result
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
        for key in cls.STATE[1:]:
            setattr(run, key, state[key])
        run.rng.bit_generator.state = state["rng"]
        run.elapsed_before = state["elapsed"]
        return run


# ---------------------------------------------------------------------------------------------
# Checks of a run's settings (new or resumed) and of a checkpoint's schema, at start


def check_settings(s):
    """A run's settings, from the command line or a checkpoint, checked in one place."""
    for key, kinds in (("objective", (str,)), ("preset_name", (str,)), ("preset", (dict,)), ("population", (int,)),
                       ("generations", (int,)), ("mutation", (int, float)), ("seed", (int,)),
                       ("data", (str, type(None))), ("vocab_size", (int, type(None))), ("threads", (int,)),
                       ("confirm_steps", (int,)), ("confirm_top", (int,)), ("probes", (bool,))):
        field(s, key, kinds, "settings")
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


def field(obj, key, kinds, where):
    """obj[key] if it is one of kinds (a bool is no int here); else a ValueError naming the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: no field '{key}'")
    value = obj[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{where}.{key} is {str(value)[:40]!r}, not {names}")
    return value


def check_compact(compact, depths, where):
    try:
        g = gn.from_compact(field({"genome": compact}, "genome", (str,), where))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    problems = gn.validate(g)
    if problems or len(g) not in depths:
        raise ValueError(f"{where}: {problems[0] if problems else f'{len(g)} LIVs, the run has {depths[0]}'}")


def check_result(e, depths, where):
    """One trained model's entry: the fields the search and the report read."""
    check_compact(field(e, "compact", (str,), where), depths, where)
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
    n = (s["preset"]["n_livs"],)
    depths = n + (max(2, n[0] // 2 * 2),)  # candidates, and baselines (an even depth)
    if field(state, "generation", (int,), "checkpoint") < 0:
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
        check_result(e, depths[1:], f"baselines.{name}")
    for key, e in field(state, "extra", (dict,), "checkpoint").items():
        if key.split(":")[0] not in ("seed", "confirm"):
            raise ValueError(f"extra: unknown entry {key[:40]!r}")
        check_result(e, depths, f"extra.{key[:40]}")
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


# ---------------------------------------------------------------------------------------------
# Training: one model at one stage, in this process or on every process of a torchrun group


class Evaluator:
    """Trains one genome at one stage of the run and scores it. Stages: 'search' (the search's
    budget), 'seed' (the same budget under the second seed: the noise floor) and 'confirm' (the
    confirmation's longer budget, second seed). Latency is measured at the search stage if asked."""

    def __init__(self, settings, device, log=None):
        self.preset = star.Preset(**settings["preset"])
        other_seed = dataclasses.replace(self.preset, seed=self.preset.seed + 1)
        steps = settings["confirm_steps"] or self.preset.steps
        self.presets = {"search": self.preset, "seed": other_seed, "confirm": dataclasses.replace(
            other_seed, steps=steps, warmup=round(self.preset.warmup * steps / self.preset.steps))}
        self.corpus = star.Corpus(settings["data"], settings["vocab_size"]).check(self.preset)  # read once
        self.device, self.log = device, log
        self.latency = settings["objective"] == "quality-latency"
        self.probing = settings["probes"]

    def __call__(self, compact, stage="search"):
        start, genome = time.time(), gn.from_compact(compact)
        result = star.train_candidate(genome, self.corpus, self.presets[stage], self.device, self.log)
        measured = time.time()
        if self.probing and stage == "search" and result["status"] == "ok":
            scores = probes.probe(genome, self.preset, self.device, log=self.log)
            result.update(probes=scores.get("accuracy"), recall_error=1 - scores["mean"] if "mean" in scores else None,
                          **({"status": "failed", "error": scores["error"]} if scores["status"] != "ok" else {}))
        if self.latency and stage == "search" and result["status"] == "ok":
            import bench  # only the latency objective needs it
            try:
                result["latency_ms"] = bench.search_latency(genome, self.preset, self.corpus.vocab_size, self.device)
            except Exception as e:  # noqa: BLE001
                result.update(status="failed", error=f"latency: {type(e).__name__}: {e}"[:300])
        return {**result, "seconds": round(time.time() - start, 2), "measure_seconds": round(time.time() - measured, 2)}


class Workers:
    """Trains tasks, (compact genome, stage) pairs, in this process one after the other."""
    rank, world = 0, 1

    def __init__(self, evaluate):
        self.evaluate = evaluate

    def map(self, tasks):
        """Yield (task index, result, rank that trained it) as each task finishes."""
        for i, task in enumerate(tasks):
            yield i, self.evaluate(*task), self.rank

    def close(self):
        pass


class StoreWorkers(Workers):
    """Every process of a torchrun group trains; rank 0 alone holds the population, the RNG, the
    checkpoint and the outputs, so the algorithm is exactly the single-process one.

    Through torchrun's key-value store: rank 0 publishes a job (its tasks) as 'job/<n>'; every
    process, rank 0's worker thread included, takes the next untrained task with an atomic counter
    (store.add), so a process that becomes free never waits for a slow one, and posts the result
    as 'job/<n>/<i>'; rank 0's main thread records each result as it arrives."""

    def __init__(self, evaluate, store, rank, world):
        super().__init__(evaluate)
        self.store, self.rank, self.world, self.jobs, self.failure = store, rank, world, 0, None

    def map(self, tasks):
        if not tasks:
            return
        job, pending = f"job/{self.jobs}", set(range(len(tasks)))
        self.jobs += 1
        self.store.set(job, json.dumps(tasks))
        threading.Thread(target=self.work, args=(job, tasks, True), daemon=True).start()
        while pending:
            ready = [i for i in sorted(pending) if self.store.check([f"{job}/{i}"])]
            if self.failure:
                raise self.failure
            for i in ready:
                pending.remove(i)
                posted = json.loads(self.store.get(f"{job}/{i}"))
                yield i, posted["result"], posted["rank"]
            time.sleep(0 if ready else 0.05)

    def work(self, job, tasks, keep_failure=False):
        """Take the job's tasks one at a time until none is left (every rank runs this)."""
        try:
            while (i := self.store.add(f"{job}/next", 1) - 1) < len(tasks):
                result = self.evaluate(*tasks[i])
                self.store.set(f"{job}/{i}", json.dumps({"result": result, "rank": self.rank}))
        except BaseException as e:  # noqa: BLE001 -- rank 0's thread hands its failure to the main thread
            if not keep_failure:
                raise
            self.failure = e

    def close(self):
        self.store.set(f"job/{self.jobs}", "null")  # the other ranks stop


def distributed():
    """(store, rank, world size) under torchrun, through its env:// rendezvous; else (None, 0, 1).
    The store outlives a restart of the group: keys are namespaced by torchrun's restart count."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    import torch.distributed as dist
    store, rank, world = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"star/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store), rank, world


def wait_get(store, key):
    while not store.check([key]):  # polled: a job may take longer than any store timeout
        time.sleep(0.1)
    return json.loads(store.get(key))


def rank_device(device):
    """Under torchrun every process trains on its own GPU, cuda:LOCAL_RANK; CPU processes share the CPU."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device.startswith("cuda") else device


def serve(store, rank, world):
    """A process of rank > 0: trains the tasks of each job that rank 0 publishes, until it says stop."""
    log = lambda s: print(f"[rank {rank}] {s}", flush=True)  # noqa: E731
    settings = wait_get(store, "settings")
    if "abort" in settings:  # rank 0 refused the run; it prints why
        sys.exit(1)
    torch.set_num_threads(settings["threads"])
    device = rank_device(settings["device"])
    log(f"worker pid {os.getpid()} on {device}, {settings['threads']} thread(s)")
    workers = StoreWorkers(Evaluator(settings, device, log), store, rank, world)
    for n in itertools.count():
        tasks = wait_get(store, f"job/{n}")
        if tasks is None:
            return
        workers.work(f"job/{n}", tasks)


# ---------------------------------------------------------------------------------------------
# The search


def fmt_result(r):
    return f"ppl {r['ppl']:.3f}" if r["status"] == "ok" else f"FAILED ({r.get('error')})"


def fmt_count(n):
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def record(compact, result, rank, **where):
    """A trained model's entry as the checkpoint keeps it."""
    g = gn.from_compact(compact)
    return {**where, "genome": g.tolist(), "compact": compact, "key": model_key(compact), "summary": gn.summary(g),
            "rank": rank, **result}


def describe(result, workers):
    latency = f"  latency {result['latency_ms']:.2f} ms" if "latency_ms" in result else ""
    return (f"{fmt_result(result)}  params {fmt_count(result['params'])}  cache {fmt_count(result['cache_bytes'])}B"
            f"{latency}  {result['seconds']:.1f}s" + (f"  (rank {result['rank']})" if workers.world > 1 else ""))


def evaluate_batch(run, workers, log):
    """Train the generation's genomes not trained yet, each distinct model once; checkpoint after each."""
    done, tasks, index = run.results, [], {}
    for i, compact in enumerate(run.batch):
        key, tag = model_key(compact), f"gen {run.generation:2d} cand {i + 1:2d}/{len(run.batch)}"
        if key in done or key in index:
            same = done[key]["compact"] if key in done else run.batch[index[key]]
            log(f"{tag}  {compact}  reused" + ("" if same == compact else f" (same model as {same})") +
                (f": {fmt_result(done[key])}" if key in done else ""))
        else:
            index[key] = i
            tasks.append((compact, "search"))
    for t, result, rank in workers.map(tasks):
        entry = record(tasks[t][0], result, rank, generation=run.generation)
        run.evaluations.append(entry)
        run.save()
        with open(os.path.join(run.out, "evaluations.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")
        log(f"gen {run.generation:2d} cand {index[entry['key']] + 1:2d}/{len(run.batch)}  {entry['compact']}  "
            f"{describe(entry, workers)}  ~{star.duration(time_left(run, workers.world))} left in the search")


def time_left(run, world=1):
    """Seconds left: the mean wall time of a model trained so far, times the models still to train
    (this generation's, the later generations'), plus the confirmation's models at its budget (they
    are trained, not probed or timed), / processes."""
    trained = run.evaluations + list(run.baselines.values())
    s = run.settings
    search = len({model_key(c) for c in run.batch} - set(run.results))
    search += (s["generations"] - run.generation - 1) * s["population"]
    confirm = 0
    if s["confirm_steps"]:
        confirmed = sum(k.startswith("confirm:") for k in run.extra)
        confirm = max(0, s["confirm_top"] + len(BASELINES) - confirmed) * s["confirm_steps"] / s["preset"]["steps"]
    seconds = sum(e["seconds"] for e in trained) / max(1, len(trained))
    measure = sum(e.get("measure_seconds", 0.0) for e in trained) / max(1, len(trained))
    return (seconds * search + (seconds - measure) * confirm) / world


def baseline_compacts(run):
    n = max(2, run.settings["preset"]["n_livs"] // 2 * 2)  # baselines need an even depth
    return {name: gn.to_compact(gn.baseline(name, n)) for name in BASELINES}


def noise_entry(run):
    """Transformer++ retrained under the second seed at the search's budget, if done."""
    return run.extra.get("seed:" + model_key(baseline_compacts(run)[BASELINES[0]]))


def run_baselines(run, workers, log):
    """Both baselines at the search's budget, and Transformer++ once more under the second seed:
    the spread of the two is the noise floor the report states beside every margin."""
    names = {c: name for name, c in baseline_compacts(run).items()}
    tasks = [(c, "search") for c, name in names.items() if name not in run.baselines]
    if noise_entry(run) is None:
        tasks.append((baseline_compacts(run)[BASELINES[0]], "seed"))
    for t, result, rank in workers.map(tasks):
        compact, stage = tasks[t]
        entry = record(compact, result, rank, stage=stage)
        if stage == "seed":
            run.extra["seed:" + entry["key"]] = entry
        else:
            run.baselines[names[compact]] = entry
        run.save()
        log(f"baseline {names[compact] + (' (second seed)' if stage == 'seed' else ''):27s} {describe(entry, workers)}")


class NothingTrained(RuntimeError):
    pass


def check_something_trained(run):
    """A search in which every model failed has nothing to report: stop with the first error."""
    trained = run.evaluations + list(run.baselines.values())
    if trained and not any(e["status"] == "ok" for e in trained):
        raise NothingTrained(f"every candidate and both baselines failed; the first error: {trained[0].get('error')}")


def next_population(run):
    """NSGA-II survival over parents + children among distinct models: a model found twice takes
    one place; duplicates fill places only when there are not enough distinct models."""
    union, first = run.population + run.batch, {}
    for i, compact in enumerate(union):
        first.setdefault(model_key(compact), i)
    F = run.objectives(union)
    parents = [i for i in first.values() if i < len(run.population)]
    children = [i for i in first.values() if i >= len(run.population)]
    chosen = [(parents + children)[i] for i in survivors(F[parents], F[children], run.settings["population"])]
    spare = sorted(set(range(len(union))) - set(chosen), key=lambda i: tuple(F[i]))
    return [union[i] for i in chosen + spare[: run.settings["population"] - len(chosen)]]


def search(run, workers, log=print):
    """The STAR loop: a random population, then generations of children and survival; then the
    confirmation of the best at a longer budget."""
    s = run.settings
    run_baselines(run, workers, log)
    if not run.population and not run.batch:
        run.batch = [gn.to_compact(gn.random_genome(s["preset"]["n_livs"], run.rng)) for _ in range(s["population"])]
        run.save()
    while True:
        if run.batch:  # a generation to finish (on resume: part of it may be done)
            evaluate_batch(run, workers, log)
            check_something_trained(run)
            run.population, run.batch = next_population(run), []
            run.save()
            report_generation(run, log)
        if run.generation + 1 >= s["generations"]:
            break
        children = make_children([gn.from_compact(c) for c in run.population], run.objectives(run.population),
                                 s["population"], run.rng, gn.crossover,
                                 lambda g, rng: gn.mutate(g, rng, s["mutation"]))
        run.generation, run.batch = run.generation + 1, [gn.to_compact(c) for c in children]
        run.save()
    confirm(run, workers, log)


def confirm_set(run):
    """The search entries to confirm: the top K distinct candidates (one objective) or K spread
    along the front from its lowest perplexity (several), then the baselines."""
    table, k = final_table(run), run.settings["confirm_top"]
    if len(OBJECTIVES[run.settings["objective"]]) > 1 and len(table) > k:
        table = [table[i] for i in sorted(set(np.linspace(0, len(table) - 1, k).round().astype(int)))]
    chosen = table[:k] + [run.baselines[name] for name in BASELINES if run.baselines[name]["status"] == "ok"]
    return list({e["key"]: e for e in chosen}.values())


def confirm(run, workers, log):
    """Retrain the confirm_set at the confirmation's longer budget, all under the second seed
    (common random numbers among themselves): how far the search's verdicts hold."""
    s = run.settings
    tasks = [(e["compact"], "confirm") for e in confirm_set(run) if "confirm:" + e["key"] not in run.extra]
    if not s["confirm_steps"] or not tasks:
        return
    log(f"confirmation: {len(tasks)} models retrained for {s['confirm_steps']} steps under seed {s['seed'] + 1}")
    for t, result, rank in workers.map(tasks):
        entry = record(tasks[t][0], result, rank, stage="confirm")
        run.extra["confirm:" + entry["key"]] = entry
        run.save()
        log(f"confirm {entry['summary'][:40]:40s} {describe(entry, workers)}")


def report_generation(run, log):
    F = run.objectives(run.population)
    log(f"generation {run.generation} done: best {OBJECTIVES[run.settings['objective']][0]} {F[:, 0].min():.3f}, "
        f"front {len(non_dominated_sort(F)[0])}, "
        f"{run.elapsed() / 60:.1f} min so far{turnover_note(run)}")
    write_outputs(run)


def turnover(entry):
    """Seconds of a candidate outside steady-state training steps: building, compiling (the first
    step), evaluation, bookkeeping -- the time between one candidate's training and the next's.
    Measurements that an objective asks for (probes, latency) are work, not turnover."""
    steady = entry["train_seconds"] - entry.get("first_step_seconds", 0.0)
    return entry["seconds"] - steady - entry.get("measure_seconds", 0.0)


def turnover_note(run):
    ok = [e for e in run.evaluations if e["generation"] == run.generation and e["status"] == "ok"]
    if not ok:
        return ""
    mean_turnover = sum(map(turnover, ok)) / len(ok)
    mean_train = sum(e["train_seconds"] for e in ok) / len(ok)
    return (f"; {sum(e['seconds'] for e in ok) / len(ok):.1f} s per candidate, turnover {mean_turnover:.2f} s "
            f"({100 * mean_turnover / max(mean_train, 1e-9):.1f}% of training)")


# ---------------------------------------------------------------------------------------------
# Results: report.md, best_genome.json, figures; written after every generation and at the end


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
    pairs = [(labels[e["key"]], e, run.extra.get("confirm:" + e["key"])) for e in confirm_set(run)]
    return [(label, e, c) for label, e, c in pairs if c and c["status"] == "ok"]


def best_genomes(run):
    """(the search's best entry, the confirmed best entry or None: confirmation retrains perplexity)."""
    key = OBJECTIVES[run.settings["objective"]][0]
    ok = [e for e in run.evaluations if e["status"] == "ok"]
    search_best = min(ok, key=lambda e: e[key]) if ok else None
    evolved = [(c["ppl"], e) for label, e, c in confirmed_pairs(run) if label.startswith("#") and key == "ppl"]
    return search_best, (min(evolved, key=lambda pair: pair[0])[1] if evolved else None)


def spearman(a, b):
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def pct(value, base):
    return f"{100 * (value - base) / base:+.1f}%"


def cell(text):
    return str(text).replace("|", "\\|")  # a '|' would split a markdown table cell


def table(header, rows):
    return ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def confirmation_section(run):
    s, pairs = run.settings, confirmed_pairs(run)
    base, steps = s["preset"]["steps"], s["confirm_steps"]
    if not steps:
        return ["Confirmation skipped (--confirm-steps 0): the numbers below hold at the search's budget only.", ""]
    if not pairs:
        return [f"Confirmation at {steps} steps: not run yet (it follows the last generation).", ""]
    again = {name: next((c for label, _, c in pairs if label == name), None) for name in BASELINES}
    rows = []
    for label, e, c in pairs:
        margins = [f"{pct(e['ppl'], run.baselines[n]['ppl'])} → {pct(c['ppl'], again[n]['ppl'])}" if again[n] else "-"
                   for n in BASELINES]
        rows.append([label, f"`{e['summary']}`", f"{e['ppl']:.3f}", f"{c['ppl']:.3f}"] + margins)
    rho = spearman([e["ppl"] for _, e, _ in pairs], [c["ppl"] for _, _, c in pairs])
    lines = [f"## Confirmed result: {len(pairs)} models retrained for {steps} steps (search: {base}), "
             f"seed {s['seed'] + 1}", "", verdict(run, pairs, again), "",
             *table(["model", "architecture", f"ppl, {base} steps", f"ppl, {steps} steps"] +
                    [f"vs {n}, {base} → {steps} steps" for n in BASELINES], rows), "",
             f"Spearman's rank correlation of perplexity between the two budgets over these {len(pairs)} models: "
             f"{rho:.2f} (1: the search's order holds; 0: no relation).", ""]
    return lines


def verdict(run, pairs, again):
    """One sentence: is the search's best still the best, and still ahead of every baseline?"""
    evolved = [(label, e, c) for label, e, c in pairs if label.startswith("#")]
    if not evolved:
        return "No evolved candidate was confirmed."
    label, e, c = min(evolved, key=lambda t: t[1]["ppl"])
    best = min(evolved, key=lambda t: t[2]["ppl"])
    behind = [n for n in BASELINES if again[n] and c["ppl"] >= again[n]["ppl"]]
    ahead = ", ".join(f"{n} by {100 * (again[n]['ppl'] - c['ppl']) / again[n]['ppl']:.1f}%"
                      for n in BASELINES if again[n] and n not in behind)
    first = (f"The search's best ({label}) is still the best confirmed candidate at {run.settings['confirm_steps']} steps"
             if best[0] == label else f"The search's best ({label}) is no longer the best at "
             f"{run.settings['confirm_steps']} steps ({best[0]} is)")
    return first + (f" and still ahead of every baseline ({ahead})." if not behind else
                    f", and no longer ahead of {', '.join(behind)}" + (f" (still ahead of {ahead})." if ahead else "."))


def context_lines(run):
    """The noise floor and evolution against random search: how to read the margins."""
    lines, s = [], run.settings
    first, noise = run.baselines.get(BASELINES[0]), noise_entry(run)
    if first and noise and first["status"] == noise["status"] == "ok":
        spread = 100 * abs(first["ppl"] - noise["ppl"]) / first["ppl"]
        lines.append(f"- Noise floor: {BASELINES[0]} retrained under seed {s['seed'] + 1} at the search's budget reached "
                     f"ppl {noise['ppl']:.3f} against {first['ppl']:.3f} under seed {s['seed']} ({spread:.1f}% apart); "
                     f"margins smaller than this are within seed noise.")
    randoms = [e for e in run.evaluations if e["generation"] == 0 and e["status"] == "ok"]
    search_best, _ = best_genomes(run)
    if randoms and search_best:
        best0 = min(e["ppl"] for e in randoms)
        keys = OBJECTIVES[s["objective"]]
        line = (f"- Evolution against random search: the best of the {len(randoms)} random genomes of generation 0 "
                f"reached ppl {best0:.3f}, the final best {search_best['ppl']:.3f} "
                f"({100 * (best0 - search_best['ppl']) / best0:.1f}% lower).")
        for name, b in run.baselines.items():
            if b["status"] == "ok" and all(b.get(k) is not None for k in keys):
                n = sum(all(e.get(k) is not None and e[k] < b[k] for k in keys) for e in randoms)
                line += f" {n} of {len(randoms)} random genomes already beat {name} on every objective ({', '.join(keys)})."
        lines.append(line)
    return lines + ([""] if lines else [])


def write_report(run, figures=()):
    s, keys = run.settings, OBJECTIVES[run.settings["objective"]]
    top = final_table(run)
    lines = [f"# STAR search: objective `{s['objective']}`", "",
             f"Preset `{s['preset_name']}` ({', '.join(f'{k}={v}' for k, v in s['preset'].items())}); "
             f"population {s['population']}, {s['generations']} generations, mutation {s['mutation']}, "
             f"seed {s['seed']}, {s['threads']} thread(s), data {s['data'] or 'embedded Shakespeare (bytes)'}, "
             f"device {s['device']}. {len(run.evaluations)} candidates trained in {run.elapsed() / 60:.1f} min.", ""]
    lines += confirmation_section(run) + context_lines(run)
    if "latency_ms" in keys:
        lines += [f"Latency: {s.get('latency_note', '')}", ""]
    title = f"Top 10 by {keys[0]}" if len(keys) == 1 else "Pareto front of the final population"
    extra = [("latency ms", lambda e: f"{e['latency_ms']:.2f}")] if "latency_ms" in keys else []
    if s["probes"]:
        extra += [(f"{t} acc", lambda e, t=t: f"{e['probes'][t]:.2f}") for t in probes.TASKS]
        extra += [("probe mean", lambda e: f"{1 - e['recall_error']:.2f}")]
    rows = []
    for label, e in [(f"#{i + 1} (gen {e['generation']})", e) for i, e in enumerate(top)] + \
            [(f"baseline {name}", e) for name, e in run.baselines.items()]:
        ok = e["status"] == "ok"
        margins = [pct(e["ppl"], b["ppl"]) if ok and b["status"] == "ok" else "-" for b in run.baselines.values()]
        rows.append([label, f"`{e['summary']}`", f"{e['ppl']:.3f}" if ok else "failed", *margins,
                     f"{e['params']:,}" if e["params"] else "-", f"{e['cache_bytes']:,}" if e["cache_bytes"] else "0"] +
                    [show_or_dash(fmt, e) for _, fmt in extra])
    lines += [f"## {title}, with the baselines (same budget: {s['preset']['steps']} steps, seed {s['seed']})", "",
              *table(["", "architecture", "ppl", *[f"ppl vs {n}" for n in run.baselines], "params", "cache bytes"]
                     + [name for name, _ in extra], rows)]
    lines += motif_section(run, top)
    failed = [e for e in run.evaluations if e["status"] != "ok"]
    if failed:
        lines += ["", f"## Failed candidates ({len(failed)})", ""]
        lines += [f"- gen {e['generation']} `{e['compact']}`: {e.get('error')}" for e in failed]
    lines += ["", "## Figures", ""] + ([f"![{name}]({name}.png)" for name in figures] if figures else
                                       ["No figures: `pip install matplotlib`, then `python evolve.py --resume "
                                        f"{run.out}` draws them."])
    lines += ["", "## Legend", ""] + gn.legend()
    atomic_write(os.path.join(run.out, "report.md"), "\n".join(lines) + "\n")


def show_or_dash(fmt, entry):
    try:
        return fmt(entry)
    except (KeyError, TypeError):  # not measured for this model (or it failed)
        return "-"


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


def motif_section(run, top):
    c0, s0, _, n0 = motif_counts([e["compact"] for e in run.evaluations if e["generation"] == 0])
    c1, s1, pairs, n1 = motif_counts([e["compact"] for e in top])
    return recall_motifs(run) + ["", "## Motifs: final front/top against the initial population", "",
            *table(["LIV class", "share of LIVs, final", "share of LIVs, initial"],
                   [[n, f"{100 * c1[n] / n1:.0f}%", f"{100 * c0[n] / n0:.0f}%"] for n, _ in (c1 + c0).most_common()]),
            "", *table(["sharing", "LIVs that share, final", "initial"],
                       [[n, f"{100 * s1[n] / n1:.0f}%", f"{100 * s0[n] / n0:.0f}%"] for n, _ in (s1 + s0).most_common()]),
            "", "Most frequent adjacent class pairs in the final front/top: " +
            (", ".join(f"{a} -> {b} ({n})" for (a, b), n in pairs.most_common(5)) or "none")]


def recall_motifs(run):
    """Which classes the recall-capable candidates (>= 90% on in-context recall) use, against all probed."""
    probed = [e for e in run.evaluations if (e.get("probes") or {}).get("recall") is not None]
    capable = [e for e in probed if e["probes"]["recall"] >= 0.9]
    if not probed:
        return []
    c_all, _, _, n_all = motif_counts([e["compact"] for e in probed])
    c_cap, _, _, n_cap = motif_counts([e["compact"] for e in capable])
    return ["", f"## Capability: {len(capable)} of {len(probed)} probed candidates are recall-capable "
                "(>= 90% on in-context recall)", "",
            *table(["LIV class", "share of LIVs, recall-capable", "share of LIVs, all probed"],
                   [[n, f"{100 * c_cap[n] / n_cap:.0f}%", f"{100 * c_all[n] / n_all:.0f}%"]
                    for n, _ in (c_cap + c_all).most_common()])]


def write_outputs(run, log=None):
    """report.md, best_genome.json (the confirmed best once confirmed; the search's best is kept as
    search_best_genome.json when they differ) and the figures, if matplotlib is installed."""
    search_best, confirmed_best = best_genomes(run)
    best = confirmed_best or search_best
    if best:
        atomic_write(os.path.join(run.out, "best_genome.json"), gn.to_json(best["genome"]))
    if confirmed_best and search_best and confirmed_best["key"] != search_best["key"]:
        atomic_write(os.path.join(run.out, "search_best_genome.json"), gn.to_json(search_best["genome"]))
    try:
        import plots
        figures = plots.run_figures(run)
    except ImportError:  # matplotlib is optional
        figures = ()
    write_report(run, figures)
    if log:
        log(f"results in {run.out}: report.md, best_genome.json, evaluations.jsonl" +
            (", " + ", ".join(f"{f}.png" for f in figures) if figures else ""))


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
    store, rank, world = distributed()
    if rank > 0:
        return serve(store, rank, world)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        run = open_run(args, world, log)
        device = star.resolve_device(args.device)
        run.settings["device"] = device
        torch.set_num_threads(run.settings["threads"])
        if run.settings["objective"] == "quality-latency":
            import bench
            run.settings["latency_note"] = bench.search_latency_note(device)
        evaluator = Evaluator(run.settings, rank_device(device) if world > 1 else device, log if world == 1 else lambda s: log(f"[rank 0] {s}"))
        star.output_dir(run.out)  # created only once everything else has been checked
    except ValueError as e:
        if store is not None:
            store.set("settings", json.dumps({"abort": str(e)}))
        star.fail(e)
    workers = StoreWorkers(evaluator, store, rank, world) if store is not None else Workers(evaluator)
    if store is not None:
        store.set("settings", json.dumps(run.settings))
    atomic_write(os.path.join(run.out, "evaluations.jsonl"), "".join(json.dumps(e) + "\n" for e in run.evaluations))
    s = run.settings
    log(f"STAR search: objective {s['objective']}, preset {s['preset_name']}, population {s['population']}, "
        f"{s['generations']} generations, {s['preset']['n_livs']} LIVs, on {device} x {world} process(es), "
        f"{s['threads']} thread(s) each; writing to {run.out}\n{star.budget_note(evaluator.corpus, evaluator.preset)}")
    run.save()
    try:
        search(run, workers, log)
    except KeyboardInterrupt:  # everything finished is in the checkpoint already
        write_outputs(run)
        star.fail(f"interrupted: continue with python evolve.py --resume {run.out}")
    except NothingTrained as e:
        write_outputs(run)
        star.fail(e)
    finally:
        workers.close()
    write_outputs(run, log)


if __name__ == "__main__":
    main()
