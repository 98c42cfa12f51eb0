"""Latency and throughput of STAR architectures (paper section 5: latency is measured, not estimated).

    python bench.py latency (--genome G | --baseline NAME) [--prompt-len 512 --decode-tokens 64] [--trace t.json]
    python bench.py train   (--genome G | --baseline NAME) [--batch 8 --seq-len 1024] [--compile]
    python bench.py ops     [--batch 8 --seq-len 2048 --width 768]
    python bench.py candidates [--n 4 --steps 200]  # a search's candidates once the catalogue is compiled
    python bench.py suite [--only candidates,ops,train,latency,search] [--smoke]   # the prepared GPU script

Times are medians over repetitions after warm-up: CUDA events on a GPU, time.perf_counter with
synchronisation elsewhere. The per-LIV-class tables come from one extra pass under
torch.profiler with a record_function label per LIV (timed separately: the profiler's own
overhead would distort the medians).
"""
import dataclasses
import json
import math
import os
import re
import resource
import signal
import statistics
import sys
import time

import numpy as np
import torch

import config
import genome as gn
import liv
import star

PEAK_TFLOPS = {  # dense bf16 peaks for MFU, and where each comes from
    "H100": (989.0, "H100 datasheet, dense bf16"), "A100": (312.0, "A100 datasheet, dense bf16"),
    "H200": (790.0, "bf16 matmuls measured on an H200 (issue 37); the datasheet's 989 is not reached")}


# ---------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, reps=10, warmup=3, setup=None):
    """Median wall time of fn() in milliseconds; setup() runs untimed before each repetition."""
    times = []
    for i in range(warmup + reps):
        state = setup() if setup else None
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(state)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def compiled(fn, use_compile):
    """torch.compile(fn) as one graph when asked (a whole model, a lone LIV). No eager fallback: a
    compile error is the benchmark's failure (one line), or its item's in a table (attempt), never
    an eager time shown as compiled."""
    if not use_compile:
        return fn
    star.configure_compile()
    return torch.compile(fn, backend=star.COMPILE_BACKEND)


def class_table(prof, device):
    """Rows of (class, calls, total ms) for the 'liv:<class>' labels of a profile. On CUDA each label
    is recorded twice, as a host range and as its span on the GPU: the GPU span is the one kept
    (the host range's device total counted kernels twice, 1.35 s in an 0.8 s pass on an H200)."""
    on_gpu = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    rows = [(event.key[4:], event.count, (event.device_time_total if on_gpu else event.cpu_time_total) / 1e3)
            for event in prof.key_averages() if event.key.startswith("liv:") and event.device_type == kind]
    return sorted(rows, key=lambda r: -r[2])


def print_class_table(rows, what):
    total = sum(r[2] for r in rows) or 1.0
    print(f"\ntime per LIV class ({what}, one profiled pass)\n{'class':<14}{'calls':>7}{'ms':>10}{'share':>8}")
    for name, calls, ms in rows:
        print(f"{name:<14}{calls:>7}{ms:>10.3f}{100 * ms / total:>7.1f}%")


# ---------------------------------------------------------------------------------------------
# FLOPs (per token, training = 3x forward: forward, and backward's two matmuls per weight)


def liv_forward_flops(layer, seq_len):
    """Forward FLOPs per token of one LIV: 2 per weight it uses (shared weights count each time
    they are used), plus the token-mixing term of its class."""
    c = layer.cfg
    flops = 2 * sum(p.numel() for p in layer.parameters())
    for _ in layer.mixers:
        if c.mixer == "attention":  # q k^T and (softmax) v over the whole context, as in 6N + 12LdT
            flops += 4 * seq_len * c.width
        elif c.mixer == "recurrence":  # chunked scan: intra-chunk matmuls + chunk states in and out
            t = min(c.chunk, seq_len)
            flops += c.heads * (2 * t * c.state + 2 * t * c.head_dim + 4 * c.state * c.head_dim)
        elif c.mixer == "long_conv":  # three real FFTs of length 2L (2.5 N log2 N each) and a product
            flops += c.width * (3 * 2.5 * 2 * math.log2(2 * seq_len) + 6)
    return flops


def training_flops_per_token(model, seq_len):
    """6N-style count: 3 x (forward FLOPs of every LIV + the LM head); the embedding is a lookup."""
    head = 2 * model.lm_head.weight.numel()
    return 3 * (head + sum(liv_forward_flops(layer, seq_len) for layer in model.livs))


