-- A billing delivery's first answer (`plan_events.response`, `credit_purchases.response`) is kept
-- in the one form every replayed answer takes (`actors.replies`, as `idempotency_replies.outcome`):
-- {"result": {"type": <class>, "fields": {...}}}, nested values typed the same way. Rows written
-- before kept {"applied"|"purchased_ms", "usage"}; they are converted here, so a retry of an old
-- delivery still gets its first answer.

-- A first answer of the old form as the new one: `result_type` with the old members, the usage
-- (and the session it may name) typed.
create or replace function pg_temp.replayable(response jsonb, result_type text, member text) returns jsonb
language sql immutable as $$
    select jsonb_build_object('result', jsonb_build_object(
        'type', result_type,
        'fields', jsonb_build_object(
            member, response->member,
            'usage', jsonb_build_object(
                'type', 'UsageView',
                'fields', (response->'usage') || jsonb_build_object('active_session',
                    case when jsonb_typeof(response->'usage'->'active_session') = 'object'
                        then jsonb_build_object('type', 'ActiveSessionView',
                                                'fields', response->'usage'->'active_session')
                        else 'null'::jsonb end)))))
$$;

update plan_events set response = pg_temp.replayable(response, 'PlanChangeResult', 'applied')
where response ? 'usage' and not response ? 'result';

update credit_purchases set response = pg_temp.replayable(response, 'CreditsAdded', 'purchased_ms')
where response ? 'usage' and not response ? 'result';
