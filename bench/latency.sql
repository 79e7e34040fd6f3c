-- bench/latency.sql: helpers for bench/run's latency and delivery measurements (plain SQL in
-- the bench database; not part of the extension).
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

-- Commit times of single-row HR updates, one row per commit.
CREATE TABLE IF NOT EXISTS bench_commit (flavour text, person_key text, committed_at timestamptz);
-- Arrival times recorded by bench-sink (loaded from its /_dump).
CREATE TABLE IF NOT EXISTS bench_arrival (at_us bigint, kind text, person_key text);

-- n single-row UPDATEs of distinct persons among the first `scope` (keys 10001..), each its
-- own transaction, `pause` seconds apart; the commit time of each (clock_timestamp() right
-- after COMMIT returned) goes to bench_commit.
CREATE OR REPLACE PROCEDURE bench_latency(flavour text, n int, scope int, pause float8)
LANGUAGE plpgsql AS $$
DECLARE
    keys text[] := '{}';
    ats timestamptz[] := '{}';
    k int;
BEGIN
    FOR i IN 1..n LOOP
        -- a stride coprime to scope visits distinct persons
        k := 10001 + ((i * 7919) % scope);
        UPDATE employee SET hire_date = hire_date + 1 WHERE emp_no = k;
        COMMIT;
        keys := keys || k::text;
        ats := ats || clock_timestamp();
        PERFORM pg_sleep(pause);
    END LOOP;
    INSERT INTO bench_commit SELECT flavour, u.k, u.at FROM unnest(keys, ats) AS u(k, at);
    COMMIT;
END
$$;