def flops_by_class(model, seq_len):
    out = {}
    for label, layer in zip(model.labels, model.livs):
        out[label[4:]] = out.get(label[4:], 0) + 3 * liv_forward_flops(layer, seq_len)
    return out


def peak_tflops(device, override=None):
    """(the card's dense bf16 peak, where it comes from) from a small table, or (None, None) when
    the card is unknown."""
    if override:
        return override, "--peak-tflops"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), (None, None))


# ---------------------------------------------------------------------------------------------
# Commands


def make_model(args, device):
    """The genome at the preset's width, heads and depth (or the flags'), checked before it is built."""
    preset = dataclasses.replace(config.PRESETS[config.preset_name(args.preset)], seq_len=args.max_len, chunk=args.chunk)
    preset = dataclasses.replace(preset, **{k: getattr(args, k) for k in ("width", "heads", "n_livs") if getattr(args, k)})
    g = config.genome_from_args(args, preset.n_livs)
    config.check_preset(preset, g)
    torch.manual_seed(0)
    return star.build_model(g, preset, args.vocab_size).to(device)


def latency(args):
    """Prefill latency for a prompt and per-token decode latency with the LIVs' caches."""
    device = torch.device(args.device)
    model = make_model(args, device).to(dtype_of(args)).eval()
    cfg = model.livs[0].cfg
    print(f"latency of {gn.summary(model.genome)}: {len(model.livs)} LIVs, width {cfg.width}, {cfg.heads} heads, "
          f"{args.dtype}, on {args.device}\nprefill of {args.batch} x {args.prompt_len} tokens, then "
          f"{args.decode_tokens} decode steps; median of {args.reps} after {args.warmup} warm-up runs, then one "
          f"profiled pass ...", flush=True)
    result = measure_latency(model, args.batch, args.prompt_len, args.decode_tokens, device, args.compile,
                             reps=args.reps, warmup=args.warmup, trace=args.trace)
    print(json.dumps({"genome": gn.to_compact(model.genome), **result}))


def measure_latency(model, batch, prompt_len, decode_tokens, device, use_compile=False, reps=10, warmup=3,
                    trace=None, show=True):
    dtype = next(model.parameters()).dtype
    prompt = torch.randint(0, model.embed.num_embeddings, (batch, prompt_len), device=device)
    token = prompt[:, -1:]
    forward = compiled(model, use_compile)
    max_len = prompt_len + decode_tokens + 1

    def fresh():
        return model.init_caches(batch, max_len, device, dtype)

    def prefilled():
        caches = fresh()
        forward(prompt, caches=caches)
        return caches

    def decode(caches):
        for _ in range(decode_tokens):
            forward(token, caches=caches)

    with torch.no_grad():
        prefill_ms = median_ms(lambda c: forward(prompt, caches=c), device, reps, warmup, setup=fresh)
        decode_ms = median_ms(decode, device, reps, warmup, setup=prefilled) / decode_tokens
        model.profiling = True
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                               if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            decode(prefilled())
            sync(device)
        model.profiling = False
    rows = class_table(prof, device)
    if show:
        print(f"prefill {batch} x {prompt_len} tokens: {prefill_ms:.3f} ms;  decode: {decode_ms:.3f} ms per token "
              f"({device.type}, {dtype}, median of {reps})")
        print_class_table(rows, f"prefill + {decode_tokens} decode steps")
    if trace:
        prof.export_chrome_trace(trace)
        if show:
            print(f"chrome trace: {trace}")
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "batch": batch, "prompt_len": prompt_len,
            "decode_tokens": decode_tokens, "device": device.type, "per_class_ms": {r[0]: r[2] for r in rows}}


SEARCH_LATENCY = {"batch": 1, "prompt_len": 64, "decode_tokens": 16, "reps": 3}


def search_latency(genome, preset, vocab_size, device):
    """The quality-latency objective: prefill of a fixed prompt plus decode of a fixed number of
    tokens, in milliseconds, on the search's own device (ours: the paper profiles its own stack)."""
    s, device = SEARCH_LATENCY, torch.device(device)
    lat_preset = dataclasses.replace(preset, seq_len=max(preset.seq_len, s["prompt_len"] + s["decode_tokens"] + 1))
    torch.manual_seed(0)
    model = star.build_model(genome, lat_preset, vocab_size).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    r = measure_latency(model.eval(), s["batch"], s["prompt_len"], s["decode_tokens"], device, reps=s["reps"],
                        show=False)
    return r["prefill_ms"] + s["decode_tokens"] * r["decode_ms_per_token"]


