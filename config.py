"""What a command is asked to do, checked at the edge, once: the presets (a candidate's model and
training, the search's defaults and probe sizes, side by side), the limits of every number a
command takes, the files it reads and writes, and the one way it refuses (one line on stderr,
exit code 1). The command lines of star.py, evolve.py and bench.py are built from these parts;
the algorithm below them receives checked values. Search checkpoints are checked in runs.py.
"""
import argparse
import contextlib
import dataclasses
import io
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import torch

import genome as gn
import liv
import probes


@dataclass
class Preset:
    """Model size and training budget of one candidate. Every field is a command-line flag."""
    width: int = 64
    heads: int = 4
    n_livs: int = 8
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 60
    lr: float = 3e-3
    warmup: int = 6
    decay: float = 0.2  # the share of the budget in the lr's decay (star.lr_at); 1.0: cosine after the warm-up
    eval_batches: int = 8
    chunk: int = 64
    compile: bool = False
    seed: int = 0

PRESETS = {
    # CPU (the README gives its cost). With 4 heads, SA-3's repeat factor 4 leaves one K/V head,
    # as SA-4 (MQA) has: the two differ only from 8 heads on.
    "tiny": Preset(),
    # One GPU: thin-deep proxies (paper section 5.3: full depth, reduced width), byte-level.
    "gpu": Preset(width=256, heads=8, n_livs=24, seq_len=1024, batch_size=32, steps=2000, lr=1e-3,
                  warmup=200, eval_batches=32, compile=True),
}
SEARCH_DEFAULTS = {  # evolve.py's, per preset (the README gives what each costs)
    # Asynchronous successive halving from 120 steps (~1 token per non-embedding parameter) to the
    # paper's ~10 (the tiny baselines have 230-237k: 1,200 steps of 16 x 128), the top third of each
    # rung continued to the next; the choice, the next best and the baselines confirmed there under
    # 3 fresh seeds (15 trainings: most of the bare run's time; README).
    "tiny": {"population": 8, "generations": 4, "rungs": [120, 400, 1200], "eta": 3,
             "confirm_top": 1, "confirm_seeds": 3, "rank_check": 1},
    # Up to the paper's ~10 tokens per parameter (a 24-LIV width-256 baseline has ~9.7M without
    # embeddings: 3,000 steps of 32 x 1,024), the top eighth continued there (README: "The gpu
    # search's compute").
    "gpu": {"population": 16, "generations": 18, "rungs": [375, 3000], "eta": 8,
            "confirm_top": 3, "confirm_seeds": 3, "rank_check": 3},
}
PROBES = {"tiny": probes.TASKS, "gpu": probes.MAD_TASKS}  # ours (CPU-sized), MAD's sizes on the GPU

OBJECTIVES = {  # all minimised
    "quality": ("ppl",),
    "quality-size": ("ppl", "params"),
    "quality-cache": ("ppl", "cache_bytes"),
    "quality-latency": ("ppl", "latency_ms"),
    "quality-recall": ("ppl", "recall_error"),  # recall_error = 1 - mean accuracy of the capability probes
    "recall": ("recall_error",),
}
SEARCH_BASELINES = ("transformer++", "striped-mamba", "striped-hyena")  # of genome.BASELINES: trained and compared by every run

# ---------------------------------------------------------------------------------------------
# Numbers

INT_MAX = 2**31 - 1
LIMITS = {  # every number any command takes: (lowest, highest); a float bound makes it a real number
    "width": (2, 1 << 16), "heads": (1, 1 << 10), "n_livs": (1, 1 << 12), "seq_len": (2, 1 << 20),
    "batch_size": (1, 1 << 20), "steps": (1, INT_MAX), "lr": (1e-9, 10.0), "warmup": (0, INT_MAX), "decay": (0.0, 1.0),
    "eval_batches": (1, 1 << 20), "chunk": (1, 1 << 16), "seed": (0, 2**32 - 1), "vocab_size": (2, 1 << 16),
    "threads": (1, 1 << 10), "tokens": (1, 1 << 20), "temperature": (1e-6, 1e6), "top_k": (1, 1 << 16),
    "population": (2, 1 << 16), "generations": (1, 1 << 16), "mutation": (0.0, 1.0), "reps": (1, 1 << 20),
    "prompt_len": (1, 1 << 20), "decode_tokens": (1, 1 << 20), "batch": (1, 1 << 20), "max_len": (2, 1 << 20),
    "peak_tflops": (1e-3, 1e7), "confirm_steps": (0, INT_MAX), "confirm_top": (1, 1 << 10), "genomes": (1, 1 << 16),
    "confirm_seeds": (1, 1 << 10), "rank_check": (0, 1 << 10), "confirm_n_livs": (1, 1 << 12),
    "confirm_width": (2, 1 << 16), "lease": (1.0, 1e6), "eta": (2, 1 << 10), "jobs": (1, 64),
}


