-- Threshold events: the outbox, and the alert level each user was last told of.
--
-- A ledger writes each event in the same transaction as the change that made it, so an event
-- exists exactly when its change is durable. Gateways with LEDGER_EVENTS_WEBHOOK_URL set deliver
-- undelivered rows (claimed with `for update skip locked`, so several gateways share the work)
-- and record each attempt here.

-- The alert level last announced (0 above the low-balance threshold, 1 at or under it, 2 none
-- left); NULL for rows written before this migration: the level is derived from the balance.
alter table usage_users add column alert_level smallint check (alert_level between 0 and 2);

create table usage_events (
    -- Deterministic (user, version, kind): a repeated write inserts nothing. The `webhook-id`.
    event_id         text primary key,
    user_id          text not null references usage_users (user_id),
    kind             text not null check (kind in ('low_balance', 'exhausted', 'plan_changed', 'period_rolled')),
    version          bigint not null,
    occurred_at      timestamptz not null,
    -- The webhook body {"id", "type", "timestamp", "data"} (sent as Postgres prints the jsonb).
    payload          jsonb not null,
    created_at       timestamptz not null default now(),
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    delivered_at     timestamptz,
    -- Set when delivery gave up (the event was older than LEDGER_EVENTS_MAX_AGE_S at its turn).
    failed_at        timestamptz,
    last_error       text
);

create index usage_events_due on usage_events (next_attempt_at)
    where delivered_at is null and failed_at is null;
create index usage_events_by_user on usage_events (user_id, occurred_at desc);

grant select, insert, update on usage_events to usage_ledger_app;

-- Every event, newest first by default in queries, with its delivery state.
create view dashboards.events as
select event_id, user_id, kind, occurred_at, payload, created_at, attempts, next_attempt_at,
       delivered_at, failed_at, last_error,
       case when delivered_at is not null then 'delivered'
            when failed_at is not null then 'failed'
            else 'pending' end as delivery
from public.usage_events;

-- Delivery health in one row: events waiting, how long the oldest has waited, failures.
create view dashboards.event_delivery as
select count(*) filter (where delivered_at is null and failed_at is null) as pending,
       coalesce(round(extract(epoch from now() - min(created_at)
           filter (where delivered_at is null and failed_at is null))::numeric, 1), 0) as oldest_pending_seconds,
       count(*) filter (where failed_at is not null) as failed,
       count(*) filter (where delivered_at > now() - interval '1 hour') as delivered_last_hour
from public.usage_events;
