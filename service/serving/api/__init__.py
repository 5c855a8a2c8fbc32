"""HTTP only: routers, schemas, dependencies, problem+json."""
