-- Runs once, when the PostgreSQL data volume is first initialised (docker-entrypoint-initdb.d).
-- One database per tenant: the model registry, Airflow's metadata, and the fleet's own
-- store (predictions, feedback, decisions). All owned by the compose user (POSTGRES_USER).
-- \gexec makes each CREATE conditional, so re-running the file by hand is harmless.
SELECT format('CREATE DATABASE %I', db)
FROM unnest(ARRAY['mlflow', 'airflow', 'abfleet']) AS db
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = db)
\gexec