def search_latency_note(device):
    s = SEARCH_LATENCY
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return (f"latency_ms = prefill of {s['prompt_len']} tokens + {s['decode_tokens']} decode steps, batch "
            f"{s['batch']}, median of {s['reps']}, on {name} ({'bf16' if device == 'cuda' else 'float32'}).")


def timed_step(step_fn, optimizer, x):
    """One training step on the batch x (b, l) as its own targets: what the throughput rows time."""
    def step(_):
        with star.autocast(x.device):
            _, loss = step_fn(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def train(args):
    """Training-step throughput, peak memory and model FLOPs utilisation."""
    device = torch.device(args.device)
    model = make_model(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if args.compile_model:  # the whole model as one graph (for comparison: the search compiles blocks)
        step_fn = compiled(model, True)
    elif args.compile:  # compiled residual blocks, as the search trains them
        model.compile_blocks()
        step_fn = model
    else:
        step_fn = model
    step = timed_step(step_fn, optimizer, torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device=device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, device, args.reps, warmup=args.warmup)
    tokens_per_s = args.batch * args.seq_len / (ms / 1e3)
    flops = training_flops_per_token(model, args.seq_len)
    tflops = flops * tokens_per_s / 1e12
    peak, source = peak_tflops(device, args.peak_tflops)
    memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA peak allocated)" if device.type == "cuda"
              else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)")
    params = star.param_counts(model)[0]
    print(f"{gn.summary(model.genome)}: {params:,} parameters, batch {args.batch} x {args.seq_len}")
    print(f"step {ms:.2f} ms, {tokens_per_s:,.0f} tokens/s, {tflops:.1f} TFLOP/s, peak memory {memory}")
    print("MFU: " + (f"{100 * tflops / peak:.1f}% of {peak:.0f} TFLOP/s ({source})" if peak else
                     "unknown card: pass --peak-tflops to get MFU"))
    print(f"\ntraining FLOPs per token by LIV class (total {flops / 1e6:.2f} MFLOP)\n{'class':<14}{'MFLOP':>10}{'share':>8}")
    for name, f in sorted(flops_by_class(model, args.seq_len).items(), key=lambda kv: -kv[1]):
        print(f"{name:<14}{f / 1e6:>10.3f}{100 * f / flops:>7.1f}%")
    return {"step_ms": ms, "tokens_per_second": tokens_per_s, "tflops": tflops, "mfu": tflops / peak if peak else None}


def ops(args):
    """Forward+backward time of every LIV class at one size, as a ratio to SDPA attention (SA-1)."""
    device = torch.device(args.device)
    results = {}
    for cls in gn.CATALOGUE:
        cfg = liv.LIVConfig(mixer=cls.mixer, width=args.width, heads=args.heads, diff=cls.diff,
                            max_len=args.seq_len, chunk=args.chunk, **cls.featurizer)
        layer = liv.LIV(cfg).to(device)
        x = torch.randn(args.batch, args.seq_len, args.width, device=device, requires_grad=True)
        fn = compiled(layer, args.compile)

        def fwd_bwd(_):
            with star.autocast(device):
                y, _ = fn(x)
            y.float().square().mean().backward()

        results[cls.name] = attempt(median_ms, fwd_bwd, device, args.reps, warmup=args.warmup)
    base = results["SA-1"]
    print(f"forward+backward, batch {args.batch} x {args.seq_len}, width {args.width}, {args.heads} heads, "
          f"{device.type}{' compiled' if args.compile else ''}\n{'class':<14}{'ms':>10}{'x SDPA':>8}")
    for name, ms in results.items():
        print(f"{name:<14}" + (ms if isinstance(ms, str) else f"{ms:>10.3f}" + (
              f"{ms / base:>8.2f}" if not isinstance(base, str) else "")))
    if not isinstance(base, str):  # the device plan's goals: SA-2 within 1.5x of SA-1, no class over 3x
        ratio = {n: ms / base for n, ms in results.items() if not isinstance(ms, str)}
        of = lambda n: f"{ratio[n]:.2f}x" if n in ratio else "failed"  # noqa: E731
        print(f"goals: SA-2 {of('SA-2')} SA-1, Delta-1 {of('Delta-1')}; "
              f"over 3x: {', '.join(n for n, r in ratio.items() if r > 3) or 'none'}")
    loop_ms, chunk_ms, short = recurrence_vs_loop(args, device)
    print(f"\nrecurrence: chunked {chunk_ms:.3f} ms at length {args.seq_len}; Python loop {loop_ms:.3f} ms at "
          f"length {short}, extrapolated x{args.seq_len / short:.0f} = {loop_ms * args.seq_len / short:.1f} ms "
          f"({loop_ms * args.seq_len / short / chunk_ms:.0f}x the chunked form)")
    return results


