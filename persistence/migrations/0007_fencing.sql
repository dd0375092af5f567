-- Fencing: each shard activation claims its shard (a new epoch) before it loads anyone, and
-- every write it makes checks, under a share lock, that its epoch is still the newest. A shard
-- process that Ray has replaced but that still runs (a node cut off from the cluster) can then
-- write nothing after its successor started. `owner` is `<ray namespace>/<shard name>`.
create table shard_activations (
    owner       text primary key,
    epoch       bigint not null check (epoch >= 1),
    host        text,
    pid         integer,
    claimed_at  timestamptz not null default now()
);

grant select, insert, update on shard_activations to usage_ledger_app;
