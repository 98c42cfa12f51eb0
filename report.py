"""What a search writes for people: report.md, best_genome.json and the figures (README: "What a
search writes, and how to read it"). Everything here is a function of one `Results` bundle that
evolve.py builds after each generation; nothing here reaches back into the search loop.

The report leads with the confirmation (the confirmed models at both budgets, a verdict and a
rank correlation), then how to read the margins (noise floor, evolution against random search),
the top 10 or the Pareto front with margins to every baseline, motif tables, failures, figures
and the legend.
"""
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

import genome as gn
import probes
import star


@dataclass
class Results:
    """A search as its report and figures read it."""
    out: str                # the run's directory
    settings: dict          # the run's settings (evolve.settings_from_args)
    objectives: tuple       # the objective's keys, all minimised: ('ppl',), ('ppl', 'cache_bytes'), ...
    evaluations: list       # every candidate trained at the search's budget, in order of completion
    baselines: dict         # baseline name -> result at the search's budget
    noise: dict             # the first baseline retrained under the second seed at that budget, or None
    top: list               # the final front (several objectives) or the top 10 (one), best first
    confirmed: list         # (label, search result, confirmed result): '#1'.. for candidates, baseline names
    elapsed: float          # seconds the search has run


def write_outputs(results, log=None):
    """report.md, best_genome.json (the confirmed best once confirmed; the search's best is kept as
    search_best_genome.json when they differ) and the figures, if matplotlib is installed."""
    search_best, confirmed_best = best_genomes(results)
    best = confirmed_best or search_best
    if best:
        star.atomic_write(os.path.join(results.out, "best_genome.json"), gn.to_json(best["genome"]))
    if confirmed_best and search_best and confirmed_best["key"] != search_best["key"]:
        star.atomic_write(os.path.join(results.out, "search_best_genome.json"), gn.to_json(search_best["genome"]))
    try:
        figures = draw_figures(results)
    except ImportError:  # matplotlib is optional
        figures = ()
    write_report(results, figures)
    if log:
        log(f"results in {results.out}: report.md, best_genome.json, evaluations.jsonl" +
            (", " + ", ".join(f"{f}.png" for f in figures) if figures else ""))


def best_genomes(results):
    """(the search's best entry, the confirmed best entry or None: confirmation retrains perplexity)."""
    key = results.objectives[0]
    ok = [e for e in results.evaluations if e["status"] == "ok"]
    search_best = min(ok, key=lambda e: e[key]) if ok else None
    evolved = [(c["ppl"], e) for label, e, c in results.confirmed if label.startswith("#") and key == "ppl"]
    return search_best, (min(evolved, key=lambda pair: pair[0])[1] if evolved else None)