def attempt(fn, *args, **kwargs):
    """fn's result, or 'failed: <the error in one line>': one item of a table fails (a class or
    genome that does not compile), the table goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return f"failed: {star.compile_error(e)}"


def recurrence_vs_loop(args, device):
    """The chunked recurrence against the naive loop over time (forward only; the loop at a
    shorter length, extrapolated linearly)."""
    h, n, k = args.heads, 16, args.width // args.heads
    short = min(args.seq_len, 256)

    def inputs(length):
        q, kk = (torch.randn(args.batch, h, length, n, device=device) for _ in range(2))
        return q, kk, torch.randn(args.batch, h, length, k, device=device), -torch.rand(args.batch, h, length, device=device)

    full, part = inputs(args.seq_len), inputs(short)
    with torch.no_grad():
        chunk_ms = median_ms(lambda _: liv.chunked_recurrence(*full, args.chunk), device, args.reps, args.warmup)
        loop_ms = median_ms(lambda _: liv.recurrence_reference(*part), device, max(1, args.reps // 3), 1)
    return loop_ms, chunk_ms, short


def candidates(args):
    """What a search's new candidate costs once the catalogue is compiled: the warm-up, then per
    random genome the first step's overhead (its seconds beyond a steady step) against the
    training of the search's first rung (375 steps at the gpu preset), and tokens/s of its
    compiled blocks against the same genome compiled whole and against Transformer++ compiled whole,
    every side timed the same way (timed_step: forward, backward, optimizer step on one batch; the
    median of --reps)."""
    device, rng = torch.device(args.device), np.random.default_rng(args.seed)
    star.COMPILE_BACKEND = args.backend
    preset = dataclasses.replace(config.PRESETS[config.preset_name(args.preset)], steps=args.steps, compile=True,
                                 **{k: getattr(args, k) for k in ("width", "heads", "n_livs", "seq_len", "batch_size")
                                    if getattr(args, k) is not None})
    corpus = star.Corpus().check(preset)
    rung = config.SEARCH_DEFAULTS[config.preset_name(args.preset)]["rungs"][0]  # the search's first
    yardstick = attempt(tokens_per_second, gn.baseline("transformer++", gn.baseline_depth(preset.n_livs)), preset,
                        device, args)
    yardstick = yardstick if isinstance(yardstick, str) else yardstick[0]
    print(f"Transformer++ compiled whole: {yardstick if isinstance(yardstick, str) else f'{yardstick:,.0f} tokens/s'} "
          f"({preset.batch_size} x {preset.seq_len}, width {preset.width}, {preset.n_livs} LIVs, {device})", flush=True)
    star.warm_up(preset, corpus, device, log=lambda s: print(s, flush=True))
    print(f"{'genome':<44}{'first s':>8}{'step ms':>8}{f'% of {rung}':>8}{'tok/s':>11}{'x whole':>8}{'x T++':>7}"
          f"{'whole: first s':>15}")
    for _ in range(args.n):
        g = gn.random_genome(preset.n_livs, rng)
        r = star.train_candidate(g, corpus, preset, device)
        if r["status"] != "ok":
            print(f"{gn.summary(g)[:43]:<44}failed: {r.get('error')}", flush=True)
            continue
        blocks, _ = tokens_per_second(g, preset, device, args, whole=False)
        whole = attempt(tokens_per_second, g, preset, device, args)  # (tokens/s, first s) or 'failed: ...'
        step = preset.batch_size * preset.seq_len / blocks  # seconds
        overhead = 100 * max(0.0, r["first_step_seconds"] - step) / (rung * step)
        versus = (f"  whole: {whole}" if isinstance(whole, str) else f"{blocks / whole[0]:>8.2f}"
                  f"{'-' if isinstance(yardstick, str) else f'{blocks / yardstick:.2f}':>7}{whole[1]:>15.2f}")
        print(f"{gn.summary(g)[:43]:<44}{r['first_step_seconds']:>8.2f}{step * 1e3:>8.1f}{overhead:>8.2f}"
              f"{blocks:>11,.0f}{versus}", flush=True)


def tokens_per_second(genome, preset, device, args, whole=True):
    """Training tokens/s of the genome (median of timed steps) compiled as one graph, or as the
    search compiles it (residual blocks, after the warm-up); and the seconds of its first step."""
    model = star.build_model(genome, preset).to(device)
    if not whole:
        model.compile_blocks()
    step_fn, optimizer = compiled(model, whole), star.make_optimizer(model, preset, device)
    step = timed_step(step_fn, optimizer, torch.randint(0, 256, (preset.batch_size, preset.seq_len), device=device))
    first = time.perf_counter()
    step(None)
    sync(device)
    first = time.perf_counter() - first
    return preset.batch_size * preset.seq_len / (median_ms(step, device, args.reps, args.warmup) / 1e3), first


SECTIONS = ("ops", "train", "latency", "search", "candidates")
DEVICE_SECTIONS = ("warmup", "search", "blocks", "ops")
SHAPES = {  # reference shapes (plain-PyTorch yardsticks measured on an H200), and a smoke-test size that runs on a CPU in seconds
    "reference": {"ops": ["--batch", "8", "--seq-len", "2048", "--width", "768", "--heads", "12"],
                  "model": ["--width", "768", "--heads", "12", "--n-livs", "24"],
                  "train": ["--batch", "16", "--seq-len", "1024", "--vocab-size", "50304"],
                  "search": [], "candidates": ["--n", "5", "--steps", "200"]},
    "smoke": {"ops": ["--batch", "1", "--seq-len", "64", "--width", "32", "--heads", "4", "--reps", "1"],
              "model": ["--width", "32", "--heads", "4", "--n-livs", "4", "--reps", "2"],
              "train": ["--batch", "2", "--seq-len", "32"],
              "search": ["--width", "32", "--n-livs", "2", "--seq-len", "64", "--batch-size", "2", "--steps", "10", "--warmup", "2",
                         "--population", "4", "--eval-batches", "1", "--no-compile", "--device", "cpu"],
              "candidates": ["--n", "2", "--steps", "3", "--backend", "eager", "--width", "32", "--heads", "4", "--n-livs", "4",
                             "--seq-len", "32", "--batch-size", "2", "--reps", "2", "--warmup", "1"]},
}


def suite_commands(args):
    """The suite's commands by section: (section, argv) pairs, bench.py's own or evolve.py's."""
    shape = SHAPES["smoke" if args.smoke else "reference"]
    model, train_shape = shape["model"], shape["model"] + shape["train"]
    n = len(gn.CATALOGUE)
    every_class = gn.to_compact(gn.repair([[i + 1, i + 1, 1, i + 1, 1] for i in range(n)]))
    compile_flag = [] if args.smoke else ["--compile"]  # inductor on a CPU takes minutes per model
    whole_flag = [] if args.smoke else ["--compile-model"]
    decode = ["--prompt-len", "16", "--decode-tokens", "4"] if args.smoke else ["--dtype", "bfloat16"]
    bench_py, evolve_py = [sys.executable, __file__], [sys.executable, "evolve.py"]
    return [
        ("candidates", bench_py + ["candidates", "--preset", "gpu"] + shape["candidates"]),
        ("candidates", bench_py + ["ops"] + shape["ops"] + compile_flag),
        ("ops", bench_py + ["ops"] + shape["ops"]),
        ("ops", bench_py + ["ops"] + shape["ops"] + compile_flag),
        ("train", bench_py + ["train", "--baseline", "transformer++"] + train_shape + compile_flag),
        ("train", bench_py + ["train", "--baseline", "transformer++"] + train_shape),
        ("train", bench_py + ["train", "--baseline", "transformer++"] + whole_flag + train_shape),
        ("train", bench_py + ["train", "--baseline", "striped-mamba"] + train_shape + compile_flag),
        ("train", bench_py + ["train", "--genome", every_class] + train_shape + compile_flag),
        ("latency", bench_py + ["latency", "--baseline", "transformer++"] + model + decode),
        ("latency", bench_py + ["latency", "--baseline", "striped-mamba"] + model + decode),
        ("search", evolve_py + ["--preset", "gpu", "--population", str(args.search_population), "--generations",
                                "1", "--steps", str(args.search_steps), "--confirm-steps", "0",
                                "--out", os.path.join(args.out, "search")]
         + shape["search"]),  # end to end, throughput and turnover: no confirmation stage
    ]


