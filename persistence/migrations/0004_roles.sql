-- Least privilege.
--
-- usage_ledger_dashboard: reads the views in schema `dashboards`, and nothing else (no table,
--   no write, no DDL). Deployments grant it to a login role for Grafana and friends.
-- usage_ledger_app: what the server needs at run time: its rows, never its tables. It owns
--   nothing, so it cannot alter, drop or truncate; the credit ledger is insert-only for it, so
--   even the server cannot rewrite a balance's history. Deployments grant it to the login role
--   in LEDGER_DATABASE_URL and migrate as the owner (LEDGER_MIGRATION_DATABASE_URL).
--
-- Both are group roles (NOLOGIN). Role names are shared by every database of a cluster, so
-- they are created only when missing; the migrating user needs CREATEROLE, or an administrator
-- creates the two roles first (deploy/README.md).

do $$
begin
    if not exists (select from pg_roles where rolname = 'usage_ledger_dashboard') then
        create role usage_ledger_dashboard nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'usage_ledger_app') then
        create role usage_ledger_app nologin;
    end if;
exception
    when duplicate_object or unique_violation then
        null; -- another database of this cluster created it at the same moment
    when insufficient_privilege then
        raise exception 'roles usage_ledger_app and usage_ledger_dashboard are missing and % may not create roles', current_user
            using hint = 'create them as an administrator first: see deploy/README.md (Postgres roles)';
end $$;

-- Nobody but the owner creates objects in public (the default since Postgres 15).
revoke create on schema public from public;

-- The server's rows.
grant usage on schema public to usage_ledger_app;
grant select on schema_migrations to usage_ledger_app;
grant select, insert, update on usage_users, usage_periods, usage_sessions, usage_meters to usage_ledger_app;
grant select, insert on credit_ledger, credit_purchases, plan_events to usage_ledger_app;
grant select on credit_balances to usage_ledger_app;
grant select, insert, update, delete on idempotency_keys to usage_ledger_app;

-- What dashboards read: the documented columns of the contract tables, and the balances.
-- Views run with their owner's rights, so the dashboard role needs no right on the tables.
create schema dashboards;

create view dashboards.users as
select user_id, plan, round(purchased_ms / 60000.0, 2) as purchased_minutes, version, created_at, updated_at
from public.usage_users;

create view dashboards.usage_periods as
select user_id, period_start, period_end, plan, minutes_used, minutes_limit, minutes_from_purchased,
       synced_at, version, archived, created_at
from public.usage_periods;

create view dashboards.usage_sessions as
select id, user_id, started_at, last_heartbeat_at, ended_at, minutes_used, topic, difficulty, end_reason
from public.usage_sessions;

create view dashboards.credit_ledger as
select user_id, seq, occurred_at, bucket, window_start, delta, balance_after, unit, reason, reference, recorded_at
from public.credit_ledger;

create view dashboards.credit_balances as
select user_id, bucket, window_start, balance, last_balance_after, entries, last_seq
from public.credit_balances;

create view dashboards.plan_events as
select delivery_id, user_id, plan, action, occurred_at, period_start, period_end, applied, received_at
from public.plan_events;

grant usage on schema dashboards to usage_ledger_dashboard;
grant select on all tables in schema dashboards to usage_ledger_dashboard;
-- Views added to `dashboards` by later migrations are readable without a grant of their own.
alter default privileges in schema dashboards grant select on tables to usage_ledger_dashboard;
