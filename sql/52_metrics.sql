-- Monitoring: one view, identity_sync.metrics (name, labels, value), in Prometheus' terms:
-- each row is a sample of the metric `name` with the labels `labels`. pg_monitor reads it, and
-- monitoring/postgres_exporter.yaml hands it to prometheus-postgres-exporter. Every branch is
-- cheap: counts of unfinished events come from the event_open index, delivery counters from
-- _delivery_stats (kept by _record and _record_many, 40_deliver.sql), the latency percentiles
-- read the events done in the last 5 minutes (event_done index). A sample whose value is not
-- known (no delivery yet, no delivery in the last 5 minutes) is left out.
--
--   identity_sync_worker_up                         1 when the worker serves this database
--   identity_sync_planner_dirty_persons             persons changed in HR and not planned yet
--   identity_sync_planner_oldest_change_seconds     age of the oldest of those changes
--   identity_sync_queue_events{target,state}        unfinished events: pending, sending, retry, failed, held
--   identity_sync_target_held{target}               1 while a threshold holds the target
--   identity_sync_target_quarantined{target}        1 while the circuit breaker quarantines it
--   identity_sync_target_paused{target}             1 while paused
--   identity_sync_target_plan_errors{target}        persons whose mapping or rules fail
--   identity_sync_target_oldest_pending_seconds{target}   age of the oldest unfinished event (0: none)
--   identity_sync_target_last_success_timestamp_seconds{target}   Unix time of the last delivery
--   identity_sync_target_delivered_total{target}    events delivered since the target was added (counter)
--   identity_sync_target_failed_attempts_total{target}    attempts that did not deliver (counter)
--   identity_sync_delivery_latency_seconds{target,quantile}   HR commit -> delivered, quantiles
--                                                   0.5, 0.9, 0.99 over the last 5 minutes
CREATE VIEW identity_sync.metrics AS
SELECT m.name, m.labels, m.value FROM (
    SELECT 'identity_sync_worker_up'::text AS name, '{}'::jsonb AS labels,
           -- (worker_status() reads the worker's pid in shared memory: no pg_stat_activity
           -- privilege needed)
           (SELECT (w.state = 'running')::int::float8 FROM identity_sync.worker_status() AS w) AS value
    UNION ALL
    SELECT 'identity_sync_planner_dirty_persons', '{}',
           ((SELECT count(*) FROM identity_sync._dirty)
            + (SELECT coalesce(sum(cardinality(c.keys)), 0) FROM identity_sync.change c))::float8
    UNION ALL
    SELECT 'identity_sync_planner_oldest_change_seconds', '{}',
           coalesce(extract(epoch FROM now() - least((SELECT min(c.at) FROM identity_sync.change c),
                                                     (SELECT min(d.first_at) FROM identity_sync._dirty d))), 0)::float8
    UNION ALL
    SELECT 'identity_sync_queue_events', jsonb_build_object('target', t.name, 'state', s.state),
           coalesce((SELECT q.n FROM (SELECT e.state, count(*) AS n FROM identity_sync.event e
                                       WHERE e.target_id = t.id AND e.state <> 'done' GROUP BY e.state) AS q
                      WHERE q.state = s.state), 0)::float8
      FROM identity_sync.target t
     CROSS JOIN unnest(ARRAY['pending', 'sending', 'retry', 'failed', 'held']) AS s(state)
    UNION ALL
    SELECT 'identity_sync_target_' || x.k, jsonb_build_object('target', t.name), x.v
      FROM identity_sync.target t
      LEFT JOIN identity_sync._delivery_stats ds ON ds.target_id = t.id
     CROSS JOIN LATERAL (VALUES
        ('held', (t.held IS NOT NULL)::int::float8),
        ('quarantined', (t.quarantined_at IS NOT NULL)::int::float8),
        ('paused', t.paused::int::float8),
        ('plan_errors', (SELECT count(*) FROM identity_sync._plan_error pe WHERE pe.target_id = t.id)::float8),
        ('oldest_pending_seconds',
         coalesce(extract(epoch FROM now() - (SELECT min(e.created_at) FROM identity_sync.event e
                                                WHERE e.target_id = t.id AND e.state <> 'done')), 0)::float8),
        ('last_success_timestamp_seconds', extract(epoch FROM ds.last_success)::float8),
        ('delivered_total', coalesce(ds.delivered, 0)::float8),
        ('failed_attempts_total', coalesce(ds.failed_attempts, 0)::float8)) AS x(k, v)
    UNION ALL
    SELECT 'identity_sync_delivery_latency_seconds',
           jsonb_build_object('target', t.name, 'quantile', q.quantile::text), q.value
      FROM identity_sync.target t
     CROSS JOIN LATERAL (
        -- from the earliest cause of the event's plan: the commit of the HR change, or when a
        -- resync, reconcile or configuration change asked for it (plan_run.caused_at)
        SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]::float8[]) WITHIN GROUP (
                   ORDER BY extract(epoch FROM e.done_at - coalesce(p.caused_at, e.created_at))::float8) AS ps
          FROM identity_sync.event e LEFT JOIN identity_sync.plan_run p ON p.id = e.plan_id
         WHERE e.state = 'done' AND e.done_at > now() - interval '5 minutes' AND e.target_id = t.id
           AND e.attempts > 0 AND e.last_error IS NULL) AS l
     CROSS JOIN LATERAL unnest(ARRAY[0.5, 0.9, 0.99]::float8[], l.ps) AS q(quantile, value)
) AS m
WHERE m.value IS NOT NULL;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT SELECT ON identity_sync.metrics TO identity_sync_reader, pg_monitor;
-- (functions in a view run with the reader's privileges)
GRANT EXECUTE ON FUNCTION identity_sync.worker_status() TO pg_monitor;

COMMENT ON VIEW identity_sync.metrics IS 'Monitoring samples in Prometheus'' terms (name, labels, value): worker up, planning backlog, unfinished events by target and state, held/quarantined/paused targets, plan errors, oldest pending age, last delivery and delivery counters per target, commit-to-delivery latency quantiles over the last 5 minutes; for pg_monitor and prometheus-postgres-exporter (monitoring/postgres_exporter.yaml).';
