#!/bin/sh
# What each performance lever bought: rawproxy as it was at several commits,
# measured by today's harness (proxy CPU per GB, per request, per connection;
# CPU time moves less than throughput on a shared machine).  Each commit is
# checked out into a temporary git worktree, given this checkout's
# benchmarks/, and run with `--peers rawproxy` (the splice path where that
# commit has it).  NOTES.md cites its output.
#
#   sh benchmarks/levers.sh [COMMIT ...]      (from the repository root, after make test)
set -eu
ROOT=$(git rev-parse --show-toplevel)
PY="$ROOT/.venv/bin/python"
OUT=${LEVERS_OUT:-"$ROOT/benchmarks/results/levers"}
ROUNDS=${LEVERS_ROUNDS:-3}
# core (copy path only), splice, before and after the steady-state interest
# skip, before and after the churn work (timer tuples, cached IP targets),
# and fe700f7, whose rawproxy/ is what shipped (name HEAD to add today's).
COMMITS=${*:-"61b0d49 23401f0 f878100 8c30f71 0d98f4b 16ba7c2 fe700f7"}
mkdir -p "$OUT"
for commit in $COMMITS; do
    sha=$(git -C "$ROOT" rev-parse --short "$commit")
    tree=$(mktemp -d /tmp/rawproxy-lever-XXXXXX)
    git -C "$ROOT" worktree add --detach --quiet "$tree/src" "$sha"
    rm -rf "$tree/src/benchmarks" && cp -R "$ROOT/benchmarks" "$tree/src/benchmarks"
    echo "== $sha: $(git -C "$ROOT" log -1 --format=%s "$sha" | cut -c1-70)"
    (cd "$tree/src" && "$PY" -m benchmarks.run --peers rawproxy --rounds "$ROUNDS" \
        --workloads bulk1,reqresp,churn --json "$OUT/$sha.json" | sed -n '/^median/,/^$/p') || true
    git -C "$ROOT" worktree remove --force "$tree/src"
    rm -rf "$tree"
done
