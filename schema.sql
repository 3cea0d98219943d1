-- feedfleet schema. Applying it twice is harmless (`feedfleet db init`).
--
-- Command side: providers, subscriptions, provider_connections, ingestion_metrics,
-- plus what the coordinator needs (worker_instances, assignments).
-- Query side: raw_market_data, a TimescaleDB hypertable (1 h chunks, 16 symbol
-- partitions) when the extension can be created, else native hourly range partitions
-- with a default partition so no insert ever fails.

CREATE TABLE IF NOT EXISTS providers (
    id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name              VARCHAR(50)  NOT NULL UNIQUE,
    provider_type     VARCHAR(50)  NOT NULL,
    enabled           BOOLEAN      NOT NULL DEFAULT TRUE,
    priority          INTEGER      NOT NULL DEFAULT 1,  -- 1 is highest: the failover order
    connection_config JSONB        NOT NULL DEFAULT '{}'::jsonb,
    rate_limits       JSONB        NOT NULL DEFAULT '{}'::jsonb,
    created_at        TIMESTAMPTZ  NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ  NOT NULL DEFAULT now(),
    CONSTRAINT providers_connection_config_is_object
        CHECK (jsonb_typeof(connection_config) = 'object'),
    CONSTRAINT providers_rate_limits_is_object CHECK (jsonb_typeof(rate_limits) = 'object')
);
CREATE INDEX IF NOT EXISTS idx_providers_enabled ON providers (enabled);
-- The seed's name length and priority default, on a table an earlier schema.sql made with
-- VARCHAR(100) and DEFAULT 100 (a longer name already there is kept, and said so).
ALTER TABLE providers ALTER COLUMN priority SET DEFAULT 1;
DO $$
BEGIN
    -- atttypmod of a VARCHAR(n) is n + 4 (the length word).
    IF (SELECT atttypmod - 4 FROM pg_attribute
        WHERE attrelid = 'providers'::regclass AND attname = 'name') > 50 THEN
        IF EXISTS (SELECT 1 FROM providers WHERE length(name) > 50) THEN
            RAISE NOTICE 'providers.name kept wider than 50: a longer name exists';
        ELSE
            ALTER TABLE providers ALTER COLUMN name TYPE VARCHAR(50);
        END IF;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS subscriptions (
    id                UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    provider_id       UUID        NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    instrument_symbol VARCHAR(50) NOT NULL,
    data_types        TEXT[]      NOT NULL DEFAULT ARRAY['TRADE', 'QUOTE'],
    is_active         BOOLEAN     NOT NULL DEFAULT TRUE,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_provider_symbol_key UNIQUE (provider_id, instrument_symbol)
);
CREATE INDEX IF NOT EXISTS idx_subscriptions_provider ON subscriptions (provider_id, is_active);

