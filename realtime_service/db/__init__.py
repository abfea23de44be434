"""Dev and test database tooling (migrations, demo data, embedded PostgreSQL), off the request path."""
