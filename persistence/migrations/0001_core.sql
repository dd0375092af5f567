-- The core tables. Names and meanings of the columns in DESIGN.md are a
-- contract with dashboards; the *_ms columns are the ledger's exact figures,
-- the minutes_* columns are derived from them for people and dashboards.

create table usage_users (
    user_id        text primary key check (length(user_id) between 1 and 255),
    plan           text not null,
    -- The last applied plan event (its occurred_at, then its delivery id, orders events).
    plan_event_at  timestamptz,
    plan_event_id  text,
    version        bigint not null check (version >= 0),
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now()
);

create table usage_periods (
    id             bigint generated always as identity primary key,
    user_id        text not null references usage_users (user_id),
    period_start   timestamptz not null,
    period_end     timestamptz not null,
    plan           text not null,
    used_ms        bigint not null check (used_ms >= 0),
    limit_ms       bigint not null check (limit_ms >= 0),
    minutes_used   numeric(14, 2) generated always as (round(used_ms / 60000.0, 2)) stored,
    minutes_limit  numeric(14, 2) generated always as (round(limit_ms / 60000.0, 2)) stored,
    archived       boolean not null default false,
    version        bigint not null,
    synced_at      timestamptz not null default now(),
    created_at     timestamptz not null default now(),
    unique (user_id, period_start),
    check (period_start < period_end)
);

create table usage_sessions (
    id                 uuid primary key,
    user_id            text not null references usage_users (user_id),
    started_at         timestamptz not null,
    last_heartbeat_at  timestamptz not null,
    ended_at           timestamptz,
    used_ms            bigint not null default 0 check (used_ms >= 0),
    minutes_used       numeric(14, 2) generated always as (round(used_ms / 60000.0, 2)) stored,
    topic              text check (length(topic) between 1 and 1000),
    difficulty         text check (difficulty in ('beginner', 'intermediate', 'advanced')),
    end_reason         text check (end_reason in ('user_ended', 'limit_reached', 'timeout', 'error', 'stale')),
    last_seq           bigint,
    version            bigint not null,
    updated_at         timestamptz not null default now(),
    check ((ended_at is null) = (end_reason is null)),
    -- At most one open session per user. Deferred to commit, so one batched
    -- write may close a session and open the next in any row order.
    constraint usage_sessions_one_open exclude using btree (user_id with =)
        where (ended_at is null) deferrable initially deferred
);

create index usage_sessions_user_started on usage_sessions (user_id, started_at desc);
create index usage_sessions_open on usage_sessions (user_id) where ended_at is null;

-- Every plan event billing delivered, applied or not, with the first answer given.
create table plan_events (
    delivery_id   text primary key,
    user_id       text not null references usage_users (user_id),
    plan          text not null,
    action        text not null check (action in ('upgrade', 'downgrade', 'cancel')),
    occurred_at   timestamptz not null,
    reset_usage   boolean not null,
    period_start  timestamptz,
    period_end    timestamptz,
    applied       boolean not null,
    response      jsonb not null,
    received_at   timestamptz not null default now()
);

create index plan_events_user_occurred on plan_events (user_id, occurred_at desc);
