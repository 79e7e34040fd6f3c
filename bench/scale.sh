# bench/scale.sh: `bash bench/run --scale`, sourced by bench/run after the cluster is up with the
# employees sample (10,000 persons) and the extension. How planning cost grows with size: the
# sample is grown to 10,000, 100,000 and 1,000,000 persons (bench/grow.sql, between the
# measurements, while no target exists, so nothing is planned for it), and each time one
# dry-run target (bench/plan-targets.sql's `directory`: 15 mapped attributes, 5 rules, a unique
# userName, a manager reference) is resynced until wait_idle: persons per second, with the
# events planned and the 1-minute load average at the end of each size.
scale_run() {
    local n have=0 last secs events rate load persons t0
    local -a rows=()
    for n in 10000 100000 1000000; do
        last=$(( n / 10000 - 1 ))
        if [ "$last" -gt "$have" ]; then
            say "scale: growing the sample to $n persons"
            psql -X -q -v ON_ERROR_STOP=1 -v first=$(( have + 1 )) -v last="$last" -d "$DB" -f bench/grow.sql >/dev/null
            have=$last
        fi
        persons=$(q "SELECT count(*) FROM employee")
        [ "$persons" = "$n" ] || die "expected $n persons, found $persons"
        idle 900
        q "VACUUM ANALYZE" >/dev/null
        psql -X -q -v ON_ERROR_STOP=1 -d "$DB" -f bench/plan-targets.sql >/dev/null
        q "SELECT identity_sync.drop_target('feed')" >/dev/null
        say "scale: resync of $n persons into one dry-run target"
        t0=$(q "SELECT clock_timestamp()")
        q "SELECT identity_sync.resync('directory')" >/dev/null
        idle 3600
        read -r secs events < <(q "
SELECT round(extract(epoch FROM clock_timestamp() - '$t0'::timestamptz)::numeric, 2),
       (SELECT coalesce(sum(events), 0) FROM identity_sync.plan_run WHERE started_at >= '$t0')" | tr '|' ' ')
        rate=$(calc "$n / $secs" 0)
        load=$(cut -d' ' -f1 /proc/loadavg)
        say "  $n persons in $secs s ($events events) → $rate persons/s, load $load"
        rows+=("$n $secs $events $rate $load")
        q "SELECT identity_sync.drop_target('directory')" >/dev/null
    done
    {
        echo
        echo "identity_sync scale benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, PostgreSQL $(q "SHOW server_version" | cut -d' ' -f1); one dry-run target"
        echo
        printf '%-10s %-10s %-10s %-14s %-10s %s\n' persons seconds events "persons/s" "÷ 10,000s" "load (1 min)"
        local first_rate="" r
        for r in "${rows[@]}"; do
            set -- $r
            [ -n "$first_rate" ] || first_rate=$4
            printf '%-10s %-10s %-10s %-14s %-10s %s\n' "$1" "$2" "$3" "$4" "$(calc "$4 / $first_rate" 2)" "$5"
        done
        echo
        for r in "${rows[@]}"; do set -- $r; echo "RESULT scale_plan_rate_$1 $4 persons/s"; done
    } | tee "$OUT/scale.txt"
}