BARE_PLAN = ("import evolve, runs; s = runs.settings_from_args(runs.parse_args(['--preset', 'gpu']), print); "
             "print('bare gpu search plan: %d trainings, %d steps, %d tokens' % evolve.planned_compute(s))")


def device_plan(args):
    """The GPU path in two calls of at most 8 minutes on a fresh H200 (issue 37): --only warmup,search
    (the cold warm-up, then a 3-candidate, one-rung gpu search from the warm cache), then --only
    blocks,ops (Transformer++ per block against the same model compiled whole, at the anchor's shape
    of the plain-PyTorch anchor (an H200: 2.98M tokens/s compiled whole, 1.62M eager); every class's
    forward+backward against SA-1). (section, argv, timeout s) triples; --smoke: CPU sizes, dynamo's
    eager backend (STAR_COMPILE_BACKEND)."""
    smoke, compile_flag = args.smoke, [] if args.smoke else ["--compile"]
    sizes = ["--width", "32", "--heads", "4", "--n-livs", "4", "--seq-len", "32", "--batch-size", "2"] if smoke else []
    rung = ["--rungs", "3", "--warmup", "1", "--eval-batches", "1", "--device", "cpu"] if smoke else ["--rungs", "375"]
    anchor = (["--width", "32", "--heads", "4", "--n-livs", "4", "--batch", "2", "--seq-len", "32"] if smoke else
              ["--preset", "gpu", "--batch", "64", "--seq-len", "1024"])
    star_py, evolve_py, bench_py = [sys.executable, "star.py"], [sys.executable, "evolve.py"], [sys.executable, __file__]
    return [
        ("warmup", star_py + ["compile", "--preset", "gpu"] + sizes + (["--device", "cpu"] if smoke else []), 200),
        ("search", evolve_py + ["--preset", "gpu", "--population", "3", "--generations", "1", "--confirm-steps",
                                "0", "--out", os.path.join(args.out, "search")] + rung + sizes, 130),
        ("search", [sys.executable, "-c", BARE_PLAN], 30),  # the bare gpu search's tokens, for its hours
        ("blocks", bench_py + ["train", "--baseline", "transformer++"] + compile_flag + anchor, 90),
        ("blocks", bench_py + ["train", "--baseline", "transformer++"] + (
            [] if smoke else ["--compile-model"]) + anchor, 90),
        ("ops", bench_py + ["ops"] + SHAPES["smoke" if smoke else "reference"]["ops"] + compile_flag, 180),
    ]