def check_number(name, value):
    """value if it is a finite number of the right kind inside LIMITS[name]; else ValueError."""
    lo, hi = LIMITS[name]
    integral = isinstance(lo, int) and isinstance(hi, int)
    kinds = int if integral else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{value!r} is not {'an integer' if integral else 'a number'} in {lo}..{hi}")
    return value


def number(name):
    """The argparse type of a numeric flag: parsed, then held to LIMITS (one line if not)."""
    integral = all(isinstance(b, int) for b in LIMITS[name])

    def parse(text):
        try:
            value = int(text) if integral else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integral else 'a number'}") from None
        try:
            return check_number(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def check_preset(preset, genome=None):
    """Every preset field in range, and shapes that every class of the genome (of the catalogue
    when no genome is given: a search may meet any class) can be built with."""
    for f in dataclasses.fields(Preset):
        value = getattr(preset, f.name)
        if f.name in LIMITS:
            try:
                check_number(f.name, value)
            except ValueError as e:
                raise ValueError(f"--{f.name.replace('_', '-')}: {e}") from None
        elif not isinstance(value, bool):
            raise ValueError(f"--{f.name}: {value!r} is not true or false")
    for cls in gn.CATALOGUE if genome is None else [gn.lookup(row) for row in genome]:
        try:
            liv.LIVConfig(mixer=cls.mixer, width=preset.width, heads=preset.heads, **cls.featurizer).check()
        except ValueError as e:
            raise ValueError(f"--{e}" if str(e).startswith("width") else f"--heads {preset.heads}: {cls.name} {e}") from None
    return preset


def field(obj, key, kinds, where):
    """obj[key] if it is one of kinds (a bool is no int here; a real number is finite); else a
    ValueError naming the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: no field '{key}'")
    value = obj[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{where}.{key} is {str(value)[:40]!r}, not {names}")
    if isinstance(value, float) and not math.isfinite(value):  # NaN compares false with everything
        raise ValueError(f"{where}.{key} is {value!r}, not a finite number")
    return value


# ---------------------------------------------------------------------------------------------
# Files


def input_file(path, what):
    """path if it is a readable regular file; else one line naming it and the problem."""
    if not os.path.exists(path):
        raise ValueError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path} is not readable")
    return path


def output_file(path, what, regular=False):
    """Refuse, before any work, an output file that cannot be written: it is opened for appending.
    regular: a device or pipe is refused too (a checkpoint or a results file is read back later)."""
    existed = os.path.exists(path)
    if regular and existed and not os.path.isfile(path):
        raise ValueError(f"cannot write {what} {path}: not a regular file")
    with writing(path, what):
        with open(path, "ab"):
            pass
    if not existed:
        os.remove(path)
    return path


def output_dir(path, what="output directory"):
    """Create a directory for outputs and prove it writable, or one line saying why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"cannot use {what} {path}: {(e.strerror or str(e)).lower()}") from None
    return path


@contextlib.contextmanager
def writing(path, what="file"):
    """Around a write: an OSError (a full device, no permission, a directory in the way) becomes
    one line naming the file (a ValueError, refused as every bad input is)."""
    try:
        yield
    except OSError as e:
        raise ValueError(f"cannot write {what} {path}: {(e.strerror or str(e)).lower()}") from None


def write_file(path, data, what="file"):
    """The one checked writer of every output: text, bytes, or a function that writes to a binary
    file (a figure's savefig). Flushed and synced before it returns, so a full device is an error
    here, never a file reported as written. A regular file (or a new one) is written to a
    temporary file and renamed over it: a kill at any moment leaves the old or the new file."""
    if callable(data):
        buffer = io.BytesIO()
        data(buffer)
        data = buffer.getvalue()
    data = data.encode() if isinstance(data, str) else data
    in_place = os.path.exists(path) and not os.path.isfile(path)  # a device or a pipe: no rename over it
    target = path if in_place else path + ".tmp"
    with writing(path, what):
        try:
            with open(target, "wb") as f:
                f.write(data)
                f.flush()  # a full device says so here (a device or pipe has nothing to sync)
                if not in_place:
                    os.fsync(f.fileno())
            if not in_place:
                os.replace(target, path)
        finally:
            if not in_place and os.path.exists(target):
                os.remove(target)
    return path


