"""Lua scripts that must run atomically inside Redis, loaded from the `.lua` files beside
this module so they can be read (and syntax-highlighted) on their own."""

from importlib.resources import files

RECORD = (files(__package__) / "record.lua").read_text()
BATCH_STATUS = (files(__package__) / "batch_status.lua").read_text()
TOKEN_BUCKET = (files(__package__) / "token_bucket.lua").read_text()
