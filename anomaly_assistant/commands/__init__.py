"""The `inspect` and `chat` commands, the one config parser, and what every command shares at run time."""
