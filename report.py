"""What a search writes for people: report.md, best_genome.json and the figures (README: "What a
search writes, and how to read it"). Everything here is a function of one `Results` bundle that
evolve.py builds after each generation; nothing here reaches back into the search loop.

The report leads with the confirmation (the confirmed models at both budgets, a verdict and a
rank correlation), then how to read them (evolution against random search),
the top 10 or the Pareto front with margins to every baseline, motif tables, failures, figures
and the legend.
"""
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

import config
import genome as gn
import probes


@dataclass
class Results:
    """A search as its report and figures read it."""
    out: str                # the run's directory
    settings: dict          # the run's settings (runs.settings_from_args)
    objectives: tuple       # the objective's keys, all minimised: ('ppl',), ('ppl', 'cache_bytes'), ...
    evaluations: list       # every candidate trained at the search's budget, in order of completion
    baselines: dict         # baseline name -> result at the search's budget
    top: list               # the final front (several objectives) or the top 10 (one), best first
    confirmed: list         # Confirmed rows, in the order of evolve.finalists
    elapsed: float          # seconds the search has run
    rung_baselines: dict = None  # baseline name -> {rung >= 1: its result there, or None}
    trainings: list = ()    # every training of the search, one per model and rung (evaluations: one per model)


@dataclass
class Confirmed:
    """A model of the confirmation: its label ('#3', its place in the search's ranking; or a
    baseline's name), kind ('top', 'rank check' or 'baseline'), its search result, its results at
    the confirmation's budget under each seed, and at the larger size (one seed) or None."""
    label: str
    kind: str
    search: dict
    runs: list
    large: dict = None


def write_outputs(results, log=None):
    """report.md, best_genome.json (the search's choice: the confirmation judges it on fresh seeds
    and never chooses, so its margins carry no selection luck) and the figures, if matplotlib is
    installed."""
    best = search_choice(results)
    if best:
        config.write_file(os.path.join(results.out, "best_genome.json"), gn.to_json(best["genome"]))
    try:
        figures = draw_figures(results)
    except ImportError:  # matplotlib is optional
        figures = ()
    write_report(results, figures)
    if log:
        log(f"results in {results.out}: report.md, best_genome.json, evaluations.jsonl" +
            (", " + ", ".join(f"{f}.png" for f in figures) if figures else ""))


def search_choice(results):
    """The search's best entry (at the highest rung reached, then by the first objective), or None."""
    key = results.objectives[0]
    ok = [e for e in results.evaluations if e["status"] == "ok" and e.get(key) is not None]
    return min(ok, key=lambda e: searched(e, key)) if ok else None