CREATE TABLE IF NOT EXISTS provider_connections (
    id              BIGSERIAL PRIMARY KEY,
    provider_id     UUID        NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    instance_id     VARCHAR(200),
    status          VARCHAR(20) NOT NULL,
    connected_at    TIMESTAMPTZ,
    disconnected_at TIMESTAMPTZ,
    error_message   TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_connections_provider_status
    ON provider_connections (provider_id, status);
-- The seed's columns: the instance's latest heartbeat on its latest row, and where and how
-- it connected (instance, host, pid, provider type, endpoint).
ALTER TABLE provider_connections ADD COLUMN IF NOT EXISTS last_heartbeat TIMESTAMPTZ;
ALTER TABLE provider_connections
    ADD COLUMN IF NOT EXISTS connection_metadata JSONB NOT NULL DEFAULT '{}'::jsonb;

CREATE TABLE IF NOT EXISTS ingestion_metrics (
    id                  BIGSERIAL PRIMARY KEY,
    provider_id         UUID        NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    instance_id         VARCHAR(200),
    timestamp           TIMESTAMPTZ NOT NULL DEFAULT now(),
    messages_received   BIGINT      NOT NULL DEFAULT 0,
    messages_published  BIGINT      NOT NULL DEFAULT 0,
    messages_stored     BIGINT      NOT NULL DEFAULT 0,
    messages_spooled    BIGINT      NOT NULL DEFAULT 0,
    messages_replayed   BIGINT      NOT NULL DEFAULT 0,
    messages_dropped    BIGINT      NOT NULL DEFAULT 0,
    decode_errors       BIGINT      NOT NULL DEFAULT 0,
    error_count         BIGINT      NOT NULL DEFAULT 0,
    throughput_per_sec  DOUBLE PRECISION NOT NULL DEFAULT 0,
    latency_p50_ms      DOUBLE PRECISION,
    latency_p99_ms      DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS idx_metrics_provider_timestamp
    ON ingestion_metrics (provider_id, timestamp DESC);
-- The seed's metric columns: messages_ingested (= messages_received), bytes_ingested (read
-- from the wire; 0 for blpapi, which hides it), errors_count (decode errors + session
-- errors), avg_latency_ms (receive -> publish, mean over the report's window).
ALTER TABLE ingestion_metrics ADD COLUMN IF NOT EXISTS messages_ingested BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ingestion_metrics ADD COLUMN IF NOT EXISTS bytes_ingested BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ingestion_metrics ADD COLUMN IF NOT EXISTS errors_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ingestion_metrics ADD COLUMN IF NOT EXISTS avg_latency_ms DOUBLE PRECISION;
ALTER TABLE ingestion_metrics ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();

-- One row per live worker process; the coordinator treats a row whose heartbeat is
-- older than its timeout as dead.
CREATE TABLE IF NOT EXISTS worker_instances (
    instance_id   VARCHAR(200) PRIMARY KEY,
    provider_id   UUID        NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    host          VARCHAR(200) NOT NULL,
    pid           INTEGER      NOT NULL,
    started_at    TIMESTAMPTZ  NOT NULL DEFAULT now(),
    heartbeat_at  TIMESTAMPTZ  NOT NULL DEFAULT now(),
    status        VARCHAR(20)  NOT NULL DEFAULT 'CONNECTING'
);
CREATE INDEX IF NOT EXISTS idx_worker_instances_provider ON worker_instances (provider_id);

-- Failover: each worker pushes its status (and since when), the canonical symbols it cannot
-- serve (the provider refused the item, or it went silent while others flow) and those
-- with a recent event, so the coordinator decides on facts, not timeouts alone.
ALTER TABLE worker_instances ADD COLUMN IF NOT EXISTS status_since TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE worker_instances ADD COLUMN IF NOT EXISTS unavailable_symbols TEXT[] NOT NULL DEFAULT '{}';
ALTER TABLE worker_instances ADD COLUMN IF NOT EXISTS flowing_symbols TEXT[] NOT NULL DEFAULT '{}';

-- The seed's subscription status is the column the code reads and writes: 'active',
-- 'inactive' (unsubscribed) or 'failover' (served by a backup). is_active, which came
-- first, is kept in step by a trigger, so an operator may edit either; a database made
-- before status existed is migrated here (status from is_active), without losing a row.
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS status VARCHAR(20) NOT NULL DEFAULT 'active';
UPDATE subscriptions SET status = 'inactive' WHERE NOT is_active AND status <> 'inactive';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'subscriptions_status_check') THEN
        ALTER TABLE subscriptions ADD CONSTRAINT subscriptions_status_check
            CHECK (status IN ('active', 'inactive', 'failover'));
    END IF;
END $$;
CREATE OR REPLACE FUNCTION feedfleet_subscription_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.is_active IS DISTINCT FROM OLD.is_active
       AND NEW.status IS NOT DISTINCT FROM OLD.status THEN
        -- Only is_active was written: status follows it.
        NEW.status := CASE WHEN NEW.is_active THEN 'active' ELSE 'inactive' END;
    ELSIF TG_OP = 'INSERT' AND NOT NEW.is_active AND NEW.status = 'active' THEN
        NEW.status := 'inactive';
    END IF;
    NEW.is_active := NEW.status IS DISTINCT FROM 'inactive';
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS subscriptions_status ON subscriptions;
CREATE TRIGGER subscriptions_status BEFORE INSERT OR UPDATE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION feedfleet_subscription_status();
CREATE INDEX IF NOT EXISTS idx_subscriptions_status ON subscriptions (status);

-- Which worker instance holds which symbol, written only by the active coordinator.
-- provider_id is the subscription's provider (for whom); instance_id (and
-- serving_provider_id) who serves it. reason: 'primary', 'failover' (a backup serves it),
-- 'failback' (the recovered primary, brought up beside the backup until its first event).
-- latest: this row's worker writes latest:{symbol} (one source per symbol).
CREATE TABLE IF NOT EXISTS assignments (
    provider_id       UUID        NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    instrument_symbol VARCHAR(50) NOT NULL,
    instance_id       VARCHAR(200) NOT NULL,
    data_types        TEXT[]      NOT NULL,
    reason            VARCHAR(20) NOT NULL DEFAULT 'primary',
    assigned_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, instrument_symbol)
);
CREATE INDEX IF NOT EXISTS idx_assignments_instance ON assignments (instance_id);
ALTER TABLE assignments ADD COLUMN IF NOT EXISTS serving_provider_id UUID;
ALTER TABLE assignments ADD COLUMN IF NOT EXISTS latest BOOLEAN NOT NULL DEFAULT TRUE;
-- A symbol may be held by two instances at once during a make-before-break failback.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = 'assignments'::regclass AND i.indisprimary
          AND a.attname = 'instance_id'
    ) THEN
        ALTER TABLE assignments DROP CONSTRAINT assignments_pkey;
        ALTER TABLE assignments ADD PRIMARY KEY (provider_id, instrument_symbol, instance_id);
    END IF;
