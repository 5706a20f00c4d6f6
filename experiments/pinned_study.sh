#!/usr/bin/env bash
# Run or resume a study longer than one machine's lease, all of it at one pinned commit.
# `dvc repro STUDY` runs in a clone of this checkout at COMMIT (DIR, default
# ../study-<commit>); the cells already published in this checkout (by earlier machines)
# are copied in first, so they are skipped; every cell that finishes there is copied back
# and committed here, one commit per cell (`metrics/study/STUDY/<cell>/`: its record and
# what the report reads of it). On a fresh machine, rerun the same command: it resumes.
# The study's code stays the pinned commit's while this checkout moves on. When the last
# cell is in, the report and dvc.lock are committed in DIR on a branch from COMMIT
# (study-STUDY-<commit>: the code and params the lock names) and merged here.
# It runs with this checkout's .venv (`make setup` first); PUBLISH_EVERY: seconds between
# looks for finished cells (60).
#   experiments/pinned_study.sh 1a2b3c4d compare            # further arguments go to dvc repro
set -uo pipefail
commit=$1 study=$2; shift 2
here=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=${DIR:-$here/../study-${commit:0:8}}
[ -d "$dir/.git" ] || git clone -q "$here" "$dir" || exit 1
git -C "$dir" fetch -q "$here" && git -C "$dir" checkout -q "$commit" || exit 1
mkdir -p "$here/metrics/study/$study" "$dir/metrics/study/$study"
# this checkout's published cells are the truth: a cell withdrawn here is withdrawn there
rsync -a --delete --exclude '.*.unisd-lock' "$here/metrics/study/$study/" "$dir/metrics/study/$study/"

publish() {  # each cell whose record changed there: copied here and committed alone
  local rec cell
  for rec in "$dir/metrics/study/$study"/*/cell.json; do
    [ -f "$rec" ] || continue
    cell=$(basename "$(dirname "$rec")")
    cmp -s "$rec" "$here/metrics/study/$study/$cell/cell.json" && continue
    rsync -a --delete --exclude '.*.unisd-lock' "$dir/metrics/study/$study/$cell/" "$here/metrics/study/$study/$cell/"
    git -C "$here" add "metrics/study/$study/$cell" &&
      git -C "$here" commit -q -m "study $study: cell $cell published (run at ${commit:0:12})" -- "metrics/study/$study/$cell" ||
      echo "pinned_study: committing $cell failed; retried in a minute" >&2
  done
}

(cd "$dir" && PATH="$here/.venv/bin:$PATH" PYTHONPATH="$dir" dvc repro "$@" "$study") &
pid=$!
trap 'kill $pid 2>/dev/null' INT TERM
while kill -0 $pid 2>/dev/null; do publish; sleep "${PUBLISH_EVERY:-60}"; done
wait $pid
rc=$?
publish
# the study is complete: its report and dvc.lock, committed there on top of the pinned code
# (the commit whose code and params the lock names), merged here
branch=study-$study-${commit:0:8}
if [ $rc -eq 0 ]; then
  { git -C "$dir" checkout -q -B "$branch" &&
    git -C "$dir" add dvc.lock "reports/$study" "metrics/study/$study" &&
    git -C "$dir" commit -q -m "study $study: report and dvc.lock, run at ${commit:0:12}" &&
    git -C "$here" fetch -q "$dir" "$branch" &&
    git -C "$here" merge -q --no-edit -m "study $study: published (report and dvc.lock of $branch)" FETCH_HEAD; } ||
    { git -C "$here" merge --abort 2>/dev/null
      echo "pinned_study: merging the report failed; it is committed in $dir on $branch" >&2; rc=1; }
fi
exit $rc
