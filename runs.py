"""A search's run: its state, checkpointed after every trained model, the checks of a checkpoint
and of the settings (one place for each), the upgrades of older checkpoints, and evolve.py's
command line, which opens a new run or resumes one. evolve.py holds the algorithm that moves the
state; this module only keeps it safe.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import uuid

import numpy as np
import torch

import config
import genome as gn
import probes
import star
import workers

VERSION = 8  # of checkpoint.json (versions 2 to 7 are read too: Run.load)
FAILED = 1e30  # the objective value of a failed candidate: worse than anything real


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
                if rung is None and e["status"] != "ok" and first["status"] == "ok" and first["rung"] < e["rung"]:
                    continue  # failed higher up: it stands at the highest rung it reached with a result
                merged[e["key"]] = {**first, **e, "generation": first["generation"]}
        return {k: e for k, e in merged.items() if rung is None or e["rung"] == rung}

    def candidates(self):
        """One entry per distinct trained model, in order of first training, at its highest rung."""
        results = self.at_rung()
        return list({e["key"]: results[e["key"]] for e in self.evaluations}.values())

    def objectives(self, compacts, rung=None):
        keys, results = config.OBJECTIVES[self.settings["objective"]], self.at_rung(rung)
        rows = [[r[k] if r["status"] == "ok" and r.get(k) is not None else FAILED for k in keys]
                for r in (results[model_key(c)] for c in compacts)]
        return np.array(rows, dtype=float).reshape(len(rows), len(keys))

    def levels(self, compacts):
        """The highest rung each model reached: selection compares results there, higher first."""
        results = self.at_rung()
        return np.array([results[model_key(c)]["rung"] for c in compacts], dtype=int)

    def elapsed(self):
        return self.elapsed_before + time.time() - self.started

    def save(self):
        state = {"version": VERSION, **{k: getattr(self, k) for k in self.STATE},
                 "rng": self.rng.bit_generator.state, "elapsed": self.elapsed()}
        config.write_file(os.path.join(self.out, "checkpoint.json"), json.dumps(state))

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
    """An older checkpoint in version 7's names; else as read. Version 2 -> 3: 'batch' became
    'pending'; 'extra', results under 'seed:<key>' and 'confirm:<key>', became 'noise' and
    'confirmed' keyed by model. 3 -> 4: the noise run is gone (the spread is measured over the
    confirmation's seeds); confirmed results are keyed 'confirm/<seed>/<key>', the seed the search's
    + 1; the settings gain the confirmation's new flags, off. 4 -> 5: one rung, the search's budget. 5 -> 6: the lr schedule
    of those trainings, cosine after the warm-up (decay 1.0); promotion by the top quarter (eta 4). 6 -> 7: a random
    generation 0 (init 'random'). 7 -> 8: the catalogue prior."""
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        return state
    if state.get("version") == 2 and isinstance(state.get("extra"), dict):
        state = {**state, "version": 3, "confirmed": {}}
        if "batch" in state:
            state["pending"] = state.pop("batch")
        for key, entry in state.pop("extra").items():
            stage, _, model = key.partition(":")
            if stage not in ("seed", "confirm"):
                raise ValueError(f"extra: unknown entry {key[:40]!r}")
            if stage == "confirm":  # 'seed:' entries were the noise run, which version 4 drops
                state["confirmed"][model] = entry
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
    if state.get("version") == 5 and isinstance(state["settings"].get("preset"), dict):
        state = {**state, "version": 6, "settings": {"eta": 4, **state["settings"],
                                                     "preset": {"decay": 1.0, **state["settings"]["preset"]}}}
    if state.get("version") == 6:
        state = {**state, "version": 7, "settings": {"init": "random", **state["settings"]}}
    if state.get("version") == 7:
        state = {**state, "version": 8, "settings": {"prior": "catalogue", **state["settings"]}}
    return state


def model_key(compact):
    return gn.to_compact(gn.canonical(gn.from_compact(compact)))


def check_settings(s):
    """A run's settings, from the command line or a checkpoint, checked in one place."""
    for key, kinds in (("objective", (str,)), ("preset_name", (str,)), ("preset", (dict,)), ("population", (int,)),
                       ("generations", (int,)), ("mutation", (int, float)), ("seed", (int,)),
                       ("data", (str, type(None))), ("vocab_size", (int, type(None))), ("threads", (int,)),
                       ("confirm_steps", (int,)), ("confirm_top", (int,)), ("probes", (bool,)),
                       ("confirm_seeds", (int,)), ("rank_check", (int,)), ("random_search", (bool,)),
                       ("confirm_n_livs", (int, type(None))), ("confirm_width", (int, type(None))),
                       ("run_id", (str,)), ("rungs", (list,)), ("eta", (int,)), ("init", (str,)), ("prior", (str,))):
        config.field(s, key, kinds, "settings")
    if s["init"] not in ("random", "hybrids"):
        raise ValueError(f"settings.init: {s['init']!r} is not random or hybrids")
    if s["prior"] not in gn.PRIORS:
        raise ValueError(f"settings.prior: {s['prior']!r} is not {' or '.join(gn.PRIORS)}")
    if s["objective"] not in config.OBJECTIVES:
        raise ValueError(f"unknown objective {s['objective']!r}; choose from {', '.join(config.OBJECTIVES)}")
    if "recall_error" in config.OBJECTIVES[s["objective"]] and not s["probes"]:
        raise ValueError(f"settings: objective {s['objective']} needs the probes, but probes is off")
    if s["preset_name"] not in config.PRESETS:
        raise ValueError(f"settings.preset_name: unknown preset {s['preset_name']!r}")
    missing = [f.name for f in dataclasses.fields(config.Preset) if f.name not in s["preset"]]
    if missing:
        raise ValueError(f"settings.preset lacks {', '.join(missing)}")
    try:
        config.check_preset(config.Preset(**s["preset"]))
    except TypeError as e:
        raise ValueError(f"settings.preset: {e}") from None
    numbers = ("population", "generations", "mutation", "threads", "confirm_steps", "confirm_top", "confirm_seeds",
               "rank_check", "eta")
    for key in numbers + tuple(k for k in ("vocab_size", "confirm_n_livs", "confirm_width") if s[k] is not None):
        try:
            config.check_number(key, s[key])
        except ValueError as e:
            raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
    if s["init"] == "hybrids" and s["preset"]["n_livs"] % 2:
        raise ValueError(f"--init hybrids: the baselines need an even --n-livs, not {s['preset']['n_livs']}")
    check_rungs(s["rungs"], s["preset"]["steps"])
    if large_size(s):
        n, n_livs = s["preset"]["n_livs"], large_size(s)[0]
        if n_livs % n:
            raise ValueError(f"--confirm-n-livs {n_livs} is not a multiple of the search's {n} LIVs (a stacked copy)")
        try:
            config.check_preset(config.Preset(**{**s["preset"], "n_livs": n_livs, "width": large_size(s)[1]}))
        except ValueError as e:
            raise ValueError(f"--confirm-width/--confirm-n-livs: {e}") from None
    return s


def check_rungs(rungs, steps):
    if not rungs or not all(isinstance(b, int) and not isinstance(b, bool) for b in rungs):
        raise ValueError(f"--rungs: {rungs!r} is not a list of step budgets")
    for b in rungs:
        config.check_number("steps", b)
    if rungs[0] != steps or any(a >= b for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"--rungs {','.join(map(str, rungs))}: the budgets must rise, from the search's "
                         f"--steps {steps}")


def plan_problems(s):
    """Settings that cannot do what they say, in words: refused for a new run, a warning on resume
    (a run begun under older checks still finishes). Some model must reach the target (ASHA keeps
    the top 1/eta of at most population x generations candidates per rung); every rung below it
    must keep a state to continue from (its decay starts before its end: --warmup, --decay); the
    hybrids must fit the population."""
    rungs, n, p = s["rungs"], s["population"] * s["generations"], config.Preset(**s["preset"])
    problems = []
    if len(rungs) > 1 and n // s["eta"] ** (len(rungs) - 1) < 1:
        problems.append(f"--rungs {','.join(map(str, rungs))} --eta {s['eta']}: of at most {n} candidates "
                        f"(--population x --generations) none would reach {rungs[-1]} steps (the top 1/{s['eta']} "
                        f"continue at each rung); use fewer rungs, a lower --eta or more candidates")
    stuck = [b for b in rungs[:-1] if star.decay_start(dataclasses.replace(p, steps=b)) >= b]
    if stuck:
        problems.append(f"--warmup {p.warmup} --decay {p.decay}: the {stuck[0]}-step rung's decay would not start "
                        "before its end, so no state could be kept to continue from")
    if len(rungs) == 1 and p.warmup > rungs[0]:
        problems.append(f"--warmup {p.warmup} is longer than the {rungs[0]}-step budget")
    if s["init"] == "hybrids" and s["population"] < len(config.SEARCH_BASELINES):
        problems.append(f"--init hybrids: --population {s['population']} cannot hold the "
                        f"{len(config.SEARCH_BASELINES)} hybrids")
    return problems


def setting_warnings(args, s):
    """Flags a run can go on with, though they do nothing or less than they say: one line each."""
    n = s["population"] * s["generations"]
    return (plan_problems(s) if args.resume else []) + [line for wanted, line in (
        (args.eta is not None and len(s["rungs"]) == 1, f"--eta {args.eta} does nothing with one rung"),
        (args.confirm_seeds is not None and not s["confirm_steps"],
         f"--confirm-seeds {args.confirm_seeds} does nothing with --confirm-steps 0 (no confirmation)"),
        (args.rank_check is not None and args.rank_check + s["confirm_top"] > n,
         f"--rank-check {args.rank_check}: the search trains at most {n} candidates; the rank check takes what "
         "there is")) if wanted]


def check_compact(compact, depths, where):
    try:
        g = gn.from_compact(config.field({"genome": compact}, "genome", (str,), where))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    problems = gn.validate(g)
    if problems or (depths and len(g) not in depths):
        raise ValueError(f"{where}: {problems[0] if problems else f'{len(g)} LIVs, the run has {depths[0]}'}")


def check_result(e, depths, where):
    """One trained model's entry: every field a run writes, each of its kind and range, and the
    fields that name the model (compact, genome, key, summary) naming the same one."""
    check_compact(config.field(e, "compact", (str,), where), depths, where)
    g = gn.from_compact(e["compact"])
    if config.field(e, "genome", (list,), where) != g.tolist() or config.field(e, "key", (str,), where) != model_key(
            e["compact"]) or config.field(e, "summary", (str,), where) != gn.summary(g):
        raise ValueError(f"{where}: its genome, key or summary is not that of {e['compact'][:40]}")
    if config.field(e, "status", (str,), where) not in ("ok", "failed"):
        raise ValueError(f"{where}.status is {e['status']!r}, not ok or failed")
    ppl = config.field(e, "ppl", (int, float, type(None)), where)  # finite if a number (config.field)
    if e["status"] == "ok" and not (ppl is not None and ppl >= 1):
        raise ValueError(f"{where}.ppl is {ppl!r} for a model that trained")
    if e["status"] == "failed":
        config.field(e, "error", (str,), where)
    for key in ("params", "params_non_embedding", "cache_bytes", "rank", "steps_trained"):
        if e.get(key) is not None and config.field(e, key, (int,), where) < 0:
            raise ValueError(f"{where}.{key} is negative")
    for key in ("seconds", "train_seconds", "measure_seconds", "first_step_seconds", "eval_seconds",
                "tokens_per_second", "latency_ms"):
        if (key in e or key in ("seconds", "train_seconds")) and not config.field(e, key, (int, float), where) >= 0:
            raise ValueError(f"{where}.{key} is {e[key]!r}, not a finite number >= 0")
    check_probes(e, where)


def check_probes(e, where):
    """Probe scores: shares in [0, 1] of known tasks, and a recall error that is 1 - their mean."""
    scores, error = e.get("probes"), e.get("recall_error")
    if scores is None and error is None:
        return
    config.field(e, "probes", (dict,), where)
    for task, share in scores.items():
        if task not in probes.TASKS or not isinstance(share, (int, float)) or isinstance(share, bool) \
                or not 0 <= share <= 1:
            raise ValueError(f"{where}.probes.{str(task)[:20]} is {share!r}: not a share of a known task")
    error = config.field(e, "recall_error", (int, float), where)
    if not scores or abs(error - (1 - sum(scores.values()) / len(scores))) > 1e-9:
        raise ValueError(f"{where}.recall_error is {error!r}, not 1 - the mean of its probe scores")


def check_state(state):
    """The checkpoint's schema, so that a corrupt or hand-edited one is refused at start with the
    field that is wrong, not halfway through a generation."""
    if config.field(state, "version", (int,), "checkpoint") != VERSION:
        raise ValueError(f"version {state['version']}; this code reads version {VERSION}")
    s = check_settings(config.field(state, "settings", (dict,), "checkpoint"))
    config.field(s, "device", (str,), "settings")
    if "latency_note" in s:
        config.field(s, "latency_note", (str,), "settings")
    n = (s["preset"]["n_livs"],)
    depths = n + (gn.baseline_depth(n[0]),)  # candidates, and baselines
    if config.field(state, "generation", (int,), "checkpoint") < 0:
        raise ValueError(f"generation {state['generation']} is negative")
    for key in ("population", "pending"):
        for i, compact in enumerate(config.field(state, key, (list,), "checkpoint")):
            check_compact(compact, n, f"{key}[{i}]")
    for i, e in enumerate(config.field(state, "evaluations", (list,), "checkpoint")):
        check_result(e, n, f"evaluations[{i}]")
        if not 0 <= config.field(e, "generation", (int,), f"evaluations[{i}]") <= state["generation"]:
            raise ValueError(f"evaluations[{i}].generation is {e['generation']}, after the run's {state['generation']}")
        if not 0 <= config.field(e, "rung", (int,), f"evaluations[{i}]") < len(s["rungs"]):
            raise ValueError(f"evaluations[{i}].rung is {e['rung']}; the run has {len(s['rungs'])} rung(s)")
    later = {f"{n}@{b}": r for n in config.SEARCH_BASELINES for r, b in enumerate(s["rungs"][1:], 1)}
    for name, e in config.field(state, "baselines", (dict,), "checkpoint").items():
        if name not in config.SEARCH_BASELINES and name not in later:
            raise ValueError(f"baselines: unknown baseline {name[:40]!r}")
        check_result(e, depths[1:], f"baselines.{name}")
        if e.get("rung", 0) != later.get(name, 0):
            raise ValueError(f"baselines.{name}.rung is {e['rung']!r}, not the rung its name says")
    for key, e in config.field(state, "confirmed", (dict,), "checkpoint").items():
        where = f"confirmed.{key[:48]}"  # the larger size at any depth: the flags may change on resume
        check_result(e, None if config.field(e, "stage", (str,), where) == "large" else depths, where)
        seed, steps = config.field(e, "seed", (int,), where), config.field(e, "steps", (int,), where)
        if confirmed_key(e["compact"], e["stage"], seed) != key or e["stage"] not in ("confirm", "large"):
            raise ValueError(f"{where} holds the result of another model, stage or seed ({e['compact'][:40]}, "
                             f"{e['stage']}, seed {seed})")
        if steps < 1:
            raise ValueError(f"{where}.steps is {steps}, not a budget")
    try:
        np.random.default_rng().bit_generator.state = config.field(state, "rng", (dict,), "checkpoint")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"rng: not a PCG64 state ({type(e).__name__}: {e})") from None
    if not config.field(state, "elapsed", (int, float), "checkpoint") >= 0:
        raise ValueError("elapsed is negative")


