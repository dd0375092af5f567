-- Holds (API.md, *Holds*): an amount of a count meter or of minutes reserved for work whose cost
-- is known only afterwards, resolved exactly once. One row per hold, written before its creation,
-- capture, release or extension is answered (write-through); an expiry is written behind (losing
-- that write only delays it: the hold is still `held` here and the shard that loads it expires it
-- again at `expires_at`). What a capture bills is a `consume` entry of `credit_ledger` whose
-- reference is the hold's `reference`, or its id.
--
-- `amount`, `captured` and `released` count meter units, or milliseconds for a minute hold
-- (`meter` null). `draws` is where a minute hold holds, as `usage_sessions.pending`: [[period start
-- (epoch ms), from its allowance (ms), from purchased minutes (ms)], ...]; `window_start` is the
-- start of the meter window a meter hold counts in (null: made while the meter had no limit).
create table usage_holds (
    hold_id      text primary key,
    user_id      text not null,
    meter        text,
    amount       bigint not null check (amount > 0),
    state        text not null check (state in ('held', 'captured', 'released', 'expired')),
    captured     bigint not null default 0 check (captured >= 0),
    released     bigint not null default 0 check (released >= 0),
    reference    text,
    created_at   timestamptz not null,
    expires_at   timestamptz not null,
    resolved_at  timestamptz,
    draws        jsonb,
    window_start timestamptz,
    version      bigint not null,
    updated_at   timestamptz not null default now(),
    check (state = 'held' or captured + released = amount)
);

-- A shard loads each user's unresolved holds (and re-arms their expiry) from here.
create index usage_holds_held on usage_holds (user_id) where state = 'held';

grant select, insert, update on usage_holds to usage_ledger_app;

-- Holds not yet resolved, as of the last write: how much each holds and for how long yet.
create view dashboards.open_holds as
select h.hold_id,
       h.user_id,
       u.plan,
       coalesce(h.meter, 'minutes') as holds,
       case when h.meter is null then round(h.amount / 60000.0, 2) else h.amount end as amount,
       h.reference,
       h.created_at,
       h.expires_at,
       round(extract(epoch from h.expires_at - now())::numeric, 1) as seconds_left
from public.usage_holds h
join public.usage_users u on u.user_id = h.user_id
where h.state = 'held';

-- Every hold, resolved or not (the dashboards' history of holds).
create view dashboards.usage_holds as
select hold_id, user_id, coalesce(meter, 'minutes') as holds,
       case when meter is null then round(amount / 60000.0, 2) else amount end as amount,
       state,
       case when meter is null then round(captured / 60000.0, 2) else captured end as captured,
       case when meter is null then round(released / 60000.0, 2) else released end as released,
       reference, created_at, expires_at, resolved_at
from public.usage_holds;
