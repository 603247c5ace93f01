"""Built-in structured plugin (work in progress: registers nothing yet)."""