def fail(message):
    """The one way a command refuses: one line on stderr, exit code 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Command-line parts


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help, unless it has none (None, or off)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 1 (not a usage block and code 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(message)

    def parse_args(self, args=None, namespace=None):
        """As argparse, and an empty value (--out '') is refused, not taken as 'not given'."""
        parsed = super().parse_args(args, namespace)
        for key, value in vars(parsed).items():
            if value == "" or (isinstance(value, list) and "" in value):
                fail(f"--{key.replace('_', '-')}: empty value (leave the flag out for its default)")
        return parsed


PRESET_HELP = {"width": "model width", "heads": "attention (and recurrence) heads", "n_livs": "LIVs in depth",
               "seq_len": "training sequence length", "batch_size": "sequences per step",
               "steps": "training steps per model", "lr": "peak learning rate", "warmup": "warm-up steps",
               "decay": "share of the steps in the lr's final decay (1: cosine after the warm-up)",
               "eval_batches": "validation batches", "chunk": "chunk length of the chunked recurrence",
               "compile": "compile residual blocks with torch.compile", "seed": "data order and initialisation seed"}


def add_preset_args(parser, default="auto"):
    """--preset plus one override flag per Preset field (--width, --steps, --lr, ...)."""
    parser.add_argument("--preset", default=default, help="tiny, gpu, or auto: gpu when CUDA is available, else tiny")
    for f in dataclasses.fields(Preset):
        values = ", ".join(f"{name} {getattr(p, f.name)}" for name, p in PRESETS.items())
        kind = ({"action": argparse.BooleanOptionalAction} if f.type in (bool, "bool")
                else {"type": number(f.name), "metavar": "N"})
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{PRESET_HELP[f.name]} ({values})",
                            **kind)


def add_data_args(p, data=True, device="auto, cpu, cuda or cuda:N"):
    """--data and --vocab-size, and --device (its help, or None for none), as the commands take them."""
    if data:
        p.add_argument("--data", help="a .txt (bytes) or .bin (uint16 tokens) file; default: embedded Shakespeare")
        p.add_argument("--vocab-size", type=number("vocab_size"), help="vocabulary of a .bin token file")
    if device:
        p.add_argument("--device", default="auto", help=device)


def add_genome_source(p, baseline_note=""):
    """The --genome / --baseline pair every genome-reading command takes (exactly one)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--genome", help="genome JSON file or compact form, e.g. 1.1.1.1.1-9.2.1.2.1")
    source.add_argument("--baseline", help=f"one of {', '.join(gn.BASELINES)}{baseline_note}")


def preset_name(name):
    """A preset's name with 'auto' resolved: gpu when CUDA is available, else tiny."""
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "tiny"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}")
    return name


