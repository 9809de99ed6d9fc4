"""The HTTP face of the service: app factory, routes, schemas, dependencies and the error envelope."""
