-- Dev/test schema (PROTOCOL section 8): the minimum of the main API's tables that ownership checks read.
-- Every column other than the keys is nullable or defaulted, so a plain INSERT INTO diagnoses (id, user_id) works.
-- apply_migrations runs this file once, inside one transaction, and records it in schema_migrations.

CREATE TABLE IF NOT EXISTS users (
    id          bigint      PRIMARY KEY,
    name        text        NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS diagnoses (
    id          bigint      PRIMARY KEY,
    user_id     bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       text        NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The replica is asked "who owns diagnosis X" by primary key; the main API also lists a user's diagnoses.
CREATE INDEX IF NOT EXISTS diagnoses_user_id_idx ON diagnoses (user_id);
