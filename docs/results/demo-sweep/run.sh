#!/bin/bash
# `onthejob demo` under a few recipes, each followed by which general questions its candidate
# adapter got wrong that the base got right (general_diff.py). Usage: run.sh NAME [demo flags].
cd "$(dirname "$0")/../../.." || exit 1
name=$1; shift
log=docs/results/demo-sweep/$name.log
flock /tmp/onthejob-heavy.lock .venv/bin/onthejob demo "$@" > "$log" 2>&1
home=$(grep -o "this demo's own folder [^ ]*" "$log" | head -1 | awk '{print $NF}')
flock /tmp/onthejob-heavy.lock .venv/bin/python docs/results/demo-sweep/general_diff.py "$home" >> "$log" 2>&1
grep -E "^(promoted|rejected)|learned [0-9] of|->|: base" "$log" | grep -v Loading