def suite(args):
    """The prepared GPU script: every command's output streams to its own log under --out, each has
    its own timeout, and --out's suite.md (a table of the commands, seconds and exit codes, then
    their logs) is rewritten after each, so a call cut short still returns what it measured.
    --plan reference: the candidates after the warm-up, ops, train, latency and a 5-candidate
    search (30-45 min cold on an H200); --plan device: device_plan. `--only` runs some sections;
    `--smoke` runs the plan at tiny sizes on a CPU, to check the script before GPU time."""
    import subprocess
    plan = device_plan(args) if args.plan == "device" else [(s, argv, 3600) for s, argv in suite_commands(args)]
    sections = set(args.only.split(",")) if args.only else {section for section, _, _ in plan}
    start, rows = time.time(), []
    for section, argv, timeout in plan:
        if section not in sections or any(argv == done for _, done, _, _ in rows):  # (smoke: compiled = eager)
            continue
        command = " ".join([os.path.basename(argv[1])] + argv[2:])
        log = os.path.join(args.out, f"{len(rows) + 1:02d}-{section}.log")
        print(f"\n[{time.time() - start:6.0f} s] $ {command}   (log: {log}, timeout {timeout} s)", flush=True)
        began = time.time()
        with open(log, "w") as f:
            f.write(f"$ {command}\n")
            f.flush()
            child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env={
                **os.environ, "PYTHONUNBUFFERED": "1", **({"STAR_COMPILE_BACKEND": "eager"} if args.smoke else {})})
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:  # the command and what it started (the warm-up's compile shares)
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                code = f"timeout {timeout} s"
        with open(log) as f:
            print(f.read().split("\n", 1)[1], end="", flush=True)
        rows.append((section, argv, time.time() - began, code))
        write_suite_table(args.out, rows, time.time() - start)
    failures = sum(code != 0 for *_, code in rows)
    print(f"\nsuite done in {time.time() - start:.0f} s, {failures} command(s) failed; {args.out}/suite.md", flush=True)
    if failures:
        config.fail(f"{failures} of {len(rows)} suite commands failed: their logs are in {args.out}/suite.md")