NAMING = ("genome", "compact", "key", "summary", "rank", "rung", "generation", "stage", "seed", "steps")  # not results


def record(compact, result, rank, **where):
    """A trained model's entry as the checkpoint keeps it."""
    g = gn.from_compact(compact)
    return {**where, "genome": g.tolist(), "compact": compact, "key": model_key(compact), "summary": gn.summary(g),
            "rank": rank, **result}


def parse_args(argv):
    p = config.Parser(description="STAR evolutionary architecture search (NSGA-II over LIV genomes)")
    p.add_argument("--objective", default=None, help=f"one of {', '.join(config.OBJECTIVES)} (default quality)")
    p.add_argument("--mutation", type=config.number("mutation"), default=None, metavar="P",
                   help="per-gene mutation probability (default 0.1)")
    p.add_argument("--confirm-steps", type=config.number("confirm_steps"), default=None, metavar="N",
                   help="steps of the confirmation stage (default: the target, the last of --rungs; 0 skips it)")
    for flag, what, meta in (("population", "genomes per generation", "N"),
                             ("generations", "generations, the initial one included", "N"),
                             ("confirm_top", "best candidates confirmed beside the baselines", "K"),
                             ("confirm_seeds", "seeds each confirmed model is retrained under: the spread margins "
                                               "must clear", "K"),
                             ("rank_check", "candidates from the middle and bottom of the search confirmed too (two "
                                           "objectives: 0 by default)", "K")):
        p.add_argument("--" + flag.replace("_", "-"), type=config.number(flag), default=None, metavar=meta,
                       help=f"{what} ({per_preset(flag)})")
    p.add_argument("--confirm-n-livs", type=config.number("confirm_n_livs"), default=None, metavar="N",
                   help="also confirm at this depth (a multiple of --n-livs; candidates stacked), one seed")
    p.add_argument("--confirm-width", type=config.number("confirm_width"), default=None, metavar="W",
                   help="also confirm at this width, one seed")
    p.add_argument("--rungs", type=rung_list, default=None, metavar="STEPS,STEPS",
                   help="successive halving: the step budgets a model may continue to, the last the target "
                        "(the first is --steps; tiny 120,400,1200, gpu 375,3000; one rung if only --steps is given)")
    p.add_argument("--eta", type=config.number("eta"), default=None, metavar="N",
                   help=f"the best of a rung's results continue to the next while it holds under 1/N of them "
                        f"({per_preset('eta')})")
    p.add_argument("--random-search", action="store_true", default=None,
                   help="the equal-budget control: every generation drawn at random (no selection, crossover, mutation)")
    p.add_argument("--init", choices=("random", "hybrids"), default=None,
                   help="generation 0: random genomes (the paper), or the baselines and their mutants (default random)")
    p.add_argument("--prior", choices=gn.PRIORS, default=None,
                   help="how a random genome or a mutation draws a LIV's class: uniform over the catalogue (the paper; "
                        "the MLP at 1 place in 21), or balanced (ours: the MLP at half the places) (default balanced)")
    p.add_argument("--lease", type=config.number("lease"), default=120.0, metavar="SECONDS",
                   help="under torchrun: a task whose process shows no life for this long is trained elsewhere")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                   help="print finished runs side by side (e.g. a search and its --random-search control) and exit")
    p.add_argument("--probes", action="store_true", default=None,
                   help="also run the capability probes on every candidate (implied by the recall objectives)")
    p.add_argument("--threads", type=config.number("threads"), default=None, metavar="N",
                   help="torch threads per process, part of the run's settings (default: torch's, "
                        f"{torch.get_num_threads()} here)")
    config.add_data_args(p, device="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--out", default=None, help="output directory (default runs/<date>-<time>)")
    p.add_argument("--resume", default=None, help="continue the run in this directory")
    config.add_preset_args(p)
    p.set_defaults(preset=None)  # None: not given (on --resume, the run's own preset)
    return p.parse_args(argv)


