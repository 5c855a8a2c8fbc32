"""Thin routers: validate, call the domain, shape the response."""
