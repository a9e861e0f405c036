#!/bin/sh
# What each performance lever bought, in two ways (proxy CPU per GB, per
# request, per connection; CPU time moves less than throughput on a shared
# machine).  NOTES.md cites the output.
#
#   sh benchmarks/levers.sh [COMMIT ...]   rawproxy as it was at several
#       commits, each checked out into a temporary git worktree, given this
#       checkout's benchmarks/, and run with `--peers rawproxy` (the splice
#       path where that commit has it);
#   sh benchmarks/levers.sh --ablate       issue #17's levers, one row each:
#       this checkout's HEAD with every lever switched off (the patches in
#       benchmarks/levers/, one per lever, each of one-line switches), then with
#       them switched back on one at a time, in the patches' order; the last
#       row is HEAD as it is.  Same code otherwise, so the rows differ by
#       the levers alone.  Run with `--peers rawproxy,rawproxy-info` (the
#       access-log lever shows at `info` only).
#
# From the repository root, after make test.  LEVERS_ROUNDS (default 3)
# rounds of each workload; LEVERS_OUT the directory of the JSON results.
set -eu
ROOT=$(git rev-parse --show-toplevel)
PY="$ROOT/.venv/bin/python"
OUT=${LEVERS_OUT:-"$ROOT/benchmarks/results/levers"}
ROUNDS=${LEVERS_ROUNDS:-3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # measure() runs in a worktree: a relative path would land there

# measure LABEL TREE PEERS WORKLOADS JSON: one benchmarks.run in TREE.
measure() {
    echo "== $1"
    (cd "$2" && "$PY" -m benchmarks.run --peers "$3" --rounds "$ROUNDS" \
        --workloads "$4" --json "$5" | sed -n '/^median/,/^$/p') || true
}

tree=""
# A patch that fails to apply (set -e) must not leave a worktree behind.
trap '[ -z "$tree" ] || { git -C "$ROOT" worktree remove --force "$tree/src" 2>/dev/null || true; rm -rf "$tree"; git -C "$ROOT" worktree prune; }' EXIT
trap 'exit 130' INT TERM

if [ "${1:-}" = "--ablate" ]; then
    patches=$(ls "$ROOT"/benchmarks/levers/*.patch)
    sha=$(git -C "$ROOT" rev-parse --short HEAD)
    on=0
    for _ in x $patches; do  # one row with none on, then one more lever each
        tree=$(mktemp -d /tmp/rawproxy-lever-XXXXXX)
        git -C "$ROOT" worktree add --detach --quiet "$tree/src" "$sha"
        index=0
        label="$sha, every lever off"
        for patch in $patches; do
            index=$((index + 1))
            name=$(basename "$patch" .patch)
            if [ "$index" -gt "$on" ]; then
                git -C "$tree/src" apply "$patch"  # this lever stays off
            elif [ "$index" -eq "$on" ]; then
                label="$sha, levers on up to $name"
            fi
        done
        measure "$label" "$tree/src" rawproxy,rawproxy-info reqresp,churn \
            "$OUT/ablate-$sha-$on.json"
        git -C "$ROOT" worktree remove --force "$tree/src"
        rm -rf "$tree"
        tree=""
        on=$((on + 1))
    done
    exit 0
fi

# core (copy path only), splice, before and after the steady-state interest
# skip, before and after the churn work (timer tuples, cached IP targets),
# and fe700f7, whose rawproxy/ is what shipped (name HEAD to add today's).
COMMITS=${*:-"61b0d49 23401f0 f878100 8c30f71 0d98f4b 16ba7c2 fe700f7"}
for commit in $COMMITS; do
    sha=$(git -C "$ROOT" rev-parse --short "$commit")
    tree=$(mktemp -d /tmp/rawproxy-lever-XXXXXX)
    git -C "$ROOT" worktree add --detach --quiet "$tree/src" "$sha"
    rm -rf "$tree/src/benchmarks" && cp -R "$ROOT/benchmarks" "$tree/src/benchmarks"
    measure "$sha: $(git -C "$ROOT" log -1 --format=%s "$sha" | cut -c1-70)" "$tree/src" \
        rawproxy bulk1,reqresp,churn "$OUT/$sha.json"
    git -C "$ROOT" worktree remove --force "$tree/src"
    rm -rf "$tree"
    tree=""
done
