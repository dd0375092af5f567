-- A billing delivery's first answer (`plan_events.response`, `credit_purchases.response`) is kept
-- in the one form every replayed answer takes (`actors.replies`, as `idempotency_replies.outcome`):
-- {"result": {"type": <class>, "fields": {...}}}, nested values typed the same way. Rows written
-- before kept {"applied"|"purchased_ms", "usage"}; they are converted here, so a retry of an old
-- delivery still gets its first answer.
update plan_events set response = jsonb_build_object('result', jsonb_build_object(
    'type', 'PlanChangeResult',
    'fields', jsonb_build_object(
        'applied', response->'applied',
        'usage', jsonb_build_object(
            'type', 'UsageView',
            'fields', (response->'usage') || jsonb_build_object('active_session',
                case when jsonb_typeof(response->'usage'->'active_session') = 'object'
                    then jsonb_build_object('type', 'ActiveSessionView',
                                            'fields', response->'usage'->'active_session')
                    else 'null'::jsonb end)))))
where response ? 'usage' and not response ? 'result';

update credit_purchases set response = jsonb_build_object('result', jsonb_build_object(
    'type', 'CreditsAdded',
    'fields', jsonb_build_object(
        'purchased_ms', response->'purchased_ms',
        'usage', jsonb_build_object(
            'type', 'UsageView',
            'fields', (response->'usage') || jsonb_build_object('active_session',
                case when jsonb_typeof(response->'usage'->'active_session') = 'object'
                    then jsonb_build_object('type', 'ActiveSessionView',
                                            'fields', response->'usage'->'active_session')
                    else 'null'::jsonb end)))))
where response ? 'usage' and not response ? 'result';
