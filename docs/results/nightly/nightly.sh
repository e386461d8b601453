#!/bin/bash
# What a team's cron job runs: the plan with its estimate, then the consolidation, the output
# going to a file (run: docs/results/nightly/nightly.sh > nightly.log 2>&1).
set -e
export ONTHEJOB_HOME=${ONTHEJOB_HOME:-/tmp/onthejob-nightly}
onthejob consolidate --tenant acme --dry-run
onthejob consolidate --tenant acme
onthejob runs list --tenant acme