def per_preset(key, unit=""):
    """'tiny 8, gpu 16': a search default as each preset sets it (config.SEARCH_DEFAULTS)."""
    return ", ".join(f"{name} {defaults[key]}{unit}" for name, defaults in config.SEARCH_DEFAULTS.items())


def rung_list(text):
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not step budgets separated by commas, e.g. 60,240") from None


def settings_from_args(args, log):
    name = config.preset_name(args.preset or "auto")
    if (args.preset or "auto") == "auto":
        log(f"preset auto: {name} ({'CUDA found' if name == 'gpu' else 'no CUDA'})")
    defaults = config.SEARCH_DEFAULTS[name]
    rungs = args.rungs or (defaults["rungs"] if args.steps is None else None)  # --steps alone: one rung
    if rungs and args.steps is None:
        args.steps = rungs[0]
    preset = config.preset_from_args(args, name)
    rungs = rungs or [preset.steps]

    def given(value, default):
        return default if value is None else value
    settings = {"objective": args.objective or "quality", "preset_name": name, "preset": dataclasses.asdict(preset),
                "population": given(args.population, defaults["population"]),
                "generations": given(args.generations, defaults["generations"]),
                "mutation": given(args.mutation, 0.1), "seed": preset.seed, "data": args.data,
                "vocab_size": args.vocab_size, "threads": given(args.threads, torch.get_num_threads()),
                "confirm_steps": given(args.confirm_steps, rungs[-1]),  # the target
                "confirm_n_livs": args.confirm_n_livs, "confirm_width": args.confirm_width,
                "random_search": bool(args.random_search), "run_id": uuid.uuid4().hex,
                "rungs": rungs, "eta": given(args.eta, defaults["eta"]), "init": args.init or "random",
                "prior": args.prior or "balanced"}
    if len(config.OBJECTIVES.get(settings["objective"], ())) > 1:  # ours: a front's confirmation spreads over it
        defaults = {**defaults, "rank_check": 0}                  # instead (evolve.finalists), within ~45 minutes
    for key in ("confirm_top", "confirm_seeds", "rank_check"):
        settings[key] = given(getattr(args, key), defaults[key])
    settings["probes"] = bool(args.probes) or "recall_error" in config.OBJECTIVES.get(settings["objective"], ())
    check_settings(settings)
    problems = plan_problems(settings)
    if problems:
        raise ValueError(problems[0])
    return settings