def write_report(results, figures=()):
    r, s = results, results.settings
    lines = [f"# STAR search: objective `{s['objective']}`", "",
             f"Preset `{s['preset_name']}` ({', '.join(f'{k}={v}' for k, v in s['preset'].items())}); "
             f"population {s['population']}, {s['generations']} generations, mutation {s['mutation']}, "
             f"seed {s['seed']}, {s['threads']} thread(s), data {s['data'] or 'embedded Shakespeare (bytes)'}, "
             f"device {s['device']}. {len(r.evaluations)} candidates trained in {r.elapsed / 60:.1f} min.", ""]
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
    star.atomic_write(os.path.join(r.out, "report.md"), "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Sections


def confirmation_section(r):
    s, pairs, names = r.settings, r.confirmed, list(r.baselines)
    base, steps = s["preset"]["steps"], s["confirm_steps"]
    if not steps:
        return ["Confirmation skipped (--confirm-steps 0): the numbers below hold at the search's budget only.", ""]
    if not pairs:
        return [f"Confirmation at {steps} steps: not run yet (it follows the last generation).", ""]
    again = {name: next((c for label, _, c in pairs if label == name), None) for name in names}
    rows = []
    for label, e, c in pairs:
        margins = [f"{pct(e['ppl'], r.baselines[n]['ppl'])} → {pct(c['ppl'], again[n]['ppl'])}" if again[n] else "-"
                   for n in names]
        rows.append([label, f"`{e['summary']}`", f"{e['ppl']:.3f}", f"{c['ppl']:.3f}"] + margins)
    rho = spearman([e["ppl"] for _, e, _ in pairs], [c["ppl"] for _, _, c in pairs])
    return [f"## Confirmed result: {len(pairs)} models retrained for {steps} steps (search: {base}), "
            f"seed {s['seed'] + 1}", "", verdict(r, again), "",
            *table(["model", "architecture", f"ppl, {base} steps", f"ppl, {steps} steps"] +
                   [f"vs {n}, {base} → {steps} steps" for n in names], rows), "",
            f"Spearman's rank correlation of perplexity between the two budgets over these {len(pairs)} models: "
            f"{rho:.2f} (1: the search's order holds; 0: no relation).", ""]


def verdict(r, again):
    """One sentence: is the search's best still the best, and still ahead of every baseline?"""
    evolved = [(label, e, c) for label, e, c in r.confirmed if label.startswith("#")]
    if not evolved:
        return "No evolved candidate was confirmed."
    label, e, c = min(evolved, key=lambda t: t[1]["ppl"])
    best, steps = min(evolved, key=lambda t: t[2]["ppl"]), r.settings["confirm_steps"]
    behind = [n for n in again if again[n] and c["ppl"] >= again[n]["ppl"]]
    ahead = ", ".join(f"{n} by {100 * (again[n]['ppl'] - c['ppl']) / again[n]['ppl']:.1f}%"
                      for n in again if again[n] and n not in behind)
    first = (f"The search's best ({label}) is still the best confirmed candidate at {steps} steps"
             if best[0] == label else f"The search's best ({label}) is no longer the best at {steps} steps "
             f"({best[0]} is)")
    return first + (f" and still ahead of every baseline ({ahead})." if not behind else
                    f", and no longer ahead of {', '.join(behind)}" + (f" (still ahead of {ahead})." if ahead else "."))


def context_lines(r):
    """The noise floor and evolution against random search: how to read the margins."""
    lines, s = [], r.settings
    name = next(iter(r.baselines), None)
    first, noise = r.baselines.get(name), r.noise
    if first and noise and first["status"] == noise["status"] == "ok":
        spread = 100 * abs(first["ppl"] - noise["ppl"]) / first["ppl"]
        lines.append(f"- Noise floor: {name} retrained under seed {s['seed'] + 1} at the search's budget reached "
                     f"ppl {noise['ppl']:.3f} against {first['ppl']:.3f} under seed {s['seed']} ({spread:.1f}% apart); "
                     f"margins smaller than this are within seed noise.")
    randoms = [e for e in r.evaluations if e["generation"] == 0 and e["status"] == "ok"]
    search_best, _ = best_genomes(r)
    if randoms and search_best:
        best0 = min(e["ppl"] for e in randoms)
        line = (f"- Evolution against random search: the best of the {len(randoms)} random genomes of generation 0 "
                f"reached ppl {best0:.3f}, the final best {search_best['ppl']:.3f} "
                f"({100 * (best0 - search_best['ppl']) / best0:.1f}% lower).")
        keys = r.objectives
        for name, b in r.baselines.items():
            if b["status"] == "ok" and all(b.get(k) is not None for k in keys):
                n = sum(all(e.get(k) is not None and e[k] < b[k] for k in keys) for e in randoms)
                line += f" {n} of {len(randoms)} random genomes already beat {name} on every objective ({', '.join(keys)})."
        lines.append(line)
    return lines + ([""] if lines else [])


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
            [(f"baseline {name}", e) for name, e in r.baselines.items()]:
        ok = e["status"] == "ok"
        margins = [pct(e["ppl"], b["ppl"]) if ok and b["status"] == "ok" else "-" for b in r.baselines.values()]
        rows.append([label, f"`{e['summary']}`", f"{e['ppl']:.3f}" if ok else "failed", *margins,
                     f"{e['params']:,}" if e["params"] else "-", f"{e['cache_bytes']:,}" if e["cache_bytes"] else "0"] +
                    [show_or_dash(fmt, e) for _, fmt in extra])
    return [f"## {title}, with the baselines (same budget: {s['preset']['steps']} steps, seed {s['seed']})", "",
            *table(["", "architecture", "ppl", *[f"ppl vs {n}" for n in r.baselines], "params", "cache bytes"]
                   + [name for name, _ in extra], rows)]


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
    search_best, confirmed_best = best_genomes(r)
    genomes = [(f"best ({'confirmed' if confirmed_best else 'search'})", (confirmed_best or search_best)["genome"])
               ] if search_best else []
    if confirmed_best and search_best and confirmed_best["key"] != search_best["key"]:
        genomes.append(("search's best", search_best["genome"]))
    genomes += [(name, b["genome"]) for name, b in r.baselines.items()]
    s = r.settings
    figures = {"architecture": lambda p: plots.architecture(genomes, p),
               "progress": lambda p: plots.progress(r.evaluations, r.baselines, s["preset"]["steps"], p)}
    if len(r.objectives) > 1:
        figures["front"] = lambda p: plots.front(r.evaluations, r.baselines, r.top, r.objectives[1], s["objective"], p)
    if len(r.confirmed) > 1:
        rho = spearman([e["ppl"] for _, e, _ in r.confirmed], [c["ppl"] for _, _, c in r.confirmed])
        axes = (f"perplexity after {s['preset']['steps']} steps (search, seed {s['seed']})",
                f"perplexity after {s['confirm_steps']} steps (seed {s['seed'] + 1})")
        figures["confirmation"] = lambda p: plots.confirmation(r.confirmed, rho, axes, p)
    for name, draw in figures.items():
        draw(os.path.join(r.out, name + ".png"))
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
