-- Self-service requests and decisions.

-- Self-service audit rows: the actor is the calling role (also under SET ROLE).
CREATE FUNCTION identity_sync._audit_request(action text, r identity_sync.request, extra jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO identity_sync._audit (actor, action, object, new)
    SELECT CASE WHEN action = 'expire' THEN 'identity_sync' ELSE identity_sync._caller() END,
           action, 'request ' || r.id,
           jsonb_build_object('request_id', r.id, 'product', p.name, 'person', r.person_key, 'state', r.state)
           || CASE WHEN identity_sync._caller() <> session_user AND action <> 'expire'
                   THEN jsonb_build_object('session_user', session_user::text) ELSE '{}' END
           || coalesce(extra, '{}')
      FROM identity_sync.product p WHERE p.id = r.product_id
$$;

CREATE FUNCTION identity_sync.request_access(product text, reason text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    p identity_sync.product := identity_sync._product(product);
    t identity_sync.target;
    existing identity_sync.request;
    r identity_sync.request;
BEGIN
    PERFORM identity_sync._expire_grants();   -- an expired grant must not block a new request
    SELECT * INTO existing FROM identity_sync.request x
     WHERE x.product_id = p.id AND x.person_key = me AND x.state IN ('pending', 'approved');
    IF existing.id IS NOT NULL THEN
        RAISE EXCEPTION 'you already have request % for product "%"', existing.id, p.name
            USING ERRCODE = 'duplicate_object', DETAIL = format('It is %s.', existing.state),
                  HINT = 'See identity_sync.my_requests; withdraw a pending request with identity_sync.revoke().';
    END IF;
    IF cardinality(identity_sync._owners(p, me)) = 0 THEN
        RAISE EXCEPTION 'nobody can approve product "%" for you', p.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'No active person other than you is an owner of the product for you today.',
                  HINT = 'The owners follow HR data (for example the manager of your department); ask an administrator.';
    END IF;
    BEGIN
        INSERT INTO identity_sync.request (product_id, person_key, requested_by, reason, requested_at)
        VALUES (p.id, me, identity_sync._caller(), reason, identity_sync._now())
        RETURNING * INTO r;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'you already have an open request for product "%"', p.name
            USING ERRCODE = 'duplicate_object', HINT = 'See identity_sync.my_requests.';
    END;
    PERFORM identity_sync._audit_request('request_access', r, jsonb_build_object('reason', reason));
    PERFORM identity_sync._notify_request('request_pending', r);
    SELECT * INTO t FROM identity_sync.target WHERE id = p.target_id;
    IF NOT EXISTS (SELECT FROM identity_sync.account a WHERE a.target_id = t.id AND a.person_key = me
                      AND a.planned_state IN ('active', 'disabled')) THEN
        RAISE NOTICE 'you have no account in "%" yet', t.name
            USING DETAIL = 'Once approved, the groups are granted when you have one.';
    END IF;
    RETURN r.id;
END
$$;

-- Request `request_id`, locked (for a decision or a revoke); `hint` says where the caller finds
-- its requests when there is no such request.
CREATE FUNCTION identity_sync._lock_request(request_id bigint, hint text)
RETURNS identity_sync.request LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request;
BEGIN
    SELECT * INTO r FROM identity_sync.request WHERE id = request_id FOR UPDATE;
    IF r.id IS NULL THEN
        RAISE EXCEPTION 'request % does not exist', request_id USING ERRCODE = 'undefined_object', HINT = hint;
    END IF;
    RETURN r;
END
$$;

-- Record the decision (approve or deny) of `me` on a request, after checking that `me` may
-- decide it now; returns the request, locked. Self-approval and non-owners are refused before
-- the request's state is revealed.
CREATE FUNCTION identity_sync._decide(request_id bigint, me text, decision text, comment text)
RETURNS identity_sync.request LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request := identity_sync._lock_request(request_id, 'identity_sync.my_approvals lists the requests you can decide.');
    p identity_sync.product;
BEGIN
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    IF r.person_key = me THEN
        RAISE EXCEPTION 'you cannot % your own request', decision USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('Request %s is your request for product "%s".', r.id, p.name),
            HINT = 'A current owner of the product decides it.';
    END IF;
    IF NOT me = ANY (identity_sync._owners(p, r.person_key, ARRAY[me])) THEN
        RAISE EXCEPTION 'permission denied to % request %', decision, r.id USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('You (person %s) are not an owner of product "%s" for person %s today.', me, p.name, r.person_key),
            HINT = 'Owners follow HR data and are computed when deciding; identity_sync.my_approvals lists the requests you can decide.';
    END IF;
    IF r.state <> 'pending' THEN
        RAISE EXCEPTION 'request % is already %', r.id, r.state USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF EXISTS (SELECT FROM identity_sync.decision d WHERE d.request_id = r.id AND d.person_key = me) THEN
        RAISE EXCEPTION 'you have already decided request %', r.id USING ERRCODE = 'object_not_in_prerequisite_state',
            DETAIL = 'With approval "all" it waits for the other current owners.';
    END IF;
    INSERT INTO identity_sync.decision (request_id, person_key, decided_by, requester, decision, comment, at)
    VALUES (r.id, me, identity_sync._caller(), r.person_key, decision, comment, identity_sync._now());
    PERFORM identity_sync._forget_decidable();
    RETURN r;
END
$$;

CREATE FUNCTION identity_sync.approve(request_id bigint, comment text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    r identity_sync.request := identity_sync._decide(request_id, me, 'approve', comment);
    p identity_sync.product;
    waiting text[];
BEGIN
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    IF p.approval = 'all' THEN
        -- Every current owner must have approved; owners who are no longer owners do not count.
        waiting := ARRAY(SELECT o FROM unnest(identity_sync._owners(p, r.person_key)) AS o
                          WHERE NOT EXISTS (SELECT FROM identity_sync.decision d
                                             WHERE d.request_id = r.id AND d.person_key = o AND d.decision = 'approve')
                          ORDER BY o);
    END IF;
    UPDATE identity_sync.request x
       SET approvals = x.approvals + 1,
           state = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN 'approved' ELSE 'pending' END,
           decided_at = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN identity_sync._now() END,
           expires_at = CASE WHEN coalesce(cardinality(waiting), 0) = 0 THEN identity_sync._now() + p.valid_for END
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request('approve', r, jsonb_build_object('approver', me, 'comment', comment)
                                                       || CASE WHEN r.expires_at IS NOT NULL THEN jsonb_build_object('expires_at', r.expires_at) ELSE '{}' END
                                                       || CASE WHEN cardinality(waiting) > 0 THEN jsonb_build_object('waiting_for', waiting) ELSE '{}' END);
    IF r.state = 'approved' THEN
        PERFORM identity_sync._notify_request('request_decided', r,
                                              jsonb_build_object('decision', 'approve', 'decided_by', me, 'comment', comment));
        PERFORM identity_sync._replan(ARRAY[r.person_key], 'approve');
    ELSE
        RAISE NOTICE 'request % waits for % more owner(s)', r.id, cardinality(waiting)
            USING DETAIL = 'Product "' || p.name || '" needs the approval of every current owner.';
    END IF;
    RETURN r.state;
END
$$;

CREATE FUNCTION identity_sync.deny(request_id bigint, comment text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me text := identity_sync._me();
    r identity_sync.request := identity_sync._decide(request_id, me, 'deny', comment);
BEGIN
    UPDATE identity_sync.request x SET state = 'denied', decided_at = identity_sync._now()
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request('deny', r, jsonb_build_object('approver', me, 'comment', comment));
    PERFORM identity_sync._notify_request('request_decided', r,
                                          jsonb_build_object('decision', 'deny', 'decided_by', me, 'comment', comment));
    RETURN r.state;
END
$$;

-- Revoke an approved grant, or withdraw a pending request. Allowed to the requester, to a
-- current owner of the product for the requester, and to identity_sync_admin.
CREATE FUNCTION identity_sync.revoke(request_id bigint)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role text := identity_sync._caller();
    admin boolean := pg_has_role(role, 'identity_sync_admin', 'USAGE');
    me text := CASE WHEN admin THEN identity_sync.current_person() ELSE identity_sync._me() END;
    r identity_sync.request;
    p identity_sync.product;
    was text;
BEGIN
    r := identity_sync._lock_request(request_id, 'identity_sync.my_requests lists your requests.');
    SELECT * INTO p FROM identity_sync.product WHERE id = r.product_id;
    IF NOT (admin OR r.person_key = me OR me = ANY (identity_sync._owners(p, r.person_key, ARRAY[me]))) THEN
        RAISE EXCEPTION 'permission denied to revoke request %', r.id USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('It is not your request, and you (person %s) are not an owner of product "%s" for person %s today.',
                            me, p.name, r.person_key),
            HINT = 'The requester, a current owner of the product or an identity_sync_admin can revoke it.';
    END IF;
    IF r.state NOT IN ('pending', 'approved') THEN
        RAISE EXCEPTION 'request % is already %', r.id, r.state USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    was := r.state;
    PERFORM identity_sync._forget_decidable();
    UPDATE identity_sync.request x
       SET state = CASE WHEN x.state = 'pending' AND x.person_key IS NOT DISTINCT FROM me THEN 'withdrawn' ELSE 'revoked' END,
           ended_at = identity_sync._now(), ended_by = role
     WHERE x.id = r.id RETURNING * INTO r;
    PERFORM identity_sync._audit_request(CASE WHEN r.state = 'withdrawn' THEN 'withdraw' ELSE 'revoke' END, r,
                                         jsonb_build_object('was', was));
    IF was = 'approved' THEN
        PERFORM identity_sync._replan(ARRAY[r.person_key], 'revoke');
    END IF;
    RETURN r.state;
END
$$;

-- Approved grants past their validity expire; the planner then revokes their groups. Called by
-- the worker on every tick (and before a new request, so an expired grant never blocks it).
CREATE FUNCTION identity_sync._expire_grants() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r identity_sync.request;
    keys text[] := '{}';
BEGIN
    FOR r IN UPDATE identity_sync.request x SET state = 'expired', ended_at = x.expires_at, ended_by = 'identity_sync'
              WHERE x.state = 'approved' AND x.expires_at <= identity_sync._now()
              RETURNING * LOOP
        PERFORM identity_sync._audit_request('expire', r, jsonb_build_object('expires_at', r.expires_at));
        keys := keys || r.person_key;
    END LOOP;
    PERFORM identity_sync._replan(ARRAY(SELECT DISTINCT k FROM unnest(keys) AS k), 'expire');
    RETURN cardinality(keys);
END
$$;

-- Privileges: nothing for PUBLIC but what is granted below (_revoke_public_execute, 00_schema.sql).
SELECT identity_sync._revoke_public_execute();

GRANT EXECUTE ON FUNCTION identity_sync.request_access(text, text), identity_sync.approve(bigint, text),
                          identity_sync.deny(bigint, text), identity_sync.revoke(bigint)
   TO PUBLIC;

COMMENT ON FUNCTION identity_sync.request_access(text, text) IS 'Request a product for yourself, with a reason; returns the request id. An owner of the product decides it.';
COMMENT ON FUNCTION identity_sync.approve(bigint, text) IS 'Approve a request as a current owner of its product (never your own); returns the request''s state.';
COMMENT ON FUNCTION identity_sync.deny(bigint, text) IS 'Deny a request as a current owner of its product (never your own); returns the request''s state.';
COMMENT ON FUNCTION identity_sync.revoke(bigint) IS 'End an approved grant (or withdraw your pending request): by the requester, a current owner or identity_sync_admin.';
