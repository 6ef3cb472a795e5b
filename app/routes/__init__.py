"""HTTP routes, one module per resource; each route only translates between HTTP and plain functions."""
