"""The jobwire web server: a Starlette app that fans job events out to clients."""
