# Sourced by the GPU step scripts: the common settings (results under $OUT,
# the repository on PYTHONPATH, unbuffered output, a persistent XLA cache,
# START for the budget), then run NAME LIMIT COMMAND... runs one step
# under a time limit (at most what is left of $BUDGET since $START), logs it
# to $OUT/NAME.log and prints its tail.
OUT=${OUT:-/tmp/jpaged-out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JPAGED_XLA_CACHE=${JPAGED_XLA_CACHE:-/tmp/jpaged-xla}
START=$SECONDS
run() {
    local name=$1 limit=$2; shift 2
    local left=$(( ${BUDGET:-100000} - (SECONDS - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 30 ]; then echo "SKIPPED $name: ${left} s left"; return; fi
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || echo "FAILED or stopped: $name (rc $?)"
    grep -v -e "^\s*$" -e cuda_timer "$OUT/$name.log" | tail -${RUN_TAIL:-25}
}
