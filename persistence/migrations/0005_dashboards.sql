-- Ops views over the synced tables, for dashboards (deploy/grafana/usage-ledger.json runs its
-- queries on these). In schema `dashboards`, so the read-only usage_ledger_dashboard role reads
-- them (0004's default privileges) and nothing else. Figures are as of the last flush: a running
-- session's minutes lag the live ledger by at most LEDGER_SYNC_INTERVAL_S.

-- Each user's current period: the allowance used, what is left, purchased minutes.
create view dashboards.current_usage as
select u.user_id,
       u.plan,
       p.period_start,
       p.period_end,
       p.minutes_limit,
       p.minutes_used,
       round(u.purchased_ms / 60000.0, 2) as purchased_minutes,
       round((greatest(p.limit_ms - p.used_ms, 0) + u.purchased_ms) / 60000.0, 2) as minutes_remaining,
       case when p.limit_ms = 0 then 100.0
            else least(100.0, round(100.0 * p.used_ms / p.limit_ms, 1)) end as percent_used,
       p.synced_at
from public.usage_users u
join public.usage_periods p on p.user_id = u.user_id and not p.archived;

-- Users at or near their limit: `at_limit` with nothing left, `near_limit` past 80% of the
-- allowance with purchased minutes or allowance still to spend.
create view dashboards.users_near_limit as
select c.*,
       case when c.minutes_remaining = 0 then 'at_limit' else 'near_limit' end as status
from dashboards.current_usage c
where c.minutes_remaining = 0 or c.percent_used >= 80;

-- Sessions running now, with how long ago their last (flushed) heartbeat was.
create view dashboards.active_sessions as
select s.id as session_id,
       s.user_id,
       u.plan,
       s.started_at,
       s.last_heartbeat_at,
       s.minutes_used,
       s.topic,
       s.difficulty,
       round(extract(epoch from now() - s.last_heartbeat_at)::numeric, 1) as seconds_since_heartbeat
from public.usage_sessions s
join public.usage_users u on u.user_id = s.user_id
where s.ended_at is null;

-- Minutes and sessions by UTC day of the session's start and the plan the user was on then.
create view dashboards.minutes_by_day as
select date_trunc('day', s.started_at at time zone 'UTC') as day,
       coalesce(p.plan, u.plan) as plan,
       count(*) as sessions,
       count(distinct s.user_id) as users,
       round(sum(s.used_ms) / 60000.0, 2) as minutes_used
from public.usage_sessions s
join public.usage_users u on u.user_id = s.user_id
left join lateral (
    select period.plan
    from public.usage_periods period
    where period.user_id = s.user_id
      and s.started_at >= period.period_start
      and s.started_at < period.period_end
    order by period.period_start desc
    limit 1
) p on true
group by 1, 2;

-- How many users are on each plan, and how many of them are in a session now.
create view dashboards.plan_distribution as
select u.plan,
       count(*) as users,
       count(*) filter (where exists (
           select 1 from public.usage_sessions s where s.user_id = u.user_id and s.ended_at is null
       )) as users_in_session
from public.usage_users u
group by u.plan;

-- The write-behind as Postgres sees it: when each table was last written, and the oldest
-- flushed heartbeat of a running session (past LEDGER_SYNC_INTERVAL_S plus the heartbeat
-- cadence, flushes are not landing; /metrics has the shards' own view: ledger_shard_flush_lag).
create view dashboards.flush_lag as
select w.users_written_at,
       w.periods_written_at,
       w.sessions_written_at,
       round(extract(epoch from now() - greatest(w.users_written_at, w.periods_written_at, w.sessions_written_at))::numeric, 1)
           as seconds_since_last_write,
       (select round(extract(epoch from now() - min(s.last_heartbeat_at))::numeric, 1)
        from public.usage_sessions s where s.ended_at is null) as oldest_running_heartbeat_age_s
from (
    select (select max(updated_at) from public.usage_users) as users_written_at,
           (select max(synced_at) from public.usage_periods) as periods_written_at,
           (select max(updated_at) from public.usage_sessions) as sessions_written_at
) w;