def write_suite_table(out, rows, seconds):
    table = ["| section | command | seconds | exit |", "|---|---|---|---|"] + [
        f"| {section} | `{' '.join(argv[2:])}` | {took:.0f} | {code} |" for section, argv, took, code in rows]
    logs = []
    for i, (section, *_) in enumerate(rows, 1):
        with open(os.path.join(out, f"{i:02d}-{section}.log")) as f:
            logs.append(f.read())
    failures = sum(code != 0 for *_, code in rows)
    config.write_file(os.path.join(out, "suite.md"), "\n".join(
        table + ["", f"{len(rows)} commands in {seconds:.0f} s, {failures} failed", ""] + search_rows(out) + ["```"]
        + logs + ["```"]))


def search_rows(out):
    """The suite's search, per candidate: tokens/s and the first step's overhead (compilation,
    warm-up: its seconds beyond a steady step) as a share of its rung's training."""
    path, rows = os.path.join(out, "search", "evaluations.jsonl"), []
    if os.path.exists(path):
        with open(path) as f:
            for e in (json.loads(line) for line in f if line.strip()):
                if e.get("status") == "ok" and e.get("steps_trained", 0) > 1 and e.get("tokens_per_second"):
                    step = (e["train_seconds"] - e["first_step_seconds"]) / (e["steps_trained"] - 1)  # seconds
                    rows.append(f"| {e['summary']} | {e['tokens_per_second']:,.0f} | {e['first_step_seconds']:.2f} | "
                                f"{100 * max(0.0, e['first_step_seconds'] - step) / e['train_seconds']:.1f} |")
    if not rows:
        return []
    speed = float(np.mean([float(row.split(" | ")[1].replace(",", "")) for row in rows]))
    logs = "".join(open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith("-search.log"))
    plan = re.search(r"bare gpu search plan: .*?(\d+) tokens", logs)
    hours = [f"The bare gpu search: {int(plan[1]):,} tokens planned at the candidates' mean {speed:,.0f} tokens/s: "
             f"{int(plan[1]) / speed / 3600:.1f} h of training (the warm-up, first steps and evaluation besides).",
             ""] if plan else []
    return ["| search candidate | tokens/s | first step s | overhead, % of its rung |", "|---|---|---|---|", *rows,
            "", *hours]


def dtype_of(args):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]