END $$;

-- Changes that the coordinator must see at once (it also polls slowly).
CREATE OR REPLACE FUNCTION feedfleet_notify_config() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('feedfleet_config', TG_TABLE_NAME);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS providers_notify ON providers;
CREATE TRIGGER providers_notify AFTER INSERT OR UPDATE OR DELETE ON providers
    FOR EACH STATEMENT EXECUTE FUNCTION feedfleet_notify_config();
DROP TRIGGER IF EXISTS subscriptions_notify ON subscriptions;
CREATE TRIGGER subscriptions_notify AFTER INSERT OR UPDATE OR DELETE ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION feedfleet_notify_config();

-- ---------------------------------------------------------------- query side

DO $$
DECLARE
    have_timescale BOOLEAN := FALSE;
BEGIN
    IF to_regclass('raw_market_data') IS NOT NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            have_timescale := TRUE;
        EXCEPTION WHEN OTHERS THEN
            -- e.g. not in shared_preload_libraries: fall back to native partitions.
            RAISE NOTICE 'timescaledb unavailable (%), using native partitions', SQLERRM;
        END;
    END IF;

    EXECUTE format($t$
        CREATE TABLE raw_market_data (
            event_id          UUID         NOT NULL,
            symbol            VARCHAR(50)  NOT NULL,
            provider          VARCHAR(100) NOT NULL,
            timestamp         TIMESTAMPTZ  NOT NULL,
            data_type         VARCHAR(20)  NOT NULL,
            price             NUMERIC(20, 8),
            volume            NUMERIC(24, 8),
            bid               NUMERIC(20, 8),
            ask               NUMERIC(20, 8),
            provider_specific JSON         NOT NULL DEFAULT '{}'::json,
            provider_sequence BIGINT,
            quality_flags     TEXT[]       NOT NULL DEFAULT '{}',
            received_at       TIMESTAMPTZ  NOT NULL,
            PRIMARY KEY (event_id, timestamp, symbol)
        ) %s$t$,
        CASE WHEN have_timescale THEN '' ELSE 'PARTITION BY RANGE (timestamp)' END);

    IF have_timescale THEN
        PERFORM create_hypertable('raw_market_data', 'timestamp',
                                  partitioning_column => 'symbol',
                                  number_partitions => 16,
                                  chunk_time_interval => INTERVAL '1 hour');
    ELSE
        CREATE TABLE raw_market_data_default PARTITION OF raw_market_data DEFAULT;
    END IF;
END $$;

-- The seed's ingestion_timestamp (when the row was written) and quality_score: 1 for a record without flags, 0.25 less for each quality flag but
-- failover and backfill (which say who served it and when, not how good it is), never
-- below 0.
ALTER TABLE raw_market_data
    ADD COLUMN IF NOT EXISTS ingestion_timestamp TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE raw_market_data ADD COLUMN IF NOT EXISTS quality_score REAL
    GENERATED ALWAYS AS (
        greatest(0.0, 1.0 - 0.25 * cardinality(
            array_remove(array_remove(quality_flags, 'failover'), 'backfill')))
    ) STORED;

CREATE INDEX IF NOT EXISTS idx_raw_data_symbol_time ON raw_market_data (symbol, timestamp DESC);