def check_resume_conflicts(args, saved):
    """Flags given with --resume must agree with the run's settings; --generations and the
    confirmation's flags may change (they do not alter what was trained), checked again."""
    given = {"objective": args.objective, "population": args.population, "mutation": args.mutation,
             "data": args.data, "vocab_size": args.vocab_size, "preset_name": args.preset, "threads": args.threads,
             "probes": args.probes, "random_search": args.random_search, "rungs": args.rungs, "eta": args.eta,
             "init": args.init, "prior": args.prior}
    given.update({f.name: getattr(args, f.name) for f in dataclasses.fields(config.Preset)})
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
    else:
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(os.path.join(out, "checkpoint.json")):
            raise ValueError(f"{out} already holds a run: use --resume {out} or another --out")
        run = Run(out, settings_from_args(args, log))
    for line in setting_warnings(args, run.settings):
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return run


def start(args, log):
    """The run (new or resumed) on its device and the pool that trains its tasks: this process, or
    a torchrun group whose rank 0 publishes the settings (the other ranks serve it, then return
    (None, None)). Every check comes before any write; a refusal is one line, exit code 1."""
    store, shared, rank, world = workers.distributed()
    if rank > 0:
        workers.serve(store, rank, world)
        return None, None
    try:
        run = open_run(args, world, log, shared)
        device = config.resolve_device(args.device)
        run.settings["device"] = device
        torch.set_num_threads(run.settings["threads"])
        if run.settings["objective"] == "quality-latency":
            import bench  # only the latency objective needs it
            run.settings["latency_note"] = bench.search_latency_note(device)
        evaluator = workers.Evaluator(run.settings, workers.rank_device(device) if world > 1 else device,
                                      log if world == 1 else lambda s: log(f"[rank 0] {s}"), run.out)
        config.output_dir(run.out)  # created only once everything else has been checked
    except ValueError as e:
        if store is not None:
            store.set("settings", json.dumps({"abort": str(e)}))
        config.fail(e)
    if store is None:
        return run, workers.Workers(evaluator)
    shared.set("run_id", run.settings["run_id"])  # a restart of this group resumes this run, no other
    store.set("settings", json.dumps({**run.settings, "lease": args.lease, "out": run.out}))
    return run, workers.StoreWorkers(evaluator, store, rank, world, args.lease)


