-- Two minute buckets (the period's allowance, purchased minutes), billing
-- anchors, count meters, the append-only credit ledger, purchases.

alter table usage_users
    add column purchased_ms bigint not null default 0 check (purchased_ms >= 0),
    add column anchor_start timestamptz,
    add column anchor_months integer not null default 0 check (anchor_months between 0 and 12),
    add column anchor_duration_ms bigint not null default 0 check (anchor_duration_ms >= 0),
    add column next_entry_seq bigint not null default 1 check (next_entry_seq >= 1);

-- minutes_used counts both buckets; used_ms stays the allowance's part.
alter table usage_periods
    add column purchased_used_ms bigint not null default 0 check (purchased_used_ms >= 0),
    drop column minutes_used;
-- One current (not archived) period per user. Deferred to commit, so one batched
-- write may archive a period and open the next in any row order.
alter table usage_periods
    add constraint usage_periods_one_current exclude using btree (user_id with =)
        where (not archived) deferrable initially deferred;

alter table usage_periods
    add column minutes_used numeric(14, 2)
        generated always as (round((used_ms + purchased_used_ms) / 60000.0, 2)) stored,
    add column minutes_from_purchased numeric(14, 2)
        generated always as (round(purchased_used_ms / 60000.0, 2)) stored;

-- A count meter's use in its current window (write-behind, guarded by version).
create table usage_meters (
    user_id       text not null references usage_users (user_id),
    meter         text not null,
    window_start  timestamptz not null,
    window_end    timestamptz not null,
    used          bigint not null check (used >= 0),
    version       bigint not null,
    updated_at    timestamptz not null default now(),
    primary key (user_id, meter)
);

-- Every change to a balance. For each (user, bucket, window) the deltas add up
-- to the balance, and balance_after is that running sum. Minute buckets
-- ('monthly' per period, 'purchased') count milliseconds; 'meter:<name>' counts uses.
create table credit_ledger (
    user_id        text not null references usage_users (user_id),
    seq            bigint not null check (seq >= 1),
    occurred_at    timestamptz not null,
    bucket         text not null,
    window_start   timestamptz,
    delta          bigint not null,
    balance_after  bigint not null,
    reason         text not null check (reason in ('grant', 'purchase', 'refund', 'consume', 'reset', 'adjust')),
    reference      text,
    unit           text generated always as (case when bucket like 'meter:%' then 'count' else 'ms' end) stored,
    recorded_at    timestamptz not null default now(),
    primary key (user_id, seq)
);

create index credit_ledger_by_balance on credit_ledger (user_id, bucket, window_start);

-- The reconciliation query: each balance as the ledger derives it, and the
-- last running sum it recorded (the two differ when a row was altered).
create view credit_balances as
select
    user_id,
    bucket,
    window_start,
    sum(delta) as balance,
    (array_agg(balance_after order by seq desc))[1] as last_balance_after,
    count(*) as entries,
    max(seq) as last_seq
from credit_ledger
group by user_id, bucket, window_start;

-- Minutes billing added, keyed by delivery id, with the first answer given.
create table credit_purchases (
    delivery_id  text primary key,
    user_id      text not null references usage_users (user_id),
    minutes_ms   bigint not null check (minutes_ms > 0),
    reason       text not null check (reason in ('purchase', 'grant', 'refund')),
    reference    text,
    response     jsonb not null,
    received_at  timestamptz not null default now()
);

create index credit_purchases_user on credit_purchases (user_id, received_at desc);

-- Users written before this migration get an opening entry: their current
-- allowance balance, so the ledger adds up from here on.
insert into credit_ledger (user_id, seq, occurred_at, bucket, window_start, delta, balance_after, reason, reference)
select user_id, 1, now(), 'monthly', period_start,
       greatest(0, limit_ms - used_ms), greatest(0, limit_ms - used_ms), 'reset', 'migration 0002'
from usage_periods
where not archived;

update usage_users set next_entry_seq = 2
where user_id in (select user_id from usage_periods where not archived);