-- What a row no longer carries (README, Storage: 395 -> 305 bytes a row with its indexes).
-- ingested_at said what ingestion_timestamp says (8 bytes). The (provider, timestamp) index
-- served no query the fleet makes (per-provider figures are in ingestion_metrics) and cost
-- 16 bytes. provider_specific is json, the event's compact text as written, where jsonb's
-- binary form took about 100 bytes for a Polygon quote's seven small fields, and nothing
-- needs jsonb's operators (->, ->> work on json). Dropping is instant on a table made
-- before; the type change rewrites the table under an exclusive lock, so it is made here
-- only while the table is small, and otherwise left, with a notice, for a quiet hour:
--   ALTER TABLE raw_market_data ALTER COLUMN provider_specific DROP DEFAULT,
--     ALTER COLUMN provider_specific TYPE json USING provider_specific::json,
--     ALTER COLUMN provider_specific SET DEFAULT '{}'::json;
DROP INDEX IF EXISTS idx_raw_data_provider_time;
DO $$
BEGIN
    ALTER TABLE raw_market_data DROP COLUMN IF EXISTS ingested_at;
    IF (SELECT atttypid FROM pg_attribute WHERE attrelid = 'raw_market_data'::regclass
        AND attname = 'provider_specific') = 'jsonb'::regtype THEN
        IF (SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits
            WHERE inhparent = 'raw_market_data'::regclass) > 256 * 1024 * 1024 THEN
            RAISE NOTICE 'provider_specific kept as jsonb: over 256 MB, see schema.sql';
        ELSE
            ALTER TABLE raw_market_data ALTER COLUMN provider_specific DROP DEFAULT,
                ALTER COLUMN provider_specific TYPE json USING provider_specific::json,
                ALTER COLUMN provider_specific SET DEFAULT '{}'::json;
        END IF;
    END IF;
EXCEPTION WHEN feature_not_supported THEN
    -- e.g. a hypertable with compressed chunks, which refuses both changes.
    RAISE NOTICE 'raw_market_data kept as it is (%)', SQLERRM;
END $$;

-- Dead-letter for records no sink may store as they are (a value outside a column, a NUL
-- character, a time out of range) and rows COPY refused: the reason and the record as
-- received, as bytes (it may hold what text columns refuse). Nothing is dropped silently.
CREATE TABLE IF NOT EXISTS rejected_records (
    event_id    UUID        PRIMARY KEY,
    provider    TEXT        NOT NULL,
    symbol      TEXT        NOT NULL,
    reason      TEXT        NOT NULL,
    payload     BYTEA       NOT NULL,
    rejected_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_rejected_records_provider_time
    ON rejected_records (provider, rejected_at DESC);

-- Creates the hourly partitions from `hours_back` before to `hours_ahead` after now.
-- Workers call it at start and every few minutes. An hour whose rows already sit in the
-- default partition is skipped (PostgreSQL would refuse it), never an error.
CREATE OR REPLACE FUNCTION feedfleet_ensure_partitions(hours_back INTEGER, hours_ahead INTEGER)
RETURNS INTEGER LANGUAGE plpgsql AS $$
DECLARE
    created INTEGER := 0;
    h       TIMESTAMPTZ;
    name    TEXT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table
                   WHERE partrelid = 'raw_market_data'::regclass) THEN
        RETURN 0;  -- a hypertable manages its own chunks
    END IF;
    FOR h IN SELECT generate_series(date_trunc('hour', now()) - make_interval(hours => hours_back),
                                    date_trunc('hour', now()) + make_interval(hours => hours_ahead),
                                    INTERVAL '1 hour')
    LOOP
        name := 'raw_market_data_' || to_char(h AT TIME ZONE 'UTC', 'YYYYMMDD"_"HH24');
        CONTINUE WHEN to_regclass(name) IS NOT NULL;
        BEGIN
            EXECUTE format('CREATE TABLE %I PARTITION OF raw_market_data
                            FOR VALUES FROM (%L) TO (%L)', name, h, h + INTERVAL '1 hour');
            created := created + 1;
        EXCEPTION WHEN check_violation OR duplicate_table THEN
            NULL;  -- rows for that hour are in the default partition, or a race
        END;
    END LOOP;
    RETURN created;
END $$;

SELECT feedfleet_ensure_partitions(2, 24);
