#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into .device-carry/ (ignored by git), to be carried with a
# device run: the wheels in .whl/ unpacked and recompressed with xz (SimpleITK's 53 MB wheel
# becomes about 29 MB) and a copy of the real cases (REAL, default ../shared/data/real) for
# painted-in training data. The machine takes at most 64 MiB with the tree: the sizes are printed
# against that limit, and the script fails when they exceed it.
set -euo pipefail
cd "$(dirname "$0")/.."
REAL=${REAL:-../shared/data/real}
DEST=.device-carry
LIMIT=$((64 * 1024 * 1024))
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: pip download SimpleITK slicerio pynrrd --no-deps -d .whl --python-version 3.12 --only-binary=:all:" >&2; exit 1; }
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for w in .whl/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
XZ_OPT=${XZ_OPT:--6 -T0} tar -cJf "$DEST/site.tar.xz" -C "$tmp/site" .
if [ -d "$DEST/real" ]; then chmod -R u+w "$DEST/real" && rm -rf "$DEST/real"; fi  # a copy of read-only data
if [ -d "$REAL" ]; then cp -r "$REAL" "$DEST/real" && chmod -R u+w "$DEST/real"; else echo "(no real cases at $REAL: training will use phantoms only)"; fi
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carry=$(du -sb "$DEST" | cut -f1)
echo "tree $((tree / 1048576)) MiB + $DEST $((carry / 1048576)) MiB = $(((tree + carry) / 1048576)) MiB of 64 MiB"
echo "carry it: run(..., carry=[\"$DEST\"])"
[ $((tree + carry)) -le $LIMIT ] || { echo "too large for the device transfer: leave out the real cases (REAL=/nonexistent) or wheels" >&2; exit 1; }
