"""Built-in export plugin (work in progress: registers nothing yet)."""