def write_report(results, figures=()):
    r, s = results, results.settings
    lines = [f"# STAR search: objective `{s['objective']}`", "",
             f"Preset `{s['preset_name']}` ({', '.join(f'{k}={v}' for k, v in s['preset'].items())}); "
             f"population {s['population']}, {s['generations']} generations, mutation {s['mutation']}, "
             f"seed {s['seed']}, {s['threads']} thread(s), data {s['data'] or 'embedded Shakespeare (bytes)'}, "
             f"device {s['device']}. {len(r.evaluations)} candidates trained in {r.elapsed / 60:.1f} min; "
             f"search compute {compute(r)} (besides the baselines and the confirmation).", ""]
    lines += confirmation_section(r) + context_lines(r)
    if "latency_ms" in r.objectives:
        lines += [f"Latency: {s.get('latency_note', '')}", ""]
    lines += top_section(r) + motif_section(r)
    failed = [e for e in r.evaluations if e["status"] != "ok"]
    if failed:
        lines += ["", f"## Failed candidates ({len(failed)})", ""]
        lines += [f"- gen {e['generation']} `{e['compact']}`: {e.get('error')}" for e in failed]
    lines += ["", "## Figures", ""] + ([f"![{name}]({name}.png)" for name in figures] if figures else
                                       ["No figures: `pip install matplotlib`, then `python evolve.py --resume "
                                        f"{r.out}` draws them."])
    lines += ["", "## Legend", ""] + gn.legend()
    config.write_file(os.path.join(r.out, "report.md"), "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Sections


def confirmation_section(r):
    s, rows, names, key = r.settings, r.confirmed, list(r.baselines), r.objectives[0]
    rungs, steps = s.get("rungs", [s["preset"]["steps"]]), s["confirm_steps"]
    base = f"{rungs[0]} steps" if len(rungs) == 1 else f"rungs {','.join(map(str, rungs))}"
    if not steps:
        return ["Confirmation skipped (--confirm-steps 0): the numbers below hold at the search's budget only.", ""]
    if not rows:
        return [f"Confirmation at {steps} steps: not run yet (it follows the last generation).", ""]
    again = {c.label: c for c in rows if c.kind == "baseline"}
    large = [c for c in rows if c.large]
    size = f"{len(large[0].large['genome'])} LIVs x {large[0].large['width']}" if large else ""
    table_rows = []
    for c in rows:
        margins = [(f"{search_margin(r, c, n, key)} → " + fmt_margin(*margin(c, again[n], key), key))
                   if n in again and c.kind != "baseline" else "-" for n in names]
        table_rows.append([c.label, c.kind, f"`{c.search['summary']}`", f"{c.search[key]:.3f}{steps_of(r, c.search)}",
                           fmt_mean(c, key)] +
                          ([f"{c.large[key]:.3f}" if c.large else "-"] if large else []) + margins)
    places = search_places(rows, key)
    lines = [f"## Confirmed result: {len(rows)} models retrained for {steps} steps (search: {base}) under "
             f"seed(s) {', '.join(str(x['seed']) for x in rows[0].runs)}", "", verdict(r), "",
             *table(["model", "kind", "architecture", f"{key}, {base}", f"{key}, {steps} steps (mean ± sd)"] +
                    ([f"{key}, {size}"] if large else []) + [f"vs {n}, {base} → {steps} steps" for n in names],
                    table_rows), "",
             rule_line(max(len(c.runs) for c in rows)), "",
             "Rank check (the search's order against the confirmed means, over the top, the rank-check candidates spread "
             f"from just below the top to the bottom of the search, and the baselines): "
             f"{correlation_line(places, [mean(c, key) for c in rows])}", *rung_predictions(r, rows, key)]
    if len(large) > 1:
        lines += ["", f"At the larger size ({size}, seed {large[0].large['seed']}) against the confirmed means: "
                  f"{correlation_line([mean(c, key) for c in large], [c.large[key] for c in large])}"]
    return lines + [""]


def search_places(rows, key):
    """Each confirmed row's place in the search's order (rungs first), from 0."""
    order = sorted(range(len(rows)), key=lambda i: searched(rows[i].search, key))
    return [float(order.index(i)) for i in range(len(rows))]


def searched(e, key):
    """The search's order of its results: the higher rung first, then the objective there."""
    return -e.get("rung", 0), e[key]


def search_margin(r, c, name, key):
    b = baseline_at(r, name, c.search)
    return pct(c.search[key], b[key], key) if b and b["status"] == "ok" and key in b else "-"


def verdict(r):
    """Is the search's choice still the best confirmed candidate, and is it ahead of each baseline
    by more than its paired interval, on seeds the search never used?"""
    key, rows = r.objectives[0], r.confirmed
    evolved = [c for c in rows if c.kind != "baseline"]
    if not evolved:
        return "No evolved candidate was confirmed."
    best, choice = min(evolved, key=lambda c: mean(c, key)), min(evolved, key=lambda c: searched(c.search, key))
    steps = r.settings["confirm_steps"]
    first = (f"The search's choice ({choice.label}) is still the best confirmed candidate at {steps} steps" if best is choice
             else f"The search's choice ({choice.label}) is no longer the best at {steps} steps ({best.label} is)")
    parts = []
    for b in (c for c in rows if c.kind == "baseline"):
        d, lo, hi = margin(choice, b, key)
        parts.append(f"{'ahead of' if d < 0 else 'behind'} {b.label} ({fmt_margin(d, lo, hi, key)})" if called(lo, hi)
                     else f"level with {b.label} ({fmt_margin(d, lo, hi, key)}, " +
                     ("inside its interval)" if lo is not None else "one seed: not resolved)"))
    return first + (f"; judged on seeds the search never used, {choice.label} is " + ", ".join(parts)
                    if parts else "") + "." + "".join(" " + line for line in size_verdict(r, evolved))


def size_verdict(r, evolved):
    """Several objectives: per baseline, the confirmed candidate with the smallest second objective
    that is level with the baseline or better (not behind beyond the paired interval), and how much
    smaller it is."""
    if len(r.objectives) < 2 or r.objectives[1] == "recall_error":  # a size or a latency, not an error rate
        return []
    key, second, lines = r.objectives[0], r.objectives[1], []
    for b in (c for c in r.confirmed if c.kind == "baseline"):
        level = [(c, margin(c, b, key)) for c in evolved if c.search.get(second) is not None]
        level = [(c, m) for c, m in level if not (called(m[1], m[2]) and m[0] > 0)]
        if not level:
            lines.append(f"No confirmed candidate is level with {b.label} or better.")
            continue
        c, m = min(level, key=lambda x: x[0].search[second])
        ratio = b.search[second] / c.search[second] if c.search[second] > 0 else math.inf
        lines.append(f"Against {b.label}: {c.label} has {c.search[second]:,} {second.replace('_', ' ')} against "
                     f"{b.search[second]:,} ({f'{ratio:.1f}x smaller' if ratio >= 1 else f'{1 / ratio:.1f}x larger'}) "
                     f"at {fmt_margin(*m, key)} {key}.")
    return lines


def rule_line(seeds):
    if seeds < 2:
        return ("One seed per model: no seed-to-seed spread is measured, so no margin is called real "
                "(run with --confirm-seeds 2 or more).")
    return ("Rule: margins are paired (every model trains under the same seeds, data order and validation batches): "
            "the mean of the per-seed differences, called only when its 95% interval (Student's t over the seeds, "
            "n - 1 degrees of freedom) excludes zero; else it is inside the noise. Each model's own spread is its "
            "± sd above.")


def correlation_line(a, b):
    if len(a) < 3:
        return f"{len(a)} models, too few to rank."
    (rho, p_rho), (tau, p_tau) = rank_correlations(a, b)
    return (f"n = {len(a)}, Spearman's rho {rho:.2f} (p = {p_rho:.3f}), Kendall's tau-b {tau:.2f} (p = {p_tau:.3f}); "
            "one-sided permutation p-values, small when the order holds.")


def context_lines(r):
    """What the within-run evolution line compares, and where the control is."""
    lines, s, key = [], r.settings, r.objectives[0]
    randoms = [e for e in r.evaluations if e["generation"] == 0 and e["status"] == "ok" and e.get(key) is not None]
    search_best = search_choice(r)
    if s.get("random_search"):
        lines.append(f"- This run is the random-search control (--random-search): all {len(r.evaluations)} candidates "
                     "were drawn at random; set it beside a search with `python evolve.py --compare DIR DIR`.")
    elif randoms and search_best and len(s.get("rungs", [])) < 2:
        best0 = min(e[key] for e in randoms)
        lines.append(f"- Within this run (not a control): the best of the {len(randoms)} random genomes of generation 0 "
                     f"reached {key} {best0:.3f}, the best of all {len(r.evaluations)} candidates (generation 0 "
                     f"included, so never worse) {search_best[key]:.3f} ({pct(search_best[key], best0, key)}). The "
                     "equal-budget control is a run with --random-search, compared with `python evolve.py --compare`.")
    return lines + ([""] if lines else [])


def compare_section(runs):
    """Finished runs side by side (a search and its --random-search control, several seeds): the
    search's choice of each, judged at the confirmation, its margin to each baseline, and evolution
    against random search for each seed that has both, every margin paired by confirmation seed
    (runs of the same search seed share them) with its 95% interval."""
    key = runs[0].objectives[0]
    names = list(runs[0].baselines)
    rows, best = [], {}
    for r in runs:
        evolved = [c for c in r.confirmed if c.kind != "baseline"]
        if not evolved:
            raise ValueError(f"{r.out}: no confirmed candidate (the run has not finished its confirmation)")
        b = best[(r.settings["seed"], search_kind(r.settings))] = min(evolved, key=lambda c: searched(c.search, key))
        again = {c.label: c for c in r.confirmed if c.kind == "baseline"}
        rows.append([r.out, search_kind(r.settings), r.settings["seed"],
                     f"{b.label} `{b.search['summary'][:40]}`", fmt_mean(b, key)] +
                    [f"{fmt_mean(again[n], key)}; {fmt_margin(*margin(b, again[n], key), key)}"
                     if n in again else "-" for n in names] + [compute(r), f"{r.elapsed / 60:.1f}"])
    lines = table(["run", "search", "seed", "search's choice", f"{key} (mean ± sd)"] +
                  [f"{n}: mean ± sd; choice's margin" for n in names] + ["search compute", "minutes"], rows)
    for kind in sorted({k for _, k in best} - {"random"}):
        pairs = sorted(seed for seed, k in best if k == kind and (seed, "random") in best)
        if not pairs:
            continue
        d = [margin(best[(seed, kind)], best[(seed, "random")], key) for seed in pairs]
        lines += ["", f"{kind.capitalize()} against random search, choice against choice "
                  "(negative: the search lower): " + ", ".join(f"seed {seed}: {fmt_margin(*m, key)}"
                                                               for seed, m in zip(pairs, d)) +
                  f"; mean {fmt_margin(float(np.mean([m[0] for m in d])), None, None, key)}; "
                  f"ahead beyond the spread in {sum(called(lo, hi) and m < 0 for m, lo, hi in d)} of "
                  f"{len(d)}, behind beyond it in {sum(called(lo, hi) and m > 0 for m, lo, hi in d)}."]
    return lines


def search_kind(s):
    """'evolution', 'evolution, rungs 60,240', 'random' (the control), each with ', init hybrids' when
    generation 0 was the hybrids and ', prior catalogue' under the paper's prior: how --compare
    groups runs."""
    rungs = f", rungs {','.join(map(str, s['rungs']))}" if len(s.get("rungs", [])) > 1 else ""
    return ("random" if s.get("random_search") else "evolution" + rungs) + (
        ", init hybrids" if s.get("init") == "hybrids" else "") + (
        f", prior {s['prior']}" if s.get("prior", "balanced") != "balanced" else "")


def top_section(r):
    """The top 10 (one objective) or the front, with the baselines and each row's margin to them."""
    s, keys = r.settings, r.objectives
    title = f"Top 10 by {keys[0]}" if len(keys) == 1 else "Pareto front of the final population"
    extra = [("latency ms", lambda e: f"{e['latency_ms']:.2f}")] if "latency_ms" in keys else []
    if s["probes"]:
        extra += [(f"{t} acc", lambda e, t=t: f"{e['probes'][t]:.2f}") for t in probes.TASKS]
        extra += [("probe mean", lambda e: f"{1 - e['recall_error']:.2f}")]
    rows = []
    for label, e in [(f"#{i + 1} (gen {e['generation']})", e) for i, e in enumerate(r.top)] + \
            [(f"baseline {name}", baseline_top(r, name)) for name in r.baselines]:
        ok = e["status"] == "ok"
        bs = [baseline_at(r, n, e) for n in r.baselines]
        margins = [pct(e["ppl"], b["ppl"]) if ok and b and b["status"] == "ok" else "-" for b in bs]
        rows.append([label, f"`{e['summary']}`", f"{e['ppl']:.3f}{steps_of(r, e)}" if ok else "failed", *margins,
                     f"{e['params']:,}" if e["params"] else "-", f"{e['cache_bytes']:,}" if e["cache_bytes"] else "0"] +
                    [show_or_dash(fmt, e) for _, fmt in extra])
    budget = (f"each at the highest rung it reached, of {', '.join(map(str, s['rungs']))} steps; margins at equal "
              f"steps" if len(s.get("rungs", [])) > 1 else f"same budget: {s['preset']['steps']} steps")
    return [f"## {title}, with the baselines ({budget}, seed {s['seed']})", "", *rung_lines(r),
            *table(["", "architecture", "ppl", *[f"ppl vs {n}" for n in r.baselines], "params", "cache bytes"]
                   + [name for name, _ in extra], rows)]


def compute(r):
    """What the search's trainings cost (every candidate at every rung it trained at, once per
    distinct model): '1,920 candidate-steps, 3.9M tokens', so runs compare at equal compute."""
    steps = sum(trained(e, r.settings) for e in r.trainings)
    return f"{steps:,} candidate-steps, {fmt_count(steps * r.settings['preset']['batch_size'] * r.settings['preset']['seq_len'])} tokens"


def rung_lines(r):
    """Successive halving: how many trainings, and how many tokens, each rung took (ours)."""
    rungs, preset = r.settings.get("rungs", []), r.settings["preset"]
    if len(rungs) < 2:
        return []
    n, steps = Counter(e["rung"] for e in r.trainings if not e.get("copied")), Counter()
    for e in r.trainings:
        steps[e["rung"]] += trained(e, r.settings)
    return [f"Rungs (asynchronous successive halving, at most 1/{r.settings.get('eta')} of a rung continued; each result at the "
            "highest rung it reached): " + "; ".join(
                f"{b} steps: {n[i]} trainings, {fmt_count(steps[i] * preset['batch_size'] * preset['seq_len'])} tokens"
                for i, b in enumerate(rungs)) + ".", ""]


def trained(e, s):
    """The steps one training took: a continued one from its kept state; older runs: its budget."""
    return e.get("steps_trained", e.get("steps") or s["rungs"][e.get("rung", 0)])


def rung_predictions(r, rows, key):
    """How well each rung predicts the confirmation (ours): over the confirmed models with a result at
    that rung (under the search's seed), its order there against the confirmed means."""
    rungs, lines = r.settings.get("rungs", []), []
    for i, b in enumerate(rungs if len(rungs) > 1 else []):
        at = {e["key"]: e[key] for e in r.trainings if e["rung"] == i and e["status"] == "ok"}
        at.update({e["key"]: e[key] for e in (baseline_at(r, n, {"rung": i}) for n in r.baselines) if e and e["status"] == "ok"})
        pairs = [(at[c.search["key"]], mean(c, key)) for c in rows if c.search["key"] in at]
        lines.append(f"- at {b} steps: " + correlation_line([a for a, _ in pairs], [m for _, m in pairs]))
    return ["", "How well each rung predicts the confirmation:", *lines] if lines else []


def motif_section(r):
    c0, s0, _, n0 = motif_counts([e["compact"] for e in r.evaluations if e["generation"] == 0])
    c1, s1, pairs, n1 = motif_counts([e["compact"] for e in r.top])
    return recall_motifs(r) + ["", "## Motifs: final front/top against the initial population", "",
            *table(["LIV class", "share of LIVs, final", "share of LIVs, initial"],
                   [[n, f"{100 * c1[n] / n1:.0f}%", f"{100 * c0[n] / n0:.0f}%"] for n, _ in (c1 + c0).most_common()]),
            "", *table(["sharing", "LIVs that share, final", "initial"],
                       [[n, f"{100 * s1[n] / n1:.0f}%", f"{100 * s0[n] / n0:.0f}%"] for n, _ in (s1 + s0).most_common()]),
            "", "Most frequent adjacent class pairs in the final front/top: " +
            (", ".join(f"{a} -> {b} ({n})" for (a, b), n in pairs.most_common(5)) or "none")]


def motif_counts(compacts):
    """Class frequencies, sharing patterns and adjacent class pairs over a set of genomes."""
    classes, sharing, pairs, total = Counter(), Counter(), Counter(), 0
    for c in compacts:
        g = gn.from_compact(c)
        names = [gn.lookup(row).name for row in g]
        classes.update(names)
        total += len(names)
        for i in range(len(g)):
            if gn.featurizer_leader(g, i) is not None:
                sharing["featurizer weights"] += 1
            if gn.feature_leader(g, i) is not None:
                sharing[f"features {gn.FEATURE_SHARING[g[i, gn.FT_STRATEGY]]}"] += 1
        pairs.update(zip(names, names[1:]))
    return classes, sharing, pairs, max(total, 1)


def recall_motifs(r):
    """Which classes the recall-capable candidates (>= 90% on in-context recall) use, against all probed."""
    probed = [e for e in r.evaluations if (e.get("probes") or {}).get("recall") is not None]
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


def draw_figures(r):
    """Every figure of a run, written beside its report; returns their names."""
    import plots  # matplotlib is optional: ImportError without it
    choice = search_choice(r)
    genomes = [("the search's choice", choice["genome"])] if choice else []
    genomes += [(name, b["genome"]) for name, b in r.baselines.items()]
    s = r.settings
    first = [e for e in (r.trainings or r.evaluations) if e.get("rung", 0) == 0]  # one budget: the first rung's
    figures = {"architecture": lambda p: plots.architecture(genomes, p),
               "progress": lambda p: plots.progress(first, r.baselines, s["preset"]["steps"], p)}
    rungs = s.get("rungs", [s["preset"]["steps"]])
    if len(r.objectives) > 1:  # each point at the highest rung it reached, its budget marked
        figures["front"] = lambda p: plots.front(r.evaluations, baseline_rungs(r), r.top, r.objectives[1],
                                                 s["objective"], rungs, p)
    key = r.objectives[0]
    if len(r.confirmed) > 1:  # a point below the top rung says its budget
        points = [(c.label + ("" if c.search.get("rung", 0) == len(rungs) - 1 else steps_of(r, c.search)), c.kind,
                   c.search[key], [x[key] for x in c.runs]) for c in r.confirmed]
        rho = spearman(search_places(r.confirmed, key), [mean(c, key) for c in r.confirmed])
        axes = (f"{key} after {rungs[-1]} steps, or the highest rung reached (search, seed {s['seed']})",
                f"{key} after {s['confirm_steps']} steps ({s['confirm_seeds']} seed(s) from {s['seed'] + 1})")
        figures["confirmation"] = lambda p: plots.confirmation(points, rho, axes, p)
    for name, draw in figures.items():
        config.write_file(os.path.join(r.out, name + ".png"), draw, "figure")
    return list(figures)


# ---------------------------------------------------------------------------------------------
# Progress lines of the search (evolve.py prints them)


def fmt_result(r):
    return f"ppl {r['ppl']:.3f}" if r["status"] == "ok" else f"FAILED ({r.get('error')})"


def fmt_count(n):
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def describe(result, world=1):
    latency = f"  latency {result['latency_ms']:.2f} ms" if "latency_ms" in result else ""
    return (f"{fmt_result(result)}  params {fmt_count(result['params'])}  cache {fmt_count(result['cache_bytes'])}B"
            f"{latency}  {result['seconds']:.1f}s" + (f"  (rank {result['rank']})" if world > 1 else ""))


def turnover(entry):
    """Seconds of a candidate outside steady-state training steps: building, compiling (the first
    step), evaluation, bookkeeping -- the time between one candidate's training and the next's.
    Measurements that an objective asks for (probes, latency) are work, not turnover."""
    steady = entry["train_seconds"] - entry.get("first_step_seconds", 0.0)
    return entry["seconds"] - steady - entry.get("measure_seconds", 0.0)


def turnover_note(evaluations, generation):
    ok = [e for e in evaluations if e["generation"] == generation and e["status"] == "ok"]
    if not ok:
        return ""
    mean_turnover = sum(map(turnover, ok)) / len(ok)
    mean_train = sum(e["train_seconds"] for e in ok) / len(ok)
    return (f"; {sum(e['seconds'] for e in ok) / len(ok):.1f} s per candidate, turnover {mean_turnover:.2f} s "
            f"({100 * mean_turnover / max(mean_train, 1e-9):.1f}% of training)")


# ---------------------------------------------------------------------------------------------
# Statistics and markdown


def ranks(x):
    """Ranks from 0; ties share their mean rank."""
    x = np.asarray(x, dtype=float)
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(a, b):
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share their mean rank)."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def rank_correlations(a, b, rounds=20000):
    """((Spearman's rho, p), (Kendall's tau-b, p)) of a against b. Each p is one-sided (a positive
    association), by permutation of b: exact up to 8 pairs, else `rounds` random permutations
    (fixed seed) with the observed order counted in."""
    n, nan = len(a), (float("nan"), float("nan"))
    if n < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return nan, nan
    if n <= 8:
        perms = np.array(list(itertools.permutations(range(n))))  # the identity first
    else:
        perms = np.vstack([np.arange(n), np.random.default_rng(0).permuted(np.tile(np.arange(n), (rounds, 1)), axis=1)])
    ra, rb = ranks(a) - (n - 1) / 2, ranks(b) - (n - 1) / 2  # centred ranks
    rho = rb[perms] @ ra / math.sqrt((ra @ ra) * (rb @ rb))  # (permutations,)
    i, j = np.triu_indices(n, 1)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    sa, sb = np.sign(a[i] - a[j]), np.sign(b[perms][:, i] - b[perms][:, j])  # (pairs,), (permutations, pairs)
    tau = sb @ sa / math.sqrt(np.count_nonzero(sa) * np.count_nonzero(sb[0]))  # tau-b: tied pairs leave the norm
    return tuple((float(x[0]), float(np.mean(x >= x[0] - 1e-12))) for x in (rho, tau))


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof):
    """Student's t, 97.5% quantile (two-sided 95%), for dof >= 1 (30's beyond: a little wide)."""
    return T975[min(dof, 30) - 1]


