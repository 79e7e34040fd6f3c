# bench/soak.sh: `bash bench/run --soak MINUTES [--rate N]`, sourced by bench/run once its
# cluster (100,000 persons, sources registered) and the sink are up. Not run on its own.
#
# Two targets on the sink (a webhook and a SCIM service, everybody working today in scope) are
# synced first; then pgbench drives a steady stream of HR changes (bench/soak.sql: hires,
# moves, terminations, renames) at SOAK_RATE transactions/s for the given minutes. Every minute
# it prints: HR changes/s, events delivered/s, latency (HR commit → delivered) p50/p99 of that
# minute's deliveries, unfinished events and persons waiting to be planned, the worker's private
# memory (RssAnon) and peak RSS (VmHWM), the on-disk size of the extension's tables and indexes,
# dead tuples of identity_sync.event, and the load average. At the end: the first and last
# minute side by side and RESULT lines.
#
# Settings (environment): SOAK_RATE (default 200 HR transactions/s), SOAK_RETENTION (the
# worker's identity_sync.event_retention during the soak, minutes; default 5: with the default
# of 7 days the tables grow by design for a week, which hides growth that is not by design).

SOAK_RATE="${SOAK_RATE:-200}"
SOAK_RETENTION="${SOAK_RETENTION:-5}"
SOAK_LOG="$OUT/soak.tsv"

soak_setup() {
    psql -X -q -v ON_ERROR_STOP=1 -d "$DB" -f bench/soak.sql >/dev/null
    q "ALTER SYSTEM SET identity_sync.event_retention = '${SOAK_RETENTION}min'" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    q "SELECT identity_sync.add_target('hook', 'webhook', '$SINK/hook', '{\"max_concurrency\": 32}')" >/dev/null 2>&1
    q "SELECT identity_sync.set_secret('hook', 'whsec_' || encode(decode(md5(random()::text) || md5(random()::text), 'hex'), 'base64'))" >/dev/null
    q "SELECT identity_sync.map('hook', 'employee_id', \$\$person.emp_no\$\$),
              identity_sync.map('hook', 'first_name', \$\$person.first_name\$\$),
              identity_sync.map('hook', 'last_name', \$\$person.last_name\$\$),
              identity_sync.map('hook', 'email', \$\$identity_sync.slug(person.first_name) || '.' || identity_sync.slug(person.last_name) || '@example.com'\$\$),
              identity_sync.map('hook', 'department', \$\$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)\$\$),
              identity_sync.add_rule('hook', 'staff', 'true')" >/dev/null
    q "SELECT identity_sync.add_target('scim', 'scim', '$SINK/v2', '{\"auth\": \"bearer\", \"max_concurrency\": 32}')" >/dev/null 2>&1
    q "SELECT identity_sync.set_secret('scim', md5(random()::text))" >/dev/null
    q "SELECT identity_sync.map('scim', 'userName', \$\$identity_sync.slug(person.first_name || '.' || person.last_name) || person.emp_no\$\$, true),
              identity_sync.map('scim', 'externalId', \$\$person.emp_no::text\$\$),
              identity_sync.map('scim', 'name.givenName', \$\$person.first_name\$\$),
              identity_sync.map('scim', 'name.familyName', \$\$person.last_name\$\$),
              identity_sync.map('scim', 'urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department', \$\$(SELECT d.dept_name FROM department d WHERE d.dept_no = contract.dept_no)\$\$),
              identity_sync.add_rule('scim', 'staff', 'true')" >/dev/null
    say "soak: initial sync of both targets (everybody working today)"
    local t0=$EPOCHREALTIME
    q "SELECT identity_sync.resync('hook'), identity_sync.resync('scim')" >/dev/null
    idle 1800
    say "  $(q "SELECT count(*) FROM identity_sync.accounts WHERE state = 'active'") active accounts in $(calc "$EPOCHREALTIME - $t0" 1) s"
    q "VACUUM ANALYZE" >/dev/null
}

# One line of figures for the minute that ended now; appended to $SOAK_LOG.
soak_sample() {   # $1 = minute number
    local pid rss hwm
    pid="$(worker_pid)"
    rss=$(awk '/^RssAnon:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status" 2>/dev/null || echo NaN)
    hwm=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status" 2>/dev/null || echo NaN)
    local line
    line=$(psql -X -Atq -F $'\t' -v ON_ERROR_STOP=1 -d "$DB" <<SQL
WITH d AS (
    SELECT extract(epoch FROM e.done_at - coalesce(p.caused_at, e.created_at)) * 1000 AS ms
      FROM identity_sync.events e LEFT JOIN identity_sync.plan_run p ON p.id = e.plan_id
     WHERE e.state = 'done' AND e.done_at > now() - interval '60 s')
SELECT $1,
       (SELECT round(count(*) / 60.0) FROM soak_log WHERE at > now() - interval '60 s'),
       (SELECT round(count(*) / 60.0) FROM d),
       (SELECT coalesce(round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric), 0) FROM d),
       (SELECT coalesce(round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric), 0) FROM d),
       (SELECT count(*) FROM identity_sync.events WHERE state <> 'done'),
       (SELECT count(*) FROM identity_sync.pending_changes),
       '$rss', '$hwm',
       (SELECT round(sum(pg_total_relation_size(c.oid)) / 1048576.0, 1)
          FROM pg_class c WHERE c.relnamespace = 'identity_sync'::regnamespace AND c.relkind IN ('r', 'm', 't')),
       (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'identity_sync.event'::regclass),
       '$(cut -d' ' -f1 /proc/loadavg)';
SQL
)
    echo "$line" >>"$SOAK_LOG"
    IFS=$'\t' read -r m hr ev p50 p99 unfinished waiting rss hwm size dead load <<<"$line"
    printf '  %4s  %6s  %8s  %7s  %7s  %10s  %8s  %8s  %7s  %8s  %9s  %5s\n' \
        "$m" "$hr" "$ev" "$p50" "$p99" "$unfinished" "$waiting" "$rss" "$hwm" "$size" "$dead" "$load" >&2
}

