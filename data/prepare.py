"""Make a token file for real runs: nanoGPT's flat uint16 `.bin`, GPT-2 BPE tokens (tiktoken) or bytes.

    python data/prepare.py --files notes/*.txt --out data/mine.bin                  # local text files
    python data/prepare.py --dataset fineweb-edu --max-tokens 500M --out data/fineweb.bin
    python data/prepare.py --dataset tinystories --out data/tinystories.bin         # a small one
    python data/prepare.py --files book.txt --tokenizer bytes --out data/book.bin   # bytes, as the presets read

A dataset is streamed from the Hugging Face hub (`datasets`), never downloaded whole; documents
are separated by the tokenizer's end-of-text token (a newline for bytes). `tiktoken` and
`datasets` are optional: only this script imports them. It ends by printing the evolve.py command
to use and how many passes over the data one candidate of the gpu preset would make.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import Parser, fail  # noqa: E402  -- one-line refusals, exit code 1, as every command

DATASETS = {  # short name -> (hub path, configuration, text field)
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),  # the default: educational web text
    "tinystories": ("roneneldan/TinyStories", None, "text"),  # small and simple: a quick start
}
GPU_PRESET_TOKENS = 2000 * 32 * 1024  # steps x batch x sequence of one candidate of star.py's gpu preset


def tokenizer(name):
    """(encode: str -> list of ids, vocabulary size, separator id) for 'gpt2' or 'bytes'."""
    if name == "bytes":
        return (lambda text: list(text.encode("utf-8"))), 256, ord("\n")
    try:
        import tiktoken
    except ImportError:
        fail("--tokenizer gpt2 needs tiktoken: pip install tiktoken (or use --tokenizer bytes)")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 -- tiktoken fetches the BPE tables once, over the network
        fail(f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}); tiktoken downloads it on first use")
    return enc.encode_ordinary, enc.n_vocab, enc.eot_token


def documents(args):
    """The texts to tokenize: each local file, or each record of a streamed dataset."""
    if args.files:
        for path in args.files:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError as e:
                fail(f"cannot read text file {path}: {(e.strerror or str(e)).lower()}")
            yield text
        return
    try:
        import datasets
    except ImportError:
        fail("--dataset needs the datasets package: pip install datasets")
    hub, config, field = DATASETS.get(args.dataset, (args.dataset, args.config, "text"))
    try:
        stream = datasets.load_dataset(hub, args.config or config, split="train", streaming=True)
        for record in stream:
            yield record[field]
    except Exception as e:  # noqa: BLE001 -- network, unknown dataset, missing field: one line
        fail(f"dataset {hub}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def count(text):
    """'500M', '2G', '100k' or a plain integer."""
    scale = {"k": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 500M") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def prepare(texts, encode, separator, out, max_tokens=None, log=sys.stderr):
    """Write the tokens of texts to out (written to out.partial, renamed when complete); returns the count."""
    try:
        written = write_tokens(texts, encode, separator, out + ".partial", max_tokens, log)
        os.replace(out + ".partial", out)
    except OSError as e:
        fail(f"cannot write {out}: {(e.strerror or str(e)).lower()}")
    finally:  # a failed or interrupted run leaves no partial file behind
        if os.path.exists(out + ".partial"):
            os.remove(out + ".partial")
    print(file=log)
    return written


def write_tokens(texts, encode, separator, path, max_tokens, log):
    written, last, start = 0, 0.0, time.time()
    with open(path, "wb") as f:
        for text in texts:
            ids = encode(text) + [separator]
            if max_tokens is not None:
                ids = ids[: max_tokens - written]
            np.asarray(ids, dtype=np.uint16).tofile(f)
            written += len(ids)
            if time.time() - last > 0.5 or written == max_tokens:
                last = time.time()
                total = f" / {max_tokens:,} ({100 * written / max_tokens:.0f}%)" if max_tokens else ""
                print(f"\r{written:,} tokens{total}, {written / max(last - start, 1e-9):,.0f}/s",
                      end="", file=log, flush=True)
            if written == max_tokens:
                break
    return written


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", nargs="+", help="local UTF-8 text files, one document each")
    source.add_argument("--dataset", help=f"a Hugging Face dataset: {', '.join(DATASETS)} or a hub path")
    p.add_argument("--config", help="the dataset's configuration (default: fineweb-edu's sample-10BT)")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default="gpt2", help="GPT-2 BPE (tiktoken) or bytes")
    p.add_argument("--max-tokens", type=count, default=None, help="stop after this many tokens (datasets: 100M)")
    p.add_argument("--out", required=True, help="the .bin file to write")
    args = p.parse_args(argv)
    if not args.out.endswith(".bin"):
        fail(f"--out {args.out}: the token file must end in .bin (that is how star.py reads it)")
    for path in args.files or []:
        if not os.path.isfile(path):
            fail(f"text file not found: {path}" if not os.path.exists(path) else f"{path} is not a regular file")
        if os.path.exists(args.out) and os.path.samefile(path, args.out):
            fail(f"--files {path} is also --out: it would be overwritten while read")
        if os.path.getsize(path) == 0:
            fail(f"text file {path} is empty")
    if os.path.isdir(args.out):
        fail(f"--out {args.out} is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out}: its directory does not exist")
    encode, vocab, separator = tokenizer(args.tokenizer)
    max_tokens = args.max_tokens or (None if args.files else 100 * 10**6)
    n = prepare(documents(args), encode, separator, args.out, max_tokens)
    train = int(0.9 * n)  # star.Corpus trains on the first 90%
    vocab_flag = 50304 if vocab == 50257 else vocab  # GPT-2's vocabulary padded to a multiple of 64, as nanoGPT
    print(f"wrote {n:,} tokens ({args.tokenizer}, vocabulary {vocab}) to {args.out}\n"
          f"search on it: python evolve.py --data {args.out} --vocab-size {vocab_flag}\n"
          f"one candidate of the gpu preset reads {GPU_PRESET_TOKENS / max(train, 1):.2f} passes over its train split")


if __name__ == "__main__":
    main()