def scale(value, key):
    """The scale margins are measured on: log perplexity (margins relative), else the value itself."""
    return math.log(value) if key == "ppl" else value


def mean(c, key):
    """A confirmed model's mean over its seeds, back on the value's own scale."""
    m = float(np.mean([scale(x[key], key) for x in c.runs]))
    return math.exp(m) if key == "ppl" else m


def margin(a, b, key):
    """Confirmed model a against b, paired by seed: (mean of the per-seed differences on the margin
    scale, low, high) of its 95% Student-t interval over the seeds both were trained under; low and
    high are None with one such seed."""
    x, y = ({run["seed"]: scale(run[key], key) for run in c.runs} for c in (a, b))
    d = np.array([x[seed] - y[seed] for seed in sorted(x.keys() & y.keys())])
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan")), None, None
    h = t975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - h), float(d.mean() + h)


def called(low, high):
    """The verdict rule: a margin counts only when its interval excludes zero."""
    return low is not None and (low > 0 or high < 0)


def fmt_margin(d, low, high, key):
    f = (lambda x: f"{100 * (math.exp(x) - 1):+.1f}%") if key == "ppl" else (lambda x: f"{100 * x:+.1f} pts")
    return f(d) + (f" [{f(low)}, {f(high)}]" if low is not None else "")


