-- The shard map: which shard owns each of the 1024 slots users hash to (`actors.routing`), per
-- Ray namespace, so the shard count is cluster state and changes while serving
-- (`usage-ledger shards resize N`). `LEDGER_SHARDS` only sizes a brand-new map.
--
-- A shard's slots are kept on its activation row: every write a shard makes share-locks that row
-- already (fencing, 0007) and now also checks that it owns the slot of every user it writes. A
-- handoff updates the giving shard's row, so it waits for that shard's writes under way, and no
-- write of it for a user of the moved slots lands after it (`persistence.shardmap`).
create table shard_map (
    namespace   text primary key,
    epoch       bigint not null check (epoch >= 1),
    count       integer not null check (count between 1 and 1024),
    target      integer check (target between 1 and 1024),  -- set while a resize is under way
    updated_at  timestamptz not null default now()
);

alter table shard_activations
    add column namespace text,
    add column shard integer check (shard between 0 and 1023),
    add column slots integer[],  -- NULL: a shard of no map (an older version's)
    -- Grows with every change of `slots`: a shard ignores an answer older than one it has applied.
    add column slots_version bigint not null default 0;

-- A shard's row is made with the map (or by a resize) before it ever claims it: epoch 0.
alter table shard_activations drop constraint shard_activations_epoch_check;
alter table shard_activations add constraint shard_activations_epoch_check check (epoch >= 0);

create index shard_activations_namespace on shard_activations (namespace) where slots is not null;

grant select, insert, update on shard_map to usage_ledger_app;
