-- Billing to the last sign of life: a session the limit ended is billed to its last heartbeat, and
-- the stretch from there to the limit is held until its client shows it was alive (a heartbeat or
-- an end within the stale timeout of its last heartbeat), then billed; otherwise it is dropped.
--
-- `pending` holds what such a session's tail holds, per period: [[period start (epoch ms),
-- from its allowance (ms), from purchased minutes (ms)], ...]. NULL once resolved, and for every
-- other session; `used_ms` never includes it. A shard rebuilds the holds (and re-arms their
-- release alarms) from these rows after a restart.
alter table usage_sessions add column pending jsonb;

create index usage_sessions_pending on usage_sessions (user_id) where pending is not null;
