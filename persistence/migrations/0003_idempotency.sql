-- Replies to requests sent with an Idempotency-Key, kept 24 h so a retry gets
-- the first answer again. Written in the same transaction as the change they
-- answer; never updated; expired rows are pruned.
create table idempotency_keys (
    user_id       text not null references usage_users (user_id),
    key           text not null check (length(key) between 1 and 255),
    request_hash  text not null,
    outcome       jsonb not null,
    created_at    timestamptz not null,
    expires_at    timestamptz not null,
    primary key (user_id, key)
);

create index idempotency_keys_expires_at on idempotency_keys (expires_at);
