"""Who trains the candidates of a search (paper section 4.2: every candidate is trained and scored
under the same budget): the Evaluator trains one genome at one stage; Workers runs a list of such
tasks in this process; StoreWorkers shares them among the processes of a torchrun group through
its key-value store. evolve.py hands each generation's tasks to one of these and records results.
"""
import dataclasses
import itertools
import json
import os
import sys
import threading
import time

import torch

import genome as gn
import probes
import star


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
        if self.preset.compile:  # every block variant now, so that no candidate compiles one
            star.warm_up(self.preset, self.corpus, device, log)
        self.latency = settings["objective"] == "quality-latency"
        self.probing, self.probes = settings["probes"], probes.tasks_for(settings["preset_name"])

    def __call__(self, compact, stage="search"):
        start, genome = time.time(), gn.from_compact(compact)
        result = star.train_candidate(genome, self.corpus, self.presets[stage], self.device, self.log)
        measured = time.time()
        if self.probing and stage == "search" and result["status"] == "ok":
            scores = star.probe(genome, self.preset, self.device, self.probes.values(), self.log)
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
