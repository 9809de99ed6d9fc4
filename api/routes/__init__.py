"""One APIRouter per resource. Routes are thin: parse, call a service, shape the response."""
