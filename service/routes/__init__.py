"""The HTTP routes, one module per resource; ``common`` holds their shared dependencies."""