def fmt_mean(c, key):
    values = [x[key] for x in c.runs]
    return f"{mean(c, key):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else " (1 seed)")


def baseline_at(r, name, e):
    """Baseline `name`'s result at the rung (budget) of result e, or None if not trained there."""
    return r.baselines[name] if not e.get("rung") else (r.rung_baselines or {}).get(name, {}).get(e["rung"])


def baseline_top(r, name):
    """Baseline `name` at the highest rung it reached with a result (where the search's best stand)."""
    later = [e for _, e in sorted((r.rung_baselines or {}).get(name, {}).items()) if e and e["status"] == "ok"]
    return {**r.baselines[name], **later[-1]} if later else r.baselines[name]  # with the first rung's measurements


def baseline_rungs(r):
    """Every baseline's results, one per rung it trained at: what a figure sets beside candidates."""
    return {name: [b] + [{**b, **e} for _, e in sorted((r.rung_baselines or {}).get(name, {}).items()) if e]
            for name, b in r.baselines.items()}


def steps_of(r, e):
    """A search result's budget, where the run has several rungs: ' (240 steps)'."""
    return f" ({r.settings['rungs'][e.get('rung', 0)]} steps)" if len(r.settings.get("rungs", [])) > 1 else ""


def pct(value, base, key="ppl"):
    return f"{100 * (value - base) / base:+.1f}%" if key == "ppl" else f"{100 * (value - base):+.1f} pts"


def show_or_dash(fmt, entry):
    try:
        return fmt(entry)
    except (KeyError, TypeError):  # not measured for this model (or it failed)
        return "-"


def cell(text):
    return str(text).replace("|", "\\|")  # a '|' would split a markdown table cell


def table(header, rows):
    return ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
