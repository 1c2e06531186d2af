"""The admin HTTP server: read-only API (OpenAPI), dashboard, Prometheus metrics, health."""