def check_comparable(dirs, loaded, left):
    """--compare sets runs side by side only when they pair: one corpus, preset but the seed,
    objective and confirmation budget; each confirmation complete (left(run): its trainings still
    to do); no run twice."""
    for d, run in zip(dirs, loaded):
        if not run.settings["confirm_steps"]:
            raise ValueError(f"--compare: {d} has no confirmation (--confirm-steps 0): nothing to set side by side")
    for what, of in (("corpus", lambda s: (s["data"], s["vocab_size"])), ("objective", lambda s: s["objective"]),
                     ("preset (width, depth, schedule...)", lambda s: json.dumps({**s["preset"], "seed": 0})),
                     ("confirmation budget", lambda s: s["confirm_steps"])):
        if len({of(r.settings) for r in loaded}) > 1:
            raise ValueError(f"--compare: the runs differ in their {what}: their margins do not pair")
    for d, run in zip(dirs, loaded):
        if left(run):
            raise ValueError(f"--compare: {d} has not finished its confirmation ({len(left(run))} trainings left: "
                             f"python evolve.py --resume {d})")
    if len({r.settings["run_id"] for r in loaded}) < len(loaded) or len(set(map(os.path.realpath, dirs))) < len(dirs):
        raise ValueError("--compare: the same run is named twice")


def confirmed_key(compact, stage, seed):
    return f"{stage}/{seed}/{model_key(compact)}"


def large_size(s):
    """(n_livs, width) of the larger-model confirmation, or None when not asked for."""
    if not (s["confirm_n_livs"] or s["confirm_width"]):
        return None
    return s["confirm_n_livs"] or s["preset"]["n_livs"], s["confirm_width"] or s["preset"]["width"]