def preset_from_args(args, name=None):
    """The named preset with the command line's overrides (checked by check_preset once the genome is known)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Preset) if getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[preset_name(name or args.preset)], **overrides)


def preset_flags(preset):
    """The flags that give the preset back (preset_from_args's inverse): a child process's command line."""
    flags = []
    for f in dataclasses.fields(Preset):
        flag, value = "--" + f.name.replace("_", "-"), getattr(preset, f.name)
        flags += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return flags


def compile_jobs():
    """The default processes of the parallel warm-up (star.warm_up): half the CPUs, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def share(text):
    """The argparse type of --part K/N: (K, N) with 0 <= K < N <= the catalogue's classes."""
    k, _, n = text.partition("/")
    classes = len(gn.CATALOGUE)
    if not (k.isascii() and k.isdigit() and n.isascii() and n.isdigit() and int(k) < int(n) <= classes):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 0 <= K < N <= {classes}, the catalogue's classes")
    return int(k), int(n)


def resolve_device(name):
    """'auto' -> cuda when available, else cpu; a device this machine cannot provide is refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but CUDA is not available")
    return name


def genome_from_args(args, n_livs):
    """The genome of --genome (checked) or of --baseline at n_livs."""
    if args.baseline:
        return gn.baseline(args.baseline, n_livs)
    g = gn.load(args.genome)
    problems = gn.validate(g)
    if problems:
        raise ValueError(f"invalid genome: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return g


def budget_note(preset, train_tokens):
    """What one model's training budget reads, and a warning when it reads the train split more than once."""
    tokens = preset.steps * preset.batch_size * preset.seq_len
    note = (f"budget per model: {preset.steps} steps of {preset.batch_size} x {preset.seq_len} = {tokens:,} tokens, "
            f"{tokens / train_tokens:.2f} passes over the train split ({train_tokens:,} tokens)")
    if tokens > train_tokens:
        note += ("\nwarning: more than one pass over the train split: models are ranked partly by how they "
                 "memorise it; bring a larger corpus (data/prepare.py)")
    return note


# ---------------------------------------------------------------------------------------------
# star.py's command line


def star_parser(description):
    """star.py's commands and their flags (star.main runs them)."""
    parser = Parser(description=description)
    sub = parser.add_subparsers(dest="command", metavar="{train,show,sample,probe,scale,compile}")

    def command(name, what, genome=True, data=True, device=True):
        p = sub.add_parser(name, help=what, description=what)
        if genome:
            add_genome_source(p)
        add_preset_args(p)
        add_data_args(p, data, device and "auto, cpu, cuda or cuda:N")
        return p
    command("train", "train one architecture, print its validation perplexity").add_argument(
        "--save", help="write the trained model to this checkpoint file")
    command("show", "list an architecture's LIVs, sharing, parameters and cache", device=False).add_argument(
        "--plot", help="also draw the architecture to this PNG file (needs matplotlib)")
    what = "generate text from a checkpoint written by train --save"
    p = sub.add_parser("sample", help=what, description=what)
    p.add_argument("--checkpoint", required=True, help="a file written by star.py train --save")
    p.add_argument("--prompt", default="\n", help="text, or space-separated token ids for a token model")
    p.add_argument("--tokens", type=number("tokens"), default=None,
                   help="tokens to generate (default 200, or what a long-convolution model's filter has room for)")
    p.add_argument("--temperature", type=number("temperature"), default=0.8, help="sampling temperature")
    p.add_argument("--top-k", type=number("top_k"), default=None, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=number("seed"), default=0, help="sampling seed")
    command("probe", "train a fresh model of the genome on each capability probe (MAD's synthetic tasks)",
            data=False).add_argument("--tasks", default=None,
                                     help=f"comma-separated: {', '.join(probes.TASKS)} (default: all)")
    what = "extrapolate a genome to a multiple of its depth: stack repeats it whole, stretch repeats each LIV"
    p = sub.add_parser("scale", help=what, description=what)
    add_genome_source(p, " (at --n-livs directly)")
    p.add_argument("--n-livs", type=number("n_livs"), required=True, help="the new depth, a multiple of the genome's")
    p.add_argument("--how", choices=["stack", "stretch"], default="stack", help="Composer's two extrapolations")
    p.add_argument("--out", help="write the genome to this JSON file (default: print it)")
    p = command("compile", "compile every residual-block variant of the catalogue once, print how many graphs that is",
                genome=False)
    p = p.add_mutually_exclusive_group()
    p.add_argument("--jobs", type=number("jobs"), help="processes compiling shares of the variants into the cache "
                   f"first, then this one loads them all (default: half the CPUs, at most 8: {compile_jobs()})")
    p.add_argument("--part", type=share, metavar="K/N", help="compile one share of the variants (share K of N)")
    return parser


PROBE_OWN = ("seq_len", "steps", "batch_size", "lr", "warmup", "eval_batches")  # each probes.Task sets these


def probe_tasks(args):
    """The probes.Task list of `star.py probe --tasks`, at the preset's sizes."""
    given = [f"--{k.replace('_', '-')}" for k in PROBE_OWN if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: each probe task sets its own length and budget (probes.TASKS); "
                         "probe takes the model's --width, --heads, --n-livs, --chunk and --seed")
    known = PROBES[preset_name(args.preset)]
    names = args.tasks.split(",") if args.tasks else list(known)
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    return [known[t] for t in names]


def prompt_ids(text, vocab):
    """The prompt as token ids: UTF-8 bytes for a byte model, space-separated ids for a token model."""
    if vocab == 256:
        prompt = list(text.encode("utf-8"))
    else:
        try:
            prompt = [int(t) for t in text.split()]
        except ValueError:
            prompt = [-1]
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"this model reads tokens: --prompt is space-separated ids below {vocab}")
    if not prompt:
        raise ValueError("--prompt is empty")
    return prompt
