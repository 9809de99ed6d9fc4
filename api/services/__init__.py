"""Business logic the routes call. Each function takes the session explicitly; nothing here imports FastAPI."""
