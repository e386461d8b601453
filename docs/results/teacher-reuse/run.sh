#!/bin/bash
# Teacher rows reused (issue 15): two co-work sessions answered by `onthejob serve` with the
# real default model (it keeps each answer's top-32 log-probs), approved, then consolidated
# twice from the same database: as the nightly job does (reusing the kept rows) and with
# --rescore-kept (scoring those answers again), and report.py compares the two.
#
#   docs/results/teacher-reuse/run.sh > docs/results/teacher-reuse/run.log 2>&1
#
# Runs under `flock /tmp/onthejob-heavy.lock` (it takes the lock itself). STEPS (default 1):
# training steps of each consolidation; the reuse is decided while the teacher's rows are
# prepared, before training, so one step measures it; STEPS= (empty) trains as the nightly
# job does (about 25 min more each). DATA: the SEAL SQuAD dev file. MODEL: another model
# directory (a smoke test with a small model; then the lock is not taken), PASSAGES per
# briefing (default 5) and MAX_TOKENS per answer (default 256, the server's; a model with a short context
# needs fewer of both).
set -euo pipefail
MODEL=${MODEL:-}
if [ -z "$MODEL" ] && [ -z "${ONTHEJOB_REUSE_LOCKED:-}" ]; then
  exec env ONTHEJOB_REUSE_LOCKED=1 flock /tmp/onthejob-heavy.lock "$0" "$@"
fi
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PY=${PY:-/work/main/.venv/bin/python}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
DATA=${DATA:-/work/shared/data/squad_seal_val.json}
STEPS=${STEPS-1}
PORT=${PORT:-8765}
WORK=$(mktemp -d /tmp/onthejob-reuse.XXXXXX)
REUSE=$WORK/reuse RESCORE=$WORK/rescore
mkdir -p "$REUSE"
OTJ=("$PY" -c 'import sys; from onthejob.cli import main; sys.argv[0] = "onthejob"; sys.exit(main())')
otj() { "${OTJ[@]}" "$@"; }
stamp() { echo "$(date -u '+%F %T') $*"; }

export ONTHEJOB_HOME=$REUSE
KEY=$(otj tenants add acme | sed -n 's/^API key (shown once, store it now): //p')
stamp "serving on port $PORT (home $REUSE)"
if curl -s "http://127.0.0.1:$PORT/health" >/dev/null; then
  echo "port $PORT is taken: set PORT" >&2; exit 1
fi
"${OTJ[@]}" serve --port "$PORT" --keep-top-k 32 ${MODEL:+--model "$MODEL"} &
SERVER=$!  # the server's own pid (not a subshell's), so that kill stops it
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 1
done
"$PY" "$HERE/sessions.py" --base "http://127.0.0.1:$PORT/v1" --key "$KEY" --data "$DATA" \
  --passages "${PASSAGES:-5}" --max-tokens "${MAX_TOKENS:-256}"
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
trap - EXIT
cp -a "$REUSE" "$RESCORE"  # the same sessions, for the consolidation that scores them again

steps=(); [ -n "$STEPS" ] && steps=(--steps "$STEPS")
[ -n "$MODEL" ] && steps+=(--model "$MODEL")
stamp "consolidating, reusing the kept rows"
# Exit status 3 is a candidate the gate rejected: an outcome, not a failure of the measure.
ONTHEJOB_HOME=$REUSE otj consolidate --tenant acme "${steps[@]}" || [ $? -eq 3 ]
stamp "consolidating, scoring the answers again (--rescore-kept)"
ONTHEJOB_HOME=$RESCORE otj consolidate --tenant acme "${steps[@]}" --rescore-kept || [ $? -eq 3 ]
stamp "report"
"$PY" "$HERE/report.py" "$REUSE" "$RESCORE" ${MODEL:+"$MODEL"} | tee "$WORK/figures.json"
[ -z "$MODEL" ] && cp "$WORK/figures.json" "$HERE/figures.json"
stamp "done (work files in $WORK)"
