-- What each login sees: the requests it can decide, grant status, row-level security, views.

-- The pending requests `role` can decide now: its person is a current owner for the requester,
-- it is not the requester and has not decided yet. One owners query per product with pending
-- requests, remembered until the statement ends (src/selfservice.rs).
CREATE FUNCTION identity_sync._decidable_ids(role text) RETURNS bigint[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ids bigint[] := identity_sync._remembered_decidable(role);
    me text;
    undecided bigint[];   -- pending requests of others that me has not decided
    p identity_sync.product;
    waiting text[];
BEGIN
    IF ids IS NOT NULL THEN
        RETURN ids;
    END IF;
    ids := '{}';
    me := identity_sync._person_of_role(role);
    IF me IS NOT NULL THEN
        undecided := ARRAY(SELECT r.id FROM identity_sync.request r
                            WHERE r.state = 'pending' AND r.person_key <> me
                              AND NOT EXISTS (SELECT FROM identity_sync.decision d
                                               WHERE d.request_id = r.id AND d.person_key = me));
        FOR p IN SELECT * FROM identity_sync.product x
                  WHERE x.id IN (SELECT r.product_id FROM identity_sync.request r WHERE r.id = ANY (undecided)) LOOP
            waiting := ARRAY(SELECT DISTINCT r.person_key FROM identity_sync.request r
                              WHERE r.id = ANY (undecided) AND r.product_id = p.id);
            ids := ids || ARRAY(
                SELECT r.id FROM identity_sync.request r
                 WHERE r.id = ANY (undecided) AND r.product_id = p.id
                   AND r.person_key IN (SELECT o.requester FROM identity_sync._owner_pairs(p, waiting, ARRAY[me]) AS o));
        END LOOP;
    END IF;
    PERFORM identity_sync._remember_decidable(role, ids);
    RETURN ids;
END
$$;

-- Can the caller approve or deny this request now (a current owner, not the requester, not
-- decided yet)?
CREATE FUNCTION identity_sync.can_approve(request_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(request_id = ANY (identity_sync._decidable_ids(identity_sync._caller())), false);
END
$$;

-- Where the grant of a request stands in its target: awaiting approval, not granted, no
-- account, withheld, pending, granted, failed, removing, kept, removed.
CREATE FUNCTION identity_sync._grant_status(request_id bigint, OUT status text, OUT detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request;
    p identity_sync.product;
    t identity_sync.target;
    a identity_sync.account;
    e identity_sync.event;
    still text[];
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id;
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    SELECT * INTO t FROM identity_sync.target WHERE id = p.target_id;
    SELECT * INTO a FROM identity_sync.account WHERE target_id = t.id AND person_key = r.person_key;
    IF r.state = 'pending' THEN
        status := 'awaiting approval';
        detail := CASE WHEN p.approval = 'all'
                       THEN format('every current owner must approve; %s approval(s) so far', r.approvals)
                       ELSE 'one current owner must approve' END;
    ELSIF r.state IN ('denied', 'withdrawn') THEN
        status := 'not granted';
    ELSIF r.state = 'approved' AND (r.expires_at IS NULL OR r.expires_at > identity_sync._now()) THEN
        SELECT * INTO e FROM identity_sync.event x
         WHERE x.target_id = t.id AND x.person_key = r.person_key AND x.state IN ('failed', 'retry')
           AND (x.kind = 'create' OR (x.kind = 'grant' AND x.payload->>'group' = ANY (p.groups)))
         ORDER BY x.seq LIMIT 1;
        IF a.person_key IS NULL OR a.planned_state = 'deleted' THEN
            status := 'no account';
            detail := format('no account in "%s": no rule of the target matches the person', t.name);
        ELSIF a.planned_state = 'disabled' AND NOT p.groups <@ a.planned_groups THEN
            status := 'withheld';
            detail := format('the account in "%s" is disabled', t.name);
        ELSIF p.groups <@ a.groups THEN
            status := 'granted';
            detail := format('member of %s in "%s"', array_to_string(p.groups, ', '), t.name);
        ELSIF e.state = 'failed' THEN
            status := 'failed';
            detail := format('event %s (%s) failed: %s', e.id, e.kind, e.last_error);
        ELSE
            status := 'pending';
            detail := format('being granted in "%s"', t.name)
                      || CASE WHEN e.state = 'retry' THEN format('; retrying: %s', e.last_error) ELSE '' END;
        END IF;
    ELSE
        still := ARRAY(SELECT g FROM unnest(p.groups) AS g WHERE g = ANY (coalesce(a.groups, '{}')) ORDER BY g);
        IF cardinality(still) = 0 THEN
            status := 'removed';
        ELSIF still <@ a.planned_groups THEN
            status := 'kept';
            detail := format('%s still granted by a rule or another request', array_to_string(still, ', '));
        ELSE
            SELECT * INTO e FROM identity_sync.event x
             WHERE x.target_id = t.id AND x.person_key = r.person_key AND x.state = 'failed'
               AND x.kind = 'revoke' AND x.payload->>'group' = ANY (still)
             ORDER BY x.seq LIMIT 1;
            status := CASE WHEN e.id IS NULL THEN 'removing' ELSE 'failed' END;
            detail := CASE WHEN e.id IS NULL THEN format('being removed from "%s"', t.name)
                           ELSE format('event %s (revoke) failed: %s', e.id, e.last_error) END;
        END IF;
    END IF;
END
$$;

-- The grant status of a request the caller may see (its own, one it can decide or decided, or
-- any for identity_sync_reader); no row otherwise.
CREATE FUNCTION identity_sync.grant_status(request_id bigint, OUT status text, OUT detail text)
RETURNS SETOF record LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._caller();
    me text;
    r identity_sync.request;
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id;
    IF r.id IS NULL THEN
        RETURN;
    END IF;
    IF NOT pg_has_role(role, 'identity_sync_reader', 'USAGE') THEN
        me := identity_sync._person_of_role(role);
        IF me IS NULL OR NOT (r.person_key = me
                              OR EXISTS (SELECT FROM identity_sync.decision d WHERE d.request_id = r.id AND d.person_key = me)
                              OR r.id = ANY (identity_sync._decidable_ids(role))) THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM identity_sync._grant_status(r.id);
END
$$;

-- Row-level security: a login reads its own requests, the ones it can decide now and the ones
-- it decided; decisions are read by their owner and by the requester. Readers read everything.
-- Nobody but the extension's functions writes (PUBLIC has SELECT only).
ALTER TABLE identity_sync.request ENABLE ROW LEVEL SECURITY;
ALTER TABLE identity_sync.decision ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_requests ON identity_sync.request FOR SELECT TO PUBLIC
    USING (person_key = (SELECT identity_sync.current_person())
           OR EXISTS (SELECT FROM identity_sync.decision d
                       WHERE d.request_id = request.id AND d.person_key = (SELECT identity_sync.current_person()))
           OR (state = 'pending' AND identity_sync.can_approve(id)));
CREATE POLICY readers ON identity_sync.request FOR SELECT TO identity_sync_reader USING (true);
CREATE POLICY own_decisions ON identity_sync.decision FOR SELECT TO PUBLIC
    USING (person_key = (SELECT identity_sync.current_person())
           OR requester = (SELECT identity_sync.current_person()));
CREATE POLICY readers ON identity_sync.decision FOR SELECT TO identity_sync_reader USING (true);

-- The catalog: what can be requested (the owners condition is not shown).
CREATE VIEW identity_sync.products AS
SELECT p.name AS product, t.name AS target, p.groups, p.approval, p.valid_for, p.description
  FROM identity_sync.product p JOIN identity_sync.target t ON t.id = p.target_id;

CREATE VIEW identity_sync.my_requests WITH (security_invoker = true) AS
SELECT r.id AS request_id, p.name AS product, t.name AS target, p.groups, r.reason, r.state,
       r.requested_at, r.decided_at, r.expires_at, r.ended_at, r.ended_by,
       (SELECT jsonb_agg(jsonb_build_object('by', d.person_key, 'decision', d.decision, 'comment', d.comment, 'at', d.at)
                         ORDER BY d.at)
          FROM identity_sync.decision d WHERE d.request_id = r.id) AS decisions,
       g.status AS grant_status, g.detail AS grant_detail
  FROM identity_sync.request r
  JOIN identity_sync.product p ON p.id = r.product_id
  JOIN identity_sync.target t ON t.id = p.target_id
  LEFT JOIN LATERAL identity_sync.grant_status(r.id) AS g ON true
 WHERE r.person_key = (SELECT identity_sync.current_person());

CREATE VIEW identity_sync.my_approvals WITH (security_invoker = true) AS
SELECT r.id AS request_id, p.name AS product, t.name AS target, p.groups, p.approval,
       r.person_key AS requester, r.requested_by AS requester_role, r.reason, r.state, r.requested_at,
       r.approvals, d.decision IS NULL AS can_decide, d.decision AS my_decision, d.comment AS my_comment,
       d.at AS my_decided_at, r.decided_at, r.expires_at, r.ended_at,
       g.status AS grant_status, g.detail AS grant_detail
  FROM identity_sync.request r
  JOIN identity_sync.product p ON p.id = r.product_id
  JOIN identity_sync.target t ON t.id = p.target_id
  LEFT JOIN identity_sync.decision d ON d.request_id = r.id AND d.person_key = (SELECT identity_sync.current_person())
  LEFT JOIN LATERAL identity_sync.grant_status(r.id) AS g ON true
 WHERE d.request_id IS NOT NULL
    OR (r.state = 'pending' AND identity_sync.can_approve(r.id));

-- Everything, for operators and auditors.
CREATE VIEW identity_sync.requests AS
SELECT r.id AS request_id, p.name AS product, t.name AS target, p.groups, r.person_key, r.requested_by,
       r.reason, r.state, r.approvals, r.requested_at, r.decided_at, r.expires_at, r.ended_at, r.ended_by,
       (SELECT jsonb_agg(jsonb_build_object('by', d.person_key, 'role', d.decided_by, 'decision', d.decision,
                                            'comment', d.comment, 'at', d.at) ORDER BY d.at)
          FROM identity_sync.decision d WHERE d.request_id = r.id) AS decisions,
       g.status AS grant_status, g.detail AS grant_detail
  FROM identity_sync.request r
  JOIN identity_sync.product p ON p.id = r.product_id
  JOIN identity_sync.target t ON t.id = p.target_id
  LEFT JOIN LATERAL identity_sync._grant_status(r.id) AS g ON true;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.can_approve(bigint), identity_sync.grant_status(bigint) TO PUBLIC;
GRANT SELECT ON identity_sync.products, identity_sync.my_requests, identity_sync.my_approvals TO PUBLIC;
GRANT SELECT ON identity_sync.requests TO identity_sync_reader;
GRANT EXECUTE ON FUNCTION identity_sync._grant_status(bigint) TO identity_sync_reader;

COMMENT ON VIEW identity_sync.products IS 'What can be requested: product, target, groups, approval mode, validity, description.';
COMMENT ON VIEW identity_sync.my_requests IS 'The calling login''s own requests, their decisions and where each grant stands in its target.';
COMMENT ON COLUMN identity_sync.my_requests.grant_status IS 'awaiting approval, not granted, no account, withheld, pending, granted, failed, removing, kept, removed.';
COMMENT ON VIEW identity_sync.my_approvals IS 'Requests the calling login can decide now (can_decide) and the ones it decided.';
COMMENT ON COLUMN identity_sync.my_approvals.can_decide IS 'True when the login is a current owner and has not decided yet: call approve() or deny().';
COMMENT ON VIEW identity_sync.requests IS 'Every self-service request with its decisions and grant status, for operators and auditors.';
COMMENT ON FUNCTION identity_sync.can_approve(bigint) IS 'Whether the calling login can approve or deny this request now.';
COMMENT ON FUNCTION identity_sync.grant_status(bigint) IS 'Where the grant of a request you may see stands in its target, with detail.';
