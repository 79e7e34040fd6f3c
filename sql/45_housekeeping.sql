-- Housekeeping: what the worker does on each tick besides planning and delivering (snapshots,
-- date boundaries, expiry of self-service grants, retention), and when it must wake next.

-- Milliseconds until something is due: a retry, a snapshot, or the next day's boundaries.
-- The worker asks before each sleep, with a plan it caches for its lifetime: the plan made at
-- its start, when the queue was empty, scanned the whole event table, and after a mass deletion
-- (drop_target of bench/run's plan targets) that was 39,820 buffers and 20 ms before every
-- sleep, until autovacuum had analyzed the table minutes later; a commit arriving meanwhile
-- waited for it (latency p50 19-20 ms in bench/run, 11 ms on an empty queue). So the event_due
-- index, whatever the statistics said when the plan was made.
CREATE FUNCTION identity_sync._next_due_ms() RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET enable_seqscan = off AS $$
BEGIN
    RETURN greatest(0, (extract(epoch FROM (least(
               -- per target, so that the event_due index answers, from where this session's
               -- claims start (no event is due before: _claim_from, 40_deliver.sql)
               (SELECT min(d.due) FROM identity_sync.target t
                 CROSS JOIN LATERAL (SELECT min(e.due_at) AS due FROM identity_sync.event e
                                      WHERE e.target_id = t.id AND e.state IN ('pending', 'retry')
                                        AND e.due_at >= identity_sync._claim_from(t.id)) AS d
                 WHERE NOT t.paused),
               (SELECT min(snapshot_at + snapshot_interval) FROM identity_sync.source WHERE capture = 'snapshot'),
               -- the next attempt of a target whose planning failed (30_plan/60_plan.sql)
               (SELECT min(t.plan_retry_at) FROM identity_sync.target t
                 WHERE EXISTS (SELECT FROM identity_sync._deferred d WHERE d.target_id = t.id)),
               date_trunc('day', now()) + interval '1 day') - now())) * 1000)::bigint);
END
$$;

-- Everything the worker does on each tick besides planning and delivering.
CREATE FUNCTION identity_sync._housekeeping() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    retention interval := identity_sync._event_retention();   -- NULL: keep forever
BEGIN
    PERFORM identity_sync._snapshot_source(s.id) FROM identity_sync.source s
      WHERE s.capture = 'snapshot' AND (s.snapshot_at IS NULL OR s.snapshot_at + s.snapshot_interval <= now());
    PERFORM identity_sync._check_boundaries();
    PERFORM identity_sync._expire_grants();
    IF EXISTS (SELECT FROM identity_sync.notification n WHERE n.on_event = 'grant_expiring') THEN
        PERFORM identity_sync._notify_expiring();
    END IF;
    PERFORM identity_sync._reconcile_schedule();
    IF retention IS NOT NULL THEN
        -- At most 10,000 events a round (one a second): a day of heavy traffic ageing out at
        -- once would otherwise be one long transaction of the worker, every HR commit waiting
        -- behind it, and a mass of dead rows at once; the oldest go first (index event_done).
        DELETE FROM identity_sync.event WHERE id = ANY (ARRAY(
            SELECT e.id FROM identity_sync.event e
             WHERE e.state = 'done' AND e.done_at < now() - retention
             ORDER BY e.done_at LIMIT 10000));
        -- A plan run, its causes and the changes they name stay while an event of the plan
        -- does (a failed event keeps its story); the attempts of an event stay with it.
        DELETE FROM identity_sync.plan_run p
         WHERE p.started_at < now() - retention
           AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.plan_id = p.id);
        DELETE FROM identity_sync.change_log c
         WHERE c.claimed_at < now() - retention
           AND NOT EXISTS (SELECT FROM identity_sync.plan_cause pc WHERE pc.change_id = c.id);
        DELETE FROM identity_sync._attempt a
         WHERE a.recorded_at < now() - retention
           AND NOT EXISTS (SELECT FROM identity_sync.event e WHERE e.id = a.event_id);
        DELETE FROM identity_sync._plan_count WHERE at < now() - interval '1 hour';
        -- Notices sent or skipped go like delivered events; failed ones stay for an operator.
        DELETE FROM identity_sync.notice x
         WHERE x.id = ANY (ARRAY(SELECT y.id FROM identity_sync.notice y
                                  WHERE y.state IN ('sent', 'skipped') AND y.created_at < now() - retention
                                  ORDER BY y.created_at LIMIT 10000));
        -- Reconcile runs like events, but the latest finished one of each target stays: the
        -- drift and orphans views read it.
        DELETE FROM identity_sync.reconcile_run r
         WHERE r.finished_at < now() - retention AND r.id IS DISTINCT FROM identity_sync._latest_reconcile(r.target_id);
    END IF;
END
$$;