soak_run() {   # $1 = minutes
    local minutes=$1
    soak_setup
    : >"$SOAK_LOG"
    cat >"$OUT/soak.pgbench" <<'PGB'
\set r random(0, 999999999)
SELECT soak_change(:r);
PGB
    say "soak: $minutes min of HR changes at $SOAK_RATE/s (pgbench -R, 4 clients), two targets, event_retention ${SOAK_RETENTION} min"
    printf '  %4s  %6s  %8s  %7s  %7s  %10s  %8s  %8s  %7s  %8s  %9s  %5s\n' \
        min "HR/s" "events/s" "p50 ms" "p99 ms" unfinished waiting "priv MB" "HWM MB" "size MB" "dead tup" load >&2
    "$PGBENCH" -n -c 4 -j 2 -R "$SOAK_RATE" -T $((minutes * 60)) -f "$OUT/soak.pgbench" "$DB" >"$OUT/soak-pgbench.log" 2>&1 &
    local bench_pid=$! t0=$SECONDS
    for m in $(seq 1 "$minutes"); do
        sleep $((t0 + m * 60 - SECONDS))
        soak_sample "$m"
    done
    wait "$bench_pid" || die "pgbench failed (log: $OUT/soak-pgbench.log)"
    idle 600
    local failed lag
    failed=$(q "SELECT count(*) FROM identity_sync.events WHERE state IN ('failed', 'retry')")
    lag=$(q "SELECT count(*) FROM identity_sync.events WHERE state <> 'done'")

    # first minute, last minute, and the growth over the second half
    local first last half
    first=$(head -n 1 "$SOAK_LOG"); last=$(tail -n 1 "$SOAK_LOG")
    half=$(sed -n "$(( (minutes + 1) / 2 ))p" "$SOAK_LOG")
    IFS=$'\t' read -r _ _ _ _ p99_first _ _ rss_first _ size_first _ _ <<<"$first"
    IFS=$'\t' read -r _ hr_last ev_last p50_last p99_last _ _ rss_last hwm_last size_last dead_last _ <<<"$last"
    IFS=$'\t' read -r _ _ _ _ _ _ _ _ _ size_half _ _ <<<"$half"
    local p99_ratio size_growth rss_max
    p99_ratio=$(calc "$p99_last / ($p99_first > 0 ? $p99_first : 1)" 2)
    size_growth=$(calc "$size_last / ($size_half > 0 ? $size_half : 1)" 2)
    rss_max=$(cut -f8 "$SOAK_LOG" | sort -g | tail -n 1)
    echo
    echo "soak: $minutes min at $SOAK_RATE HR transactions/s ($(grep -o 'number of transactions actually processed: [0-9]*' "$OUT/soak-pgbench.log" | awk '{print $NF}') changes; log: $SOAK_LOG)"
    printf '%-34s %12s %12s   %s\n' "" "first minute" "last minute" "goal"
    printf '%-34s %12s %12s   %s\n' "latency p99 (commit → delivered)" "$p99_first ms" "$p99_last ms" "last ≤ 1.5 × first: $p99_ratio×"
    printf '%-34s %12s %12s   %s\n' "worker private memory (RssAnon)" "$rss_first MB" "$rss_last MB" "flat (max $rss_max MB; VmHWM $hwm_last MB)"
    printf '%-34s %12s %12s   %s\n' "extension tables and indexes" "$size_first MB" "$size_last MB" "bounded: last ÷ half-way = $size_growth"
    echo "afterwards: $failed events failed or retrying, $lag unfinished; dead tuples of event at the end: $dead_last"
    echo "RESULT soak_latency_p99_first $p99_first ms"
    echo "RESULT soak_latency_p99_last $p99_last ms"
    echo "RESULT soak_latency_p50_last $p50_last ms"
    echo "RESULT soak_p99_ratio $p99_ratio x"
    echo "RESULT soak_events_per_s_last $ev_last events/s"
    echo "RESULT soak_hr_changes_per_s_last $hr_last changes/s"
    echo "RESULT soak_worker_private_mb_max $rss_max MB"
    echo "RESULT soak_size_mb_last $size_last MB"
    echo "RESULT soak_size_growth_second_half $size_growth x"
    echo "RESULT soak_failed $failed events"
}
