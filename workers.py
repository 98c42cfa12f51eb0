"""Who trains the candidates of a search (paper section 4.2: every candidate is trained and scored
under the same budget): the Evaluator trains one genome at one stage; Workers runs a list of such
tasks in this process; StoreWorkers shares them among the processes of a torchrun group through
its key-value store. evolve.py hands each generation's tasks to one of these and records results.
"""
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import threading
import time
import uuid

import torch

import config
import genome as gn
import star


class Evaluator:
    """Trains one genome at one stage of the run and scores it. Stages: 'search' (the first rung's
    budget, the search's seed), 'rung 1', 'rung 2'... (the later rungs' budgets, continued from the
    state kept at the rung below: star.train_candidate), 'confirm' (the target budget, from
    scratch, under a given seed) and 'large' (the confirmation's budget at --confirm-n-livs/
    --confirm-width; evolve.py hands it the genome already scaled). Kept states live in the run's
    directory (states/), so any process continues any model; a missing or unreadable one means a
    training from scratch, which ends the same (it only costs more). Latency is measured at the
    search stage if asked; the probes run at the search stage if asked, and at the confirmation
    too when they are the objective ('recall')."""

    def __init__(self, settings, device, log=None, out=None):
        self.preset = config.Preset(**settings["preset"])
        confirm = dataclasses.replace(self.preset, steps=settings["confirm_steps"] or self.preset.steps)
        large = dataclasses.replace(confirm, n_livs=settings.get("confirm_n_livs") or self.preset.n_livs,
                                    width=settings.get("confirm_width") or self.preset.width,
                                    compile=False)  # eager: a size the warm-up never saw (README: "Compilation")
        self.rungs = settings["rungs"]
        rungs = {stage(r): dataclasses.replace(self.preset, steps=b) for r, b in enumerate(self.rungs)}
        self.presets = {"confirm": confirm, "large": large, **rungs}
        self.corpus = star.Corpus(settings["data"], settings["vocab_size"]).check(self.preset)  # read once
        self.device, self.log, self.out = device, log, out
        if self.preset.compile:  # every block variant now, so that no candidate compiles one
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # under torchrun, every process warms up: share the CPUs
            star.warm_up(self.preset, self.corpus, device, log, jobs=max(1, config.compile_jobs() // local))
        self.latency = settings["objective"] == "quality-latency"
        self.probe_stages = {kind for kind, wanted in (("search", settings["probes"]),
                                                         ("confirm", settings["objective"] == "recall")) if wanted}
        self.probes = config.PROBES[settings["preset_name"]]

    def __call__(self, compact, kind="search", seed=None):
        start, genome = time.perf_counter(), gn.from_compact(compact)  # the clock training uses
        preset = dataclasses.replace(self.presets[kind], seed=self.preset.seed if seed is None else seed)
        rung = next((r for r in range(len(self.rungs)) if kind == stage(r)), None)
        resume = read_state(state_path(self.out, compact, self.rungs[rung - 1])) if rung and self.out else None
        keep = None
        if rung is not None and rung + 1 < len(self.rungs) and self.out:  # a model that may continue
            keep = lambda state: self.keep(state_path(self.out, compact, preset.steps), state)  # noqa: E731
        result = star.train_candidate(genome, self.corpus, preset, self.device, self.log, resume=resume, keep=keep)
        if transient(result):  # ours: out of memory or a device error may pass; retried once
            if self.log:
                self.log(f"  {result['error']}: retrying once")
            result = {**star.train_candidate(genome, self.corpus, preset, self.device, self.log, resume=resume,
                                             keep=keep), "retried": True}
            result["transient"] = transient(result)  # failed twice so: a resume tries it again
        measured = time.perf_counter()
        if kind in self.probe_stages and result["status"] == "ok":
            scores = star.probe(genome, preset, self.device, self.probes.values(), self.log)
            result.update(probes=scores.get("accuracy"), recall_error=1 - scores["mean"] if "mean" in scores else None,
                          **({"status": "failed", "error": scores["error"]} if scores["status"] != "ok" else {}))
        if self.latency and kind == "search" and result["status"] == "ok":
            import bench  # only the latency objective needs it
            try:
                result["latency_ms"] = bench.search_latency(genome, self.preset, self.corpus.vocab_size, self.device)
            except Exception as e:  # noqa: BLE001
                result.update(status="failed", error=f"latency: {type(e).__name__}: {e}"[:300])
        end = time.perf_counter()  # one sample, unrounded: rounding each apart made turnover -0.003 s
        return {**result, "seconds": end - start, "measure_seconds": end - measured}

    @staticmethod
    def keep(path, state):
        """Write a kept state; one that cannot be written (a full disk) only costs a later retraining."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            config.write_file(path, lambda f: torch.save(state, f), "kept state")
        except (OSError, ValueError) as e:
            print(f"warning: {e}; a promotion of this model will train it from scratch", file=sys.stderr)


def state_path(out, compact, steps):
    """Where a model's state kept at the decay of a `steps` budget lives (the search's seed)."""
    key = hashlib.sha1(gn.to_compact(gn.canonical(gn.from_compact(compact))).encode()).hexdigest()[:20]
    return os.path.join(out, "states", f"{key}-{steps}.pt")


def read_state(path):
    """A kept state, or None with a warning line (none kept, or a damaged file: the training starts
    from scratch, to the same result; star.start_training refuses one of another model)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and {"model", "optimizer", "step", "key"} <= set(state):
            return state
        problem = "not a kept state"
    except FileNotFoundError:
        problem = "none was kept"
    except Exception as e:  # noqa: BLE001
        problem = f"unreadable ({type(e).__name__})"
    print(f"warning: kept state {path}: {problem}; the model trains from scratch", file=sys.stderr, flush=True)
    return None


def stage(rung):
    """The Evaluator's stage of a training at this rung of --rungs: 'search' (the first), 'rung 1', ..."""
    return f"rung {rung}" if rung else "search"


def transient(result):
    """A failure that another attempt may not meet: out of memory, a CUDA or NCCL error."""
    error = result.get("error") or ""
    return result["status"] == "failed" and (error.startswith("out of memory") or "CUDA" in error or "NCCL" in error)


class Workers:
    """Trains tasks, (compact genome, stage, seed) triples, in this process one after the other."""
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
    as 'job/<n>/<i>'; rank 0's main thread records each result as it arrives.

    Leases (ours): while a process trains a task, a thread beats its counter 'job/<n>/<i>/beat'.
    A task whose beat stands still for `lease` seconds (a hung or stopped process) is handed out
    again as a retry ticket, which any free process takes, without restarting the group; the first
    result posted wins (the same training gives the same result). Processes stay in a job until
    rank 0 marks it done, since a retry may still come."""

    def __init__(self, evaluate, store, rank, world, lease=120.0):
        super().__init__(evaluate)
        self.store, self.rank, self.world, self.jobs, self.failure, self.lease = store, rank, world, 0, None, lease

    def map(self, tasks):
        if not tasks:
            return
        job, pending, seen = f"job/{self.jobs}", set(range(len(tasks))), {}
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
            self.reissue_expired(job, pending, seen)
            time.sleep(0 if ready else 0.05)
        self.store.set(f"{job}/done", "1")

    def reissue_expired(self, job, pending, seen):
        """Hand out again every taken task whose beat has not moved for a lease."""
        taken, now = self.store.add(f"{job}/next", 0), time.monotonic()
        for i in sorted(pending):
            if i >= taken:
                continue
            beat = self.store.add(f"{job}/{i}/beat", 0)
            if seen.get(i, (None,))[0] != beat:
                seen[i] = (beat, now)
            elif now - seen[i][1] > self.lease:
                self.store.set(f"{job}/retry/{self.store.add(f'{job}/retry/issued', 0)}", str(i))
                self.store.add(f"{job}/retry/issued", 1)
                seen[i] = (beat, now)
                print(f"task {i} of {job}: no beat for {self.lease:.0f} s, handed out again", flush=True)

    def work(self, job, tasks, keep_failure=False):
        """Take the job's tasks, then its retry tickets, until rank 0 marks it done (every rank runs this)."""
        try:
            while (i := self.next_task(job, len(tasks))) is not None:
                if self.store.check([f"{job}/{i}"]):
                    continue  # a retry of a task that its first process finished after all
                beating = threading.Event()
                threading.Thread(target=self.beat, args=(f"{job}/{i}/beat", beating), daemon=True).start()
                try:
                    result = self.evaluate(*tasks[i])
                finally:
                    beating.set()
                self.store.set(f"{job}/{i}", json.dumps({"result": result, "rank": self.rank}))
        except BaseException as e:  # noqa: BLE001 -- rank 0's thread hands its failure to the main thread
            if not keep_failure:
                raise
            self.failure = e

    def next_task(self, job, n):
        """The next untaken task, or else the next retry ticket once rank 0 issues it; None when done."""
        i = self.store.add(f"{job}/next", 1) - 1
        if i < n:
            return i
        ticket = self.store.add(f"{job}/retry/taken", 1) - 1
        while not self.store.check([f"{job}/done"]):
            if self.store.add(f"{job}/retry/issued", 0) > ticket:
                return int(self.store.get(f"{job}/retry/{ticket}"))
            time.sleep(0.1)
        return None

    def beat(self, key, stop):
        self.store.add(key, 1)
        while not stop.wait(self.lease / 4):
            self.store.add(key, 1)

    def close(self):
        self.store.set(f"job/{self.jobs}", "null")  # the other ranks stop


def distributed():
    """(store, shared, rank, world size) under torchrun, through its env:// rendezvous; else
    (None, None, 0, 1). `shared` outlives restarts of the group (the run id lives there); `store` is
    this group's own namespace (group_name), so that no key of a job repeats across restarts."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, None, 0, 1
    import torch.distributed as dist
    store, rank, world = next(dist.rendezvous("env://"))
    name = group_name(store, rank, world)
    return dist.PrefixStore(f"star/{name}", store), dist.PrefixStore("star/shared", store), rank, world


def group_name(store, rank, world):
    """A name no earlier group used (ours). torchrun's store outlives a restart, and an elastic
    membership change restarts the group without counting a restart, so neither the restart count
    nor fixed keys are safe. Rank 0 draws a fresh name and beats a counter under it until every
    other rank has joined; a rank that reads a name whose counter stands still (a dead group's)
    reads again."""
    if rank == 0:
        name = uuid.uuid4().hex
        store.set("star/group", name)
        while store.add(f"star/{name}/joined", 0) < world - 1:
            store.add(f"star/{name}/alive", 1)
            time.sleep(0.05)
        return name
    while True:
        while not store.check(["star/group"]):
            time.sleep(0.05)
        name = store.get("star/group").decode()
        beat = store.add(f"star/{name}/alive", 0)
        time.sleep(0.5)
        if store.add(f"star/{name}/alive", 0) != beat:
            store.add(f"star/{name}/joined", 1)
            return name


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
    workers = StoreWorkers(Evaluator(settings, device, log, settings["out"]), store, rank, world, settings["lease"])
    for n in itertools.count():
        tasks = wait_get(store, f"job/{n}")
        if tasks is None:
            return
        workers.work(f"job/{n}", tasks)
