# Sourced by the GPU step scripts: run NAME LIMIT COMMAND... runs one step
# under a time limit (at most what is left of $BUDGET since $START), logs it
# to $OUT/NAME.log and prints its tail.
run() {
    local name=$1 limit=$2; shift 2
    local left=$(( ${BUDGET:-100000} - (SECONDS - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 30 ]; then echo "SKIPPED $name: ${left} s left"; return; fi
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || echo "FAILED or stopped: $name (rc $?)"
    grep -v -e "^\s*$" -e cuda_timer "$OUT/$name.log" | tail -${RUN_TAIL:-25}
}
