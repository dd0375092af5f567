-- Room on each page for a flush to rewrite its rows in place.
--
-- A flush rewrites every dirty user's row, current period and open session (and meters in use).
-- On a full page the new version of a row goes to another page, and every index of the table
-- gets an entry for it (usage_sessions has five, counting its deferred exclusion constraint,
-- which is checked again at COMMIT for each new entry). With half of each page kept free, the
-- new version fits beside the old one: a heap-only (HOT) update, no index touched, since a flush
-- changes no indexed column (`ended_at` and `pending` stay NULL while a session is open). On the
-- 2-core development machine this took the users, periods and sessions upserts of a flush of
-- 50,000 users with an open session from about 3.5 s to 1.4 s (every update HOT, against almost
-- none before).
--
-- The price is space: these tables take about twice the pages. Only pages written from now on
-- are affected; `VACUUM FULL` (or pg_repack) repacks the existing ones, when wanted.
alter table usage_users set (fillfactor = 50);
alter table usage_periods set (fillfactor = 50);
alter table usage_sessions set (fillfactor = 50);
alter table usage_meters set (fillfactor = 50);