def add_args(s, name):
    """The flags of one bench.py command."""
    number = config.number
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    if name in ("latency", "train", "candidates"):
        s.add_argument("--preset", default="auto", help="width, heads and depth unless given: tiny, gpu or auto")
    s.add_argument("--width", type=number("width"), default=768 if name == "ops" else None,
                   help="model width" + ("" if name == "ops" else " (default: the preset's)"))
    s.add_argument("--heads", type=number("heads"), default=12 if name == "ops" else None,
                   help="heads" + ("" if name == "ops" else " (default: the preset's)"))
    s.add_argument("--chunk", type=number("chunk"), default=64, help="chunk length of the chunked recurrence")
    s.add_argument("--reps", type=number("reps"), default=10, help="timed repetitions")
    s.add_argument("--warmup", type=number("warmup"), default=3, help="untimed warm-up repetitions")
    s.add_argument("--compile", action="store_true", help="time torch.compile'd code")
    if name in ("latency", "train"):
        config.add_genome_source(s)
        s.add_argument("--n-livs", type=number("n_livs"), default=None, help="LIVs in depth (default: the preset's)")
        s.add_argument("--vocab-size", type=number("vocab_size"), default=256, help="vocabulary")
        s.add_argument("--max-len", type=number("max_len"), default=2048, help="longest sequence (the long filter's length)")
    if name == "latency":
        s.add_argument("--batch", type=number("batch"), default=1, help="sequences decoded together")
        s.add_argument("--prompt-len", type=number("prompt_len"), default=512, help="prompt tokens (prefill)")
        s.add_argument("--decode-tokens", type=number("decode_tokens"), default=64, help="tokens decoded one by one")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
        s.add_argument("--trace", help="write a Chrome trace (chrome://tracing, Perfetto) of the profiled pass")
    if name in ("train", "ops"):
        s.add_argument("--batch", type=number("batch"), default=8, help="sequences per step")
        s.add_argument("--seq-len", type=number("seq_len"), default=2048 if name == "ops" else 1024, help="tokens per sequence")
    if name == "train":
        s.add_argument("--peak-tflops", type=number("peak_tflops"), default=None, help="the card's peak, for MFU")
        s.add_argument("--compile-model", action="store_true", help="compile the whole model, not blocks")
    if name == "candidates":
        s.add_argument("--n", type=number("genomes"), default=4, help="random genomes to train")
        s.add_argument("--steps", type=number("steps"), default=200, help="steps per candidate")
        s.add_argument("--n-livs", type=number("n_livs"), default=None, help="LIVs (default: the preset's)")
        s.add_argument("--seq-len", type=number("seq_len"), default=None, help="tokens per sequence")
        s.add_argument("--batch-size", type=number("batch_size"), default=None, help="sequences per step")
        s.add_argument("--seed", type=number("seed"), default=0, help="seed of the random genomes")
        s.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                       help="torch.compile backend (eager: dynamo's graphs without code generation, for --smoke)")
    if name == "suite":
        s.add_argument("--plan", default="reference", choices=["reference", "device"],
                       help="reference: every section (30-45 min cold); device: two calls of 8 min (README)")
        s.add_argument("--only", help="comma-separated sections: " + ", ".join(SECTIONS) + "; device plan: "
                       + ", ".join(DEVICE_SECTIONS))
        s.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU: check the script itself")
        s.add_argument("--search-steps", type=number("steps"), default=200, help="steps per candidate of the search")
        s.add_argument("--search-population", type=number("population"), default=5, help="the search's population")
        s.add_argument("--out", default="runs/suite", help="the search's output directory")


def parse_args(argv):
    p = config.Parser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{latency,train,ops,suite,candidates}")
    helps = {"latency": "prefill and per-token decode time, per LIV class", "train": "training tokens/s, memory, MFU",
             "ops": "every LIV class against SDPA attention", "suite": "the prepared GPU measurements in one call",
             "candidates": "a search's candidates after the catalogue's warm-up, against whole-model compilation"}
    for name, what in helps.items():
        add_args(sub.add_parser(name, help=what, description=what), name)
    args = p.parse_args(argv)
    if args.command == "latency" and args.prompt_len + args.decode_tokens + 1 > args.max_len:
        args.max_len = args.prompt_len + args.decode_tokens + 1
    if args.command in ("train", "ops") and args.seq_len > getattr(args, "max_len", 0):
        args.max_len = args.seq_len
    return args


def check_args(args):
    """What argparse cannot check, before any work: device, output paths, suite sections, shapes."""
    args.device = config.resolve_device(args.device)
    if getattr(args, "trace", None):
        config.output_file(args.trace, "trace")
    if args.command == "suite":
        known = DEVICE_SECTIONS if args.plan == "device" else SECTIONS
        unknown = set(args.only.split(",")) - set(known) if args.only is not None else set()
        if unknown:
            raise ValueError(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
        search = os.path.join(args.out, "search")
        if ("search" in args.only.split(",") if args.only else True) and os.path.exists(search):
            raise ValueError(f"--out {args.out} already holds a suite's search ({search}): choose another --out")
        config.output_dir(args.out, "search output directory")
    if args.command == "ops":
        config.check_preset(dataclasses.replace(config.PRESETS["tiny"], width=args.width, heads=args.heads,
                                              seq_len=args.seq_len, chunk=args.chunk))


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        {"latency": latency, "train": train, "ops": ops, "suite": suite, "candidates": candidates}[args.command](args)
    except ValueError as e:
        config.fail(e)
    except Exception as e:  # noqa: BLE001 -- a compile error (torch's are long): its first line
        config.fail(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300])


if __name__ == "__main__":
    main()
